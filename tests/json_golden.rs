//! The gateway's JSON is the proto3 JSON mapping for every message it
//! writes, checked two ways on the same bytes:
//!
//! - against the golden files in `tests/golden/` (exact, with grpc-gateway's
//!   `null` for unset messages); `LIGHTBOX_UPDATE_GOLDEN=1` rewrites them;
//! - against a second implementation, Google's Python
//!   `google.protobuf.json_format` (`tests/golden/json_format.py`), which
//!   omits unset messages instead of writing `null` — the one difference,
//!   removed before comparing. CI requires it
//!   (`LIGHTBOX_REQUIRE_PYTHON_PROTOBUF=1`); elsewhere it is skipped with a
//!   notice when Python's protobuf is not installed.

use std::{collections::BTreeMap, path::PathBuf};

use base64::Engine;
use lightbox_api::{
    contracts::{Contract, ContractChange, ContractOption, ContractStatus, Plan},
    feed::{ChangeKind, Freshness, Reset, Source, StreamState, StreamStatus},
    photos::{
        CreatePhotoResponse, DeletePhotoResponse, GetPhotoResponse, GetProfileResponse, ListPhotosResponse, Photo,
        PhotoChange,
    },
    users::{User, UserChange, UserStatus},
};
use prost::Message;
use prost_reflect::DynamicMessage;
use serde_json::Value;

fn time(seconds: i64, nanos: i32) -> Option<pbjson_types::Timestamp> {
    Some(pbjson_types::Timestamp { seconds, nanos })
}

fn user() -> User {
    User {
        id: "0190a5b2-0000-7000-8000-000000000001".into(),
        display_name: "Ada Lovelace — «Analytical»".into(),
        email: "ada@example.com".into(),
        status: UserStatus::Active as i32,
        contract_id: "0190a5b2-0000-7000-8000-0000000000c1".into(),
        revision: 9_007_199_254_740_993,
        create_time: time(1_700_000_000, 0),
        update_time: time(1_700_000_001, 120_000_000),
    }
}

fn contract() -> Contract {
    Contract {
        id: "0190a5b2-0000-7000-8000-0000000000c1".into(),
        holder_user_id: user().id,
        plan: Plan::Premium as i32,
        options: vec![
            ContractOption {
                code: "photo_quota".into(),
                value: "1000".into(),
                enabled: true,
            },
            ContractOption {
                code: "hd".into(),
                value: String::new(),
                enabled: false,
            },
        ],
        status: ContractStatus::Active as i32,
        valid_until: time(4_102_444_800, 1),
        revision: 42,
        create_time: time(-1, 999_000),
        update_time: None,
    }
}

fn photo(id: &str, taken: Option<pbjson_types::Timestamp>) -> Photo {
    Photo {
        id: id.into(),
        user_id: user().id,
        title: "Quai \"Ouest\"\n\t<b>&</b>".into(),
        content_type: "image/jpeg".into(),
        size_bytes: 5_000_000_000,
        taken_time: taken,
        create_time: time(1_700_000_002, 500_000),
        revision: 7,
        ..Photo::default()
    }
}

fn freshness(source: Source) -> Option<Freshness> {
    Some(Freshness {
        source: source as i32,
        revision: 42,
        age: Some(pbjson_types::Duration {
            seconds: 1,
            nanos: 500_000_000,
        }),
        stream_state: Some(StreamStatus {
            state: StreamState::Disconnected as i32,
            since_time: time(1_700_000_003, 0),
        }),
        held_reason: "a snapshot would delete 12 of 20 entities".into(),
        copy_revision: 45,
    })
}

/// Every message type the gateway writes, populated and empty.
fn cases() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    vec![
        (
            "list_photos",
            "lightbox.photos.v1.ListPhotosResponse",
            ListPhotosResponse {
                photos: vec![photo("p1", time(1_600_000_000, 123_456_789)), photo("p2", None)],
                user: Some(user()),
                contract: Some(contract()),
                next_page_token: "bmV4dA".into(),
                user_freshness: freshness(Source::Cache),
                contract_freshness: freshness(Source::Upstream),
            }
            .encode_to_vec(),
        ),
        (
            "list_photos_empty",
            "lightbox.photos.v1.ListPhotosResponse",
            ListPhotosResponse::default().encode_to_vec(),
        ),
        (
            "get_profile",
            "lightbox.photos.v1.GetProfileResponse",
            GetProfileResponse {
                user: Some(user()),
                contract: None,
                user_freshness: freshness(Source::Cache),
                contract_freshness: None,
            }
            .encode_to_vec(),
        ),
        (
            "create_photo",
            "lightbox.photos.v1.CreatePhotoResponse",
            CreatePhotoResponse {
                photo: Some(photo("p3", time(0, 0))),
            }
            .encode_to_vec(),
        ),
        (
            "get_photo",
            "lightbox.photos.v1.GetPhotoResponse",
            GetPhotoResponse {
                photo: Some(photo("p4", None)),
            }
            .encode_to_vec(),
        ),
        (
            "delete_photo",
            "lightbox.photos.v1.DeletePhotoResponse",
            DeletePhotoResponse { revision: 8 }.encode_to_vec(),
        ),
        (
            "photo_deleted",
            "lightbox.photos.v1.PhotoChange",
            PhotoChange {
                revision: 8,
                kind: ChangeKind::Delete as i32,
                photo_id: "p4".into(),
                photo: None,
                user_id: user().id,
            }
            .encode_to_vec(),
        ),
        (
            "user_change",
            "lightbox.users.v1.UserChange",
            UserChange {
                revision: 3,
                kind: ChangeKind::Upsert as i32,
                user_id: user().id,
                user: Some(user()),
            }
            .encode_to_vec(),
        ),
        (
            "contract_change",
            "lightbox.contracts.v1.ContractChange",
            ContractChange {
                revision: 43,
                kind: ChangeKind::Upsert as i32,
                contract_id: contract().id,
                contract: Some(contract()),
                holder_user_id: user().id,
            }
            .encode_to_vec(),
        ),
        (
            "reset",
            "lightbox.feed.v1.Reset",
            Reset {
                revision: 100,
                reason: "history before revision 90 was compacted".into(),
            }
            .encode_to_vec(),
        ),
    ]
}

/// The gateway's JSON for each case.
fn ours() -> BTreeMap<String, Value> {
    let pool = lightbox_gateway::descriptors().unwrap_or_else(|e| panic!("{e}"));
    cases()
        .into_iter()
        .map(|(name, type_name, bytes)| {
            let desc = pool
                .get_message_by_name(type_name)
                .unwrap_or_else(|| panic!("{type_name} is not described"));
            let message = DynamicMessage::decode(desc, bytes.as_slice())
                .unwrap_or_else(|e| panic!("{name} does not decode: {e}"));
            let json = lightbox_gateway::json::to_json(&message).unwrap_or_else(|e| panic!("{name}: {e}"));
            (name.to_owned(), json)
        })
        .collect()
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

#[test]
fn the_json_equals_the_golden_files() {
    for (name, json) in ours() {
        let path = golden_dir().join(format!("{name}.json"));
        let text = serde_json::to_string_pretty(&json).unwrap_or_else(|e| panic!("{e}")) + "\n";
        if std::env::var_os("LIGHTBOX_UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            continue;
        }
        let golden = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        assert_eq!(text, golden, "{name}: the JSON differs from {}", path.display());
    }
}

/// `value` without the `null` members, which Python omits.
fn without_nulls(value: Value) -> Value {
    match value {
        Value::Object(fields) => Value::Object(
            fields
                .into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(without_nulls).collect()),
        other => other,
    }
}

#[test]
fn the_json_equals_pythons_json_format() {
    let required = std::env::var_os("LIGHTBOX_REQUIRE_PYTHON_PROTOBUF").is_some();
    let probe = std::process::Command::new("python3")
        .args(["-c", "import google.protobuf.json_format"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        assert!(
            !required,
            "python3 with the protobuf package is required (pip install -r .ci/requirements.txt)"
        );
        eprintln!("NOTICE: skipping the cross-check against Python's json_format: python3 -m pip install protobuf");
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let fds = dir.path().join("descriptors.bin");
    std::fs::write(&fds, lightbox_api::FILE_DESCRIPTOR_SET).unwrap_or_else(|e| panic!("{e}"));
    let listed: Vec<Value> = cases()
        .into_iter()
        .map(|(name, type_name, bytes)| {
            serde_json::json!({
                "name": name,
                "type": type_name,
                "bytes": base64::engine::general_purpose::STANDARD.encode(bytes),
            })
        })
        .collect();
    let cases_file = dir.path().join("cases.json");
    std::fs::write(&cases_file, Value::Array(listed).to_string()).unwrap_or_else(|e| panic!("{e}"));
    let output = std::process::Command::new("python3")
        .arg(golden_dir().join("json_format.py"))
        .arg(&fds)
        .arg(&cases_file)
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3: {e}"));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let theirs: BTreeMap<String, Value> =
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("Python's output is not JSON: {e}"));
    let ours = ours();
    assert_eq!(ours.len(), theirs.len());
    for (name, json) in ours {
        assert_eq!(
            without_nulls(json),
            theirs[&name],
            "{name}: ours (left) and Python's (right) differ"
        );
    }
}
