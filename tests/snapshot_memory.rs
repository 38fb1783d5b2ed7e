//! Snapshots page: 50 concurrent `Watch(since_revision=0)` on a feed of
//! 100,000 entities, under writes, each get the whole state at one
//! revision and then every change after it, while the process's peak
//! memory grows by a bounded amount (a few pages per snapshot being read,
//! not the state once per stream).
//!
//! One test in its own binary: the peak resident memory measured
//! (`VmHWM`, reset through `/proc/self/clear_refs`) is this test's alone.
//! On SQLite always (about 100 s in a debug build on 2 cores); on
//! PostgreSQL too with `LIGHTBOX_TEST_SNAPSHOT_POSTGRES=1` (about 300 s:
//! the same paging code, on the backend the changefeed suite already
//! covers both ways).

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use lightbox_api::users::User;
use lightbox_changefeed::{Feed, FeedOptions, Frame, Retention, WatchFilter};
use lightbox_testkit::TestDb;
use tokio_stream::StreamExt;

const FEED: &str = "things";
const ENTITIES: usize = 100_000;
const WATCHERS: usize = 50;
/// The bound on the peak memory growth while the snapshots are read. The
/// state is about 25 MB in memory (100,000 entities as `Change`s); a
/// snapshot held whole by each of the 50 streams would be over 1 GB.
const PEAK_GROWTH_BOUND_KIB: u64 = 96 * 1024;
/// How long the whole run may take (a debug build on 2 cores).
const RUN_DEADLINE: Duration = Duration::from_secs(300);

fn id(n: usize) -> String {
    format!("0190a3c2-7b1e-7000-8000-{n:012}")
}

fn user(n: usize, name: &str) -> User {
    User {
        id: id(n),
        display_name: name.into(),
        email: format!("user{n}@example.com"),
        ..User::default()
    }
}

/// What was written: entity index → its (revision, deleted) writes, in
/// revision order.
type Writes = Arc<Mutex<HashMap<usize, Vec<(i64, bool)>>>>;

/// A digest of a state, whatever the order it is read in: the number of
/// entities, and the sum of a hash of each (id, revision). A stream keeps
/// only this, so that the memory measured is the server side's.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Digest {
    entities: usize,
    sum: u64,
}

impl Digest {
    fn add(&mut self, id: &str, revision: i64) {
        let mut hasher = DefaultHasher::new();
        (id, revision).hash(&mut hasher);
        self.entities += 1;
        self.sum = self.sum.wrapping_add(hasher.finish());
    }
}

/// The digest of the state at `at`: each entity's latest write at or
/// before it, unless that was its deletion.
fn state_at(writes: &HashMap<usize, Vec<(i64, bool)>>, at: i64) -> Digest {
    let mut digest = Digest::default();
    for (n, history) in writes {
        if let Some(&(revision, deleted)) = history.iter().rev().find(|(revision, _)| *revision <= at)
            && !deleted
        {
            digest.add(&id(*n), revision);
        }
    }
    digest
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|line| line.starts_with(field))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kib| kib.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_snapshots_of_a_large_feed_page_with_bounded_memory() {
    run(TestDb::sqlite()).await;
    if std::env::var_os("LIGHTBOX_TEST_SNAPSHOT_POSTGRES").is_some_and(|on| on == "1") {
        let db = TestDb::postgres()
            .await
            .unwrap_or_else(|| panic!("LIGHTBOX_TEST_SNAPSHOT_POSTGRES=1, and PostgreSQL does not answer"));
        run(db).await;
    }
}

async fn run(test_db: TestDb) {
    let started = Instant::now();
    let db = test_db.connect().await;
    db.migrate(&[]).await.unwrap_or_else(|err| panic!("migrate: {err}"));
    let options = FeedOptions {
        // Room for every write of the run: no stream falls a ring behind.
        watcher_buffer: 16_384,
        progress_interval: Duration::from_secs(3600),
        retention: Retention {
            interval: None,
            ..Retention::default()
        },
        ..FeedOptions::default()
    };
    let max_snapshots = options.max_snapshots;
    let feed: Feed<User> = Feed::open(db, FEED, options)
        .await
        .unwrap_or_else(|err| panic!("open feed: {err}"));
    let writes: Writes = Arc::default();
    for batch in 0..ENTITIES / 1000 {
        let mut tx = feed.begin().await.unwrap_or_else(|err| panic!("begin: {err}"));
        let mut written = Vec::with_capacity(1000);
        for n in batch * 1000..(batch + 1) * 1000 {
            let revision = tx
                .put(&id(n), &user(n, "seeded"))
                .await
                .unwrap_or_else(|err| panic!("put: {err}"));
            written.push((n, revision));
        }
        tx.commit().await.unwrap_or_else(|err| panic!("commit: {err}"));
        let mut writes = writes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for (n, revision) in written {
            writes.insert(n, vec![(revision, false)]);
        }
    }
    println!("seeded {ENTITIES} entities in {:?}", started.elapsed());

    // From here, the peak resident memory is this part's.
    std::fs::write("/proc/self/clear_refs", "5").unwrap_or_else(|err| panic!("reset the peak RSS: {err}"));
    let baseline = status_kib("VmRSS:");

    // The watchers: each checks its snapshot against the state at its
    // revision once it has it, then the live changes, revision by revision.
    let begun = Arc::new(tokio::sync::Semaphore::new(0));
    let mut watchers = Vec::new();
    for _ in 0..WATCHERS {
        let mut stream = feed.watch(0, WatchFilter::default());
        let begun = Arc::clone(&begun);
        watchers.push(tokio::spawn(async move {
            let at = match stream.next().await {
                Some(Ok(Frame::SnapshotBegin { revision })) => revision,
                other => panic!("expected the snapshot's begin, got {other:?}"),
            };
            begun.add_permits(1);
            let mut digest = Digest::default();
            let mut last = String::new();
            loop {
                match stream.next().await {
                    Some(Ok(Frame::Change(change))) => {
                        assert!(change.entity.is_some(), "a snapshot carries no deletions");
                        assert!(change.revision <= at, "a snapshot holds nothing written after it");
                        assert!(change.entity_id > last, "a snapshot is in id order, each entity once");
                        digest.add(&change.entity_id, change.revision);
                        last.clone_from(&change.entity_id);
                    }
                    Some(Ok(Frame::SnapshotEnd { revision })) => {
                        assert_eq!(revision, at, "a snapshot ends at the revision it began at");
                        break;
                    }
                    other => panic!("expected a snapshot's change or end, got {other:?}"),
                }
            }
            (at, digest, stream)
        }));
    }

    // A writer updates and deletes entities while the snapshots are read,
    // until every one has begun.
    let mut next = 0;
    while begun.available_permits() < WATCHERS {
        assert!(
            started.elapsed() < RUN_DEADLINE,
            "the snapshots did not all begin in time"
        );
        let n = (next * 7919) % ENTITIES;
        let deleted = next % 5 == 4;
        let mut tx = feed.begin().await.unwrap_or_else(|err| panic!("begin: {err}"));
        let revision = if deleted {
            tx.delete(&id(n))
                .await
                .unwrap_or_else(|err| panic!("delete: {err}"))
                .unwrap_or_else(|| panic!("{n} was deleted already"))
        } else {
            tx.put(&id(n), &user(n, &format!("update {next}")))
                .await
                .unwrap_or_else(|err| panic!("put: {err}"))
        };
        tx.commit().await.unwrap_or_else(|err| panic!("commit: {err}"));
        writes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(n)
            .or_default()
            .push((revision, deleted));
        next += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let head = feed
        .committed_revision()
        .await
        .unwrap_or_else(|err| panic!("head: {err}"));
    println!("{next} writes while {WATCHERS} snapshots were read ({max_snapshots} at a time)");

    let mut snapshots = Vec::new();
    for watcher in watchers {
        let remaining = RUN_DEADLINE.saturating_sub(started.elapsed());
        let (at, digest, mut stream) = tokio::time::timeout(remaining, watcher)
            .await
            .unwrap_or_else(|_| panic!("the snapshots did not all end within {RUN_DEADLINE:?}"))
            .unwrap_or_else(|err| panic!("a watcher failed: {err}"));
        // Then every change after the snapshot, in order, up to the head.
        let mut cursor = at;
        while cursor < head {
            match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
                Ok(Some(Ok(Frame::Change(change)))) => {
                    assert_eq!(
                        change.revision,
                        cursor + 1,
                        "live changes follow the snapshot without a gap"
                    );
                    cursor = change.revision;
                }
                Ok(Some(Ok(Frame::Progress { .. }))) => {}
                other => panic!("expected the change after {cursor}, got {other:?}"),
            }
        }
        snapshots.push((at, digest));
    }
    let peak = status_kib("VmHWM:");
    let growth = peak.saturating_sub(baseline);
    // Each snapshot is exactly the state at its revision.
    let writes = writes.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
    let mut revisions = Vec::new();
    for (at, digest) in snapshots {
        assert_eq!(digest, state_at(&writes, at), "the snapshot at {at} is the state then");
        revisions.push(at);
    }
    revisions.sort_unstable();
    revisions.dedup();
    println!(
        "{WATCHERS} snapshots of {ENTITIES} entities at {} revisions: peak RSS {peak} KiB, {growth} KiB above the {baseline} KiB before, in {:?}",
        revisions.len(),
        started.elapsed()
    );
    assert!(
        growth < PEAK_GROWTH_BOUND_KIB,
        "the peak memory grew by {growth} KiB, over the bound of {PEAK_GROWTH_BOUND_KIB} KiB"
    );
    drop(feed);
    drop(test_db);
}
