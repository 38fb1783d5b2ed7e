//! Live updates for the signed-in user as Server-Sent Events.
//!
//! One SSE stream merges three upstream watches, each filtered to the user:
//! `WatchUsers` (their user), `WatchContracts` (the contracts they hold) and
//! `WatchPhotos` (their photos). Events:
//!
//! - `user`, `contract`, `photo`: a change, as the proto3 JSON of the
//!   upstream's `UserChange` / `ContractChange` / `PhotoChange`;
//! - `synced`: the snapshot of one source is complete
//!   (`{"source": "users", "revision": "42"}`);
//! - `reset`: a source could not resume from the cursor; a fresh snapshot of
//!   it follows, and anything of that source not in it no longer exists;
//! - `upstream`: a source's watch was lost or is back
//!   (`{"source": "users", "connected": false, "message": "..."}`); the
//!   gateway reconnects by itself, with backoff, from where it was.
//!
//! Every event's `id` is a cursor `U.C.P`: the users, contracts and photos
//! revisions the client has everything up to (0 for a source still in its
//! snapshot). A client that reconnects with `Last-Event-ID` resumes each
//! source after its revision and loses nothing; with no `Last-Event-ID` it
//! gets a snapshot of each source first. Idle streams carry a heartbeat
//! comment, so proxies and phones keep the connection open.

use std::{convert::Infallible, fmt, sync::Arc, time::Duration};

use axum::{
    extract::{Path, State},
    response::sse::{Event, KeepAlive, Sse},
};
use futures_util::{Stream, StreamExt};
use http::HeaderMap;
use prost_reflect::{DynamicMessage, MethodDescriptor};
use serde_json::{Value, json};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, transport::Channel};

use crate::{Gateway, codec::DynamicCodec, error::HttpError, json as proto_json};

/// One upstream watch of the events stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Users,
    Contracts,
    Photos,
}

impl Source {
    const ALL: [Source; 3] = [Source::Users, Source::Contracts, Source::Photos];

    fn index(self) -> usize {
        self as usize
    }

    /// The name in `synced`, `reset` and `upstream` events.
    fn name(self) -> &'static str {
        match self {
            Source::Users => "users",
            Source::Contracts => "contracts",
            Source::Photos => "photos",
        }
    }

    /// The event name of a change.
    fn change_event(self) -> &'static str {
        match self {
            Source::Users => "user",
            Source::Contracts => "contract",
            Source::Photos => "photo",
        }
    }

    /// The watch method, as `package.Service/Method`.
    pub(crate) fn method(self) -> &'static str {
        match self {
            Source::Users => "lightbox.users.v1.UsersService.WatchUsers",
            Source::Contracts => "lightbox.contracts.v1.ContractsService.WatchContracts",
            Source::Photos => "lightbox.photos.v1.PhotosService.WatchPhotos",
        }
    }

    /// The watch request's filter to `user_id`, in proto3 JSON.
    fn filter(self, user_id: &str) -> Value {
        match self {
            Source::Users => json!({ "userIds": [user_id] }),
            Source::Contracts => json!({ "holderUserId": user_id }),
            Source::Photos => json!({ "userId": user_id }),
        }
    }
}

/// Where a client is in each source: the `id` of every event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor([i64; 3]);

impl Cursor {
    /// Parses a `Last-Event-ID` (`U.C.P`, three non-negative revisions).
    pub fn parse(text: &str) -> Result<Cursor, String> {
        let parts: Vec<&str> = text.trim().split('.').collect();
        let bad = || format!("Last-Event-ID {text:?} is not a cursor of this stream (U.C.P, three revisions)");
        let [u, c, p] = parts.as_slice() else { return Err(bad()) };
        let mut revisions = [0; 3];
        for (slot, part) in revisions.iter_mut().zip([u, c, p]) {
            *slot = part.parse::<i64>().ok().filter(|r| *r >= 0).ok_or_else(bad)?;
        }
        Ok(Cursor(revisions))
    }

    fn get(self, source: Source) -> i64 {
        self.0[source.index()]
    }

    fn set(&mut self, source: Source, revision: i64) {
        self.0[source.index()] = revision;
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0[0], self.0[1], self.0[2])
    }
}

/// What a source's task tells the stream: its new resume revision, and the
/// event to send, if any (progress moves the cursor silently).
struct Update {
    source: Source,
    position: i64,
    event: Option<(&'static str, Value)>,
}

/// Aborts the source tasks when the client goes away.
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        self.0.iter().for_each(JoinHandle::abort);
    }
}

/// The route of the events stream.
pub const PATH: &str = "/v1/users/{user_id}/events";

/// `GET /v1/users/{user_id}/events`.
pub(crate) async fn handler(
    State(gateway): State<Arc<Gateway>>,
    Path(user_id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, HttpError> {
    let subject = gateway.options.auth.authenticate(&headers)?;
    let user_id = crate::authorize(&subject, &user_id)?;
    let mut cursor = match headers.get("last-event-id") {
        Some(value) => Cursor::parse(
            value
                .to_str()
                .map_err(|_| HttpError::invalid("Last-Event-ID is not text"))?,
        )
        .map_err(HttpError::invalid)?,
        None => Cursor::default(),
    };
    let permit = Arc::clone(&gateway.streams).try_acquire_owned().map_err(|_| {
        HttpError::new(
            tonic::Code::Unavailable,
            format!(
                "the gateway is serving its limit of {} event streams; retry later",
                gateway.options.max_event_streams
            ),
        )
    })?;

    let (tx, rx) = mpsc::channel(256);
    let mut tasks = Vec::new();
    for source in Source::ALL {
        let method = gateway
            .method(source.method())
            .ok_or_else(|| HttpError::new(tonic::Code::Internal, format!("{} is not described", source.method())))?;
        let channel = gateway
            .channel(&method)
            .ok_or_else(|| HttpError::new(tonic::Code::Internal, format!("no upstream for {}", source.method())))?;
        let leg = Leg {
            source,
            method,
            channel,
            filter: source.filter(&user_id),
            tx: tx.clone(),
        };
        tasks.push(tokio::spawn(leg.run(cursor.get(source))));
    }
    drop(tx);
    tracing::info!(user_id, %cursor, "events stream opened");

    let guard = (Tasks(tasks), permit);
    let shutdown = gateway.shutdown.clone();
    let stream = ReceiverStream::new(rx)
        .filter_map(move |update: Update| {
            let _alive = &guard;
            cursor.set(update.source, update.position);
            let event = update.event.map(|(name, data)| {
                Ok(Event::default()
                    .event(name)
                    .id(cursor.to_string())
                    .data(data.to_string()))
            });
            std::future::ready(event)
        })
        .take_until(async move { shutdown.wait().await });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(gateway.options.heartbeat).text("heartbeat")))
}

/// One source's watch, kept open for the life of the events stream.
struct Leg {
    source: Source,
    method: MethodDescriptor,
    channel: Channel,
    filter: Value,
    tx: mpsc::Sender<Update>,
}

impl Leg {
    /// Watches from `since`, reconnecting with backoff and resuming after
    /// the last revision delivered, until the client goes away.
    async fn run(self, mut since: i64) {
        let mut delay = Duration::from_millis(100);
        let mut connected = None;
        loop {
            let lost = match self.watch(&mut since, &mut connected).await {
                Ok(()) => "the upstream ended the watch".to_owned(),
                Err(status) if status.code() == tonic::Code::Cancelled && self.tx.is_closed() => return,
                Err(status) => status.message().to_owned(),
            };
            if self.tx.is_closed() {
                return;
            }
            if connected != Some(false) {
                connected = Some(false);
                let data = json!({ "source": self.source.name(), "connected": false, "message": lost });
                if !self.send(since, Some(("upstream", data))).await {
                    return;
                }
            } else {
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            let jitter = Duration::from_millis(fastrand::u64(0..=delay.as_millis() as u64 / 2));
            tokio::time::sleep(delay + jitter).await;
        }
    }

    /// Sends an update; false once the client has gone.
    async fn send(&self, position: i64, event: Option<(&'static str, Value)>) -> bool {
        let update = Update {
            source: self.source,
            position,
            event,
        };
        self.tx.send(update).await.is_ok()
    }

    /// One watch call, until it fails or ends.
    async fn watch(&self, since: &mut i64, connected: &mut Option<bool>) -> Result<(), Status> {
        let mut request = self.filter.clone();
        if let Value::Object(fields) = &mut request {
            fields.insert("sinceRevision".into(), Value::String(since.to_string()));
        }
        let request = proto_json::from_json_value(self.method.input(), request, "")
            .map_err(|e| Status::internal(format!("the watch request does not build: {e}")))?;
        let mut grpc = crate::ready(self.channel.clone(), self.source.name()).await?;
        let path = crate::routes::grpc_path(&self.method).map_err(Status::internal)?;
        let mut stream = grpc
            .server_streaming(
                tonic::Request::new(request),
                path,
                DynamicCodec::new(self.method.output()),
            )
            .await?
            .into_inner();
        let mut in_snapshot = false;
        while let Some(frame) = stream.message().await? {
            if *connected != Some(true) {
                *connected = Some(true);
                let data = json!({ "source": self.source.name(), "connected": true });
                if !self.send(*since, Some(("upstream", data))).await {
                    return Ok(());
                }
            }
            let event = self.frame(&frame, since, &mut in_snapshot)?;
            if !self.send(*since, event).await {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Reads one watch frame: moves `since` and says what to send.
    fn frame(
        &self,
        frame: &DynamicMessage,
        since: &mut i64,
        in_snapshot: &mut bool,
    ) -> Result<Option<(&'static str, Value)>, Status> {
        let part = |name: &str| {
            frame
                .has_field_by_name(name)
                .then(|| frame.get_field_by_name(name))
                .flatten()
                .and_then(|v| v.as_message().cloned())
        };
        let revision = |message: &DynamicMessage| {
            message
                .get_field_by_name("revision")
                .and_then(|v| v.as_i64())
                .unwrap_or_default()
        };
        let to_json =
            |message: &DynamicMessage| proto_json::to_json(message).map_err(|e| Status::internal(e.to_string()));
        let source = self.source.name();
        if let Some(change) = part("change") {
            if !*in_snapshot {
                *since = revision(&change);
            }
            Ok(Some((self.source.change_event(), to_json(&change)?)))
        } else if part("snapshot_begin").is_some() {
            *in_snapshot = true;
            *since = 0;
            Ok(None)
        } else if let Some(end) = part("snapshot_end") {
            *in_snapshot = false;
            *since = revision(&end);
            let data = json!({ "source": source, "revision": since.to_string() });
            Ok(Some(("synced", data)))
        } else if let Some(progress) = part("progress") {
            if !*in_snapshot {
                *since = revision(&progress);
            }
            Ok(None)
        } else if let Some(reset) = part("reset") {
            *since = 0;
            let mut data = to_json(&reset)?;
            if let Value::Object(fields) = &mut data {
                fields.insert("source".into(), Value::String(source.into()));
            }
            Ok(Some(("reset", data)))
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_bad_ones_are_refused() {
        let cursor = Cursor::parse("12.0.7").expect("valid");
        assert_eq!(cursor.to_string(), "12.0.7");
        assert_eq!(cursor.get(Source::Photos), 7);
        for bad in ["", "1.2", "1.2.3.4", "a.b.c", "1.-2.3"] {
            assert!(Cursor::parse(bad).is_err(), "{bad:?}");
        }
    }
}
