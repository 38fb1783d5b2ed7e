//! Refusing a request body that gives one field twice: the same key twice in
//! an object (JSON leaves its meaning undefined; most parsers keep the last),
//! or one field under both its names (`contentType` and `content_type`, both
//! accepted by the proto3 JSON mapping). Either would make the gateway pick
//! one of two values silently; it answers 400 naming the field instead.
//!
//! One pass over the body before it is read into the request message,
//! walking the message's descriptor alongside the JSON so that nested
//! messages and lists of them are checked too. Objects that are not messages
//! (maps, `google.protobuf.Struct`) are checked for repeated keys only.

use std::{collections::HashSet, fmt};

use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

/// Checks that no field of a `desc` message is given twice in `bytes`
/// (JSON), naming fields from `prefix` (the request field the body fills,
/// if not the whole request). Malformed JSON passes: the reader that
/// follows says what is wrong with it.
pub(crate) fn check(desc: &MessageDescriptor, bytes: &[u8], prefix: &str) -> Result<(), String> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let root = At::Root(prefix);
    match (Unique {
        message: Some(desc.clone()),
        at: &root,
    })
    .deserialize(&mut deserializer)
    {
        Ok(()) => Ok(()),
        Err(err) if err.is_data() => Err(err.to_string()),
        Err(_) => Ok(()),
    }
}

/// Where a value is in the body: a chain of borrowed steps back to the
/// root, spelled out (`photo.tags[2]`) only for an error. A path built for
/// every value instead would copy a long key once per element under it:
/// quadratic in the body, which a client controls.
enum At<'a> {
    /// The body itself, as the request field it fills (empty: the request).
    Root(&'a str),
    /// The value of a key of an object.
    Key(&'a At<'a>, &'a str),
    /// An element of a list.
    Index(&'a At<'a>, usize),
}

impl fmt::Display for At<'_> {
    // Recursive, as deep as the body nests: serde_json stops at 128 levels.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            At::Root(prefix) => f.write_str(prefix),
            At::Key(At::Root(""), key) => f.write_str(key),
            At::Key(parent, key) => write!(f, "{parent}.{key}"),
            At::Index(parent, index) => write!(f, "{parent}[{index}]"),
        }
    }
}

/// One JSON value being walked: the message it stands for, if it is one,
/// and where it is in the body (for the error).
struct Unique<'a> {
    message: Option<MessageDescriptor>,
    at: &'a At<'a>,
}

/// What a value of `field` is walked as: a message's fields, or plain JSON.
fn message_of(field: &FieldDescriptor) -> Option<MessageDescriptor> {
    match field.kind() {
        Kind::Message(message) if !field.is_map() => Some(message),
        _ => None,
    }
}

impl<'de> DeserializeSeed<'de> for Unique<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Unique<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // A field is one field by number, whichever of its names is used.
        let mut seen: HashSet<Result<u32, String>> = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let field = self
                .message
                .as_ref()
                .and_then(|m| m.get_field_by_json_name(&key).or_else(|| m.get_field_by_name(&key)));
            let identity = field.as_ref().map(FieldDescriptor::number).ok_or_else(|| key.clone());
            if !seen.insert(identity) {
                let what = match &field {
                    Some(field) if key != field.json_name() || key != field.name() => format!(
                        "`{}` is given twice (as `{}` and `{}` are one field); give it once",
                        At::Key(self.at, field.json_name()),
                        field.json_name(),
                        field.name()
                    ),
                    _ => format!("`{}` is given twice; give it once", At::Key(self.at, &key)),
                };
                return Err(de::Error::custom(what));
            }
            let here = At::Key(self.at, field.as_ref().map_or(key.as_str(), FieldDescriptor::json_name));
            map.next_value_seed(Unique {
                message: field.as_ref().and_then(message_of),
                at: &here,
            })?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0;
        loop {
            let here = At::Index(self.at, index);
            let element = Unique {
                message: self.message.clone(),
                at: &here,
            };
            if seq.next_element_seed(element)?.is_none() {
                break;
            }
            index += 1;
        }
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn photo_request() -> MessageDescriptor {
        crate::descriptors()
            .ok()
            .and_then(|pool| pool.get_message_by_name("lightbox.photos.v1.CreatePhotoRequest"))
            .expect("CreatePhotoRequest is described")
    }

    #[test]
    fn one_field_given_twice_is_refused_naming_it() {
        let desc = photo_request();
        let twice = |body: &str| check(&desc, body.as_bytes(), "");
        assert!(twice(r#"{"photo": {"title": "a", "contentType": "image/png"}}"#).is_ok());
        let err = twice(r#"{"photo": {"title": "a", "title": "b"}}"#).expect_err("same key twice");
        assert!(err.contains("`photo.title` is given twice"), "{err}");
        let err = twice(r#"{"photo": {"contentType": "image/png", "content_type": "image/jpeg"}}"#)
            .expect_err("both spellings");
        assert!(
            err.contains("`photo.contentType` is given twice") && err.contains("content_type"),
            "{err}"
        );
        let err = twice(r#"{"photo": {}, "photo": {}}"#).expect_err("a message twice");
        assert!(err.contains("`photo` is given twice"), "{err}");
        // Named from the field the body fills.
        let photo = desc
            .get_field_by_name("photo")
            .and_then(|f| f.kind().as_message().cloned());
        let err = check(&photo.expect("Photo"), br#"{"title": "a", "title": "b"}"#, "photo").expect_err("twice");
        assert!(err.contains("`photo.title` is given twice"), "{err}");
        // Inside lists and objects that are no field, named by position.
        let err = twice(r#"{"photo": {}, "x": [{}, {"y": 1, "y": 2}]}"#).expect_err("nested twice");
        assert!(err.contains("`x[1].y` is given twice"), "{err}");
        // Not JSON at all: left to the reader, which says what is wrong.
        assert!(twice("{not json").is_ok());
    }
}
