//! The upstream watches behind the events stream: the three sources, how
//! one watch call is opened (filtered to a user for a phone's catch-up, or
//! unfiltered for the fan-out's shared stream), and its frames as the
//! gateway reads them.

use std::{sync::Arc, time::Duration};

use http::uri::PathAndQuery;
use lightbox_client::Balanced;
use prost_reflect::{DynamicMessage, MethodDescriptor};
use serde_json::{Value, json};
use tonic::{Status, Streaming};

use crate::{codec::DynamicCodec, json as proto_json};

/// One upstream of the events stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Users,
    Contracts,
    Photos,
}

impl Source {
    pub(crate) const ALL: [Source; 3] = [Source::Users, Source::Contracts, Source::Photos];

    /// Its place in a cursor, and in per-source arrays.
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// The name in `synced`, `reset` and `upstream` events.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Source::Users => "users",
            Source::Contracts => "contracts",
            Source::Photos => "photos",
        }
    }

    /// The event name of a change.
    pub(crate) fn change_event(self) -> &'static str {
        match self {
            Source::Users => "user",
            Source::Contracts => "contract",
            Source::Photos => "photo",
        }
    }

    /// The watch method, as `package.Service.Method`.
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

    /// The field of a change that names the user it concerns: the user
    /// itself, a contract's holder, a photo's owner (on deletions too).
    fn owner_field(self) -> &'static str {
        match self {
            Source::Users | Source::Photos => "user_id",
            Source::Contracts => "holder_user_id",
        }
    }
}

/// A frame of a watch, as the gateway reads it.
pub(crate) enum Frame {
    /// A change (of a snapshot, a replay or live) concerning `owner`; its
    /// JSON is written by [`Frame::json`] only for a change someone gets.
    Change {
        revision: i64,
        owner: String,
        change: DynamicMessage,
    },
    /// A snapshot starts.
    SnapshotBegin,
    /// The snapshot at `revision` is complete.
    SnapshotEnd { revision: i64 },
    /// Every change up to `revision` was delivered.
    Progress { revision: i64 },
    /// The watch could not resume; a snapshot follows. `data` is the
    /// `reset` event's data.
    Reset { data: Arc<str> },
}

impl Frame {
    /// A change's proto3 JSON, written once and shared by every phone that
    /// gets it.
    pub(crate) fn json(change: &DynamicMessage) -> Result<Arc<str>, Status> {
        let value =
            proto_json::to_json(change).map_err(|e| Status::internal(format!("a change does not encode: {e}")))?;
        Ok(data(&value))
    }
}

/// An event's data, written once.
pub(crate) fn data(value: &Value) -> Arc<str> {
    Arc::from(value.to_string())
}

/// The `upstream` event telling phones that `source`'s watch was lost. In
/// general words: the cause (logged) can name internal addresses.
pub(crate) fn lost(source: Source) -> Arc<str> {
    data(&json!({
        "source": source.name(),
        "connected": false,
        "message": format!("the {} updates are interrupted; the gateway reconnects by itself", source.name()),
    }))
}

/// How many idle timeouts the first frame of a watch from 0 may take: a
/// snapshot waits for its turn (see `lightbox_changefeed::FeedOptions::max_snapshots`).
const SNAPSHOT_TURN_FACTOR: u32 = 8;

/// How to call one source's watch.
#[derive(Clone)]
pub(crate) struct Upstream {
    source: Source,
    method: MethodDescriptor,
    path: PathAndQuery,
    channel: Balanced,
    /// How long a watch may take to open, or stay silent once open, before
    /// it is taken for dead: an upstream that accepts the call and then says
    /// nothing would otherwise hold its follower for ever.
    idle: Duration,
}

impl Upstream {
    /// The watch of `source`, described by `method`, on `channel`; a watch
    /// that takes `idle` to open or to say anything fails `UNAVAILABLE`.
    pub(crate) fn new(
        source: Source,
        method: MethodDescriptor,
        channel: Balanced,
        idle: Duration,
    ) -> Result<Upstream, String> {
        let path = crate::routes::grpc_path(&method)?;
        Ok(Upstream {
            source,
            method,
            path,
            channel,
            idle,
        })
    }

    /// Which source.
    pub(crate) fn source(&self) -> Source {
        self.source
    }

    /// Opens a watch from `since`, of `user_id`'s changes only if given.
    pub(crate) async fn watch(&self, since: i64, user_id: Option<&str>) -> Result<Watch, Status> {
        let mut request = match user_id {
            Some(user_id) => self.source.filter(user_id),
            None => json!({}),
        };
        if let Value::Object(fields) = &mut request {
            fields.insert("sinceRevision".into(), Value::String(since.to_string()));
        }
        let request = proto_json::from_json_value(self.method.input(), request, "")
            .map_err(|e| Status::internal(format!("the watch request does not build: {e}")))?;
        let open = async {
            let mut grpc = crate::ready(self.channel.clone(), self.source.name()).await?;
            grpc.server_streaming(
                tonic::Request::new(request),
                self.path.clone(),
                DynamicCodec::new(self.method.output()),
            )
            .await
        };
        let stream = tokio::time::timeout(self.idle, open)
            .await
            .map_err(|_| {
                Status::unavailable(format!(
                    "the {} watch did not open within {:?}",
                    self.source.name(),
                    self.idle
                ))
            })??
            .into_inner();
        // A watch from 0 starts with a snapshot, which may wait its turn
        // behind others (a feed reads a few at once) with nothing sent
        // meanwhile: its first frame gets longer than the silence rule.
        let first = match since {
            0 => self.idle.saturating_mul(SNAPSHOT_TURN_FACTOR),
            _ => self.idle,
        };
        Ok(Watch {
            source: self.source,
            stream,
            idle: self.idle,
            wait: first,
        })
    }
}

/// One open watch call. Dropping it cancels the call upstream.
pub(crate) struct Watch {
    source: Source,
    stream: Streaming<DynamicMessage>,
    idle: Duration,
    /// How long the next frame may take: longer for the first of a
    /// snapshot, `idle` after.
    wait: Duration,
}

impl Watch {
    /// The next frame; `None` once the upstream ended the watch. Frames
    /// of kinds this gateway does not know are skipped. Cancel-safe:
    /// nothing is lost if the future is dropped.
    /// A watch silent for its `idle` fails `UNAVAILABLE` (the upstream
    /// sends progress well within it); the first frame of a snapshot may
    /// take `SNAPSHOT_TURN_FACTOR` times that.
    pub(crate) async fn next(&mut self) -> Result<Option<Frame>, Status> {
        loop {
            let wait = self.wait;
            let message = tokio::time::timeout(wait, self.stream.message()).await;
            let message = message.map_err(|_| {
                Status::unavailable(format!("no word from the {} watch for {wait:?}", self.source.name()))
            })?;
            self.wait = self.idle;
            let Some(frame) = message? else {
                return Ok(None);
            };
            if let Some(frame) = self.read(&frame)? {
                return Ok(Some(frame));
            }
        }
    }

    fn read(&self, frame: &DynamicMessage) -> Result<Option<Frame>, Status> {
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
        Ok(Some(if let Some(change) = part("change") {
            let owner = change
                .get_field_by_name(self.source.owner_field())
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            Frame::Change {
                revision: revision(&change),
                owner,
                change,
            }
        } else if part("snapshot_begin").is_some() {
            Frame::SnapshotBegin
        } else if let Some(end) = part("snapshot_end") {
            Frame::SnapshotEnd {
                revision: revision(&end),
            }
        } else if let Some(progress) = part("progress") {
            Frame::Progress {
                revision: revision(&progress),
            }
        } else if let Some(reset) = part("reset") {
            let mut value = proto_json::to_json(&reset).map_err(Status::internal)?;
            if let Value::Object(fields) = &mut value {
                fields.insert("source".into(), Value::String(self.source.name().into()));
            }
            Frame::Reset { data: data(&value) }
        } else {
            return Ok(None);
        }))
    }
}

#[cfg(test)]
mod tests {
    use lightbox_client::{ConnectOptions, HealthCheck, Target};
    use tonic::Code;

    use super::*;

    /// An upstream that takes every call and never answers it: no headers,
    /// as a peer stuck between accepting a call and serving it.
    async fn mute_upstream() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("a bound address");
        let app = axum::Router::new().fallback(std::future::pending::<&'static str>);
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    /// An upstream that opens every call (gRPC headers) and then sends
    /// nothing.
    async fn silent_upstream() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("a bound address");
        let app = axum::Router::new().fallback(|| async {
            let nothing = futures_util::stream::pending::<Result<tonic::codegen::Bytes, std::io::Error>>();
            (
                [(http::header::CONTENT_TYPE, "application/grpc")],
                axum::body::Body::from_stream(nothing),
            )
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    fn upstream_at(addr: std::net::SocketAddr, idle: Duration) -> Upstream {
        let target = Target::parse(&format!("http://{addr}")).expect("a target");
        let options = ConnectOptions {
            health: HealthCheck::Off,
            ..ConnectOptions::with_connect_timeout(Duration::from_secs(5))
        };
        let channel = lightbox_client::connect(&target, options).expect("a channel");
        let pool = crate::descriptors().expect("descriptors");
        let method = crate::find_method(&pool, Source::Users.method()).expect("WatchUsers is described");
        Upstream::new(Source::Users, method, channel, idle).expect("an upstream")
    }

    #[tokio::test]
    async fn a_silent_watch_fails_after_the_idle_timeout_and_a_snapshot_waits_longer_for_its_turn() {
        let upstream = upstream_at(silent_upstream().await, Duration::from_millis(100));
        for (since, waited) in [(5, "100ms"), (0, "800ms")] {
            let mut watch = match upstream.watch(since, None).await {
                Ok(watch) => watch,
                Err(status) => panic!("the silent upstream's watch did not open: {status:?}"),
            };
            let next = tokio::time::timeout(Duration::from_secs(20), watch.next())
                .await
                .expect("the watch gave up by itself");
            match next {
                Ok(frame) => panic!("a silent upstream sent {:?}", frame.is_some()),
                Err(status) => {
                    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                    assert!(
                        status.message().contains(&format!("for {waited}")),
                        "since {since}: {status:?}"
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn a_watch_that_never_opens_fails_unavailable_after_the_idle_timeout() {
        let upstream = upstream_at(mute_upstream().await, Duration::from_millis(200));
        let opened = tokio::time::timeout(Duration::from_secs(20), upstream.watch(0, None))
            .await
            .expect("the watch gave up by itself");
        match opened {
            Ok(_) => panic!("a mute upstream opened a watch"),
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(status.message().contains("did not open within 200ms"), "{status:?}");
            }
        }
    }
}
