//! Builds the gRPC request message of a route from the HTTP request: the
//! body, then the path variables, then the query string, refusing anything
//! that does not map to exactly one request field.

use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, Value};

use crate::{
    error::HttpError,
    json,
    routes::{BodyRule, FieldPath, Route},
};

/// The request message of `route` from its bound path variables, query
/// string and body.
pub(crate) fn request_message(
    route: &Route,
    bound: &[(&FieldPath, String)],
    query: Option<&str>,
    body: &[u8],
) -> Result<DynamicMessage, HttpError> {
    let input = route.method.input();
    let has_body = !body.iter().all(u8::is_ascii_whitespace);
    let mut message = match &route.body {
        BodyRule::None if has_body => {
            return Err(HttpError::invalid(format!(
                "{} {} takes no request body",
                route.verb, route.template
            )));
        }
        BodyRule::None => DynamicMessage::new(input.clone()),
        BodyRule::Whole if !has_body => DynamicMessage::new(input.clone()),
        BodyRule::Whole => json::from_json_bytes(input.clone(), body, "").map_err(HttpError::invalid)?,
        BodyRule::Field(field) => {
            let Kind::Message(part) = field.kind() else {
                return Err(HttpError::invalid("the body field is not a message"));
            };
            if !has_body {
                return Err(HttpError::invalid(format!(
                    "the request body must be a JSON `{}` object",
                    part.name()
                )));
            }
            let value = json::from_json_bytes(part, body, field.json_name()).map_err(HttpError::invalid)?;
            let mut message = DynamicMessage::new(input.clone());
            message.set_field(field, Value::Message(value));
            message
        }
    };

    for (path, raw) in bound {
        let value =
            scalar(path.leaf(), raw).map_err(|e| HttpError::invalid(format!("path segment for `{path}`: {e}")))?;
        if let Some(existing) = path.get(&message)
            && existing != Value::default_value_for_field(path.leaf())
            && existing != value
        {
            return Err(HttpError::invalid(format!(
                "`{path}` is {raw:?} in the path but differs in the body"
            )));
        }
        path.set(&mut message, value);
    }

    if let Some(query) = query.filter(|q| !q.is_empty()) {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
            .map_err(|e| HttpError::invalid(format!("the query string does not parse: {e}")))?;
        for (key, raw) in pairs {
            let (parents, leaf) = resolve_query(&input, &key)?;
            let path = FieldPath { fields: parents };
            if route.variables().any(|v| v.overlaps(&path_with(&path, &leaf)))
                || matches!(&route.body, BodyRule::Whole)
                || matches!(&route.body, BodyRule::Field(f) if path.fields.first().unwrap_or(&leaf) == f)
            {
                return Err(HttpError::invalid(format!(
                    "query parameter `{key}` sets a field that the path or body carries"
                )));
            }
            let value = scalar(&leaf, &raw).map_err(|e| HttpError::invalid(format!("query parameter `{key}`: {e}")))?;
            let Some(target) = descend(&mut message, &path.fields) else {
                return Err(HttpError::invalid(format!("query parameter `{key}` is not a field")));
            };
            if leaf.is_list() {
                if let Value::List(items) = target.get_field_mut(&leaf) {
                    items.push(value);
                }
            } else {
                target.set_field(&leaf, value);
            }
        }
    }
    Ok(message)
}

fn path_with(parents: &FieldPath, leaf: &FieldDescriptor) -> FieldPath {
    let mut fields = parents.fields.clone();
    fields.push(leaf.clone());
    FieldPath { fields }
}

/// The message at `fields` inside `message`, created if unset.
fn descend<'a>(message: &'a mut DynamicMessage, fields: &[FieldDescriptor]) -> Option<&'a mut DynamicMessage> {
    match fields.split_first() {
        None => Some(message),
        Some((first, rest)) => match message.get_field_mut(first) {
            Value::Message(child) => descend(child, rest),
            _ => None,
        },
    }
}

/// Resolves a query parameter name (JSON or proto names, dotted for nested
/// fields) to its parent fields and leaf field.
fn resolve_query(input: &MessageDescriptor, key: &str) -> Result<(Vec<FieldDescriptor>, FieldDescriptor), HttpError> {
    let unknown = || HttpError::invalid(format!("unknown query parameter `{key}`"));
    let mut parents = Vec::new();
    let mut current = input.clone();
    let mut names = key.split('.').peekable();
    while let Some(name) = names.next() {
        let field = current
            .get_field_by_json_name(name)
            .or_else(|| current.get_field_by_name(name))
            .ok_or_else(unknown)?;
        if names.peek().is_none() {
            if field.is_map() {
                return Err(HttpError::invalid(format!("query parameter `{key}` is a map")));
            }
            return Ok((parents, field));
        }
        match field.kind() {
            Kind::Message(next) if !field.is_list() && !field.is_map() => {
                current = next;
                parents.push(field);
            }
            _ => return Err(unknown()),
        }
    }
    Err(unknown())
}

/// Parses one URL value for `field` (a scalar, an enum by name or number,
/// or a well-known type in its JSON string form).
fn scalar(field: &FieldDescriptor, raw: &str) -> Result<Value, String> {
    fn parse<T: std::str::FromStr>(raw: &str, what: &str) -> Result<T, String> {
        raw.parse().map_err(|_| format!("{raw:?} is not {what}"))
    }
    Ok(match field.kind() {
        Kind::String => Value::String(raw.to_owned()),
        Kind::Bool => Value::Bool(parse(raw, "true or false")?),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(parse(raw, "a 32-bit integer")?),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(parse(raw, "a 64-bit integer")?),
        Kind::Uint32 | Kind::Fixed32 => Value::U32(parse(raw, "an unsigned 32-bit integer")?),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(parse(raw, "an unsigned 64-bit integer")?),
        Kind::Float => Value::F32(parse(raw, "a number")?),
        Kind::Double => Value::F64(parse(raw, "a number")?),
        Kind::Bytes => return Err("bytes fields cannot be given in a URL".into()),
        Kind::Enum(enumeration) => {
            let value = enumeration
                .get_value_by_name(raw)
                .or_else(|| raw.parse().ok().and_then(|n| enumeration.get_value(n)))
                .ok_or_else(|| {
                    let names: Vec<_> = enumeration.values().map(|v| v.name().to_owned()).collect();
                    format!("{raw:?} is not one of {}", names.join(", "))
                })?;
            Value::EnumNumber(value.number())
        }
        Kind::Message(message) => Value::Message(
            json::from_json_value(message, serde_json::Value::String(raw.to_owned()), "").map_err(|e| {
                format!(
                    "{raw:?} is not a valid {}: {e}",
                    field.kind().as_message().map_or("", |m| m.name())
                )
            })?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use http::Method;
    use prost_reflect::DescriptorPool;

    use super::*;
    use crate::routes;

    fn route(verb: Method, template: &str) -> Route {
        let pool = DescriptorPool::decode(lightbox_api::FILE_DESCRIPTOR_SET).expect("descriptors decode");
        routes::routes(&pool)
            .expect("routes")
            .into_iter()
            .find(|r| r.verb == verb && r.template == template)
            .expect("the route exists")
    }

    fn build(route: &Route, path: &[&str], query: Option<&str>, body: &str) -> Result<serde_json::Value, HttpError> {
        let bound = route.matches(path).expect("the path matches");
        let message = request_message(route, &bound, query, body.as_bytes())?;
        Ok(json::to_json(&message).expect("maps to JSON"))
    }

    #[test]
    fn query_parameters_fill_the_other_fields() {
        let list = route(Method::GET, "/v1/users/{user_id}/photos");
        let json = build(
            &list,
            &["v1", "users", "u1", "photos"],
            Some("consistency=CONSISTENCY_FRESH&page_size=5&minUsersRevision=7&maxStaleness=1.5s"),
            "",
        )
        .expect("valid");
        assert_eq!(json["userId"], "u1");
        assert_eq!(json["consistency"], "CONSISTENCY_FRESH");
        assert_eq!(json["pageSize"], 5);
        assert_eq!(json["minUsersRevision"], "7");
        assert_eq!(json["maxStaleness"], "1.500s");
    }

    #[test]
    fn bad_query_parameters_say_which_and_why() {
        let list = route(Method::GET, "/v1/users/{user_id}/photos");
        let path = ["v1", "users", "u1", "photos"];
        for (query, expected) in [
            ("colour=red", "unknown query parameter `colour`"),
            ("pageSize=many", "`pageSize`"),
            ("consistency=SOMETIMES", "CONSISTENCY_CACHED"),
            ("userId=u2", "path or body"),
        ] {
            let err = build(&list, &path, Some(query), "").expect_err(query);
            assert_eq!(err.code, tonic::Code::InvalidArgument);
            assert!(err.message.contains(expected), "{query}: {}", err.message);
        }
        let err = build(&list, &path, None, "{}").expect_err("a GET takes no body");
        assert!(err.message.contains("no request body"), "{}", err.message);
    }

    #[test]
    fn the_body_fills_its_field_and_the_path_must_agree() {
        let create = route(Method::POST, "/v1/users/{photo.user_id}/photos");
        let path = ["v1", "users", "u1", "photos"];
        let json = build(&create, &path, None, r#"{"title": "Sea", "sizeBytes": "10"}"#).expect("valid");
        assert_eq!(json["photo"]["userId"], "u1", "the path fills the nested field");
        assert_eq!(json["photo"]["title"], "Sea");
        let err = build(&create, &path, None, r#"{"userId": "u2"}"#).expect_err("conflict");
        assert!(err.message.contains("photo.userId"), "{}", err.message);
        let err = build(&create, &path, None, r#"{"title": 5}"#).expect_err("wrong type");
        assert!(err.message.contains("photo.title"), "{}", err.message);
        let err = build(&create, &path, None, "").expect_err("empty body");
        assert!(err.message.contains("Photo"), "{}", err.message);
    }
}
