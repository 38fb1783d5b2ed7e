//! The proto3 JSON mapping, as grpc-gateway's default marshaller writes it
//! and reads it.
//!
//! Output: lowerCamelCase names, 64-bit integers as strings, enums by name,
//! RFC 3339 timestamps normalised to `Z`, durations as `"1.5s"`; fields
//! without presence (scalars, enums, lists, maps) always written, at their
//! default if unset; unset singular message fields written as `null`
//! (protojson's `EmitUnpopulated`). Input: either field name style, numbers
//! or strings for integers, enum names or numbers, and unknown fields
//! refused, so a typo is a 400 rather than a silently ignored field.

use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, ReflectMessage,
    SerializeOptions,
};
use serde_json::Value;

/// Writes `message` in the proto3 JSON mapping (see the module docs).
pub fn to_json(message: &DynamicMessage) -> Result<Value, String> {
    let options = SerializeOptions::new().skip_default_fields(false);
    let mut value = message
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| format!("{} does not map to JSON: {e}", message.descriptor().full_name()))?;
    emit_unpopulated_messages(&message.descriptor(), &mut value);
    Ok(value)
}

/// Writes a generated (prost) message in the proto3 JSON mapping, by the
/// gateway's own path: encoded, read back as a [`DynamicMessage`] of the
/// message `full_name` in `pool` (see [`crate::descriptors`]), and written by
/// [`to_json`]. For clients of the services (the command-line tools) that
/// must write exactly what the gateway writes for the same message.
pub fn message_to_json<M: prost::Message>(
    pool: &DescriptorPool,
    full_name: &str,
    message: &M,
) -> Result<Value, String> {
    let desc = pool
        .get_message_by_name(full_name)
        .ok_or_else(|| format!("{full_name} is not in the descriptors"))?;
    let dynamic = DynamicMessage::decode(desc, message.encode_to_vec().as_slice())
        .map_err(|e| format!("the message does not decode as {full_name}: {e}"))?;
    to_json(&dynamic)
}

/// Whether `message` is a well-known type with its own JSON form (a string
/// or a number rather than an object).
fn is_well_known(message: &MessageDescriptor) -> bool {
    message.full_name().starts_with("google.protobuf.")
}

/// Adds `null` for every unset singular message field outside a `oneof`,
/// through the whole tree, as protojson's `EmitUnpopulated` does.
fn emit_unpopulated_messages(message: &MessageDescriptor, value: &mut Value) {
    if is_well_known(message) {
        return;
    }
    let Value::Object(object) = value else { return };
    for field in message.fields() {
        let Kind::Message(child) = field.kind() else { continue };
        if field.is_map() {
            if let (Some(Value::Object(entries)), Some(value_field)) =
                (object.get_mut(field.json_name()), child.get_field_by_name("value"))
                && let Kind::Message(item) = value_field.kind()
            {
                entries.values_mut().for_each(|v| emit_unpopulated_messages(&item, v));
            }
        } else if field.is_list() {
            if let Some(Value::Array(items)) = object.get_mut(field.json_name()) {
                items.iter_mut().for_each(|v| emit_unpopulated_messages(&child, v));
            }
        } else if let Some(present) = object.get_mut(field.json_name()) {
            emit_unpopulated_messages(&child, present);
        } else if !in_real_oneof(&field) {
            object.insert(field.json_name().to_owned(), Value::Null);
        }
    }
}

/// Whether `field` is a member of a `oneof` written in the proto (not the
/// synthetic one of a proto3 `optional` field).
fn in_real_oneof(field: &FieldDescriptor) -> bool {
    field.containing_oneof().is_some_and(|oneof| !oneof.is_synthetic())
}

/// Reads a `desc` message from JSON bytes. Errors name the offending field
/// as a path from `prefix` (such as `photo.sizeBytes`).
pub fn from_json_bytes(desc: MessageDescriptor, bytes: &[u8], prefix: &str) -> Result<DynamicMessage, String> {
    crate::unique::check(&desc, bytes, prefix).map_err(|e| format!("invalid JSON: {e}"))?;
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let message = read(desc, &mut deserializer, prefix)?;
    deserializer
        .end()
        .map_err(|e| format!("the request body has trailing characters after the JSON value: {e}"))?;
    Ok(message)
}

/// Reads a `desc` message from a JSON value (see [`from_json_bytes`]).
pub fn from_json_value(desc: MessageDescriptor, value: Value, prefix: &str) -> Result<DynamicMessage, String> {
    read(desc, value, prefix)
}

fn read<'de, D>(desc: MessageDescriptor, deserializer: D, prefix: &str) -> Result<DynamicMessage, String>
where
    D: serde::Deserializer<'de>,
    D::Error: std::fmt::Display,
{
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    let mut track = serde_path_to_error::Track::new();
    let tracked = serde_path_to_error::Deserializer::new(deserializer, &mut track);
    DynamicMessage::deserialize_with_options(desc, tracked, &options).map_err(|e| {
        let path = track.path().to_string();
        let at = match (prefix.is_empty(), path == ".") {
            (true, true) => String::new(),
            (true, false) => format!(" at `{path}`"),
            (false, true) => format!(" at `{prefix}`"),
            (false, false) => format!(" at `{prefix}.{path}`"),
        };
        format!("invalid JSON{at}: {e}")
    })
}

#[cfg(test)]
mod tests {
    use prost_reflect::{DescriptorPool, Value as Field};

    use super::*;

    fn pool() -> DescriptorPool {
        DescriptorPool::decode(lightbox_api::FILE_DESCRIPTOR_SET).expect("the built-in descriptors decode")
    }

    fn photo_desc() -> MessageDescriptor {
        pool()
            .get_message_by_name("lightbox.photos.v1.Photo")
            .expect("Photo is described")
    }

    #[test]
    fn output_follows_the_grpc_gateway_mapping() {
        let mut photo = DynamicMessage::new(photo_desc());
        photo.set_field_by_name("id", Field::String("p1".into()));
        photo.set_field_by_name("size_bytes", Field::I64(1_234_567_890_123));
        let mut created = DynamicMessage::new(
            pool()
                .get_message_by_name("google.protobuf.Timestamp")
                .expect("Timestamp is described"),
        );
        created.set_field_by_name("seconds", Field::I64(1_700_000_000));
        created.set_field_by_name("nanos", Field::I32(120_000_000));
        photo.set_field_by_name("create_time", Field::Message(created));

        let json = to_json(&photo).expect("maps to JSON");
        assert_eq!(json["id"], "p1");
        assert_eq!(json["sizeBytes"], "1234567890123", "int64 is a string");
        assert_eq!(json["createTime"], "2023-11-14T22:13:20.120Z", "timestamps end in Z");
        assert_eq!(
            json["title"], "",
            "scalars without presence are written at their default"
        );
        assert_eq!(json["revision"], "0");
        assert_eq!(
            json["takenTime"],
            Value::Null,
            "unset messages are null, as EmitUnpopulated writes"
        );
    }

    #[test]
    fn a_generated_message_is_written_as_its_dynamic_twin() {
        let mut photo = lightbox_api::photos::Photo {
            id: "p1".into(),
            size_bytes: 1_234_567_890_123,
            create_time: Some(Default::default()),
            ..Default::default()
        };
        if let Some(created) = photo.create_time.as_mut() {
            created.seconds = 1_700_000_000;
            created.nanos = 120_000_000;
        }
        let json = message_to_json(&pool(), "lightbox.photos.v1.Photo", &photo).expect("maps to JSON");
        let mut dynamic = DynamicMessage::new(photo_desc());
        dynamic
            .transcode_from(&photo)
            .expect("a Photo decodes as lightbox.photos.v1.Photo");
        assert_eq!(json, to_json(&dynamic).expect("maps to JSON"));
        assert_eq!(json["createTime"], "2023-11-14T22:13:20.120Z");
        assert_eq!(json["sizeBytes"], "1234567890123");
        let unknown = message_to_json(&pool(), "lightbox.photos.v1.Nope", &photo).expect_err("unknown name");
        assert!(unknown.contains("lightbox.photos.v1.Nope"), "{unknown}");
    }

    #[test]
    fn unknown_fields_and_wrong_types_name_the_field() {
        let err = from_json_bytes(photo_desc(), br#"{"title": "a", "colour": "red"}"#, "photo")
            .expect_err("unknown field refused");
        assert!(err.contains("colour"), "{err}");
        let err = from_json_bytes(photo_desc(), br#"{"sizeBytes": "lots"}"#, "photo").expect_err("wrong type refused");
        assert!(err.contains("photo.sizeBytes"), "{err}");
        let err = from_json_bytes(photo_desc(), br#"{"title": "a""#, "").expect_err("malformed JSON refused");
        assert!(err.starts_with("invalid JSON"), "{err}");
    }

    #[test]
    fn input_accepts_both_name_styles_and_round_trips() {
        let message = from_json_bytes(
            photo_desc(),
            br#"{"user_id": "u1", "sizeBytes": 12, "takenTime": "2024-02-29T10:00:00+02:00"}"#,
            "",
        )
        .expect("valid input");
        let json = to_json(&message).expect("maps to JSON");
        assert_eq!(json["userId"], "u1");
        assert_eq!(json["sizeBytes"], "12");
        assert_eq!(json["takenTime"], "2024-02-29T08:00:00Z", "offsets are normalised to Z");
    }
}
