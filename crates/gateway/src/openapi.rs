//! The OpenAPI 3 document of the gateway, generated from the route table
//! (and so from the protos' annotations and comments), never written by
//! hand. `lightbox openapi` prints it; `openapi/lightbox.json` is the
//! checked-in copy, which a test keeps equal to this output.

use std::collections::{BTreeMap, BTreeSet};

use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value, json};

use crate::routes::{BodyRule, FieldPath, Route, Segment};

/// The document for `routes` plus the events stream.
pub fn document(routes: &[Route]) -> Value {
    let mut schemas = Schemas::default();
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for route in routes {
        let operation = operation(route, &mut schemas);
        paths
            .entry(openapi_path(route))
            .or_default()
            .insert(route.verb.as_str().to_ascii_lowercase(), operation);
    }
    paths
        .entry(crate::events::PATH.to_owned())
        .or_default()
        .insert("get".into(), events_operation());

    let mut components = Map::new();
    let mut all = Map::new();
    while let Some(message) = schemas.pending.pop() {
        let schema = schemas.object(&message);
        all.insert(message.full_name().to_owned(), schema);
    }
    all.insert("Error".into(), error_schema());
    components.insert("schemas".into(), Value::Object(all));
    components.insert(
        "securitySchemes".into(),
        json!({ "bearer": { "type": "http", "scheme": "bearer", "bearerFormat": "JWT" } }),
    );
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Lightbox mobile API",
            "version": "v1",
            "description": "HTTP/JSON routes of the Lightbox gateway, generated from the google.api.http \
                annotations of the protos. Bodies use the proto3 JSON mapping (lowerCamelCase names, \
                64-bit integers as strings, RFC 3339 timestamps, enums by name). `me` in a path stands \
                for the signed-in user; a token may only act for its own subject.",
        },
        "security": [{ "bearer": [] }],
        "paths": paths,
        "components": components,
    })
}

/// The name of a path variable in the document: its field's own name
/// (`user_id` for `photo.user_id`), so that one path is written one way
/// whatever message the route fills (OpenAPI path parameters are plain
/// names; a dotted one breaks generated clients), unless two variables of
/// the route would then share it.
fn parameter_name(route: &Route, variable: &FieldPath) -> String {
    let leaf = variable.leaf().name();
    let shared = route.variables().filter(|other| other.leaf().name() == leaf).count() > 1;
    if shared {
        variable.proto_name().replace('.', "_")
    } else {
        leaf.to_owned()
    }
}

/// The route's path as the document writes it: `/v1/users/{user_id}/photos`.
fn openapi_path(route: &Route) -> String {
    let segments: Vec<String> = route
        .segments
        .iter()
        .map(|segment| match segment {
            Segment::Literal(literal) => literal.clone(),
            Segment::Variable(variable) => format!("{{{}}}", parameter_name(route, variable)),
        })
        .collect();
    format!("/{}", segments.join("/"))
}

fn operation(route: &Route, schemas: &mut Schemas) -> Value {
    let method = &route.method;
    let mut parameters = Vec::new();
    let mut bound = BTreeSet::new();
    for variable in route.variables() {
        bound.insert(variable.fields[0].name().to_owned());
        let mut schema = schemas.field(variable.leaf(), false);
        let mut description = comment(variable.leaf()).unwrap_or_default();
        if *variable == route.owner {
            description = format!("{description} `me` stands for the signed-in user.")
                .trim()
                .to_owned();
            if let Value::Object(fields) = &mut schema {
                fields.insert("example".into(), "me".into());
            }
        }
        if variable.fields.len() > 1 {
            description = format!("{description} Fills `{}` of the request.", variable.proto_name())
                .trim()
                .to_owned();
        }
        parameters.push(json!({
            "name": parameter_name(route, variable),
            "in": "path",
            "required": true,
            "description": description,
            "schema": schema,
        }));
    }
    let input = method.input();
    let mut request_body = Value::Null;
    match &route.body {
        BodyRule::None => {
            for field in input.fields().filter(|f| !bound.contains(f.name())) {
                if matches!(field.kind(), Kind::Message(m) if !is_string_form(&m)) || field.is_map() {
                    continue;
                }
                parameters.push(json!({
                    "name": field.json_name(),
                    "in": "query",
                    "required": false,
                    "description": comment(&field).unwrap_or_default(),
                    "schema": schemas.field(&field, true),
                }));
            }
        }
        BodyRule::Whole => request_body = body(schemas.reference(&input), true),
        BodyRule::Field(field) => {
            if let Kind::Message(part) = field.kind() {
                request_body = body(schemas.reference(&part), true);
            }
        }
    }
    let output = match &route.response_body {
        Some(field) => match field.kind() {
            Kind::Message(part) => part,
            _ => method.output(),
        },
        None => method.output(),
    };
    // Raw bytes (an image), not JSON: described as such.
    let content = match output.full_name() == crate::unary::HTTP_BODY {
        true => Some(json!({ "*/*": { "schema": { "type": "string", "format": "binary" } } })),
        false => body(schemas.reference(&output), false)["content"]
            .as_object()
            .cloned()
            .map(Value::Object),
    };
    let answer = content.map_or(
        json!({ "description": "OK" }),
        |content| json!({ "description": "OK", "content": content }),
    );
    let mut operation = json!({
        "operationId": format!("{}_{}", method.parent_service().name(), method.name()),
        "tags": [method.parent_service().name()],
        "summary": comment_of(method.parent_file().file_descriptor_proto(), method.path()).unwrap_or_default(),
        "parameters": parameters,
        "responses": {
            "200": answer,
            "default": {
                "description": "An error: the gRPC code mapped to an HTTP status as grpc-gateway maps it.",
                "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } },
            },
        },
    });
    if !request_body.is_null()
        && let Value::Object(fields) = &mut operation
    {
        fields.insert("requestBody".into(), request_body);
    }
    operation
}

fn body(schema: Value, required: bool) -> Value {
    json!({ "required": required, "content": { "application/json": { "schema": schema } } })
}

fn events_operation() -> Value {
    json!({
        "operationId": "Gateway_StreamEvents",
        "tags": ["Events"],
        "summary": "Live updates of the signed-in user's user, contracts and photos, as Server-Sent Events.",
        "description": "Events: `user`, `contract`, `photo` (the upstream's UserChange, ContractChange or \
            PhotoChange in proto3 JSON), `synced` (a source's snapshot is complete), `reset` (a source could \
            not resume; its snapshot follows), `upstream` (a source's watch was lost or is back) and `end` \
            (the gateway ends the stream, after every event already sent, with `{\"reason\": ..., \
            \"resume\": true}`: the client fell too far behind, or the gateway lost its place; reconnect \
            with `Last-Event-ID`). Each event's id is a cursor `U.C.P`; reconnect with `Last-Event-ID` to \
            resume without loss. Idle streams carry a `heartbeat` comment.",
        "parameters": [
            {
                "name": "user_id",
                "in": "path",
                "required": true,
                "description": "The user; `me` stands for the signed-in user.",
                "schema": { "type": "string", "example": "me" },
            },
            {
                "name": "Last-Event-ID",
                "in": "header",
                "required": false,
                "description": "The id of the last event received, to resume after it.",
                "schema": { "type": "string", "example": "12.4.30" },
            },
        ],
        "responses": {
            "200": {
                "description": "An event stream.",
                "content": { "text/event-stream": { "schema": { "type": "string" } } },
            },
            "default": {
                "description": "An error.",
                "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } },
            },
        },
    })
}

fn error_schema() -> Value {
    json!({
        "type": "object",
        "description": "An error, in the shape of google.rpc.Status.",
        "properties": {
            "code": { "type": "integer", "format": "int32", "description": "The gRPC status code." },
            "message": { "type": "string", "description": "What was wrong." },
            "details": { "type": "array", "items": { "type": "object" }, "description": "More detail, if any." },
        },
    })
}

/// Well-known types whose JSON form is a string.
fn is_string_form(message: &MessageDescriptor) -> bool {
    matches!(
        message.full_name(),
        "google.protobuf.Timestamp" | "google.protobuf.Duration" | "google.protobuf.FieldMask"
    )
}

/// The schemas referenced so far, and those still to write.
#[derive(Default)]
struct Schemas {
    seen: BTreeSet<String>,
    pending: Vec<MessageDescriptor>,
}

impl Schemas {
    fn reference(&mut self, message: &MessageDescriptor) -> Value {
        if let Some(schema) = well_known(message) {
            return schema;
        }
        if self.seen.insert(message.full_name().to_owned()) {
            self.pending.push(message.clone());
        }
        json!({ "$ref": format!("#/components/schemas/{}", message.full_name()) })
    }

    fn object(&mut self, message: &MessageDescriptor) -> Value {
        let mut properties = Map::new();
        for field in message.fields() {
            let mut schema = self.field(&field, true);
            if let (Some(text), Value::Object(fields)) = (comment(&field), &mut schema) {
                if fields.contains_key("$ref") {
                    // OpenAPI 3.0 ignores siblings of `$ref`: wrap it.
                    schema = json!({ "allOf": [schema], "description": text });
                } else {
                    fields.insert("description".into(), text.into());
                }
            }
            properties.insert(field.json_name().to_owned(), schema);
        }
        json!({
            "type": "object",
            "description": comment_of(message.parent_file_descriptor_proto(), message.path()).unwrap_or_default(),
            "properties": properties,
        })
    }

    fn field(&mut self, field: &FieldDescriptor, whole: bool) -> Value {
        let item = match field.kind() {
            Kind::Message(message) if field.is_map() => {
                let value = message
                    .get_field_by_name("value")
                    .map_or(json!({}), |value| self.field(&value, false));
                return json!({ "type": "object", "additionalProperties": value });
            }
            Kind::Message(message) => self.reference(&message),
            Kind::Enum(enumeration) => {
                let names: Vec<_> = enumeration.values().map(|v| v.name().to_owned()).collect();
                json!({ "type": "string", "enum": names })
            }
            Kind::String => json!({ "type": "string" }),
            Kind::Bytes => json!({ "type": "string", "format": "byte" }),
            Kind::Bool => json!({ "type": "boolean" }),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => json!({ "type": "integer", "format": "int32" }),
            Kind::Uint32 | Kind::Fixed32 => json!({ "type": "integer", "format": "int64", "minimum": 0 }),
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => json!({ "type": "string", "format": "int64" }),
            Kind::Uint64 | Kind::Fixed64 => json!({ "type": "string", "format": "uint64" }),
            Kind::Float => json!({ "type": "number", "format": "float" }),
            Kind::Double => json!({ "type": "number", "format": "double" }),
        };
        if whole && field.is_list() {
            json!({ "type": "array", "items": item })
        } else if whole && matches!(field.kind(), Kind::Message(_)) {
            // An unset message field is written as `null` (see the json module).
            nullable(item)
        } else {
            item
        }
    }
}

/// `schema`, or `null` (OpenAPI 3.0: `nullable`, which a `$ref` cannot
/// carry beside it, hence the `allOf`).
fn nullable(schema: Value) -> Value {
    match schema {
        Value::Object(mut fields) if !fields.contains_key("$ref") => {
            fields.insert("nullable".into(), Value::Bool(true));
            Value::Object(fields)
        }
        reference => json!({ "allOf": [reference], "nullable": true }),
    }
}

fn well_known(message: &MessageDescriptor) -> Option<Value> {
    Some(match message.full_name() {
        "google.protobuf.Timestamp" => json!({ "type": "string", "format": "date-time" }),
        "google.protobuf.Duration" => json!({ "type": "string", "example": "1.5s" }),
        "google.protobuf.FieldMask" => json!({ "type": "string", "example": "displayName,email" }),
        _ => return None,
    })
}

fn comment(field: &FieldDescriptor) -> Option<String> {
    comment_of(field.parent_file().file_descriptor_proto(), field.path())
}

/// The leading comment of the element at `path` in `file`, as one line,
/// without the lines meant for `buf lint` (`buf:lint:ignore …`).
fn comment_of(file: &prost_reflect::prost_types::FileDescriptorProto, path: &[i32]) -> Option<String> {
    let info = file.source_code_info.as_ref()?;
    let location = info.location.iter().find(|l| l.path == path)?;
    let text = location.leading_comments.as_deref()?;
    let prose = text.lines().filter(|line| !line.trim_start().starts_with("buf:lint:"));
    let text = prose.flat_map(str::split_whitespace).collect::<Vec<_>>().join(" ");
    (!text.is_empty()).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_and_schema_is_described() {
        let pool = crate::descriptors().expect("descriptors");
        let routes = crate::routes::routes(&pool).expect("routes");
        let doc = document(&routes);
        let list = &doc["paths"]["/v1/users/{user_id}/photos"]["get"];
        assert_eq!(list["operationId"], "PhotosService_ListPhotos");
        let names: Vec<_> = list["parameters"]
            .as_array()
            .expect("parameters")
            .iter()
            .map(|p| p["name"].as_str().unwrap_or_default().to_owned())
            .collect();
        for expected in ["user_id", "pageSize", "consistency", "minUsersRevision", "maxStaleness"] {
            assert!(names.iter().any(|n| n == expected), "{expected} in {names:?}");
        }
        let photo = &doc["components"]["schemas"]["lightbox.photos.v1.Photo"];
        assert_eq!(
            photo["properties"]["sizeBytes"]["type"], "string",
            "int64 is a string in JSON"
        );
        assert!(
            photo["properties"]["title"]["description"]
                .as_str()
                .is_some_and(|d| d.contains("title")),
            "comments become descriptions: {photo}"
        );
        assert!(doc["paths"][crate::events::PATH]["get"].is_object());
        let thumbnail = &doc["paths"]["/v1/users/{user_id}/photos/{id}/thumbnail"]["get"]["responses"]["200"];
        assert_eq!(
            thumbnail["content"]["*/*"]["schema"]["format"], "binary",
            "an HttpBody answer is raw bytes: {thumbnail}"
        );
        // One path, one spelling: creating and listing photos share theirs,
        // and every path parameter is a plain name declared by each of its
        // operations.
        let photos = &doc["paths"]["/v1/users/{user_id}/photos"];
        assert!(photos["post"].is_object() && photos["get"].is_object(), "{photos}");
        for (path, operations) in doc["paths"].as_object().expect("paths") {
            let names: Vec<&str> = path
                .split('{')
                .skip(1)
                .filter_map(|rest| rest.split('}').next())
                .collect();
            for name in &names {
                assert!(
                    name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{path}: {name} is not a plain name"
                );
            }
            for (verb, operation) in operations.as_object().expect("operations") {
                for name in &names {
                    let declared = operation["parameters"]
                        .as_array()
                        .is_some_and(|ps| ps.iter().any(|p| p["in"] == "path" && p["name"] == *name));
                    assert!(declared, "{verb} {path} declares {name}");
                }
            }
        }
        // Every reference resolves.
        let text = doc.to_string();
        for reference in text.split("#/components/schemas/").skip(1) {
            let name = reference.split('"').next().unwrap_or_default();
            assert!(
                doc["components"]["schemas"][name].is_object(),
                "{name} is referenced but not defined"
            );
        }
    }
}
