//! The cache (projection) library on SQLite and PostgreSQL: it follows a
//! watch stream into a persisted copy, resumes from its cursor after drops
//! and restarts, handles compaction answers, holds back mass deletions, and
//! notices a silent stream.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures_util::StreamExt;
use lightbox_api::users::User;
use lightbox_cache::{Cache, CacheOptions, Source};
use lightbox_changefeed::{Feed, FeedOptions, Retention, watch::WatchStream};
use lightbox_testkit::{TestDb, conformance, eventually};
use tonic::Status;

conformance!(
    follows_a_snapshot_then_live_changes,
    a_restart_resumes_from_the_cursor_without_relisting,
    after_any_drops_the_copy_equals_the_upstream,
    compaction_answers_are_applied_by_themselves,
    the_guard_rail_holds_back_a_snapshot_that_deletes_most_of_the_copy,
    a_silent_stream_is_noticed_and_reconnected,
    a_watch_that_never_opens_is_given_up_and_tried_again,
    a_held_batch_is_neither_applied_nor_skipped,
);

fn feed_options() -> FeedOptions {
    FeedOptions {
        progress_interval: Duration::from_millis(100),
        poll_interval: Duration::from_millis(100),
        retention: Retention {
            interval: None,
            ..Retention::default()
        },
        ..FeedOptions::default()
    }
}

fn cache_options() -> CacheOptions {
    CacheOptions {
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(100),
        idle_timeout: Duration::from_secs(2),
        ..CacheOptions::default()
    }
}

/// An upstream feed in its own database (of the same backend as `like`).
async fn upstream(like: &TestDb, options: FeedOptions) -> (TestDb, Feed<User>) {
    let db = match like.backend() {
        lightbox_changefeed::Backend::Sqlite => TestDb::sqlite(),
        lightbox_changefeed::Backend::Postgres => match TestDb::postgres().await {
            Some(db) => db,
            None => panic!("PostgreSQL went away"),
        },
    };
    let pool = db.connect().await;
    pool.migrate(&[]).await.unwrap_or_else(|err| panic!("{err}"));
    let feed = Feed::open(pool, "users", options)
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    (db, feed)
}

async fn open_cache(db: &TestDb, options: CacheOptions) -> Cache<User> {
    let pool = db.connect().await;
    pool.migrate(&[&lightbox_cache::MIGRATIONS])
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    Cache::open(pool, "users", options)
        .await
        .unwrap_or_else(|err| panic!("{err}"))
}

async fn put(feed: &Feed<User>, id: &str, name: &str) -> i64 {
    lightbox_testkit::put_user(feed, id, name).await
}

async fn delete(feed: &Feed<User>, id: &str) {
    lightbox_testkit::delete_entity(feed, id).await
}

/// The upstream's state: id -> (name, revision).
async fn upstream_state(feed: &Feed<User>) -> HashMap<String, (String, i64)> {
    let listed = feed.list("", 100_000).await.unwrap_or_else(|err| panic!("{err}"));
    listed
        .into_iter()
        .map(|(id, u)| (id, (u.display_name, u.revision)))
        .collect()
}

async fn copy_state(cache: &Cache<User>) -> HashMap<String, (String, i64)> {
    cache
        .all()
        .into_iter()
        .map(|(id, (u, revision))| (id, (u.display_name, revision)))
        .collect()
}

/// Waits until the copy equals the upstream, entities and revisions.
async fn converged(cache: &Cache<User>, feed: &Feed<User>) {
    let head = feed.committed_revision().await.unwrap_or_else(|err| panic!("{err}"));
    eventually("the copy to reach the upstream's head", || async {
        (cache.state().applied_revision >= head).then_some(())
    })
    .await;
    assert_eq!(copy_state(cache).await, upstream_state(feed).await);
}

/// A source that records where it was asked to start, and can cut each
/// stream after a number of frames.
#[derive(Clone)]
struct Recorder {
    feed: Feed<User>,
    asked: Arc<Mutex<Vec<i64>>>,
    cut_after: Arc<Mutex<Option<usize>>>,
}

impl Recorder {
    fn new(feed: &Feed<User>) -> Recorder {
        Recorder {
            feed: feed.clone(),
            asked: Arc::default(),
            cut_after: Arc::default(),
        }
    }

    fn asked(&self) -> Vec<i64> {
        self.asked.lock().map(|a| a.clone()).unwrap_or_default()
    }
}

impl Source<User> for Recorder {
    fn watch(
        &self,
        since: i64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<WatchStream<User>, Status>> + Send>> {
        if let Ok(mut asked) = self.asked.lock() {
            asked.push(since);
        }
        let stream = self.feed.watch(since, Vec::new());
        let cut = self.cut_after.lock().ok().and_then(|c| *c);
        Box::pin(async move {
            Ok(match cut {
                Some(n) => Box::pin(stream.take(n).chain(futures_util::stream::once(async {
                    Err(Status::unavailable("cut by the test"))
                }))) as WatchStream<User>,
                None => stream,
            })
        })
    }
}

async fn follows_a_snapshot_then_live_changes(db: TestDb) {
    let (_up, feed) = upstream(&db, feed_options()).await;
    put(&feed, "a", "A").await;
    put(&feed, "b", "B").await;
    let cache = open_cache(&db, cache_options()).await;
    assert!(!cache.state().connected);
    let follower = tokio::spawn({
        let cache = cache.clone();
        let feed = feed.clone();
        async move { cache.follow(feed).await }
    });
    converged(&cache, &feed).await;
    assert!(cache.state().connected);
    let revision = put(&feed, "a", "A2").await;
    delete(&feed, "b").await;
    assert!(cache.wait_for(revision + 1, Duration::from_secs(10)).await);
    converged(&cache, &feed).await;
    assert_eq!(
        cache.get("a").map(|(u, r)| (u.display_name, r)),
        Some(("A2".into(), revision))
    );
    assert!(cache.get("b").is_none());
    follower.abort();
}

async fn a_restart_resumes_from_the_cursor_without_relisting(db: TestDb) {
    let (_up, feed) = upstream(&db, feed_options()).await;
    for i in 0..5 {
        put(&feed, &format!("u{i}"), "v1").await;
    }
    let cache = open_cache(&db, cache_options()).await;
    let follower = tokio::spawn({
        let cache = cache.clone();
        let feed = feed.clone();
        async move { cache.follow(feed).await }
    });
    converged(&cache, &feed).await;
    let cursor = cache.state().applied_revision;
    follower.abort();
    drop(cache);
    // Changes while the process is down.
    put(&feed, "u1", "v2").await;
    delete(&feed, "u2").await;
    // A new process: the copy and its cursor are on disk.
    let cache = open_cache(&db, cache_options()).await;
    assert_eq!(cache.state().applied_revision, cursor);
    assert_eq!(copy_state(&cache).await.len(), 5, "reads work before any connection");
    let source = Recorder::new(&feed);
    let follower = tokio::spawn({
        let cache = cache.clone();
        let source = source.clone();
        async move { cache.follow(source).await }
    });
    converged(&cache, &feed).await;
    assert_eq!(
        source.asked().first(),
        Some(&cursor),
        "resumed from the cursor, not from 0"
    );
    follower.abort();
}

async fn after_any_drops_the_copy_equals_the_upstream(db: TestDb) {
    let (_up, feed) = upstream(&db, feed_options()).await;
    let cache = open_cache(&db, cache_options()).await;
    let source = Recorder::new(&feed);
    let mut rng = fastrand::Rng::with_seed(7);
    // Every stream, the first included, is cut after a few frames.
    if let Ok(mut cut) = source.cut_after.lock() {
        *cut = Some(2);
    }
    let follower = tokio::spawn({
        let cache = cache.clone();
        let source = source.clone();
        async move { cache.follow(source).await }
    });
    for round in 0..20 {
        // Each stream is cut after a few frames, at a different place each time.
        if let Ok(mut cut) = source.cut_after.lock() {
            *cut = Some(rng.usize(1..6));
        }
        for i in 0..5 {
            let id = format!("u{}", rng.usize(0..8));
            if rng.u8(0..4) == 0 {
                if feed.get(&id).await.ok().flatten().is_some() {
                    delete(&feed, &id).await;
                }
            } else {
                put(&feed, &id, &format!("r{round}-{i}")).await;
            }
        }
    }
    if let Ok(mut cut) = source.cut_after.lock() {
        *cut = None;
    }
    put(&feed, "last", "x").await;
    converged(&cache, &feed).await;
    assert!(
        source.asked().len() > 2,
        "the stream was really dropped: {:?}",
        source.asked()
    );
    follower.abort();
}

async fn compaction_answers_are_applied_by_themselves(db: TestDb) {
    let options = FeedOptions {
        retention: Retention {
            keep_changes: 3,
            keep_tombstones: 10,
            interval: None,
        },
        ..feed_options()
    };
    let (_up, feed) = upstream(&db, options).await;
    for i in 0..6 {
        put(&feed, &format!("u{i}"), "v0").await;
    }
    let cache = open_cache(&db, cache_options()).await;
    let follow = |cache: &Cache<User>| {
        let (cache, feed) = (cache.clone(), feed.clone());
        tokio::spawn(async move { cache.follow(feed).await })
    };
    let follower = follow(&cache);
    converged(&cache, &feed).await;
    follower.abort();
    // Compacted history, within the tombstones: the consolidated delta.
    put(&feed, "u0", "v1").await;
    delete(&feed, "u1").await;
    for i in 0..4 {
        put(&feed, &format!("u{}", 2 + i % 2), &format!("v{i}")).await;
    }
    feed.compact().await.unwrap_or_else(|err| panic!("{err}"));
    let follower = follow(&cache);
    converged(&cache, &feed).await;
    follower.abort();
    // Past the tombstone horizon: reset and snapshot, deletions included.
    delete(&feed, "u0").await;
    for i in 0..12 {
        put(&feed, &format!("u{}", 2 + i % 2), &format!("w{i}")).await;
    }
    feed.compact().await.unwrap_or_else(|err| panic!("{err}"));
    let follower = follow(&cache);
    converged(&cache, &feed).await;
    assert!(cache.get("u0").is_none());
    follower.abort();
}

async fn the_guard_rail_holds_back_a_snapshot_that_deletes_most_of_the_copy(db: TestDb) {
    let (_up, feed) = upstream(&db, feed_options()).await;
    for i in 0..20 {
        put(&feed, &format!("u{i:02}"), "v").await;
    }
    let cache = open_cache(&db, cache_options()).await;
    let follower = tokio::spawn({
        let (cache, feed) = (cache.clone(), feed.clone());
        async move { cache.follow(feed).await }
    });
    converged(&cache, &feed).await;
    follower.abort();
    let before = copy_state(&cache).await;
    // The upstream's database is replaced by one holding two users: the
    // cursor is ahead of it, so it answers reset + a snapshot of two.
    let (_other, replaced) = upstream(&db, feed_options()).await;
    put(&replaced, "u00", "v").await;
    put(&replaced, "u01", "v").await;
    let follower = tokio::spawn({
        let (cache, replaced) = (cache.clone(), replaced.clone());
        async move { cache.follow(replaced).await }
    });
    let held = eventually("the guard rail to hold the snapshot", || async { cache.state().held }).await;
    assert!(held.contains("would delete 18 of the 20"), "{held}");
    // Surfaced to readers with every answer from the copy.
    assert_eq!(cache.state().freshness(0).held_reason, held);
    assert_eq!(copy_state(&cache).await, before, "reads keep the last good state");
    // The operator decides the deletion is real.
    cache.release_guard();
    eventually("the released snapshot to apply", || async {
        (copy_state(&cache).await.len() == 2).then_some(())
    })
    .await;
    assert!(cache.state().held.is_none());
    follower.abort();
}

/// A source whose streams never say anything (counting the calls).
struct Silent(Arc<AtomicUsize>);

impl Source<User> for Silent {
    fn watch(
        &self,
        _since: i64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<WatchStream<User>, Status>> + Send>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(Box::pin(futures_util::stream::pending()) as WatchStream<User>) })
    }
}

/// A source whose watch calls never even open (an upstream that takes the
/// call and sends no headers), counting the calls.
struct NeverOpens(Arc<AtomicUsize>);

impl Source<User> for NeverOpens {
    fn watch(
        &self,
        _since: i64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<WatchStream<User>, Status>> + Send>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(futures_util::future::pending())
    }
}

/// Follows the source `make` builds around a call counter, with a short
/// idle timeout, until it has been called three times: given up and tried
/// again twice. Answers the cache, still following.
async fn tried_again<S: Source<User> + Send + Sync + 'static>(
    db: &TestDb,
    make: fn(Arc<AtomicUsize>) -> S,
    what: &str,
) -> (Cache<User>, tokio::task::JoinHandle<()>) {
    let cache = open_cache(
        db,
        CacheOptions {
            idle_timeout: Duration::from_millis(200),
            ..cache_options()
        },
    )
    .await;
    let calls = Arc::new(AtomicUsize::new(0));
    let follower = tokio::spawn({
        let (cache, source) = (cache.clone(), make(calls.clone()));
        async move { cache.follow(source).await }
    });
    eventually(what, || async { (calls.load(Ordering::SeqCst) >= 3).then_some(()) }).await;
    (cache, follower)
}

async fn a_watch_that_never_opens_is_given_up_and_tried_again(db: TestDb) {
    let (cache, follower) = tried_again(&db, NeverOpens, "the watch tried again after the idle timeout").await;
    assert!(
        !cache.state().connected,
        "a watch that never opened is not a connection"
    );
    follower.abort();
}

async fn a_silent_stream_is_noticed_and_reconnected(db: TestDb) {
    let (_cache, follower) = tried_again(&db, Silent, "a reconnection after the silence").await;
    follower.abort();
}

async fn a_held_batch_is_neither_applied_nor_skipped(db: TestDb) {
    let (_up, feed) = upstream(&db, feed_options()).await;
    for i in 0..20 {
        put(&feed, &format!("u{i:02}"), "v").await;
    }
    let cache = open_cache(&db, cache_options()).await;
    let follower = tokio::spawn({
        let (cache, feed) = (cache.clone(), feed.clone());
        async move { cache.follow(feed).await }
    });
    converged(&cache, &feed).await;
    // Most of the upstream deleted in one transaction: the changes arrive together.
    let mut tx = feed.begin().await.unwrap_or_else(|err| panic!("{err}"));
    for i in 0..15 {
        tx.delete(&format!("u{i:02}"))
            .await
            .unwrap_or_else(|err| panic!("{err}"));
    }
    let head = tx.commit().await.unwrap_or_else(|err| panic!("{err}"));
    let held = eventually("the guard rail to hold the deletions", || async { cache.state().held }).await;
    assert!(held.contains("batch"), "{held}");
    assert!(
        cache.state().applied_revision < head,
        "the held changes are not skipped past"
    );
    cache.release_guard();
    converged(&cache, &feed).await;
    assert_eq!(copy_state(&cache).await.len(), 5);
    follower.abort();
}
