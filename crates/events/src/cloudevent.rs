//! CloudEvents 1.0 and their HTTP protocol binding (binary and structured
//! content modes), written here rather than taken from `cloudevents-sdk`
//! (0.9 pins reqwest 0.12 and sends binary-mode header values without the
//! percent-encoding the binding requires).
//!
//! Binary mode: every attribute but `datacontenttype` in a `ce-` header,
//! its value percent-encoded as the binding's section 3.1.3.2 says (space,
//! `"`, `%` and everything outside U+0021..U+007E, as UTF-8 bytes, `%XY`
//! upper-case); `datacontenttype` as `Content-Type`; the data as the body.
//! Structured mode: the JSON event format, `application/cloudevents+json`.
//! Decoding (for functions and tests) accepts both, unquotes RFC 7230
//! quoted strings, percent-decodes once and refuses invalid UTF-8.

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue, header::CONTENT_TYPE};
use serde_json::{Map, Value};

/// The media type of a structured-mode request (the JSON event format).
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json; charset=utf-8";

/// The CloudEvents version written.
pub const SPEC_VERSION: &str = "1.0";

/// A CloudEvent: its context attributes and its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudEvent {
    /// `id`: unique within `source`; a redelivery keeps it.
    pub id: String,
    /// `source`: a URI reference naming the event's producer.
    pub source: String,
    /// `type`, such as `dev.lightbox.contract.updated`.
    pub event_type: String,
    /// `subject`: the entity's id.
    pub subject: Option<String>,
    /// `time`, RFC 3339.
    pub time: Option<String>,
    /// `datacontenttype`, such as `application/json`.
    pub datacontenttype: Option<String>,
    /// Extension attributes (`sequence`, `traceparent`), by name, as their
    /// canonical strings.
    pub extensions: BTreeMap<String, String>,
    /// The data, as bytes (JSON text for `application/json`).
    pub data: Option<Vec<u8>>,
}

/// The two ways to lay an event out in an HTTP request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Attributes in `ce-` headers, data as the body.
    Binary,
    /// The whole event as a JSON document.
    Structured,
}

/// An HTTP message that is not a CloudEvent this binding can read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BindingError {
    /// A required attribute is missing.
    #[error("the CloudEvent has no {0:?} attribute")]
    Missing(&'static str),
    /// A header value does not decode (bad escape, invalid UTF-8).
    #[error("header {name}: {reason}")]
    Header {
        /// The header.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The structured body is not a JSON event.
    #[error("the structured event does not parse: {0}")]
    Json(String),
    /// The specversion is not 1.0.
    #[error("specversion {0:?} is not supported (1.0 is)")]
    Version(String),
}

/// Percent-encodes a header value as the HTTP binding requires.
pub fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if (0x21..=0x7e).contains(&byte) && byte != b'"' && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Decodes a header value: RFC 7230 quoted strings unquoted, then one round
/// of percent-decoding (either case), refusing invalid UTF-8.
pub fn percent_decode(value: &str) -> Result<String, String> {
    let unquoted = unquote(value)?;
    let raw = unquoted.as_bytes();
    let mut bytes = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let hex = raw.get(i + 1..i + 3).ok_or("a truncated percent escape")?;
            let text = std::str::from_utf8(hex).map_err(|_| "a bad percent escape")?;
            bytes.push(u8::from_str_radix(text, 16).map_err(|_| format!("bad percent escape %{text}"))?);
            i += 3;
        } else {
            bytes.push(raw[i]);
            i += 1;
        }
    }
    String::from_utf8(bytes).map_err(|_| "the decoded bytes are not UTF-8".to_owned())
}

/// Unescapes the double-quoted parts of a header value (RFC 7230 3.2.6).
fn unquote(value: &str) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.trim().chars();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (_, '"') => quoted = !quoted,
            (true, '\\') => out.push(chars.next().ok_or("a dangling backslash in a quoted string")?),
            (_, c) => out.push(c),
        }
    }
    if quoted {
        return Err("an unterminated quoted string".into());
    }
    Ok(out)
}

impl CloudEvent {
    /// Every attribute but the data, by name, as canonical strings.
    fn attributes(&self) -> Vec<(&str, &str)> {
        let mut attributes = vec![
            ("specversion", SPEC_VERSION),
            ("id", self.id.as_str()),
            ("source", self.source.as_str()),
            ("type", self.event_type.as_str()),
        ];
        for (name, value) in [
            ("subject", &self.subject),
            ("time", &self.time),
            ("datacontenttype", &self.datacontenttype),
        ] {
            if let Some(value) = value {
                attributes.push((name, value.as_str()));
            }
        }
        attributes.extend(self.extensions.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        attributes
    }

    /// The headers and body of an HTTP request carrying this event in `mode`.
    pub fn to_http(&self, mode: Mode) -> Result<(HeaderMap, Vec<u8>), BindingError> {
        let mut headers = HeaderMap::new();
        match mode {
            Mode::Binary => {
                for (name, value) in self.attributes() {
                    if name == "datacontenttype" {
                        continue;
                    }
                    let header = HeaderName::try_from(format!("ce-{name}")).map_err(|e| BindingError::Header {
                        name: name.to_owned(),
                        reason: e.to_string(),
                    })?;
                    // Percent-encoded: printable ASCII only, always a valid value.
                    let value = HeaderValue::try_from(percent_encode(value)).map_err(|e| BindingError::Header {
                        name: name.to_owned(),
                        reason: e.to_string(),
                    })?;
                    headers.insert(header, value);
                }
                if let Some(content_type) = &self.datacontenttype {
                    let value = HeaderValue::try_from(content_type.as_str()).map_err(|e| BindingError::Header {
                        name: "content-type".into(),
                        reason: e.to_string(),
                    })?;
                    headers.insert(CONTENT_TYPE, value);
                }
                Ok((headers, self.data.clone().unwrap_or_default()))
            }
            Mode::Structured => {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static(STRUCTURED_CONTENT_TYPE));
                let body = serde_json::to_vec(&self.to_json()).map_err(|e| BindingError::Json(e.to_string()))?;
                Ok((headers, body))
            }
        }
    }

    /// The event in the JSON event format.
    pub fn to_json(&self) -> Value {
        let mut object: Map<String, Value> = self
            .attributes()
            .into_iter()
            .map(|(name, value)| (name.to_owned(), Value::String(value.to_owned())))
            .collect();
        if let Some(data) = &self.data {
            let json = self.datacontenttype.as_deref().is_none_or(is_json);
            match serde_json::from_slice::<Value>(data) {
                Ok(value) if json => {
                    object.insert("data".into(), value);
                }
                _ => {
                    use base64::Engine as _;
                    let encoded = base64::engine::general_purpose::STANDARD.encode(data);
                    object.insert("data_base64".into(), Value::String(encoded));
                }
            }
        }
        Value::Object(object)
    }

    /// Reads an event from an HTTP request, in either mode (structured when
    /// the content type is `application/cloudevents+json`).
    pub fn from_http(headers: &HeaderMap, body: &[u8]) -> Result<CloudEvent, BindingError> {
        let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        if content_type
            .to_ascii_lowercase()
            .starts_with("application/cloudevents+json")
        {
            let value: Value = serde_json::from_slice(body).map_err(|e| BindingError::Json(e.to_string()))?;
            return CloudEvent::from_json(value);
        }
        let mut attributes = BTreeMap::new();
        for (name, value) in headers {
            let Some(attribute) = name.as_str().strip_prefix("ce-") else {
                continue;
            };
            let text = value
                .to_str()
                .map_err(|_| header_error(name.as_str(), "not visible ASCII"))?;
            let decoded = percent_decode(text).map_err(|reason| header_error(name.as_str(), &reason))?;
            attributes.insert(attribute.to_owned(), decoded);
        }
        if !content_type.is_empty() {
            attributes.insert("datacontenttype".into(), content_type.to_owned());
        }
        CloudEvent::from_attributes(attributes, (!body.is_empty()).then(|| body.to_vec()))
    }

    /// Reads an event in the JSON event format.
    pub fn from_json(value: Value) -> Result<CloudEvent, BindingError> {
        let Value::Object(object) = value else {
            return Err(BindingError::Json("not a JSON object".into()));
        };
        let mut attributes = BTreeMap::new();
        let mut data = None;
        for (name, value) in object {
            match (name.as_str(), value) {
                ("data", value) => {
                    data = Some(serde_json::to_vec(&value).map_err(|e| BindingError::Json(e.to_string()))?);
                }
                ("data_base64", Value::String(text)) => {
                    use base64::Engine as _;
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(text)
                        .map_err(|e| BindingError::Json(format!("data_base64: {e}")))?;
                    data = Some(bytes);
                }
                (_, Value::String(text)) => {
                    attributes.insert(name, text);
                }
                (_, Value::Null) => {}
                // Integer and boolean extensions: their canonical strings.
                (_, other @ (Value::Number(_) | Value::Bool(_))) => {
                    attributes.insert(name, other.to_string());
                }
                (_, _) => return Err(BindingError::Json(format!("attribute {name:?} is not a scalar"))),
            }
        }
        CloudEvent::from_attributes(attributes, data)
    }

    fn from_attributes(
        mut attributes: BTreeMap<String, String>,
        data: Option<Vec<u8>>,
    ) -> Result<CloudEvent, BindingError> {
        let version = attributes
            .remove("specversion")
            .ok_or(BindingError::Missing("specversion"))?;
        if version != SPEC_VERSION {
            return Err(BindingError::Version(version));
        }
        Ok(CloudEvent {
            id: attributes.remove("id").ok_or(BindingError::Missing("id"))?,
            source: attributes.remove("source").ok_or(BindingError::Missing("source"))?,
            event_type: attributes.remove("type").ok_or(BindingError::Missing("type"))?,
            subject: attributes.remove("subject"),
            time: attributes.remove("time"),
            datacontenttype: attributes.remove("datacontenttype"),
            extensions: attributes,
            data,
        })
    }
}

fn header_error(name: &str, reason: &str) -> BindingError {
    BindingError::Header {
        name: name.to_owned(),
        reason: reason.to_owned(),
    }
}

/// Whether a media type is JSON (`application/json`, `…+json`, `text/json`).
fn is_json(media_type: &str) -> bool {
    let essence = media_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binding_example_encodes_as_the_spec_says() {
        // HTTP protocol binding 1.0.2, section 3.1.3.2.
        assert_eq!(percent_encode("Euro € 😀"), "Euro%20%E2%82%AC%20%F0%9F%98%80");
        assert_eq!(
            percent_decode("Euro%20%E2%82%AC%20%F0%9F%98%80").as_deref(),
            Ok("Euro € 😀")
        );
    }

    #[test]
    fn decoding_accepts_lower_case_quoted_and_needless_escapes() {
        assert_eq!(percent_decode("%e2%82%ac").as_deref(), Ok("€"));
        assert_eq!(percent_decode("\"a b\"").as_deref(), Ok("a b"));
        assert_eq!(percent_decode("\"say \\\"hi\\\"\"").as_deref(), Ok("say \"hi\""));
        assert_eq!(percent_decode("%41BC").as_deref(), Ok("ABC"));
    }

    #[test]
    fn decoding_refuses_invalid_utf8_and_bad_escapes() {
        // The spec's example: an overlong encoding of U+0020.
        assert!(percent_decode("%C0%A0").is_err());
        assert!(percent_decode("%4").is_err());
        assert!(percent_decode("%zz").is_err());
        assert!(percent_decode("\"open").is_err());
    }

    #[test]
    fn quotes_percent_and_controls_are_encoded() {
        assert_eq!(percent_encode("a\"b%c\td"), "a%22b%25c%09d");
        assert_eq!(percent_encode("/mycontext/subcontext"), "/mycontext/subcontext");
    }

    #[test]
    fn is_json_reads_the_essence() {
        assert!(is_json("application/json; charset=utf-8"));
        assert!(is_json("application/cloudevents+json"));
        assert!(!is_json("text/plain"));
    }
}
