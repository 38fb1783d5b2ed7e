//! Replicas and failover: three Users replicas (`lightbox serve --target
//! users` processes) on one PostgreSQL database, one of them killed with
//! SIGKILL while four writers make 10,000 writes through a balanced client
//! (`lightbox_client`) over the three addresses.
//!
//! Photos (a process, `LIGHTBOX_USERS_URL` listing the three replicas) and a
//! CLI watcher (`lightbox watch users --json --addr A,B,C`) start while only
//! the replica to be killed is up, so both follow it when it dies: both must
//! fail over and resume, Photos' copy ending exactly the users table, the
//! watcher printing every revision exactly once, in order. The writers see
//! failures only within the ejection window after the kill, each
//! `UNAVAILABLE`; a write whose answer was lost (it may or may not have
//! committed) is retried under a new value, and accounted for afterwards
//! from the changelog.
//!
//! Needs PostgreSQL: skipped with a notice when it is unreachable, unless
//! `LIGHTBOX_REQUIRE_POSTGRES=1`.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use lightbox_api::{
    contracts::{ListContractsRequest, contracts_service_client::ContractsServiceClient},
    users::{CreateUserRequest, ListUsersRequest, UpdateUserRequest, User, users_service_client::UsersServiceClient},
};
use lightbox_cache::{Cache, CacheOptions};
use lightbox_testkit::{TestDb, channel, eventually};
use prost::Message;
use sqlx::Row;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_lightbox");

/// The users service's changefeed (`lightbox_users::FEED`).
const USERS_FEED: &str = "users";

/// Writer tasks, each with its own balanced client.
const WRITERS: usize = 4;
/// Writes per writer: the first `USERS_PER_WRITER` create its users, the
/// rest update them in turn. The full 4 × 2,500 took 45-53 s in a debug
/// build on 2 shared cores (the writes serialise on the feed's counter row;
/// three server processes and PostgreSQL share the cores), the whole test
/// 46-56 s: under the minute, so the count is not cut.
const WRITES: usize = 2_500;
const USERS_PER_WRITER: usize = 10;
/// How long after the kill a call may still fail: lightbox-client documents
/// a few milliseconds for a killed process on loopback; generous for a
/// loaded machine.
const EJECTION_WINDOW: Duration = Duration::from_secs(1);
/// How long the writes may take in all before the test gives up.
const WRITES_DEADLINE: Duration = Duration::from_secs(240);

/// A failed write: when it was sent and answered, and how it failed.
#[derive(Debug)]
struct Failed {
    sent: Instant,
    answered: Instant,
    code: Code,
    message: String,
}

/// What one writer saw: the writes acknowledged (revision, value), the
/// values of the writes whose answer was a failure (committed or not), and
/// the failures.
#[derive(Debug, Default)]
struct Ledger {
    acked: Vec<(i64, String)>,
    unanswered: Vec<String>,
    failures: Vec<Failed>,
}

/// Three ports nothing listens on, distinct (all bound at once, then released).
fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|err| panic!("bind: {err}")))
        .collect();
    std::array::from_fn(|i| {
        listeners[i]
            .local_addr()
            .unwrap_or_else(|err| panic!("bound listener has no address: {err}"))
            .port()
    })
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `lightbox serve` with `args`, its own admin listener on a free port, and
/// `env`; killed (SIGKILL) when dropped.
fn serve(args: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new(BIN)
        .arg("serve")
        .args(args)
        .args(["--admin-addr", "127.0.0.1:0"])
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run {BIN}: {err}"))
}

/// A Users replica on `port`, over the shared database.
fn users_replica(port: u16, database: &str, contracts_url: &str) -> Child {
    let addr = local(port).to_string();
    serve(
        &[
            "--target",
            "users",
            "--users-addr",
            &addr,
            "--database-url",
            database,
            "--contracts-url",
            contracts_url,
            "--progress-interval",
            "200ms",
        ],
        &[],
    )
}

/// Whether the users service at `port` answers.
async fn users_serving(port: u16) -> Option<()> {
    let mut client = UsersServiceClient::new(channel(local(port)).await);
    let request = ListUsersRequest {
        page_size: 1,
        ..ListUsersRequest::default()
    };
    client.list_users(request).await.ok().map(|_| ())
}

/// Every line a child writes to `stream`, as it comes.
fn collect_lines(stream: impl tokio::io::AsyncRead + Unpin + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&lines);
    tokio::spawn(async move {
        let mut reader = BufReader::new(stream).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    });
    lines
}

fn snapshot_of(lines: &Mutex<Vec<String>>) -> Vec<String> {
    lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The revision of a watch frame's JSON line, if it is a change.
fn change_revision(frame: &serde_json::Value) -> Option<i64> {
    frame["change"]["revision"].as_str().and_then(|r| r.parse().ok())
}

/// One writer: `WRITES` writes through a balanced client over `targets`;
/// a failed write is retried (under a new value, so that the changelog says
/// which attempt committed) until it is acknowledged.
async fn writer(w: usize, targets: String, done: tokio::sync::watch::Sender<usize>) -> Ledger {
    let channel = lightbox_client::channel(&targets, Duration::from_secs(1))
        .unwrap_or_else(|err| panic!("bad targets {targets}: {err}"));
    let mut client = UsersServiceClient::new(channel);
    let (mut ids, mut ledger): (Vec<String>, _) = (Vec::new(), Ledger::default());
    for op in 0..WRITES {
        for attempt in 0.. {
            assert!(
                attempt < 50,
                "writer {w}'s write {op} failed {attempt} times: {:?}",
                ledger.failures.last()
            );
            let value = format!("w{w}-{op}-{attempt}");
            let sent = Instant::now();
            let answer = if op < USERS_PER_WRITER {
                let user = User {
                    display_name: value.clone(),
                    email: format!("{value}@failover.example.com"),
                    ..User::default()
                };
                client
                    .create_user(CreateUserRequest { user: Some(user) })
                    .await
                    .map(|r| r.into_inner().user)
            } else {
                let user = User {
                    id: ids[op % USERS_PER_WRITER].clone(),
                    display_name: value.clone(),
                    ..User::default()
                };
                let request = UpdateUserRequest {
                    user: Some(user),
                    update_mask: Some(pbjson_types::FieldMask {
                        paths: vec!["display_name".into()],
                    }),
                    expected_revision: 0,
                };
                client.update_user(request).await.map(|r| r.into_inner().user)
            };
            match answer {
                Ok(Some(user)) => {
                    if op < USERS_PER_WRITER {
                        ids.push(user.id);
                    }
                    ledger.acked.push((user.revision, value));
                    break;
                }
                Ok(None) => panic!("writer {w}'s write {op} answered no user"),
                Err(status) => {
                    ledger.unanswered.push(value);
                    ledger.failures.push(Failed {
                        sent,
                        answered: Instant::now(),
                        code: status.code(),
                        message: status.message().to_owned(),
                    });
                }
            }
        }
        done.send_modify(|n| *n += 1);
    }
    ledger
}

/// Every user, through the replica at `port`: id -> (display name, revision).
async fn list_users(port: u16) -> BTreeMap<String, (String, i64)> {
    let mut client = UsersServiceClient::new(channel(local(port)).await);
    let (mut all, mut token) = (BTreeMap::new(), String::new());
    loop {
        let page = client
            .list_users(ListUsersRequest {
                page_size: 1000,
                page_token: token,
            })
            .await
            .unwrap_or_else(|status| panic!("list users: {status:?}"))
            .into_inner();
        for user in page.users {
            all.insert(user.id, (user.display_name, user.revision));
        }
        if page.next_page_token.is_empty() {
            return all;
        }
        token = page.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_users_replica_fails_over_with_nothing_lost_or_repeated() {
    let Some(users_db) = TestDb::postgres().await else {
        return;
    };
    let begun = Instant::now();
    let (contracts_db, photos_db) = (TestDb::sqlite(), TestDb::sqlite());
    let [a, b, c, contracts_port, photos_port] = free_ports::<5>();
    let replicas_url = [a, b, c].map(|p| format!("http://{}", local(p))).join(",");
    let contracts_url = format!("http://{}", local(contracts_port));

    let contracts_addr = local(contracts_port).to_string();
    let _contracts = serve(
        &[
            "--target",
            "contracts",
            "--contracts-addr",
            &contracts_addr,
            "--database-url",
            contracts_db.url(),
            // As often as its followers (users, photos) expect to hear from it.
            "--progress-interval",
            "200ms",
        ],
        &[],
    );
    eventually("contracts to serve", || async {
        let mut client = ContractsServiceClient::new(channel(local(contracts_port)).await);
        client
            .list_contracts(ListContractsRequest::default())
            .await
            .ok()
            .map(|_| ())
    })
    .await;

    // Only replica A at first: Photos' copy and the watcher open their
    // streams on it, the replica that is killed.
    let mut replica_a = users_replica(a, users_db.url(), &contracts_url);
    eventually("users replica A to serve", || users_serving(a)).await;
    let photos_addr = local(photos_port).to_string();
    // Photos' idle timeout is three of its progress intervals: a second
    // keeps a busy machine from making it reconnect (elsewhere) on its own.
    let _photos = serve(
        &[
            "--target",
            "photos",
            "--photos-addr",
            &photos_addr,
            "--database-url",
            photos_db.url(),
            "--progress-interval",
            "1s",
        ],
        &[
            ("LIGHTBOX_USERS_URL", replicas_url.as_str()),
            ("LIGHTBOX_CONTRACTS_URL", contracts_url.as_str()),
        ],
    );
    let mut watcher = Command::new(BIN)
        .args(["watch", "users", "--json", "--addr", &replicas_url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run {BIN} watch: {err}"));
    let printed = collect_lines(watcher.stdout.take().unwrap_or_else(|| panic!("no stdout")));
    let said = collect_lines(watcher.stderr.take().unwrap_or_else(|| panic!("no stderr")));
    eventually("the watcher's snapshot to end", || async {
        snapshot_of(&printed)
            .iter()
            .any(|l| l.contains("snapshotEnd"))
            .then_some(())
    })
    .await;
    // Photos' persisted copy of users, read as its next start would.
    let copy = eventually("Photos to migrate its database", || async {
        let db = lightbox_changefeed::Db::connect(photos_db.url()).await.ok()?;
        Cache::<User>::open(db, lightbox_photos::USERS_CACHE, CacheOptions::default())
            .await
            .ok()
    })
    .await;
    // A first user through A: once both followers have it, both are
    // streaming from A.
    let mut through_a = UsersServiceClient::new(channel(local(a)).await);
    let first = through_a
        .create_user(CreateUserRequest {
            user: Some(User {
                display_name: "first".into(),
                email: "first@failover.example.com".into(),
                ..User::default()
            }),
        })
        .await
        .unwrap_or_else(|status| panic!("create the first user: {status:?}"))
        .into_inner()
        .user
        .unwrap_or_default();
    assert_eq!(first.revision, 1);
    eventually("the watcher to print revision 1", || async {
        let lines = snapshot_of(&printed);
        let frames = lines.iter().filter_map(|l| serde_json::from_str(l).ok());
        frames
            .filter_map(|f: serde_json::Value| change_revision(&f))
            .any(|r| r == 1)
            .then_some(())
    })
    .await;
    eventually("Photos' copy to hold revision 1", || async {
        copy.persisted()
            .await
            .ok()
            .filter(|(cursor, _)| *cursor >= 1)
            .map(|_| ())
    })
    .await;

    // Then B and C, and the writers over all three.
    let _replica_b = users_replica(b, users_db.url(), &contracts_url);
    let _replica_c = users_replica(c, users_db.url(), &contracts_url);
    eventually("users replica B to serve", || users_serving(b)).await;
    eventually("users replica C to serve", || users_serving(c)).await;
    let ready = begun.elapsed();

    let (done, mut progress) = tokio::sync::watch::channel(0usize);
    let writing = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(writer(w, replicas_url.clone(), done.clone())))
        .collect();
    drop(done);
    // SIGKILL replica A a third of the way through.
    let kill_after = WRITERS * WRITES / 3;
    tokio::time::timeout(WRITES_DEADLINE, progress.wait_for(|n| *n >= kill_after))
        .await
        .unwrap_or_else(|_| panic!("{kill_after} writes not done within {WRITES_DEADLINE:?}"))
        .unwrap_or_else(|_| panic!("the writers stopped before {kill_after} writes"));
    let killed_at = Instant::now();
    replica_a
        .start_kill()
        .unwrap_or_else(|err| panic!("cannot kill replica A: {err}"));
    let status = replica_a.wait().await.unwrap_or_else(|err| panic!("replica A: {err}"));
    assert!(!status.success(), "replica A was killed: {status:?}");
    let mut ledgers = Vec::new();
    for writer in writers {
        let ledger = tokio::time::timeout(WRITES_DEADLINE, writer)
            .await
            .unwrap_or_else(|_| panic!("the writes did not finish within {WRITES_DEADLINE:?}"))
            .unwrap_or_else(|err| panic!("a writer failed: {err}"));
        ledgers.push(ledger);
    }
    let wrote = writing.elapsed();

    // Every failure came within the ejection window after the kill, and was
    // UNAVAILABLE: after that, every write succeeded.
    let failures: Vec<&Failed> = ledgers.iter().flat_map(|l| &l.failures).collect();
    let after_kill: Vec<Duration> = failures
        .iter()
        .map(|f| {
            assert!(
                f.answered >= killed_at,
                "a write failed before the kill: {:?} {}",
                f.code,
                f.message
            );
            f.answered - killed_at
        })
        .collect();
    let latest = after_kill.iter().max().copied().unwrap_or_default();
    let sent_latest = failures
        .iter()
        .map(|f| f.sent.saturating_duration_since(killed_at))
        .max()
        .unwrap_or_default();
    eprintln!(
        "failover: {} of {} writes failed, the last answered {latest:?} after the kill (sent {sent_latest:?} after it)",
        failures.len(),
        WRITERS * WRITES
    );
    for f in &failures {
        assert_eq!(f.code, Code::Unavailable, "{}", f.message);
        assert!(
            f.answered - killed_at <= EJECTION_WINDOW,
            "a write failed {:?} after the kill, past the ejection window: {}",
            f.answered - killed_at,
            f.message
        );
    }

    // The changelog, read from the database: every acknowledged write at
    // its revision, each unanswered one at most once, nothing else.
    let db = users_db.connect().await;
    let rows = sqlx::query("SELECT revision, entity_id, payload FROM feed_changes WHERE feed = $1 ORDER BY revision")
        .bind(USERS_FEED)
        .fetch_all(db.pool())
        .await
        .unwrap_or_else(|err| panic!("read the changelog: {err}"));
    let (mut changelog, mut latest) = (Vec::new(), BTreeMap::new());
    for row in &rows {
        let revision: i64 = row.try_get(0).unwrap_or_else(|err| panic!("revision: {err}"));
        let id: String = row.try_get(1).unwrap_or_else(|err| panic!("entity_id: {err}"));
        let payload: Option<Vec<u8>> = row.try_get(2).unwrap_or_else(|err| panic!("payload: {err}"));
        let user = User::decode(payload.unwrap_or_default().as_slice())
            .unwrap_or_else(|err| panic!("revision {revision} does not decode: {err}"));
        latest.insert(id, (user.display_name.clone(), revision));
        changelog.push((revision, user.display_name));
    }
    let head = changelog.len() as i64;
    assert!(
        changelog.iter().map(|c| c.0).eq(1..=head),
        "revisions 1..={head}, no gap"
    );
    let by_revision: HashMap<i64, &str> = changelog.iter().map(|(r, v)| (*r, v.as_str())).collect();
    let acked: HashMap<&str, i64> = ledgers
        .iter()
        .flat_map(|l| &l.acked)
        .map(|(r, v)| (v.as_str(), *r))
        .collect();
    assert_eq!(acked.len(), WRITERS * WRITES, "every write acknowledged once");
    for (value, revision) in &acked {
        assert_eq!(
            by_revision.get(revision),
            Some(value),
            "acknowledged at revision {revision}"
        );
    }
    let unanswered: HashSet<&str> = ledgers.iter().flat_map(|l| &l.unanswered).map(String::as_str).collect();
    let mut committed_unanswered = 0;
    for (revision, value) in &changelog[1..] {
        if acked.contains_key(value.as_str()) {
            continue;
        }
        assert!(
            unanswered.contains(value.as_str()),
            "revision {revision} ({value}) is no write of the test"
        );
        committed_unanswered += 1;
    }
    assert_eq!(head as usize, 1 + acked.len() + committed_unanswered);
    eprintln!(
        "failover: head {head}; {committed_unanswered} of {} unanswered writes had committed",
        unanswered.len()
    );

    // Photos' copy converges exactly to the users table, read through a
    // replica still up.
    let users = list_users(b).await;
    assert_eq!(users, latest, "the users table is the changelog's latest state");
    eventually("Photos' copy to be the users table at the head", || async {
        let (cursor, copy) = copy.persisted().await.ok()?;
        let copy: BTreeMap<String, (String, i64)> = copy
            .into_iter()
            .map(|(id, (user, revision))| (id, (user.display_name, revision)))
            .collect();
        (cursor == head && copy == users).then_some(())
    })
    .await;

    // The watcher printed every revision once, in order, up to the head,
    // after resuming on another replica by itself.
    eventually("the watcher to print the head", || async {
        let lines = snapshot_of(&printed);
        let last = lines
            .iter()
            .rev()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|f| change_revision(&f));
        (last == Some(head)).then_some(())
    })
    .await;
    let frames: Vec<serde_json::Value> = snapshot_of(&printed)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|err| panic!("not JSON ({err}): {l}")))
        .collect();
    assert_eq!(frames.iter().filter(|f| f.get("snapshotBegin").is_some()).count(), 1);
    assert!(frames.iter().all(|f| f.get("reset").is_none()), "no reset");
    let mut seen = Vec::new();
    for frame in &frames {
        if let Some(revision) = change_revision(frame) {
            let value = frame["change"]["user"]["displayName"].as_str().unwrap_or_default();
            assert_eq!(by_revision.get(&revision).copied(), Some(value), "revision {revision}");
            seen.push(revision);
        }
    }
    assert!(
        seen.iter().copied().eq(1..=head),
        "every revision once, in order: {} changes printed for head {head}",
        seen.len()
    );
    let said = snapshot_of(&said);
    let resumed: Vec<&String> = said
        .iter()
        .filter(|l| l.contains("reconnecting from revision"))
        .collect();
    assert!(!resumed.is_empty(), "the watcher resumed: {said:?}");
    eprintln!("failover: the watcher said {resumed:?}");
    let _ = watcher.kill().await;
    eprintln!(
        "failover: ready in {ready:?}, {} writes in {wrote:?}, {:?} in all",
        WRITERS * WRITES,
        begun.elapsed()
    );
}
