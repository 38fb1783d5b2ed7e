//! Pull vs push, on SQLite and PostgreSQL: a copy that polls the change
//! listing (`List…Changes`) reaches exactly the state a copy that watches
//! reaches, through creates, updates, deletes, an outage of the poller and
//! a compaction that makes it list the state again from 0; a restarted
//! poller resumes from its persisted cursor; an idle poller stays fresh, a
//! backlog does not pass for the head. Over gRPC: `tests/pull_services.rs`.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use lightbox_api::users::User;
use lightbox_cache::{Cache, CacheOptions, Listing, PollOptions, PullSource};
use lightbox_changefeed::{Backend, ChangePage, Db, Feed, FeedOptions, Retention};
use lightbox_testkit::{TestDb, conformance, eventually};
use tonic::Status;

conformance!(
    the_pull_copy_and_the_push_copy_reach_the_same_state_from_the_same_changes,
    a_restarted_poller_resumes_from_its_persisted_cursor,
    an_idle_poller_stays_fresh_and_counts_its_polls,
    a_poller_paging_through_a_backlog_does_not_claim_to_be_current,
);

fn feed_options() -> FeedOptions {
    FeedOptions {
        progress_interval: Duration::from_millis(100),
        poll_interval: Duration::from_millis(100),
        retention: Retention {
            keep_changes: 3,
            keep_tombstones: 10,
            interval: None,
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

/// Every ~20 ms, pages of 4: the state listing and the backlogs take
/// several pages.
fn poll_options() -> PollOptions {
    PollOptions {
        interval: Duration::from_millis(20),
        page_size: 4,
        timeout: Duration::from_secs(5),
    }
}

/// Another database of `like`'s backend.
async fn another(like: &TestDb) -> TestDb {
    match like.backend() {
        Backend::Sqlite => TestDb::sqlite(),
        Backend::Postgres => match TestDb::postgres().await {
            Some(db) => db,
            None => panic!("PostgreSQL went away"),
        },
    }
}

/// An upstream feed of users in a database of its own (of `like`'s backend).
async fn upstream_feed(like: &TestDb) -> (TestDb, Feed<User>) {
    let db = another(like).await;
    let pool = db.connect().await;
    pool.migrate(&[]).await.unwrap_or_else(|err| panic!("{err}"));
    let feed = Feed::open(pool, "users", feed_options())
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    (db, feed)
}

async fn local_db(db: &TestDb) -> Db {
    let pool = db.connect().await;
    pool.migrate(&[&lightbox_cache::MIGRATIONS])
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    pool
}

async fn open(db: &Db, name: &'static str, options: CacheOptions) -> Cache<User> {
    Cache::open(db.clone(), name, options)
        .await
        .unwrap_or_else(|err| panic!("{err}"))
}

async fn put(feed: &Feed<User>, id: &str, name: &str) -> i64 {
    lightbox_testkit::put_user(feed, id, name).await
}

async fn delete(feed: &Feed<User>, id: &str) {
    lightbox_testkit::delete_entity(feed, id).await
}

/// The upstream's whole state: id -> (user, revision of its state).
async fn upstream_state(feed: &Feed<User>) -> HashMap<String, (User, i64)> {
    let listed = feed.list("", 100_000).await.unwrap_or_else(|err| panic!("{err}"));
    listed
        .into_iter()
        .map(|(id, user)| {
            let revision = user.revision;
            (id, (user, revision))
        })
        .collect()
}

/// Waits until `copy` has applied the upstream's head, then checks that it
/// holds exactly the upstream's state.
async fn converged(copy: &Cache<User>, feed: &Feed<User>, what: &str) {
    let head = feed.committed_revision().await.unwrap_or_else(|err| panic!("{err}"));
    eventually(&format!("the {what} copy to reach revision {head}"), || async {
        (copy.state().applied_revision >= head).then_some(())
    })
    .await;
    assert_eq!(copy.all(), upstream_state(feed).await, "the {what} copy");
    assert_eq!(copy.snapshot().revision(), head, "the {what} copy's revision");
}

/// A feed's pull listing that can be taken down, and records what it was
/// asked (revision, whether with a page token) and the resets it answered.
#[derive(Clone)]
struct Gate {
    feed: Feed<User>,
    down: Arc<AtomicBool>,
    /// Each answer takes this long (milliseconds).
    delay_ms: Arc<AtomicU64>,
    asked: Arc<Mutex<Vec<(i64, bool)>>>,
    resets: Arc<Mutex<Vec<i64>>>,
}

impl Gate {
    fn new(feed: &Feed<User>) -> Gate {
        Gate {
            feed: feed.clone(),
            down: Arc::default(),
            delay_ms: Arc::default(),
            asked: Arc::default(),
            resets: Arc::default(),
        }
    }

    fn asked(&self) -> Vec<(i64, bool)> {
        self.asked.lock().map(|a| a.clone()).unwrap_or_default()
    }

    fn resets(&self) -> Vec<i64> {
        self.resets.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl PullSource<User> for Gate {
    fn list_changes(&self, since: i64, page_size: i32, page_token: String) -> Listing<User> {
        let down = self.down.load(Ordering::SeqCst);
        let delay = Duration::from_millis(self.delay_ms.load(Ordering::SeqCst));
        if let Ok(mut asked) = self.asked.lock() {
            asked.push((since, !page_token.is_empty()));
        }
        let (feed, resets) = (self.feed.clone(), self.resets.clone());
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            if down {
                return Err(Status::unavailable("taken down by the test"));
            }
            let page: ChangePage<User> = PullSource::list_changes(&feed, since, page_size, page_token).await?;
            if page.reset.is_some()
                && let Ok(mut resets) = resets.lock()
            {
                resets.push(since);
            }
            Ok(page)
        })
    }
}

async fn the_pull_copy_and_the_push_copy_reach_the_same_state_from_the_same_changes(db: TestDb) {
    let (_up, feed) = upstream_feed(&db).await;
    // A state to list first: three pages of four.
    for i in 0..10 {
        put(&feed, &format!("u{i:02}"), "v0").await;
    }
    let local = local_db(&db).await;
    let pushed = open(&local, "users_push", cache_options()).await;
    let pulled = open(&local, "users_pull", cache_options()).await;
    let gate = Gate::new(&feed);
    let watcher = tokio::spawn({
        let (cache, feed) = (pushed.clone(), feed.clone());
        async move { cache.follow(feed).await }
    });
    let poller = tokio::spawn({
        let (cache, gate) = (pulled.clone(), gate.clone());
        async move { cache.poll(gate, poll_options()).await }
    });
    converged(&pushed, &feed, "push").await;
    converged(&pulled, &feed, "pull").await;
    assert!(pulled.state().connected);
    assert_eq!(pulled.state().reconnects, 0, "no poll failed");
    let first = gate.asked();
    assert!(
        first.starts_with(&[(0, false), (0, true), (0, true)]),
        "the state was listed from 0, page after page: {first:?}"
    );

    // Creates, updates and deletes while both follow.
    let mut rng = fastrand::Rng::with_seed(11);
    for round in 0..40 {
        let id = format!("u{:02}", rng.usize(0..14));
        if rng.u8(0..4) == 0 && feed.get(&id).await.ok().flatten().is_some() {
            delete(&feed, &id).await;
        } else {
            put(&feed, &id, &format!("r{round}")).await;
        }
    }
    converged(&pushed, &feed, "push").await;
    converged(&pulled, &feed, "pull").await;
    assert!(gate.resets().is_empty(), "a poller that keeps up is never reset");

    // The poller loses its upstream; the history it would need is compacted
    // away meanwhile (past the tombstones kept): back, it is told to reset
    // and lists the state again from 0.
    gate.down.store(true, Ordering::SeqCst);
    eventually("the poller to notice the outage", || async {
        (!pulled.state().connected).then_some(())
    })
    .await;
    let cursor = pulled.state().applied_revision;
    let reconnects = pulled.state().reconnects;
    // One the puts below do not bring back.
    let some = upstream_state(&feed)
        .await
        .into_keys()
        .filter(|id| !["u00", "u01", "u02"].contains(&id.as_str()))
        .min()
        .unwrap_or_default();
    delete(&feed, &some).await;
    put(&feed, "new", "n").await;
    for i in 0..12 {
        put(&feed, &format!("u{:02}", i % 3), &format!("w{i}")).await;
    }
    feed.compact().await.unwrap_or_else(|err| panic!("{err}"));
    eventually("the poller to retry with backoff", || async {
        (pulled.state().reconnects > reconnects + 1).then_some(())
    })
    .await;
    let asked_before = gate.asked().len();
    gate.down.store(false, Ordering::SeqCst);
    converged(&pushed, &feed, "push").await;
    converged(&pulled, &feed, "pull").await;
    assert_eq!(gate.resets(), vec![cursor], "reset once, from the cursor it had");
    let after = gate.asked().split_off(asked_before);
    assert!(
        after.contains(&(0, false)) && after.contains(&(0, true)),
        "listed the state again from 0, page after page: {after:?}"
    );
    assert!(pulled.get(&some).is_none(), "the deletion compacted away is applied");

    // Same state, entity for entity, revision for revision.
    assert_eq!(pulled.all(), pushed.all());
    assert_eq!(pulled.state().applied_revision, pushed.state().applied_revision);
    let persisted = pulled.persisted().await.unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(
        persisted,
        (pulled.state().applied_revision, pulled.all()),
        "persisted per batch"
    );
    assert_eq!(pushed.state().polls, 0, "a watcher never polls");
    watcher.abort();
    poller.abort();
}

async fn a_restarted_poller_resumes_from_its_persisted_cursor(db: TestDb) {
    let (_up, feed) = upstream_feed(&db).await;
    for i in 0..6 {
        put(&feed, &format!("u{i}"), "v1").await;
    }
    let local = local_db(&db).await;
    let cache = open(&local, "users", cache_options()).await;
    let poller = tokio::spawn({
        let (cache, feed) = (cache.clone(), feed.clone());
        async move { cache.poll(feed, poll_options()).await }
    });
    converged(&cache, &feed, "pull").await;
    let cursor = cache.state().applied_revision;
    poller.abort();
    let _ = poller.await;
    drop(cache);
    // Changes while the process is down.
    put(&feed, "u1", "v2").await;
    delete(&feed, "u2").await;
    put(&feed, "u9", "v1").await;
    // A new process: the copy and its cursor are on disk.
    let cache = open(&local, "users", cache_options()).await;
    assert_eq!(cache.state().applied_revision, cursor);
    assert_eq!(cache.all().len(), 6, "reads work before any poll");
    let gate = Gate::new(&feed);
    let poller = tokio::spawn({
        let (cache, gate) = (cache.clone(), gate.clone());
        async move { cache.poll(gate, poll_options()).await }
    });
    converged(&cache, &feed, "restarted pull").await;
    let asked = gate.asked();
    assert_eq!(
        asked.first(),
        Some(&(cursor, false)),
        "resumed from the cursor: {asked:?}"
    );
    assert!(
        !asked.iter().any(|&(since, _)| since == 0),
        "never listed from 0: {asked:?}"
    );
    assert_eq!(cache.state().reconnects, 0, "no poll failed");
    poller.abort();
}

async fn an_idle_poller_stays_fresh_and_counts_its_polls(db: TestDb) {
    let (_up, feed) = upstream_feed(&db).await;
    put(&feed, "a", "A").await;
    let local = local_db(&db).await;
    let cache = open(&local, "users", cache_options()).await;
    let poller = tokio::spawn({
        let (cache, feed) = (cache.clone(), feed.clone());
        async move { cache.poll(feed, poll_options()).await }
    });
    converged(&cache, &feed, "pull").await;
    let before = cache.state();
    // Nothing changes: each poll finds nothing, and still proves the copy
    // current up to the head it read.
    eventually("empty polls", || async {
        (cache.state().empty_polls >= before.empty_polls + 5).then_some(())
    })
    .await;
    assert!(
        cache
            .wait_fresh(Duration::from_millis(500), Duration::from_secs(5))
            .await
    );
    let after = cache.state();
    assert!(after.polls >= before.polls + 5, "{after:?}");
    assert!(after.last_heard > before.last_heard, "each empty poll renews the age");
    assert_eq!(after.applied_revision, before.applied_revision);
    assert_eq!(after.reconnects, 0, "no failure, no reconnection");
    poller.abort();
}

async fn a_poller_paging_through_a_backlog_does_not_claim_to_be_current(db: TestDb) {
    let (_up, feed) = upstream_feed(&db).await;
    put(&feed, "a", "A").await;
    let local = local_db(&db).await;
    let cache = open(&local, "users", cache_options()).await;
    let gate = Gate::new(&feed);
    let poller = tokio::spawn({
        let (cache, gate) = (cache.clone(), gate.clone());
        async move { cache.poll(gate, poll_options()).await }
    });
    converged(&cache, &feed, "pull").await;
    // Slow answers, then a backlog of five full pages committed at once.
    gate.delay_ms.store(40, Ordering::SeqCst);
    let before = cache.state();
    let mut tx = feed.begin().await.unwrap_or_else(|err| panic!("{err}"));
    for i in 0..20 {
        let user = User {
            id: format!("b{i:02}"),
            revision: tx.next_revision(),
            ..User::default()
        };
        tx.put(&user.id, &user).await.unwrap_or_else(|err| panic!("{err}"));
    }
    let head = tx.commit().await.unwrap_or_else(|err| panic!("{err}"));
    // Until the head is reached, the copy does not renew its age: only a
    // short page proves it current. (A poll that read the head before the
    // commit may still renew it, before the first page of the backlog: the
    // age seen with that page is the reference.)
    let mut seen = Vec::new();
    let mut reference = None;
    let deadline = tokio::time::Instant::now() + lightbox_testkit::DEADLINE;
    loop {
        let state = cache.state();
        if state.applied_revision >= head {
            break;
        }
        if state.applied_revision > before.applied_revision {
            let reference = *reference.get_or_insert(state.last_heard);
            assert_eq!(
                state.last_heard, reference,
                "current at {} of {head}?",
                state.applied_revision
            );
            if seen.last() != Some(&state.applied_revision) {
                seen.push(state.applied_revision);
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the backlog was not applied in time"
        );
        // Sampling, not waiting for an outcome: each page takes 40 ms.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        seen.len() >= 2,
        "the backlog was seen part-applied, page after page: {seen:?}"
    );
    assert!(
        cache
            .wait_fresh(Duration::from_millis(500), Duration::from_secs(5))
            .await
    );
    assert_eq!(cache.all(), upstream_state(&feed).await);
    poller.abort();
}
