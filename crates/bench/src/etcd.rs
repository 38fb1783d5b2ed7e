//! etcd as the peer: an etcd server started by the bench on loopback (a
//! fresh data directory, etcd's default durability: every write fsynced),
//! spoken to over its own gRPC API (`etcdserverpb`, the few messages used
//! written by hand in `pb`, wire-compatible, no protoc), measured by the same code
//! as Lightbox:
//!
//! - watch fan-out ([`crate::fanout::measure`]): one watch per gRPC
//!   `Watch` stream, [`PER_CONNECTION`] streams per HTTP/2 connection, all
//!   on one key, the writer on its own connection;
//! - unary reads ([`unary`]): a serializable `Range` of one key, the same
//!   closed-loop generator as Lightbox's `GetUser`.

mod pb;

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::{process::Child, sync::oneshot, task::JoinHandle};
use tonic::{Status, transport::Channel};

use self::pb::{put, range, watch};
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
/// `UNARY_CONNECTIONS` connections.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::{Cell, measure};

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
