//! The HTTP routes, read from the `google.api.http` annotations of the
//! services in the descriptor set: one table that both the request
//! dispatcher and the OpenAPI document are built from.
//!
//! Supported rule features: `get`, `put`, `post`, `delete`, `patch` and
//! `custom` verbs; path templates of literal segments and single-segment
//! variables (`{user_id}`, `{photo.user_id}`); `body` of `*`, a message
//! field, or none; `response_body`; `additional_bindings`. Multi-segment
//! variables (`{name=users/*}`, `**`) and `:verb` suffixes are refused when
//! the table is built, so an unsupported annotation fails at start, not on
//! a request.

use std::fmt;

use http::{Method, uri::PathAndQuery};
use prost_reflect::{DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MethodDescriptor, Value};

/// One step of a path template.
#[derive(Debug, Clone)]
pub enum Segment {
    /// A literal segment, matched exactly.
    Literal(String),
    /// A variable: one non-empty segment, bound to a (possibly nested)
    /// request field.
    Variable(FieldPath),
}

/// A matched path's variables: each field and its percent-decoded value,
/// in template order.
pub type Bindings<'a> = Vec<(&'a FieldPath, String)>;

/// A dotted path to a request field, such as `photo.user_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath {
    /// The fields from the request message down, each a singular field of
    /// the previous one's message.
    pub fields: Vec<FieldDescriptor>,
}

impl FieldPath {
    /// Resolves `path` (proto field names, dot-separated) in `message`.
    fn resolve(message: &prost_reflect::MessageDescriptor, path: &str) -> Result<FieldPath, String> {
        let mut fields = Vec::new();
        let mut current = message.clone();
        for (i, name) in path.split('.').enumerate() {
            if i > 0 {
                let Some(Kind::Message(next)) = fields.last().map(FieldDescriptor::kind) else {
                    return Err(format!("`{path}`: `{name}` follows a field that is not a message"));
                };
                current = next;
            }
            let field = current
                .get_field_by_name(name)
                .or_else(|| current.get_field_by_json_name(name))
                .ok_or_else(|| format!("`{path}`: {} has no field `{name}`", current.full_name()))?;
            if field.is_list() || field.is_map() {
                return Err(format!("`{path}`: `{name}` is repeated"));
            }
            fields.push(field);
        }
        Ok(FieldPath { fields })
    }

    /// The last field of the path.
    pub fn leaf(&self) -> &FieldDescriptor {
        // A path is never empty: `resolve` fails on an empty name.
        &self.fields[self.fields.len() - 1]
    }

    /// The path in proto field names (`photo.user_id`).
    pub fn proto_name(&self) -> String {
        self.fields
            .iter()
            .map(FieldDescriptor::name)
            .collect::<Vec<_>>()
            .join(".")
    }

    /// The path in JSON names (`photo.userId`), as errors and query
    /// parameters spell it.
    pub fn json_name(&self) -> String {
        self.fields
            .iter()
            .map(FieldDescriptor::json_name)
            .collect::<Vec<_>>()
            .join(".")
    }

    /// Whether `self` and `other` name the same field or one contains the
    /// other.
    pub fn overlaps(&self, other: &FieldPath) -> bool {
        self.fields.iter().zip(&other.fields).all(|(a, b)| a == b)
    }

    /// The value at this path in `message`, if every message on the way is
    /// set.
    pub fn get(&self, message: &DynamicMessage) -> Option<Value> {
        let mut current = message.clone();
        for (i, field) in self.fields.iter().enumerate() {
            if !current.has_field(field) {
                return None;
            }
            let value = current.get_field(field).into_owned();
            if i + 1 == self.fields.len() {
                return Some(value);
            }
            current = value.as_message()?.clone();
        }
        None
    }

    /// Sets the value at this path in `message`, creating the messages on
    /// the way.
    pub fn set(&self, message: &mut DynamicMessage, value: Value) {
        let (leaf, parents) = match self.fields.split_last() {
            Some(split) => split,
            None => return,
        };
        let mut current = message;
        for field in parents {
            let slot = current.get_field_mut(field);
            // `resolve` checked that every parent is a singular message.
            let Value::Message(child) = slot else { return };
            current = child;
        }
        current.set_field(leaf, value);
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.json_name())
    }
}

/// What the HTTP body fills.
#[derive(Debug, Clone)]
pub enum BodyRule {
    /// No body is accepted.
    None,
    /// The body is the whole request message.
    Whole,
    /// The body is this message field of the request.
    Field(FieldDescriptor),
}

/// One HTTP route of one RPC method.
#[derive(Debug, Clone)]
pub struct Route {
    /// The HTTP verb.
    pub verb: Method,
    /// The path template as written in the annotation.
    pub template: String,
    /// The template's segments.
    pub segments: Vec<Segment>,
    /// What the body fills.
    pub body: BodyRule,
    /// The response field returned as the body, if not the whole response.
    pub response_body: Option<FieldDescriptor>,
    /// The RPC method.
    pub method: MethodDescriptor,
    /// The method's gRPC path (`/package.Service/Method`).
    pub grpc_path: PathAndQuery,
    /// The variable naming the user the route acts for: the one right after
    /// a literal `users` segment. Every route has one; the gateway checks it
    /// against the signed-in user.
    pub owner: FieldPath,
    /// Whether the body can carry raw bytes (a `bytes` field, at any
    /// depth: an uploaded image), which gets the upload limits.
    pub uploads: bool,
}

impl Route {
    /// The variables of the template, in order.
    pub fn variables(&self) -> impl Iterator<Item = &FieldPath> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Variable(v) => Some(v),
            Segment::Literal(_) => None,
        })
    }

    /// Matches a request path (already split into raw segments) and returns
    /// the variables' percent-decoded values, in template order.
    pub fn matches<'a>(&'a self, path: &[&str]) -> Option<Bindings<'a>> {
        if path.len() != self.segments.len() {
            return None;
        }
        let mut bound = Vec::new();
        for (segment, raw) in self.segments.iter().zip(path) {
            match segment {
                Segment::Literal(literal) if literal == raw => {}
                Segment::Literal(_) => return None,
                Segment::Variable(field) => {
                    let value = percent_decode(raw)?;
                    if value.is_empty() {
                        return None;
                    }
                    bound.push((field, value));
                }
            }
        }
        Some(bound)
    }
}

/// Decodes `%XX` escapes in a path segment; `None` if they are malformed or
/// the result is not UTF-8.
fn percent_decode(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = raw.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The gRPC path of `method` (`/package.Service/Method`).
pub fn grpc_path(method: &MethodDescriptor) -> Result<PathAndQuery, String> {
    let path = format!("/{}/{}", method.parent_service().full_name(), method.name());
    PathAndQuery::try_from(path).map_err(|e| format!("{}: bad method path: {e}", method.full_name()))
}

/// Reads every `google.api.http` annotation of the Lightbox services
/// (package `lightbox.…`) in `pool`.
pub fn routes(pool: &DescriptorPool) -> Result<Vec<Route>, String> {
    let extension = pool
        .get_extension_by_name("google.api.http")
        .ok_or("the descriptors lack google/api/annotations.proto")?;
    let mut routes = Vec::new();
    for service in pool.services() {
        if !service.full_name().starts_with("lightbox.") {
            continue;
        }
        for method in service.methods() {
            let options = method.options();
            if !options.has_extension(&extension) {
                continue;
            }
            let rule = options.get_extension(&extension);
            let Some(rule) = rule.as_message() else { continue };
            let context = |e: String| format!("{}: {e}", method.full_name());
            routes.push(route(&method, rule).map_err(context)?);
            if let Some(more) = rule.get_field_by_name("additional_bindings")
                && let Some(list) = more.as_list()
            {
                for binding in list.iter().filter_map(Value::as_message) {
                    routes.push(route(&method, binding).map_err(context)?);
                }
            }
        }
    }
    Ok(routes)
}

fn text(rule: &DynamicMessage, name: &str) -> String {
    rule.get_field_by_name(name)
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn route(method: &MethodDescriptor, rule: &DynamicMessage) -> Result<Route, String> {
    if method.is_client_streaming() || method.is_server_streaming() {
        return Err("streaming methods have no HTTP route here (the events route serves watches)".into());
    }
    let mut pattern = None;
    for (name, verb) in [
        ("get", Method::GET),
        ("put", Method::PUT),
        ("post", Method::POST),
        ("delete", Method::DELETE),
        ("patch", Method::PATCH),
    ] {
        let template = text(rule, name);
        if !template.is_empty() {
            pattern = Some((verb, template));
        }
    }
    if let Some(custom) = rule.get_field_by_name("custom")
        && let Some(custom) = custom.as_message()
        && rule.has_field_by_name("custom")
    {
        let verb = Method::from_bytes(text(custom, "kind").as_bytes()).map_err(|e| format!("custom verb: {e}"))?;
        pattern = Some((verb, text(custom, "path")));
    }
    let (verb, template) = pattern.ok_or("the rule has no pattern")?;
    let request = method.input();
    let segments = parse_template(&request, &template)?;

    let body = match text(rule, "body").as_str() {
        "" => BodyRule::None,
        "*" => BodyRule::Whole,
        name => {
            let field = request
                .get_field_by_name(name)
                .ok_or_else(|| format!("body `{name}` is not a field of {}", request.full_name()))?;
            if !matches!(field.kind(), Kind::Message(_)) || field.is_list() || field.is_map() {
                return Err(format!("body `{name}` must be a singular message field"));
            }
            BodyRule::Field(field)
        }
    };
    let response_body = match text(rule, "response_body").as_str() {
        "" => None,
        name => Some(
            method
                .output()
                .get_field_by_name(name)
                .ok_or_else(|| format!("response_body `{name}` is not a field of the response"))?,
        ),
    };
    let owner = segments
        .windows(2)
        .find_map(|pair| match pair {
            [Segment::Literal(users), Segment::Variable(v)] if users == "users" => Some(v.clone()),
            _ => None,
        })
        .ok_or_else(|| format!("`{template}` names no user (`users/{{...}}`): every route acts for one user"))?;
    if owner.leaf().kind() != Kind::String {
        return Err(format!("`{template}`: the user variable must be a string field"));
    }
    let uploads = match &body {
        BodyRule::None => false,
        BodyRule::Whole => carries_bytes(&method.input(), &mut Vec::new()),
        BodyRule::Field(field) => match field.kind() {
            Kind::Message(message) => carries_bytes(&message, &mut Vec::new()),
            kind => kind == Kind::Bytes,
        },
    };
    Ok(Route {
        verb,
        template,
        segments,
        body,
        uploads,
        response_body,
        grpc_path: grpc_path(method)?,
        method: method.clone(),
        owner,
    })
}

/// Whether `message` has a `bytes` field, itself or in a message field at
/// any depth (`seen`: the messages already looked at, for recursive types).
fn carries_bytes(message: &prost_reflect::MessageDescriptor, seen: &mut Vec<String>) -> bool {
    if seen.iter().any(|name| name == message.full_name()) {
        return false;
    }
    seen.push(message.full_name().to_owned());
    message.fields().any(|field| match field.kind() {
        Kind::Bytes => true,
        Kind::Message(inner) => carries_bytes(&inner, seen),
        _ => false,
    })
}

fn parse_template(request: &prost_reflect::MessageDescriptor, template: &str) -> Result<Vec<Segment>, String> {
    let path = template
        .strip_prefix('/')
        .ok_or_else(|| format!("`{template}` does not start with `/`"))?;
    if template.contains(':') {
        return Err(format!("`{template}`: `:verb` suffixes are not supported"));
    }
    path.split('/')
        .map(|segment| {
            if let Some(inner) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                if inner.contains('=') {
                    return Err(format!("`{template}`: multi-segment variables are not supported"));
                }
                let field = FieldPath::resolve(request, inner)?;
                if matches!(field.leaf().kind(), Kind::Message(_)) {
                    return Err(format!("`{template}`: `{inner}` is a message, not a scalar"));
                }
                Ok(Segment::Variable(field))
            } else if segment.is_empty() || segment.contains(['{', '}', '*']) {
                Err(format!("`{template}`: segment `{segment}` is not supported"))
            } else {
                Ok(Segment::Literal(segment.to_owned()))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Vec<Route> {
        let pool = DescriptorPool::decode(lightbox_api::FILE_DESCRIPTOR_SET).expect("descriptors decode");
        routes(&pool).expect("the annotations are all supported")
    }

    #[test]
    fn the_photos_annotations_become_routes() {
        let table = table();
        let find = |verb: Method, template: &str| {
            table
                .iter()
                .find(|r| r.verb == verb && r.template == template)
                .unwrap_or_else(|| panic!("{verb} {template} is routed"))
        };
        let create = find(Method::POST, "/v1/users/{photo.user_id}/photos");
        assert_eq!(create.grpc_path, "/lightbox.photos.v1.PhotosService/CreatePhoto");
        assert_eq!(create.owner.proto_name(), "photo.user_id");
        assert!(matches!(&create.body, BodyRule::Field(f) if f.name() == "photo"));
        let get = find(Method::GET, "/v1/users/{user_id}/photos/{id}");
        let bound = get.matches(&["v1", "users", "me", "photos", "a%2Fb"]).expect("matches");
        assert_eq!(bound[1].1, "a/b", "variables are percent-decoded");
        assert!(get.matches(&["v1", "users", "me", "photos"]).is_none());
        find(Method::GET, "/v1/users/{user_id}");
        find(Method::GET, "/v1/users/{user_id}/photos");
        find(Method::DELETE, "/v1/users/{user_id}/photos/{id}");
    }

    #[test]
    fn unsupported_templates_are_refused_with_the_reason() {
        let pool = DescriptorPool::decode(lightbox_api::FILE_DESCRIPTOR_SET).expect("descriptors decode");
        let request = pool
            .get_message_by_name("lightbox.photos.v1.GetPhotoRequest")
            .expect("described");
        assert!(parse_template(&request, "/v1/{id=photos/*}").is_err());
        assert!(parse_template(&request, "/v1/photos/{id}:undelete").is_err());
        assert!(parse_template(&request, "/v1/photos/{nope}").is_err());
        assert!(parse_template(&request, "v1/photos").is_err());
    }
}
