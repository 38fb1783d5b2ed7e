//! What the tools print: tables for people, and for `--json` the proto3
//! JSON mapping of the response message, written by the gateway's code
//! ([`lightbox_gateway::json::message_to_json`]), so the CLI and the
//! gateway write the same bytes for the same message.

use std::io::Write;

use lightbox_api::feed::{Freshness, Source, StreamState};
use prost_reflect::DescriptorPool;

use super::{Failure, Kind};

/// A generated message the tools print as JSON, with its full proto name
/// (the generated code carries none).
pub(crate) trait Proto: prost::Message {
    /// The message's full name, such as `lightbox.users.v1.User`.
    const NAME: &'static str;
}

macro_rules! proto_names {
    ($($package:literal { $($ty:ident),* $(,)? })*) => {
        $($(impl Proto for $ty {
            const NAME: &'static str = concat!($package, ".", stringify!($ty));
        })*)*
        /// Every message named above, for the test that checks the names.
        #[cfg(test)]
        const NAMED: &[&str] = &[$($(concat!($package, ".", stringify!($ty))),*),*];
    };
}

use lightbox_api::{
    contracts::{
        Contract, CreateContractResponse, DeleteContractResponse, GetContractResponse, ListContractsResponse,
        UpdateContractResponse, WatchContractsResponse,
    },
    photos::{
        CreatePhotoResponse, DeletePhotoResponse, GetPhotoResponse, ListPhotosResponse, Photo, WatchPhotosResponse,
    },
    users::{
        CreateUserResponse, DeleteUserResponse, GetUserResponse, ListUsersResponse, UpdateUserResponse, User,
        WatchUsersResponse,
    },
};

// The Rust name of each is its proto name, so the names are made from them.
proto_names! {
    "lightbox.users.v1" {
        User, CreateUserResponse, GetUserResponse, ListUsersResponse, UpdateUserResponse, DeleteUserResponse,
        WatchUsersResponse,
    }
    "lightbox.contracts.v1" {
        Contract, CreateContractResponse, GetContractResponse, ListContractsResponse, UpdateContractResponse,
        DeleteContractResponse, WatchContractsResponse,
    }
    "lightbox.photos.v1" {
        Photo, CreatePhotoResponse, GetPhotoResponse, ListPhotosResponse, DeletePhotoResponse, WatchPhotosResponse,
    }
}

/// Writes messages in the proto3 JSON mapping, compact, one per line:
/// exactly the gateway's body for the same message.
pub(crate) struct Json {
    /// Every Lightbox message's descriptor, decoded once per command.
    pool: DescriptorPool,
}

impl Json {
    /// A writer, with the descriptors of every Lightbox message.
    pub(crate) fn new() -> Result<Json, Failure> {
        let pool = lightbox_gateway::descriptors().map_err(|e| Failure::new(Kind::Other, e))?;
        Ok(Json { pool })
    }

    /// A writer if `--json` asked for one.
    pub(crate) fn if_asked(json: bool) -> Result<Option<Json>, Failure> {
        json.then(Json::new).transpose()
    }

    /// `message` as one line of JSON.
    pub(crate) fn line<M: Proto>(&self, message: &M) -> Result<String, Failure> {
        let value = lightbox_gateway::json::message_to_json(&self.pool, M::NAME, message)
            .map_err(|e| Failure::new(Kind::Other, format!("cannot write {} as JSON: {e}", M::NAME)))?;
        serde_json::to_string(&value)
            .map_err(|e| Failure::new(Kind::Other, format!("cannot write {} as JSON: {e}", M::NAME)))
    }

    /// Prints `message` as one line of JSON.
    pub(crate) fn print<M: Proto>(&self, message: &M) -> anyhow::Result<()> {
        emit(&self.line(message)?)?;
        Ok(())
    }
}

/// Prints what a delete answered: the response as JSON, or one line
/// (`deleted user ID at revision N`).
pub(crate) fn print_deleted<M: Proto>(
    json: Option<&Json>,
    kind: &str,
    id: &str,
    response: &M,
    revision: i64,
) -> anyhow::Result<()> {
    match json {
        Some(json) => json.print(response),
        None => Ok(emit(&format!("deleted {kind} {id} at revision {revision}")).map(drop)?),
    }
}

/// Writes `text` and a newline to stdout. A reader that went away (`| head`)
/// is not the command's failure: answers `false` when stdout is closed.
pub(crate) fn emit(text: &str) -> Result<bool, Failure> {
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(err) => Err(Failure::new(Kind::Other, format!("cannot write to stdout: {err}"))),
    }
}

/// Prints rows under a header, columns padded to their widest cell.
pub(crate) fn print_table(header: &[&str], rows: &[Vec<String>]) -> Result<(), Failure> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_owned()
    };
    let mut text = line(&header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>());
    for row in rows {
        text.push('\n');
        text.push_str(&line(row));
    }
    emit(&text)?;
    Ok(())
}

/// An enum value's proto name without its prefix, in lower case
/// (`PLAN_PREMIUM` → `premium`); `?` for a number the tool does not know.
pub(crate) fn enum_word(name: Option<&str>, prefix: &str) -> String {
    name.map_or("?".to_owned(), |n| n.trim_start_matches(prefix).to_lowercase())
}

/// Where a part of an answer came from: "contract: from cache, revision 3
/// (copy at 7), 0.2s old, stream connected".
pub(crate) fn freshness_line(part: &str, freshness: Option<&Freshness>) -> String {
    let Some(f) = freshness else {
        return format!("{part}: -");
    };
    let source = enum_word(Source::try_from(f.source).ok().map(|s| s.as_str_name()), "SOURCE_");
    let age = f.age.map_or(0.0, |a| a.seconds as f64 + f64::from(a.nanos) / 1e9);
    let stream = match f.stream_state.as_ref().map(|s| StreamState::try_from(s.state)) {
        Some(Ok(StreamState::Connected)) => ", stream connected",
        Some(_) => ", stream DISCONNECTED",
        None => "",
    };
    let copy = match f.copy_revision {
        0 => String::new(),
        at => format!(" (copy at {at})"),
    };
    format!(
        "{part}: from {source}, revision {}{copy}, {age:.1}s old{stream}",
        f.revision
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_printed_message_is_described_under_its_name() {
        let Ok(json) = Json::new() else {
            panic!("the descriptors decode");
        };
        for name in NAMED {
            assert!(json.pool.get_message_by_name(name).is_some(), "{name} is not described");
        }
    }

    #[test]
    fn json_is_the_gateways_compact_proto3_mapping() {
        let Ok(json) = Json::new() else {
            panic!("the descriptors decode");
        };
        let user = User {
            id: "u1".into(),
            revision: 4,
            create_time: Some(pbjson_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            ..User::default()
        };
        let line = json.line(&CreateUserResponse { user: Some(user) }).expect("writes");
        assert!(!line.contains('\n'), "{line}");
        let value: serde_json::Value = serde_json::from_str(&line).expect("parses");
        assert_eq!(value["user"]["revision"], "4", "int64 as a string");
        assert_eq!(value["user"]["createTime"], "2023-11-14T22:13:20Z");
        assert_eq!(
            value["user"]["status"], "USER_STATUS_UNSPECIFIED",
            "enums by name, defaults written"
        );
        assert_eq!(value["user"]["updateTime"], serde_json::Value::Null);
    }
}
