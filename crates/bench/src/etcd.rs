//! etcd as the peer: an etcd server started by the bench on loopback (a
//! fresh data directory, etcd's default durability: every write fsynced),
//! spoken to over its own gRPC API (`etcdserverpb`, the few messages used
//! written by hand, wire-compatible, no protoc), measured by the same code
//! as Lightbox:
//!
//! - watch fan-out ([`crate::fanout::measure`]): one watch per gRPC
//!   `Watch` stream, [`PER_CONNECTION`] streams per HTTP/2 connection, all
//!   on one key, the writer on its own connection;
//! - unary reads ([`unary`]): a serializable `Range` of one key, the same
//!   closed-loop generator as Lightbox's `GetUser`.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::{process::Child, sync::oneshot, task::JoinHandle};
use tokio_stream::StreamExt;
use tonic::{Request, Status, codec::Streaming, codegen::http::uri::PathAndQuery, transport::Channel};
use tonic_prost::ProstCodec;

use crate::{
    fanout::{PER_CONNECTION, Received, WatchSystem},
    harness::{Res, connect, server_command},
    load::closed_loop,
    report::UnaryRow,
};

/// Why the etcd cells are skipped when there is no etcd.
const NOT_INSTALLED: &str =
    "etcd is not installed: no `etcd` on PATH nor at /usr/bin/etcd (Debian: apt-get install etcd-server)";
/// How long etcd may take to answer once started.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long one readiness probe may take (etcd still electing itself).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The pause between two readiness probes.
const PROBE_EVERY: Duration = Duration::from_millis(20);
/// How long every watch of a cell may take to be created.
const OPEN_DEADLINE: Duration = Duration::from_secs(120);
/// The key every watcher watches and the writer writes.
const FANOUT_KEY: &[u8] = b"bench/fanout";
/// The key the unary cells read.
const UNARY_KEY: &[u8] = b"bench/unary";
/// Its value: about the size of a Lightbox user.
const UNARY_VALUE: &[u8] = br#"{"id":"0192f3a4-bench","name":"Ada Lovelace","email":"ada@example.com","revision":1}"#;
/// Connections the unary clients share.
const UNARY_CONNECTIONS: usize = 4;

/// The messages of etcd's `etcdserverpb` (api/etcdserverpb/rpc.proto) and
/// `mvccpb` (api/mvccpb/kv.proto) that the bench uses, with etcd's field
/// numbers; fields the bench never sets or reads are left out (protobuf
/// skips them).
mod pb {
    /// Every answer's header.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResponseHeader {
        /// The cluster that answered.
        #[prost(uint64, tag = "1")]
        pub cluster_id: u64,
        /// The member that answered.
        #[prost(uint64, tag = "2")]
        pub member_id: u64,
        /// The store's revision when the request was applied.
        #[prost(int64, tag = "3")]
        pub revision: i64,
        /// The raft term.
        #[prost(uint64, tag = "4")]
        pub raft_term: u64,
    }

    /// A key and its value (`mvccpb.KeyValue`).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValue {
        /// The key.
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        /// The revision of its last creation.
        #[prost(int64, tag = "2")]
        pub create_revision: i64,
        /// The revision of its last modification.
        #[prost(int64, tag = "3")]
        pub mod_revision: i64,
        /// Modifications since its creation.
        #[prost(int64, tag = "4")]
        pub version: i64,
        /// The value.
        #[prost(bytes = "vec", tag = "5")]
        pub value: Vec<u8>,
        /// Its lease, 0 for none.
        #[prost(int64, tag = "6")]
        pub lease: i64,
    }

    /// `KV/Range`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RangeRequest {
        /// The first key.
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        /// The end of the range, empty for `key` alone.
        #[prost(bytes = "vec", tag = "2")]
        pub range_end: Vec<u8>,
        /// At most this many keys, 0 for all.
        #[prost(int64, tag = "3")]
        pub limit: i64,
        /// At this revision, 0 for the newest.
        #[prost(int64, tag = "4")]
        pub revision: i64,
        /// Member-local, without a round of consensus.
        #[prost(bool, tag = "7")]
        pub serializable: bool,
    }

    /// `KV/Range`'s answer.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RangeResponse {
        /// The header.
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
        /// The keys found.
        #[prost(message, repeated, tag = "2")]
        pub kvs: Vec<KeyValue>,
        /// Whether there are more.
        #[prost(bool, tag = "3")]
        pub more: bool,
        /// The keys in the range.
        #[prost(int64, tag = "4")]
        pub count: i64,
    }

    /// `KV/Put`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutRequest {
        /// The key.
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        /// The value.
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
        /// A lease, 0 for none.
        #[prost(int64, tag = "3")]
        pub lease: i64,
        /// Whether to answer the previous value.
        #[prost(bool, tag = "4")]
        pub prev_kv: bool,
    }

    /// `KV/Put`'s answer.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutResponse {
        /// The header: the write's revision.
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
    }

    /// What a client sends on a `Watch` stream.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WatchRequest {
        /// Create, cancel, or ask for progress.
        #[prost(oneof = "watch_request::RequestUnion", tags = "1, 2, 3")]
        pub request_union: Option<watch_request::RequestUnion>,
    }

    /// [`WatchRequest`]'s one of (the variants are named freely: the wire
    /// knows them by tag).
    pub mod watch_request {
        /// Create, cancel, or ask for progress.
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum RequestUnion {
            /// A new watch.
            #[prost(message, tag = "1")]
            Create(super::WatchCreateRequest),
            /// The end of a watch.
            #[prost(message, tag = "2")]
            Cancel(super::WatchCancelRequest),
            /// A progress report, now.
            #[prost(message, tag = "3")]
            Progress(super::WatchProgressRequest),
        }
    }

    /// A new watch.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WatchCreateRequest {
        /// The key.
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        /// The end of the range, empty for `key` alone.
        #[prost(bytes = "vec", tag = "2")]
        pub range_end: Vec<u8>,
        /// From this revision on (inclusive), 0 for now.
        #[prost(int64, tag = "3")]
        pub start_revision: i64,
        /// Periodic empty answers when idle.
        #[prost(bool, tag = "4")]
        pub progress_notify: bool,
        /// Event kinds left out.
        #[prost(enumeration = "FilterType", repeated, tag = "5")]
        pub filters: Vec<i32>,
        /// Whether events carry the previous value.
        #[prost(bool, tag = "6")]
        pub prev_kv: bool,
        /// An id chosen by the client, 0 for the server's.
        #[prost(int64, tag = "7")]
        pub watch_id: i64,
        /// Whether large revisions may be split over answers.
        #[prost(bool, tag = "8")]
        pub fragment: bool,
    }

    /// Event kinds a watch may leave out.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum FilterType {
        /// Leave out puts.
        Noput = 0,
        /// Leave out deletes.
        Nodelete = 1,
    }

    /// The end of a watch.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WatchCancelRequest {
        /// The watch.
        #[prost(int64, tag = "1")]
        pub watch_id: i64,
    }

    /// A progress report, now.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WatchProgressRequest {}

    /// What the server sends on a `Watch` stream.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WatchResponse {
        /// The header.
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
        /// The watch it is for.
        #[prost(int64, tag = "2")]
        pub watch_id: i64,
        /// The watch was created: events from now on reach it.
        #[prost(bool, tag = "3")]
        pub created: bool,
        /// The watch was canceled: nothing more comes.
        #[prost(bool, tag = "4")]
        pub canceled: bool,
        /// The oldest revision left, when the watch started before it.
        #[prost(int64, tag = "5")]
        pub compact_revision: i64,
        /// Why it was canceled.
        #[prost(string, tag = "6")]
        pub cancel_reason: String,
        /// More of the same revision follows.
        #[prost(bool, tag = "7")]
        pub fragment: bool,
        /// The changes.
        #[prost(message, repeated, tag = "11")]
        pub events: Vec<Event>,
    }

    /// One change (`mvccpb.Event`).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Event {
        /// Put or delete.
        #[prost(enumeration = "EventType", tag = "1")]
        pub r#type: i32,
        /// The key and its new value.
        #[prost(message, optional, tag = "2")]
        pub kv: Option<KeyValue>,
        /// The previous value, when asked for.
        #[prost(message, optional, tag = "3")]
        pub prev_kv: Option<KeyValue>,
    }

    /// [`Event`]'s kinds.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum EventType {
        /// A value was stored.
        Put = 0,
        /// The key was deleted.
        Delete = 1,
    }
}

/// An etcd server started by the bench on loopback, ready: killed (and
/// its data directory removed) when dropped.
pub struct Etcd {
    /// The server (declared first: killed before its directory goes).
    child: Child,
    pid: u32,
    /// `http://127.0.0.1:PORT`, its client URL.
    url: String,
    /// The writer's own connection.
    writer: Channel,
    /// Its data directory and log.
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd (on core 0 when pinning) on free loopback ports with a
    /// fresh data directory and answers once a linearizable `Range` works
    /// (it has elected itself); `Ok(Err(why))` when etcd is not installed.
    pub async fn start(pinned: bool) -> Res<Result<Etcd, String>> {
        let Some(program) = find_etcd() else {
            return Ok(Err(NOT_INSTALLED.into()));
        };
        let dir = tempfile::tempdir()?;
        let (client_port, peer_port) = free_ports()?;
        let url = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let log_path = dir.path().join("etcd.log");
        let log = std::fs::File::create(&log_path)?;
        let mut command = server_command(pinned, &program);
        command
            .arg("--name=default")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=default={peer}"))
            .arg("--initial-cluster-state=new")
            .args(["--logger=zap", "--log-outputs=stderr", "--log-level=error"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let pid = child.id().ok_or("etcd exited as soon as it started")?;
        let writer = wait_ready(&mut child, &url, &log_path).await?;
        Ok(Ok(Etcd {
            child,
            pid,
            url,
            writer,
            _dir: dir,
        }))
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Kills it and removes its data directory.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

impl WatchSystem for Etcd {
    fn name(&self) -> &'static str {
        "etcd"
    }

    fn server_pid(&self) -> u32 {
        self.pid
    }

    async fn open_watchers(&self, watchers: usize, writes: u64) -> Res<Vec<JoinHandle<Res<Received>>>> {
        let deadline = tokio::time::Instant::now() + OPEN_DEADLINE;
        let mut tasks = Vec::with_capacity(watchers);
        let mut live = Vec::with_capacity(watchers);
        for first in (0..watchers).step_by(PER_CONNECTION) {
            let channel = connect(&self.url).await?;
            for _ in first..watchers.min(first + PER_CONNECTION) {
                let (created, is_live) = oneshot::channel();
                tasks.push(tokio::spawn(watcher(channel.clone(), writes, created)));
                live.push(is_live);
            }
        }
        for (i, is_live) in live.into_iter().enumerate() {
            let failure = match tokio::time::timeout_at(deadline, is_live).await {
                Ok(Ok(())) => continue,
                // The task ended before its watch was created: its error says why.
                Ok(Err(_)) => match tasks.get_mut(i) {
                    Some(task) => match task.await {
                        Ok(Err(e)) => e.to_string(),
                        Ok(Ok(_)) => "etcd: a watcher ended before its watch was created".into(),
                        Err(e) => format!("etcd: a watcher failed: {e}"),
                    },
                    None => "etcd: a watcher went missing".into(),
                },
                Err(_) => format!(
                    "etcd: {i} of {watchers} watches were created within {} s",
                    OPEN_DEADLINE.as_secs()
                ),
            };
            for task in &tasks {
                task.abort();
            }
            return Err(failure.into());
        }
        Ok(tasks)
    }

    async fn write(&self, seq: u64) -> Res<()> {
        put(self.writer.clone(), FANOUT_KEY, seq.to_string().into_bytes())
            .await
            .map_err(|s| format!("etcd: Put of write {seq} failed: {}", describe(&s)))?;
        Ok(())
    }
}

/// The unary peer cell: `clients` closed loops for `duration`, each a
/// serializable `Range` of one key (put first), over
/// [`UNARY_CONNECTIONS`] connections.
pub async fn unary(etcd: &Etcd, clients: usize, duration: Duration) -> Res<UnaryRow> {
    put(etcd.writer.clone(), UNARY_KEY, UNARY_VALUE.to_vec())
        .await
        .map_err(|s| format!("etcd: Put of the unary key failed: {}", describe(&s)))?;
    let mut channels = Vec::with_capacity(UNARY_CONNECTIONS);
    for _ in 0..UNARY_CONNECTIONS {
        channels.push(connect(&etcd.url).await?);
    }
    // The key reads back before it is measured.
    let first = range(etcd.writer.clone(), UNARY_KEY, true)
        .await
        .map_err(|s| format!("etcd: Range of the unary key failed: {}", describe(&s)))?;
    if !first.kvs.iter().any(|kv| kv.value == UNARY_VALUE) {
        return Err("etcd: the unary key did not read back after its Put".into());
    }
    let run = closed_loop(clients, duration, move |client| {
        let channel = channels[client % channels.len()].clone();
        async move {
            let answer = range(channel, UNARY_KEY, true).await?;
            if answer.kvs.len() == 1 {
                Ok(())
            } else {
                Err(Status::not_found("the unary key is missing"))
            }
        }
    })
    .await;
    Ok(UnaryRow {
        system: "etcd".into(),
        call: "Range (serializable)".into(),
        clients,
        requests_per_s: run.requests_per_s(),
        latency: run.latency,
    })
}

/// One watcher: a `Watch` stream with one watch on [`FANOUT_KEY`]; tells
/// `created` once etcd has created it, then collects `writes` puts.
async fn watcher(channel: Channel, writes: u64, created: oneshot::Sender<()>) -> Res<Received> {
    let mut created = Some(created);
    let mut stream = watch(channel, FANOUT_KEY)
        .await
        .map_err(|s| format!("etcd: cannot open a Watch stream: {}", describe(&s)))?;
    let mut received = Vec::with_capacity(writes as usize);
    while created.is_some() || (received.len() as u64) < writes {
        let answer = stream
            .message()
            .await
            .map_err(|s| format!("etcd: a Watch stream failed: {}", describe(&s)))?
            .ok_or("etcd: a Watch stream ended")?;
        let arrived = Instant::now();
        if answer.canceled {
            return Err(format!("etcd: a watch was canceled: {:?}", answer.cancel_reason).into());
        }
        if answer.created
            && let Some(created) = created.take()
        {
            // The opener may have given up already: nobody to tell then.
            let _ = created.send(());
        }
        for event in answer.events {
            let Some(kv) = event.kv else {
                continue;
            };
            if event.r#type != pb::EventType::Put as i32 || kv.key != FANOUT_KEY {
                continue;
            }
            let seq = std::str::from_utf8(&kv.value)
                .ok()
                .and_then(|value| value.parse::<u64>().ok())
                .ok_or_else(|| {
                    format!(
                        "etcd: a put on {:?} whose value {:?} is not a write number",
                        String::from_utf8_lossy(FANOUT_KEY),
                        String::from_utf8_lossy(&kv.value)
                    )
                })?;
            received.push((seq, arrived));
        }
    }
    Ok(Received {
        arrivals: received,
        open: Box::new(stream),
    })
}

/// A status in one line: its code and message.
fn describe(status: &Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// `etcd` on PATH, else at the usual places.
fn find_etcd() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .chain(["/usr/bin/etcd", "/usr/local/bin/etcd"].map(PathBuf::from))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Two free loopback ports (both held while picking, so distinct).
fn free_ports() -> Res<(u16, u16)> {
    let client = std::net::TcpListener::bind("127.0.0.1:0")?;
    let peer = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok((client.local_addr()?.port(), peer.local_addr()?.port()))
}

/// Probes etcd at `url` until a linearizable `Range` answers (so it has a
/// leader and takes writes) or it exits or [`START_DEADLINE`] passes;
/// answers the probe's connection.
async fn wait_ready(child: &mut Child, url: &str, log: &Path) -> Res<Channel> {
    let deadline = Instant::now() + START_DEADLINE;
    let mut last = String::from("no answer yet");
    loop {
        if let Some(status) = child.try_wait()? {
            return Err(format!("etcd exited ({status}) before it answered; {}", log_tail(log)).into());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "etcd did not answer at {url} within {} s (last: {last}); {}",
                START_DEADLINE.as_secs(),
                log_tail(log)
            )
            .into());
        }
        let probe = async {
            let channel = connect(url).await.map_err(|e| e.to_string())?;
            range(channel.clone(), FANOUT_KEY, false)
                .await
                .map_err(|s| format!("Range: {}", describe(&s)))?;
            Ok::<_, String>(channel)
        };
        match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
            Ok(Ok(channel)) => return Ok(channel),
            Ok(Err(e)) => last = e,
            Err(_) => last = format!("a probe took over {} s", PROBE_TIMEOUT.as_secs()),
        }
        // The next probe, once this one has failed: not a guess at readiness.
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// The end of etcd's log, for an error message.
fn log_tail(log: &Path) -> String {
    match std::fs::read_to_string(log) {
        Ok(text) if !text.trim().is_empty() => {
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(10)..].join("\n");
            format!("its log ends:\n{tail}")
        }
        Ok(_) => "its log is empty".into(),
        Err(e) => format!("its log cannot be read: {e}"),
    }
}

/// A unary call to etcd on `channel`.
async fn call<Req, Resp>(channel: Channel, path: &'static str, request: Req) -> Result<Resp, Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("the connection is not ready: {e}")))?;
    let codec = ProstCodec::<Req, Resp>::default();
    Ok(grpc
        .unary(Request::new(request), PathAndQuery::from_static(path), codec)
        .await?
        .into_inner())
}

/// `KV/Range` of `key` alone.
async fn range(channel: Channel, key: &[u8], serializable: bool) -> Result<pb::RangeResponse, Status> {
    let request = pb::RangeRequest {
        key: key.to_vec(),
        serializable,
        ..pb::RangeRequest::default()
    };
    call(channel, "/etcdserverpb.KV/Range", request).await
}

/// `KV/Put` of `key`, answered once etcd has committed it.
async fn put(channel: Channel, key: &[u8], value: Vec<u8>) -> Result<pb::PutResponse, Status> {
    let request = pb::PutRequest {
        key: key.to_vec(),
        value,
        ..pb::PutRequest::default()
    };
    call(channel, "/etcdserverpb.KV/Put", request).await
}

/// A `Watch` stream on `channel` with one watch of `key` from now on; the
/// request half stays open (closing it would end the stream).
async fn watch(channel: Channel, key: &[u8]) -> Result<Streaming<pb::WatchResponse>, Status> {
    let create = pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::Create(pb::WatchCreateRequest {
            key: key.to_vec(),
            ..pb::WatchCreateRequest::default()
        })),
    };
    let requests = tokio_stream::once(create).chain(tokio_stream::pending());
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("the connection is not ready: {e}")))?;
    let codec = ProstCodec::<pb::WatchRequest, pb::WatchResponse>::default();
    Ok(grpc
        .streaming(
            Request::new(requests),
            PathAndQuery::from_static("/etcdserverpb.Watch/Watch"),
            codec,
        )
        .await?
        .into_inner())
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::fanout::{Cell, measure};

    #[test]
    fn messages_use_etcds_field_numbers() {
        // Field 1 (key, bytes) then field 7 (serializable, varint).
        let range = pb::RangeRequest {
            key: b"k".to_vec(),
            serializable: true,
            ..pb::RangeRequest::default()
        };
        assert_eq!(range.encode_to_vec(), [0x0a, 1, b'k', 0x38, 1]);
        // Field 1 (create_request) holding field 1 (key) and field 3 (start_revision).
        let watch = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::Create(pb::WatchCreateRequest {
                key: b"k".to_vec(),
                start_revision: 5,
                ..pb::WatchCreateRequest::default()
            })),
        };
        assert_eq!(watch.encode_to_vec(), [0x0a, 5, 0x0a, 1, b'k', 0x18, 5]);
        // created (3), then events (11) holding type DELETE (1) and kv (2) with value (5).
        let bytes = [0x18, 1, 0x5a, 6, 0x08, 1, 0x12, 2, 0x2a, 0];
        let answer = pb::WatchResponse::decode(&bytes[..]).map_err(|e| e.to_string());
        assert_eq!(
            answer.map(|a| (a.created, a.events.first().map(|e| (e.r#type, e.kv.is_some())))),
            Ok((true, Some((pb::EventType::Delete as i32, true))))
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn etcd_watches_and_reads() -> Res<()> {
        let etcd = match Etcd::start(false).await? {
            Ok(etcd) => etcd,
            Err(why) => {
                println!("skipped: {why}");
                return Ok(());
            }
        };
        let fanout = measure(&etcd, Cell::new(10, 20, 0)).await?;
        println!("{fanout:?}");
        assert_eq!((fanout.watchers, fanout.writes, fanout.deliveries), (10, 20, 10 * 20));
        assert!(fanout.each.p50_ms >= 0.0 && fanout.each.max_ms.is_finite());
        let reads = unary(&etcd, 4, Duration::from_secs(1)).await?;
        println!("{reads:?}");
        assert!(reads.requests_per_s > 0.0, "{reads:?}");
        etcd.stop().await;
        Ok(())
    }
}
