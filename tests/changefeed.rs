//! The changefeed's guarantees (DESIGN.md section 3), each proven on SQLite
//! and PostgreSQL with a test that fails without it.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use lightbox_api::users::User;
use lightbox_changefeed::{
    Change, Feed, FeedOptions, Frame, Lease, Retention, WatchFilter, lease::retention_lease, watch::WatchStream,
};
use lightbox_testkit::{DEADLINE, TestDb, conformance};
use tokio_stream::StreamExt;
use tonic::Code;

conformance!(
    a_transaction_begin_cancelled_in_flight_leaves_no_transaction_open,
    watch_from_zero_is_a_snapshot_then_live_changes,
    a_snapshot_read_in_pages_is_the_state_at_its_revision_under_writes,
    snapshots_beyond_the_cap_wait_and_a_stalled_one_gives_up_its_turn,
    resume_replays_exactly_the_changes_after_the_revision,
    concurrent_writers_never_let_a_watcher_skip_a_revision,
    a_rolled_back_write_leaves_no_change_and_no_hole,
    compacted_history_is_answered_with_the_consolidated_delta,
    past_the_tombstone_horizon_comes_a_reset_and_a_snapshot,
    a_revision_ahead_of_the_server_gets_a_reset,
    idle_streams_carry_progress_past_filtered_changes,
    an_idle_stream_gets_progress_every_interval,
    a_slow_watcher_is_dropped_without_slowing_writers_or_others,
    a_stalled_watcher_whose_change_the_ticks_overwrote_is_dropped_not_told_progress,
    id_filters_apply_to_snapshot_and_live,
    scope_filters_apply_to_snapshot_live_and_deletions,
    scoped_resume_replays_only_the_scope,
    scoped_resume_from_trimmed_history_gets_the_scope_delta_or_a_scoped_reset,
    pull_listing_follows_the_same_revisions_and_compaction_rule,
    closing_the_feed_ends_streams_with_the_resume_revision,
    closing_the_database_stops_the_tail_instead_of_failing_each_poll,
    one_tail_serves_every_watcher,
    a_commit_here_reaches_watchers_without_reading_the_changelog,
    a_commit_handed_over_after_another_replicas_reads_the_gap,
    a_transaction_too_large_to_hand_over_is_read_from_the_changelog,
    a_resume_says_at_once_that_it_is_current,
    a_watch_from_now_starts_at_the_head_with_no_snapshot_or_replay,
    watches_from_now_opened_under_concurrent_writers_miss_nothing,
    watchers_in_many_groups_opened_under_writes_each_get_every_change_in_order,
    replicas_running_retention_at_once_keep_the_changelog_correct,
    the_retention_lease_is_held_by_one_at_a_time_and_fences_a_stale_holder,
);

const FEED: &str = "things";

fn options() -> FeedOptions {
    FeedOptions {
        watcher_buffer: 4096,
        progress_interval: Duration::from_secs(3600),
        poll_interval: Duration::from_millis(200),
        retention: Retention {
            interval: None,
            ..Retention::default()
        },
        ..FeedOptions::default()
    }
}

async fn open(db: &TestDb, options: FeedOptions) -> Feed<User> {
    let db = db.connect().await;
    db.migrate(&[]).await.unwrap_or_else(|err| panic!("migrate: {err}"));
    Feed::open(db, FEED, options)
        .await
        .unwrap_or_else(|err| panic!("open feed: {err}"))
}

fn user(id: &str, name: &str) -> User {
    User {
        id: id.into(),
        display_name: name.into(),
        ..User::default()
    }
}

/// Writes `name` to entity `id` in its own transaction; returns the revision.
async fn put(feed: &Feed<User>, id: &str, name: &str) -> i64 {
    let mut tx = feed.begin().await.unwrap_or_else(|err| panic!("begin: {err}"));
    let mut entity = user(id, name);
    entity.revision = tx.next_revision();
    let revision = tx.put(id, &entity).await.unwrap_or_else(|err| panic!("put: {err}"));
    assert_eq!(
        tx.commit().await.unwrap_or_else(|err| panic!("commit: {err}")),
        revision
    );
    revision
}

/// Writes `name` to entity `id` in `scope`, in its own transaction; returns
/// the revision.
async fn put_in(feed: &Feed<User>, scope: &str, id: &str, name: &str) -> i64 {
    let mut tx = feed.begin().await.unwrap_or_else(|err| panic!("begin: {err}"));
    let mut entity = user(id, name);
    entity.revision = tx.next_revision();
    let revision = tx
        .put_scoped(id, scope, &entity)
        .await
        .unwrap_or_else(|err| panic!("put: {err}"));
    tx.commit().await.unwrap_or_else(|err| panic!("commit: {err}"));
    revision
}

async fn delete(feed: &Feed<User>, id: &str) -> i64 {
    let mut tx = feed.begin().await.unwrap_or_else(|err| panic!("begin: {err}"));
    let revision = tx.delete(id).await.unwrap_or_else(|err| panic!("delete: {err}"));
    tx.commit().await.unwrap_or_else(|err| panic!("commit: {err}"));
    revision.unwrap_or_else(|| panic!("nothing to delete at {id}"))
}

async fn next(stream: &mut WatchStream<User>) -> Result<Frame<User>, tonic::Status> {
    match tokio::time::timeout(DEADLINE, stream.next()).await {
        Ok(Some(item)) => item,
        Ok(None) => panic!("the watch stream ended"),
        Err(_) => panic!("no frame within {DEADLINE:?}"),
    }
}

async fn frame(stream: &mut WatchStream<User>) -> Frame<User> {
    next(stream)
        .await
        .unwrap_or_else(|status| panic!("stream failed: {status:?}"))
}

async fn change(stream: &mut WatchStream<User>) -> Arc<Change<User>> {
    match frame(stream).await {
        Frame::Change(change) => change,
        other => panic!("expected a change, got {other:?}"),
    }
}

/// The next change, past any progress frames the feed's timer sent first
/// (a slow commit can let a tick or two go by).
async fn change_past_progress(stream: &mut WatchStream<User>) -> Arc<Change<User>> {
    loop {
        match frame(stream).await {
            Frame::Progress { .. } => continue,
            Frame::Change(change) => return change,
            other => panic!("expected a change, got {other:?}"),
        }
    }
}

/// The progress frame a replay ends with: the stream is current at `revision`.
async fn caught_up(stream: &mut WatchStream<User>, revision: i64) {
    match frame(stream).await {
        Frame::Progress { revision: at } => assert_eq!(at, revision, "the replay reached the head"),
        other => panic!("expected progress at {revision} after the replay, got {other:?}"),
    }
}

async fn committed(feed: &Feed<User>) -> i64 {
    feed.committed_revision()
        .await
        .unwrap_or_else(|err| panic!("read head: {err}"))
}

/// A client's copy, built only from what the stream says.
#[derive(Default, Debug)]
struct Replica {
    entities: BTreeMap<String, (i64, String)>,
    cursor: i64,
    /// Set between a snapshot's begin and end: the snapshot replaces the copy.
    incoming: Option<BTreeMap<String, (i64, String)>>,
    resets: usize,
}

impl Replica {
    fn apply(&mut self, frame: Frame<User>) {
        match frame {
            Frame::Reset { .. } => self.resets += 1,
            Frame::SnapshotBegin { .. } => self.incoming = Some(BTreeMap::new()),
            Frame::SnapshotEnd { revision } => {
                self.entities = self.incoming.take().unwrap_or_default();
                self.cursor = revision;
            }
            Frame::Progress { revision } => self.cursor = self.cursor.max(revision),
            Frame::Change(change) => {
                let target = self.incoming.as_mut().unwrap_or(&mut self.entities);
                match &change.entity {
                    Some(entity) => {
                        target.insert(change.entity_id.clone(), (change.revision, entity.display_name.clone()));
                    }
                    None => {
                        target.remove(&change.entity_id);
                    }
                }
                if self.incoming.is_none() {
                    self.cursor = change.revision;
                }
            }
        }
    }

    /// Applies frames until the copy's cursor reaches `revision`.
    async fn follow_to(&mut self, stream: &mut WatchStream<User>, revision: i64) {
        while self.cursor < revision || self.incoming.is_some() {
            self.apply(frame(stream).await);
        }
    }
}

/// The server's state, as a fresh snapshot tells it.
async fn server_state(feed: &Feed<User>) -> BTreeMap<String, (i64, String)> {
    let mut replica = Replica::default();
    let mut stream = feed.watch(0, Vec::new());
    loop {
        let frame = frame(&mut stream).await;
        let end = matches!(frame, Frame::SnapshotEnd { .. });
        replica.apply(frame);
        if end {
            return replica.entities;
        }
    }
}

async fn watch_from_zero_is_a_snapshot_then_live_changes(db: TestDb) {
    let feed = open(&db, options()).await;
    put(&feed, "a", "A1").await;
    put(&feed, "b", "B1").await;
    let r = put(&feed, "a", "A2").await;
    let mut stream = feed.watch(0, Vec::new());
    assert!(matches!(frame(&mut stream).await, Frame::SnapshotBegin { revision } if revision == r));
    let first = change(&mut stream).await;
    let second = change(&mut stream).await;
    assert_eq!((first.entity_id.as_str(), first.revision), ("a", r));
    assert_eq!(first.entity.as_ref().map(|u| u.display_name.as_str()), Some("A2"));
    assert_eq!((second.entity_id.as_str(), second.revision), ("b", 2));
    assert!(matches!(frame(&mut stream).await, Frame::SnapshotEnd { revision } if revision == r));
    // Live: exactly the changes after R, in order, once each.
    let later = [put(&feed, "c", "C1").await, delete(&feed, "b").await];
    for revision in later {
        let live = change(&mut stream).await;
        assert_eq!(live.revision, revision);
    }
}

/// Writes `count` entities `p0000`, `p0001`, … in one transaction; returns
/// the revision.
async fn put_many(feed: &Feed<User>, count: usize) -> i64 {
    let mut tx = feed.begin().await.unwrap_or_else(|err| panic!("begin: {err}"));
    let mut revision = 0;
    for n in 0..count {
        let id = format!("p{n:04}");
        revision = tx
            .put(&id, &user(&id, "first"))
            .await
            .unwrap_or_else(|err| panic!("put: {err}"));
    }
    tx.commit().await.unwrap_or_else(|err| panic!("commit: {err}"));
    revision
}

/// The snapshot's changes up to its end, once its begin has been read.
async fn rest_of_snapshot(stream: &mut WatchStream<User>) -> (Vec<Arc<Change<User>>>, i64) {
    let mut changes = Vec::new();
    loop {
        match frame(stream).await {
            Frame::Change(change) => changes.push(change),
            Frame::SnapshotEnd { revision } => return (changes, revision),
            other => panic!("expected a snapshot's change or end, got {other:?}"),
        }
    }
}

async fn a_snapshot_read_in_pages_is_the_state_at_its_revision_under_writes(db: TestDb) {
    // Five pages of 512: the last ones are read well after the first is sent.
    let feed = open(&db, options()).await;
    let r = put_many(&feed, 2600).await;
    let mut stream = feed.watch(0, Vec::new());
    assert!(matches!(frame(&mut stream).await, Frame::SnapshotBegin { revision } if revision == r));
    let mut first_page = Vec::new();
    for _ in 0..512 {
        first_page.push(change(&mut stream).await);
    }
    // Written while the snapshot streams, into its unread pages.
    let updated = put(&feed, "p2500", "second").await;
    let deleted = delete(&feed, "p2550").await;
    let created = put(&feed, "p2599x", "new").await;
    let (rest, end) = rest_of_snapshot(&mut stream).await;
    assert_eq!(end, r, "the snapshot ends at the revision it began at");
    let snapshot: Vec<_> = first_page.into_iter().chain(rest).collect();
    assert_eq!(
        snapshot.len(),
        2600,
        "every entity of revision {r}, nothing written after"
    );
    for (n, change) in snapshot.iter().enumerate() {
        assert_eq!(change.entity_id, format!("p{n:04}"), "in id order, each once");
        assert_eq!(
            change.entity.as_ref().map(|u| u.display_name.as_str()),
            Some("first"),
            "{} as it was at revision {r}",
            change.entity_id
        );
    }
    // Then the writes, live, in order.
    for revision in [updated, deleted, created] {
        assert_eq!(change(&mut stream).await.revision, revision);
    }
}

async fn snapshots_beyond_the_cap_wait_and_a_stalled_one_gives_up_its_turn(db: TestDb) {
    let stall = Duration::from_millis(300);
    let feed = open(
        &db,
        FeedOptions {
            max_snapshots: 1,
            snapshot_stall: stall,
            ..options()
        },
    )
    .await;
    let r = put_many(&feed, 1600).await;
    // The first snapshot takes the one turn, and its client stops reading.
    let mut stalled = feed.watch(0, Vec::new());
    assert!(matches!(frame(&mut stalled).await, Frame::SnapshotBegin { revision } if revision == r));
    assert_eq!(feed.stats().snapshots, 1);
    // The next waits for the turn (it is not refused), and gets it when the
    // first has stalled for `stall`: then it streams the whole snapshot.
    let waited = std::time::Instant::now();
    let mut waiting = feed.watch(0, Vec::new());
    assert!(matches!(frame(&mut waiting).await, Frame::SnapshotBegin { revision } if revision == r));
    assert!(
        waited.elapsed() >= stall,
        "the second snapshot began only once the first gave up its turn"
    );
    let (changes, end) = rest_of_snapshot(&mut waiting).await;
    assert_eq!((changes.len(), end), (1600, r));
    // The stalled stream gets what was read for it, then ends: to watch again.
    let ended = loop {
        match next(&mut stalled).await {
            Ok(Frame::Change(_)) => {}
            Ok(other) => panic!("expected the pages read before the stall, got {other:?}"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::ResourceExhausted);
    assert!(ended.message().contains("since_revision=0"), "{}", ended.message());
    assert_eq!(feed.stats().snapshots, 0, "no snapshot is being read any more");
}

async fn resume_replays_exactly_the_changes_after_the_revision(db: TestDb) {
    let feed = open(&db, options()).await;
    for i in 1..=10 {
        put(&feed, &format!("e{}", i % 3), &format!("v{i}")).await;
    }
    let mut stream = feed.watch(5, Vec::new());
    for expected in 6..=10 {
        assert_eq!(change(&mut stream).await.revision, expected);
    }
    caught_up(&mut stream, 10).await;
    let live = put(&feed, "e9", "live").await;
    assert_eq!(
        change(&mut stream).await.revision,
        live,
        "nothing repeated or skipped between replay and live"
    );
}

async fn concurrent_writers_never_let_a_watcher_skip_a_revision(db: TestDb) {
    const WRITERS: usize = 8;
    const WRITES: usize = 150;
    let feed = open(&db, options()).await;
    // The watcher tails from the start while the writers race.
    let mut stream = feed.watch(0, Vec::new());
    assert!(matches!(frame(&mut stream).await, Frame::SnapshotBegin { revision: 0 }));
    assert!(matches!(frame(&mut stream).await, Frame::SnapshotEnd { revision: 0 }));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let feed = feed.clone();
        writers.spawn(async move {
            for i in 0..WRITES {
                let mut tx = feed.begin().await.unwrap_or_else(|err| panic!("begin: {err}"));
                tx.put(&format!("w{w}-{}", i % 10), &user("x", &format!("{i}")))
                    .await
                    .unwrap_or_else(|err| panic!("put: {err}"));
                if i % 4 == 0 {
                    // Hold the transaction open a little: the window in which a
                    // revision handed out at insert time would commit late.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                tx.commit().await.unwrap_or_else(|err| panic!("commit: {err}"));
            }
        });
    }
    let total = (WRITERS * WRITES) as i64;
    for expected in 1..=total {
        let seen = change(&mut stream).await.revision;
        assert_eq!(seen, expected, "the watcher must see every revision in order");
    }
    while let Some(joined) = writers.join_next().await {
        joined.unwrap_or_else(|err| panic!("writer failed: {err}"));
    }
    assert_eq!(committed(&feed).await, total);
}

async fn a_rolled_back_write_leaves_no_change_and_no_hole(db: TestDb) {
    let feed = open(&db, options()).await;
    put(&feed, "a", "1").await;
    {
        let mut tx = feed.begin().await.unwrap_or_else(|err| panic!("begin: {err}"));
        tx.put("ghost", &user("ghost", "never"))
            .await
            .unwrap_or_else(|err| panic!("put: {err}"));
        // Dropped without commit: rolled back.
    }
    let next = put(&feed, "b", "2").await;
    assert_eq!(next, 2, "the rolled-back write must not consume a revision");
    assert!(
        feed.get("ghost")
            .await
            .unwrap_or_else(|err| panic!("get: {err}"))
            .is_none()
    );
    let mut stream = feed.watch(1, Vec::new());
    assert_eq!(change(&mut stream).await.entity_id, "b");
}

fn compacting(keep_changes: i64, keep_tombstones: i64) -> FeedOptions {
    FeedOptions {
        retention: Retention {
            keep_changes,
            keep_tombstones,
            interval: None,
        },
        ..options()
    }
}

/// History: 10 entities created, then updates and deletions: 40 revisions.
async fn history(feed: &Feed<User>) {
    let start = committed(feed).await;
    for i in 0..10 {
        put(feed, &format!("e{i}"), "v0").await;
    }
    for round in 1..=2 {
        for i in 0..10 {
            if i % 4 == 0 && round == 2 {
                delete(feed, &format!("e{i}")).await;
            } else {
                put(feed, &format!("e{i}"), &format!("v{round}")).await;
            }
        }
    }
    for i in 10..20 {
        put(feed, &format!("e{i}"), "late").await;
    }
    assert_eq!(committed(feed).await, start + 40);
}

async fn compacted_history_is_answered_with_the_consolidated_delta(db: TestDb) {
    let feed = open(&db, compacting(5, 1000)).await;
    // A client follows up to revision 12, then goes away.
    for i in 0..10 {
        put(&feed, &format!("e{i}"), "v0").await;
    }
    put(&feed, "e0", "v1").await;
    put(&feed, "e1", "v1").await;
    let mut client = Replica::default();
    let mut stream = feed.watch(0, Vec::new());
    client.follow_to(&mut stream, 12).await;
    drop(stream);
    // Meanwhile: more history, then compaction keeps only the last 5 changes.
    for round in 2..=3 {
        for i in 0..10 {
            if i % 4 == 0 && round == 3 {
                delete(&feed, &format!("e{i}")).await;
            } else {
                put(&feed, &format!("e{i}"), &format!("v{round}")).await;
            }
        }
    }
    feed.compact().await.unwrap_or_else(|err| panic!("compact: {err}"));
    let head = committed(&feed).await;
    // Resume from 12: no reset, no snapshot, only the latest state of each
    // changed entity (deletions included), in revision order.
    let mut stream = feed.watch(12, Vec::new());
    let mut delta = Vec::new();
    while client.cursor < head {
        let frame = frame(&mut stream).await;
        assert!(
            matches!(frame, Frame::Change(_)),
            "expected only changes, got {frame:?}"
        );
        if let Frame::Change(change) = &frame {
            delta.push(change.revision);
        }
        client.apply(frame);
    }
    assert!(
        delta.windows(2).all(|w| w[0] < w[1]),
        "delta in revision order: {delta:?}"
    );
    assert_eq!(
        delta.len(),
        10,
        "one change per entity changed since 12, not the {} changes",
        head - 12
    );
    assert_eq!(client.resets, 0);
    assert_eq!(
        client.entities,
        server_state(&feed).await,
        "applying the delta yields the server's state"
    );
}

async fn past_the_tombstone_horizon_comes_a_reset_and_a_snapshot(db: TestDb) {
    let feed = open(&db, compacting(5, 10)).await;
    let mut client = Replica::default();
    put(&feed, "gone", "soon deleted").await;
    let mut stream = feed.watch(0, Vec::new());
    client.follow_to(&mut stream, 1).await;
    drop(stream);
    history(&feed).await;
    delete(&feed, "gone").await;
    for i in 0..15 {
        put(&feed, &format!("x{i}"), "x").await;
    }
    feed.compact().await.unwrap_or_else(|err| panic!("compact: {err}"));
    let mut stream = feed.watch(1, Vec::new());
    let head = committed(&feed).await;
    assert!(
        matches!(frame(&mut stream).await, Frame::Reset { revision, reason } if revision == head && reason.contains("older than"))
    );
    client.follow_to(&mut stream, head).await;
    assert!(
        !client.entities.contains_key("gone"),
        "the deletion the client missed is applied by the reset"
    );
    assert_eq!(client.entities, server_state(&feed).await);
}

async fn a_revision_ahead_of_the_server_gets_a_reset(db: TestDb) {
    let feed = open(&db, options()).await;
    put(&feed, "a", "1").await;
    let mut stream = feed.watch(99, Vec::new());
    assert!(matches!(frame(&mut stream).await, Frame::Reset { reason, .. } if reason.contains("ahead")));
    assert!(matches!(frame(&mut stream).await, Frame::SnapshotBegin { revision: 1 }));
}

async fn idle_streams_carry_progress_past_filtered_changes(db: TestDb) {
    let feed = open(
        &db,
        FeedOptions {
            progress_interval: Duration::from_millis(100),
            ..options()
        },
    )
    .await;
    put(&feed, "mine", "1").await;
    let mut stream = feed.watch(1, vec!["mine".to_owned()]);
    let others = put(&feed, "other", "1").await;
    // The filtered-out change is never sent, but progress moves past it.
    loop {
        match frame(&mut stream).await {
            Frame::Progress { revision } if revision >= others => break,
            Frame::Progress { .. } => continue,
            other => panic!("expected only progress, got {other:?}"),
        }
    }
}

/// One progress frame per interval on an idle stream, not one every other
/// interval (a progress frame is not "something sent" for the next tick): a
/// copy fed by it is never more than about one interval old.
async fn an_idle_stream_gets_progress_every_interval(db: TestDb) {
    let interval = Duration::from_millis(300);
    let feed = open(
        &db,
        FeedOptions {
            progress_interval: interval,
            ..options()
        },
    )
    .await;
    // No writes at all: every frame of this stream is a progress frame.
    let mut stream = feed.watch(-1, Vec::new());
    assert!(
        matches!(frame(&mut stream).await, Frame::Progress { .. }),
        "from now starts with progress"
    );
    let mut previous = tokio::time::Instant::now();
    let mut gaps = Vec::new();
    for _ in 0..4 {
        assert!(matches!(frame(&mut stream).await, Frame::Progress { .. }));
        let now = tokio::time::Instant::now();
        gaps.push(now - previous);
        previous = now;
    }
    // Every gap but the first (which starts mid-interval) is one interval; two
    // would mean every other tick was skipped. Generous for a loaded machine.
    for gap in &gaps[1..] {
        assert!(
            *gap < interval * 3 / 2,
            "progress every interval ({interval:?}), got gaps {gaps:?}"
        );
    }
}

async fn a_slow_watcher_is_dropped_without_slowing_writers_or_others(db: TestDb) {
    let buffer = 16;
    let feed = open(
        &db,
        FeedOptions {
            watcher_buffer: buffer,
            ..options()
        },
    )
    .await;
    put(&feed, "seed", "0").await;
    let mut stalled = feed.watch(1, Vec::new());
    let mut reader = feed.watch(1, Vec::new());
    // Both are live; then the reader keeps up in its own task and the
    // stalled one reads nothing.
    put(&feed, "seed", "1").await;
    for stream in [&mut stalled, &mut reader] {
        assert_eq!(change(stream).await.revision, 2);
        caught_up(stream, 2).await;
    }
    let writes = (buffer * 20) as i64;
    let (seen_tx, mut seen) = tokio::sync::watch::channel(2i64);
    let reading = tokio::spawn(async move {
        let mut last = 2;
        while last < 2 + writes {
            let revision = change(&mut reader).await.revision;
            assert_eq!(revision, last + 1);
            last = revision;
            let _ = seen_tx.send(last);
        }
        last
    });
    for i in 0..writes {
        // The reader keeps up by construction (a busy machine may not
        // schedule it for a while): the writer never runs more than half a
        // buffer ahead of it, and never waits for the stalled watcher.
        let written = 2 + i;
        tokio::time::timeout(DEADLINE, seen.wait_for(|r| *r >= written - buffer as i64 / 2))
            .await
            .unwrap_or_else(|_| panic!("the reader fell behind revision {written}"))
            .unwrap_or_else(|_| panic!("the reader stopped"));
        put(&feed, &format!("k{}", i % 7), &format!("{i}")).await;
    }
    assert_eq!(reading.await.unwrap_or_else(|err| panic!("reader: {err}")), 2 + writes);
    // The stalled watcher learns it fell behind, with where to resume.
    let mut last = 2;
    let status = loop {
        match next(&mut stalled).await {
            Ok(Frame::Change(change)) => last = change.revision,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains(&format!("since_revision={last}")),
        "{}",
        status.message()
    );
    assert!(last < 2 + writes, "it was dropped before reading everything");
    // Resuming from there loses nothing.
    let mut resumed = feed.watch(last, Vec::new());
    for expected in last + 1..=2 + writes {
        assert_eq!(change(&mut resumed).await.revision, expected);
    }
}

/// Progress ticks take places in the ring: on a quiet feed, a watcher that
/// stops reading with one change unread can see it overwritten by ticks
/// alone, with no later change left to show the hole. It must then be
/// dropped with where to resume, never told progress past the change.
async fn a_stalled_watcher_whose_change_the_ticks_overwrote_is_dropped_not_told_progress(db: TestDb) {
    let buffer = 4;
    let feed = open(
        &db,
        FeedOptions {
            watcher_buffer: buffer,
            progress_interval: Duration::from_millis(50),
            ..options()
        },
    )
    .await;
    let mut stalled = feed.watch(-1, Vec::new());
    let mut idle = feed.watch(-1, Vec::new());
    for stream in [&mut stalled, &mut idle] {
        assert!(matches!(frame(stream).await, Frame::Progress { .. }));
    }
    let before = put(&feed, "a", "1").await;
    // Ticks come every 50 ms; a commit slower than that lets some go first.
    for stream in [&mut stalled, &mut idle] {
        assert_eq!(change_past_progress(stream).await.revision, before);
    }
    let unread = put(&feed, "a", "2").await;
    assert_eq!(change_past_progress(&mut idle).await.revision, unread);
    // The idle stream, in the same group, counts the ticks: each is one of
    // its progress frames (the first may be skipped, a change went just
    // before it). Twice the buffer of them have overwritten the change.
    let mut ticks = 0;
    while ticks < 2 * buffer + 1 {
        match frame(&mut idle).await {
            Frame::Progress { .. } => ticks += 1,
            other => panic!("only progress on a quiet feed, got {other:?}"),
        }
    }
    let status = loop {
        match next(&mut stalled).await {
            Ok(Frame::Progress { revision }) => assert!(
                revision < unread,
                "progress at {revision} claims change {unread}, which this watcher never received"
            ),
            Ok(other) => panic!("the change was overwritten, yet the stream sent {other:?}"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains(&format!("since_revision={before}")),
        "{}",
        status.message()
    );
}

async fn id_filters_apply_to_snapshot_and_live(db: TestDb) {
    let feed = open(&db, options()).await;
    put(&feed, "a", "1").await;
    put(&feed, "b", "1").await;
    let mut stream = feed.watch(0, vec!["b".to_owned(), "absent".to_owned()]);
    assert!(matches!(frame(&mut stream).await, Frame::SnapshotBegin { .. }));
    assert_eq!(change(&mut stream).await.entity_id, "b");
    assert!(matches!(frame(&mut stream).await, Frame::SnapshotEnd { revision: 2 }));
    put(&feed, "a", "2").await;
    let wanted = put(&feed, "b", "2").await;
    let live = change(&mut stream).await;
    assert_eq!((live.entity_id.as_str(), live.revision), ("b", wanted));
}

/// A change as (revision, id, scope, name or None for a deletion), to
/// compare whole sequences.
type Seen = (i64, String, String, Option<String>);

fn seen(change: &Arc<Change<User>>) -> Seen {
    (
        change.revision,
        change.entity_id.clone(),
        change.scope.clone(),
        change.entity.as_ref().map(|u| u.display_name.clone()),
    )
}

fn expect(revision: i64, id: &str, scope: &str, name: Option<&str>) -> Seen {
    (revision, id.into(), scope.into(), name.map(Into::into))
}

/// The changes of a snapshot, after its begin frame, up to its end at
/// `revision`.
async fn snapshot_changes(stream: &mut WatchStream<User>, revision: i64) -> Vec<Seen> {
    let mut changes = Vec::new();
    loop {
        match frame(stream).await {
            Frame::Change(change) => changes.push(seen(&change)),
            Frame::SnapshotEnd { revision: end } => {
                assert_eq!(end, revision);
                return changes;
            }
            other => panic!("expected the snapshot to go on, got {other:?}"),
        }
    }
}

async fn scope_filters_apply_to_snapshot_live_and_deletions(db: TestDb) {
    let feed = open(&db, options()).await;
    put_in(&feed, "alice", "a1", "A1").await;
    put_in(&feed, "bob", "b1", "B1").await;
    put_in(&feed, "alice", "a2", "A2").await;
    put(&feed, "x", "unscoped").await;
    let head = put_in(&feed, "bob", "b2", "B2").await;
    let mut stream = feed.watch(0, WatchFilter::scope("alice"));
    assert!(matches!(frame(&mut stream).await, Frame::SnapshotBegin { revision } if revision == head));
    assert_eq!(
        snapshot_changes(&mut stream, head).await,
        vec![
            expect(1, "a1", "alice", Some("A1")),
            expect(3, "a2", "alice", Some("A2"))
        ],
        "the snapshot holds alice's entities only"
    );
    // Live: alice's changes only, deletions included, each exactly once.
    put_in(&feed, "bob", "b1", "B1'").await;
    let updated = put_in(&feed, "alice", "a1", "A1'").await;
    delete(&feed, "b1").await;
    put(&feed, "x", "unscoped again").await;
    let deleted = delete(&feed, "a2").await;
    let created = put_in(&feed, "alice", "a3", "A3").await;
    for expected in [
        expect(updated, "a1", "alice", Some("A1'")),
        expect(deleted, "a2", "alice", None),
        expect(created, "a3", "alice", Some("A3")),
    ] {
        assert_eq!(seen(&change(&mut stream).await), expected);
    }
    // Ids and a scope together: both apply.
    let head = committed(&feed).await;
    let mut both = feed.watch(0, WatchFilter::ids(["a1", "b2", "absent"]).in_scope("alice"));
    assert!(matches!(frame(&mut both).await, Frame::SnapshotBegin { .. }));
    assert_eq!(
        snapshot_changes(&mut both, head).await,
        vec![expect(updated, "a1", "alice", Some("A1'"))]
    );
    put_in(&feed, "alice", "a3", "A3'").await;
    put_in(&feed, "bob", "b2", "B2'").await;
    let wanted = put_in(&feed, "alice", "a1", "A1''").await;
    assert_eq!(
        seen(&change(&mut both).await),
        expect(wanted, "a1", "alice", Some("A1''"))
    );
    // The unfiltered watch sees every scope, and the scope of each change.
    let mut all = feed.watch(wanted - 2, Vec::new());
    assert_eq!(seen(&change(&mut all).await).2, "bob");
    assert_eq!(seen(&change(&mut all).await).2, "alice");
}

/// Entity `i` of a scoped history: a0, a2, a4 are alice's; b1, b3, b5 bob's.
fn owned(i: usize) -> (&'static str, String) {
    if i.is_multiple_of(2) {
        ("alice", format!("a{i}"))
    } else {
        ("bob", format!("b{i}"))
    }
}

/// Writes a history over two scopes and no scope (20 revisions: six
/// entities created, updated twice, a0 and b1 deleted instead of their
/// second update, an unscoped entity written after each round), recording
/// every change as the server should report it.
async fn scoped_history(feed: &Feed<User>, log: &mut Vec<Seen>) {
    for i in 0..6 {
        let (scope, id) = owned(i);
        let revision = put_in(feed, scope, &id, "v0").await;
        log.push(expect(revision, &id, scope, Some("v0")));
    }
    for round in 1..=2 {
        for i in 0..6 {
            let (scope, id) = owned(i);
            if round == 2 && i < 2 {
                let revision = delete(feed, &id).await;
                log.push(expect(revision, &id, scope, None));
            } else {
                let name = format!("v{round}");
                let revision = put_in(feed, scope, &id, &name).await;
                log.push(expect(revision, &id, scope, Some(name.as_str())));
            }
        }
        let name = format!("unscoped {round}");
        let revision = put(feed, "x", &name).await;
        log.push(expect(revision, "x", "", Some(name.as_str())));
    }
    assert_eq!(committed(feed).await, 20);
}

async fn scoped_resume_replays_only_the_scope(db: TestDb) {
    let feed = open(&db, options()).await;
    let mut log = Vec::new();
    scoped_history(&feed, &mut log).await;
    let head = committed(&feed).await;
    for since in [1, 3, 8, head - 1] {
        let mut stream = feed.watch(since, WatchFilter::scope("alice"));
        let expected: Vec<Seen> = log.iter().filter(|c| c.0 > since && c.2 == "alice").cloned().collect();
        let mut replayed = Vec::new();
        for _ in 0..expected.len() {
            replayed.push(seen(&change(&mut stream).await));
        }
        assert_eq!(replayed, expected, "alice's changes after {since}, and only those");
        caught_up(&mut stream, committed(&feed).await).await;
        // Then live, with nothing repeated or skipped.
        let name = format!("live after {since}");
        put_in(&feed, "bob", "b9", "live").await;
        let live = put_in(&feed, "alice", "a9", &name).await;
        log.push(expect(live - 1, "b9", "bob", Some("live")));
        log.push(expect(live, "a9", "alice", Some(name.as_str())));
        assert_eq!(
            seen(&change(&mut stream).await),
            expect(live, "a9", "alice", Some(name.as_str()))
        );
    }
}

async fn scoped_resume_from_trimmed_history_gets_the_scope_delta_or_a_scoped_reset(db: TestDb) {
    let feed = open(&db, compacting(4, 12)).await;
    let mut log = Vec::new();
    scoped_history(&feed, &mut log).await;
    let head = committed(&feed).await;
    feed.compact().await.unwrap_or_else(|err| panic!("compact: {err}"));
    // Trimmed history, tombstones kept: the latest state of each of alice's
    // entities changed since, deletions included, in revision order.
    let since = head - 12;
    let mut latest = BTreeMap::new();
    for c in log.iter().filter(|c| c.0 > since && c.2 == "alice") {
        latest.insert(c.1.clone(), c.clone());
    }
    let mut expected: Vec<Seen> = latest.into_values().collect();
    expected.sort();
    assert!(
        expected.iter().any(|c| c.3.is_none()),
        "the delta holds a deletion: {expected:?}"
    );
    let mut stream = feed.watch(since, WatchFilter::scope("alice"));
    let mut delta = Vec::new();
    for _ in 0..expected.len() {
        delta.push(seen(&change(&mut stream).await));
    }
    assert_eq!(delta, expected);
    caught_up(&mut stream, head).await;
    let live = put_in(&feed, "alice", "a0", "back").await;
    put_in(&feed, "bob", "b1", "back").await;
    assert_eq!(
        seen(&change(&mut stream).await),
        expect(live, "a0", "alice", Some("back"))
    );
    // Past the tombstones kept: a reset, then a snapshot of alice's
    // entities only.
    let mut stream = feed.watch(1, WatchFilter::scope("alice"));
    let head = committed(&feed).await;
    assert!(
        matches!(frame(&mut stream).await, Frame::Reset { revision, reason } if revision == head && reason.contains("older than"))
    );
    assert!(matches!(frame(&mut stream).await, Frame::SnapshotBegin { revision } if revision == head));
    let snapshot = snapshot_changes(&mut stream, head).await;
    let ids: Vec<&str> = snapshot.iter().map(|c| c.1.as_str()).collect();
    assert_eq!(ids, ["a0", "a2", "a4"]);
    assert!(snapshot.iter().all(|c| c.2 == "alice" && c.3.is_some()));
}

async fn pull_listing_follows_the_same_revisions_and_compaction_rule(db: TestDb) {
    let feed = open(&db, compacting(5, 12)).await;
    history(&feed).await;
    // From 0: the whole current state, paged, then the changes after it,
    // then an empty page at the head.
    let mut copy = BTreeMap::new();
    let (mut since, mut token) = (0, String::new());
    loop {
        let page = feed
            .list_changes(since, 4, &token)
            .await
            .unwrap_or_else(|err| panic!("list: {err}"));
        token = page.next_page_token.clone();
        assert!(page.reset.is_none());
        for change in &page.changes {
            assert!(since == 0 || change.revision > since);
            match &change.entity {
                Some(u) => copy.insert(change.entity_id.clone(), (change.revision, u.display_name.clone())),
                None => copy.remove(&change.entity_id),
            };
        }
        if page.changes.is_empty() && token.is_empty() {
            assert_eq!(page.next_since_revision, committed(&feed).await);
            break;
        }
        since = page.next_since_revision;
    }
    assert_eq!(copy, server_state(&feed).await);
    // Changelog pages while history is kept.
    let page = feed
        .list_changes(37, 100, "")
        .await
        .unwrap_or_else(|err| panic!("list: {err}"));
    assert_eq!(
        page.changes.iter().map(|c| c.revision).collect::<Vec<_>>(),
        vec![38, 39, 40]
    );
    feed.compact().await.unwrap_or_else(|err| panic!("compact: {err}"));
    // Compacted: latest state per entity changed since; past tombstones: reset.
    let page = feed
        .list_changes(30, 100, "")
        .await
        .unwrap_or_else(|err| panic!("list: {err}"));
    assert!(page.reset.is_none());
    assert_eq!(page.changes.len(), 10);
    let page = feed
        .list_changes(3, 100, "")
        .await
        .unwrap_or_else(|err| panic!("list: {err}"));
    assert!(page.reset.is_some_and(|reason| reason.contains("older than")));
    assert_eq!(page.next_since_revision, 0);
    // Listing the state from 0 never runs into the tombstone horizon, however
    // old the entities: it pages by id at one revision.
    let (mut token, mut listed) = (String::new(), 0);
    loop {
        let page = feed
            .list_changes(0, 3, &token)
            .await
            .unwrap_or_else(|err| panic!("list: {err}"));
        assert!(page.reset.is_none(), "{:?}", page.reset);
        listed += page.changes.len();
        if page.next_page_token.is_empty() {
            assert_eq!(page.next_since_revision, committed(&feed).await);
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(listed, server_state(&feed).await.len());
    assert!(feed.list_changes(0, 3, "forged").await.is_err());
}

/// A process shutting down closes its database: the tail stops there,
/// instead of failing (and logging an error) at every poll until the
/// process exits.
async fn closing_the_database_stops_the_tail_instead_of_failing_each_poll(db: TestDb) {
    const POLL: Duration = Duration::from_millis(5);
    let feed = open(
        &db,
        FeedOptions {
            poll_interval: POLL,
            ..options()
        },
    )
    .await;
    lightbox_testkit::eventually("the tail polling", || async {
        (feed.stats().tail_reads >= 3).then_some(())
    })
    .await;
    feed.db().close().await;
    let before = feed.stats().tail_reads;
    // Forty polls' worth: a tail still polling would read about forty times.
    tokio::time::sleep(POLL * 40).await;
    let reads = feed.stats().tail_reads - before;
    assert!(reads <= 1, "{reads} changelog reads after the database was closed");
    // On PostgreSQL the listener's connection, outside the pool, goes too.
    if db.backend() == lightbox_changefeed::Backend::Postgres {
        use sqlx::Connection as _;
        lightbox_testkit::eventually("no connection of the feed left open", || async {
            let mut conn = sqlx::PgConnection::connect(db.url()).await.ok()?;
            let others: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            .fetch_one(&mut conn)
            .await
            .ok()?;
            (others == 0).then_some(())
        })
        .await;
    }
}

async fn closing_the_feed_ends_streams_with_the_resume_revision(db: TestDb) {
    let feed = open(&db, options()).await;
    let revision = put(&feed, "a", "1").await;
    let mut stream = feed.watch(0, Vec::new());
    for _ in 0..3 {
        frame(&mut stream).await;
    }
    feed.close();
    let status = next(&mut stream)
        .await
        .err()
        .unwrap_or_else(|| panic!("expected the stream to end"));
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains(&format!("since_revision={revision}")));
}

/// Two replicas of a service on one PostgreSQL database: a write through
/// one reaches the other's watchers at once, woken by a notification (the
/// poll interval is an hour, so only the notification can wake it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_postgres_wake_each_other_through_notifications() {
    let Some(db) = TestDb::postgres().await else { return };
    let slow_poll = FeedOptions {
        poll_interval: Duration::from_secs(3600),
        ..options()
    };
    let first = open(&db, slow_poll.clone()).await;
    let second = open(&db, slow_poll).await;
    let mut stream = second.watch(0, Vec::new());
    assert!(matches!(frame(&mut stream).await, Frame::SnapshotBegin { revision: 0 }));
    assert!(matches!(frame(&mut stream).await, Frame::SnapshotEnd { revision: 0 }));
    put(&first, "a", "from the first replica").await;
    let seen = change(&mut stream).await;
    assert_eq!((seen.entity_id.as_str(), seen.revision), ("a", 1));
}

async fn one_tail_serves_every_watcher(db: TestDb) {
    const WATCHERS: usize = 50;
    const WRITES: i64 = 20;
    let feed = open(&db, options()).await;
    let mut streams: Vec<_> = (0..WATCHERS).map(|_| feed.watch(0, Vec::new())).collect();
    for stream in &mut streams {
        assert!(matches!(frame(stream).await, Frame::SnapshotBegin { .. }));
        assert!(matches!(frame(stream).await, Frame::SnapshotEnd { .. }));
    }
    assert_eq!(feed.stats().watchers, WATCHERS as i64);
    let before = feed.stats().tail_reads;
    let started = tokio::time::Instant::now();
    for i in 0..WRITES {
        put(&feed, "k", &i.to_string()).await;
        for stream in &mut streams {
            assert_eq!(change(stream).await.revision, i + 1);
        }
    }
    // One read per wake-up (a commit wakes it locally, and on PostgreSQL its
    // notification once more) and per poll, however many watchers: not one
    // per watcher per change (that would be 1,000 here).
    let polls = (started.elapsed().as_millis() / options().poll_interval.as_millis()) as u64 + 1;
    let reads = feed.stats().tail_reads - before;
    assert!(
        reads <= 2 * WRITES as u64 + polls + 1,
        "{reads} changelog reads for {WRITES} changes"
    );
    drop(streams);
    assert_eq!(feed.stats().watchers, 0);
}

/// A commit in this process hands its changes to the tail, which publishes
/// them without reading them back: with the poll an hour away, only the
/// hand-over can bring them to the watcher, and (on SQLite, where no
/// notification wakes the tail) the changelog is not read at all.
async fn a_commit_here_reaches_watchers_without_reading_the_changelog(db: TestDb) {
    const WRITES: i64 = 20;
    let feed = open(
        &db,
        FeedOptions {
            poll_interval: Duration::from_secs(3600),
            ..options()
        },
    )
    .await;
    let mut stream = feed.watch(lightbox_changefeed::watch::FROM_NOW, Vec::new());
    assert!(matches!(frame(&mut stream).await, Frame::Progress { revision: 0 }));
    // The tail reads once as it starts (for commits made before it ran).
    lightbox_testkit::eventually("the tail's first read", || async {
        (feed.stats().tail_reads >= 1).then_some(())
    })
    .await;
    let before = feed.stats().tail_reads;
    for i in 0..WRITES {
        let revision = put(&feed, "k", &i.to_string()).await;
        let seen = change(&mut stream).await;
        assert_eq!(seen.revision, revision);
        assert_eq!(
            seen.entity.as_ref().map(|user| user.display_name.as_str()),
            Some(i.to_string().as_str()),
            "the change handed over is the one committed"
        );
    }
    let reads = feed.stats().tail_reads - before;
    // On PostgreSQL each commit's own notification wakes the tail once more.
    let allowed = match db.backend() {
        lightbox_changefeed::Backend::Sqlite => 0,
        lightbox_changefeed::Backend::Postgres => WRITES as u64,
    };
    assert!(
        reads <= allowed,
        "{reads} changelog reads for {WRITES} commits made here"
    );
}

/// Two replicas on one database: a commit handed over in one with another
/// replica's commit before it (which it was not handed) makes its tail read
/// the gap from the changelog, so its watchers get both, in order, and not
/// a hole.
async fn a_commit_handed_over_after_another_replicas_reads_the_gap(db: TestDb) {
    let slow_poll = FeedOptions {
        poll_interval: Duration::from_secs(3600),
        ..options()
    };
    let first = open(&db, slow_poll.clone()).await;
    let second = open(&db, slow_poll).await;
    let mut stream = second.watch(lightbox_changefeed::watch::FROM_NOW, Vec::new());
    assert!(matches!(frame(&mut stream).await, Frame::Progress { revision: 0 }));
    let elsewhere = put(&first, "a", "from the first replica").await;
    let here = put(&second, "b", "from the second replica").await;
    assert_eq!(change(&mut stream).await.revision, elsewhere);
    assert_eq!(change(&mut stream).await.revision, here);
}

/// A transaction writing more changes than the ring holds is not handed
/// over whole: the tail reads it from the changelog (the poll an hour
/// away, only that read can publish it).
async fn a_transaction_too_large_to_hand_over_is_read_from_the_changelog(db: TestDb) {
    const RING: usize = 8;
    let feed = open(
        &db,
        FeedOptions {
            watcher_buffer: RING,
            poll_interval: Duration::from_secs(3600),
            ..options()
        },
    )
    .await;
    let mut tx = feed.begin().await.unwrap_or_else(|err| panic!("begin: {err}"));
    for i in 0..2 * RING {
        let id = format!("e{i}");
        tx.put(&id, &user(&id, "bulk"))
            .await
            .unwrap_or_else(|err| panic!("put: {err}"));
    }
    let head = tx.commit().await.unwrap_or_else(|err| panic!("commit: {err}"));
    assert_eq!(head, 2 * RING as i64);
    lightbox_testkit::eventually("the tail publishes the large transaction", || async {
        (feed.head() == head).then_some(())
    })
    .await;
}

/// A request cancelled while its transaction's `BEGIN` is in flight (a
/// watch dropped as its snapshot starts) must not hand the connection back
/// to the pool inside that transaction: the next writer on it would run in
/// a read-only snapshot, or worse, inside someone else's transaction.
async fn a_transaction_begin_cancelled_in_flight_leaves_no_transaction_open(db: TestDb) {
    let feed = open(&db, options()).await;
    put(&feed, "a", "0").await;
    for i in 0..200 {
        // Dropped after a moment: some are cancelled with `BEGIN` sent and
        // its answer not yet read.
        let moment = Duration::from_micros(fastrand::u64(0..1500));
        let _ = tokio::time::timeout(moment, feed.db().begin_snapshot()).await;
        let _ = tokio::time::timeout(moment, feed.db().begin_write()).await;
        put(&feed, "a", &i.to_string()).await;
    }
}

/// A resume (N > 0) that has replayed everything up to the head says so at
/// once with a progress frame at the head, filtered or not, with or without
/// anything to replay: the progress interval here is an hour.
async fn a_resume_says_at_once_that_it_is_current(db: TestDb) {
    let feed = open(&db, options()).await;
    for name in ["1", "2", "3"] {
        put(&feed, "a", name).await;
    }
    let mut stream = feed.watch(1, Vec::new());
    assert_eq!(change(&mut stream).await.revision, 2);
    assert_eq!(change(&mut stream).await.revision, 3);
    caught_up(&mut stream, 3).await;
    // Nothing to replay: the progress frame comes first.
    let mut current = feed.watch(3, Vec::new());
    caught_up(&mut current, 3).await;
    // Filtered: the progress frame goes past the changes filtered out.
    let mut elsewhere = feed.watch(1, vec!["b".to_owned()]);
    caught_up(&mut elsewhere, 3).await;
    // Then live, nothing repeated.
    let live = put(&feed, "b", "1").await;
    for stream in [&mut stream, &mut current, &mut elsewhere] {
        assert_eq!(change(stream).await.revision, live);
    }
    // A snapshot ends with its own frame, and no progress frame follows.
    let mut snapshot = feed.watch(0, Vec::new());
    assert!(matches!(frame(&mut snapshot).await, Frame::SnapshotBegin { revision } if revision == live));
    assert_eq!(change(&mut snapshot).await.entity_id, "a");
    assert_eq!(change(&mut snapshot).await.entity_id, "b");
    assert!(matches!(frame(&mut snapshot).await, Frame::SnapshotEnd { revision } if revision == live));
    let next = put(&feed, "c", "1").await;
    assert_eq!(change(&mut snapshot).await.revision, next);
}

/// `since_revision = -1`: no snapshot and no replay, a progress frame at the
/// head first, then exactly the changes after it; filters apply. Other
/// negative revisions are refused.
async fn a_watch_from_now_starts_at_the_head_with_no_snapshot_or_replay(db: TestDb) {
    let feed = open(&db, options()).await;
    put(&feed, "a", "1").await;
    let head = put(&feed, "b", "1").await;
    // "Now" is what the feed has fanned out (its tail publishes each commit
    // a moment after it): a later commit comes as a live change.
    lightbox_testkit::eventually("the feed fans out its last commit", || async {
        (feed.head() == head).then_some(())
    })
    .await;
    let mut all = feed.watch(lightbox_changefeed::watch::FROM_NOW, Vec::new());
    let mut only_b = feed.watch(lightbox_changefeed::watch::FROM_NOW, vec!["b".to_owned()]);
    for stream in [&mut all, &mut only_b] {
        assert!(
            matches!(frame(stream).await, Frame::Progress { revision } if revision == head),
            "the first frame is the head"
        );
    }
    let a = put(&feed, "a", "2").await;
    let b = put(&feed, "b", "2").await;
    assert_eq!(change(&mut all).await.revision, a);
    assert_eq!(change(&mut all).await.revision, b);
    assert_eq!(change(&mut only_b).await.revision, b);
    let (since, _) = lightbox_changefeed::messages::watch_args(-1, ("ids", Vec::new()), None)
        .unwrap_or_else(|err| panic!("-1 is a watch's \"from now\": {err}"));
    assert_eq!(since, lightbox_changefeed::watch::FROM_NOW);
    let refused = lightbox_changefeed::messages::watch_args(-2, ("ids", Vec::new()), None);
    assert!(
        matches!(&refused, Err(lightbox_api::ApiError::InvalidArgument(m)) if m.contains("-2")),
        "{refused:?}"
    );
}

/// A watch from now reads the head in the same step as it subscribes to the
/// ring: opened while writers commit, each one's first change after its
/// progress frame is exactly the next revision (a gap would end the stream
/// with "missed revisions").
async fn watches_from_now_opened_under_concurrent_writers_miss_nothing(db: TestDb) {
    const WRITES: i64 = 200;
    let feed = open(&db, options()).await;
    let writer = {
        let feed = feed.clone();
        tokio::spawn(async move {
            for i in 0..WRITES {
                put(&feed, &format!("k{}", i % 5), &i.to_string()).await;
            }
        })
    };
    let mut opened = 0;
    while !writer.is_finished() || opened == 0 {
        let mut stream = feed.watch(lightbox_changefeed::watch::FROM_NOW, Vec::new());
        opened += 1;
        let head = match frame(&mut stream).await {
            Frame::Progress { revision } => revision,
            other => panic!("expected progress first, got {other:?}"),
        };
        if head < WRITES {
            assert_eq!(change(&mut stream).await.revision, head + 1, "opened at {head}");
        }
        tokio::task::yield_now().await;
    }
    writer.await.unwrap_or_else(|err| panic!("writer: {err}"));
    assert!(opened > 1, "watches were opened while the writer wrote");
}

/// The ring wakes its watchers in groups of 256, one group after the other
/// (`crate::ring`): 600 streams, kept open while a writer commits, so that
/// groups fill and new ones are made in the middle of publishing; every
/// stream gets every change after the head it started at, in order.
async fn watchers_in_many_groups_opened_under_writes_each_get_every_change_in_order(db: TestDb) {
    const WATCHERS: usize = 600;
    const WRITES: i64 = 100;
    let feed = open(&db, options()).await;
    let writer = {
        let feed = feed.clone();
        tokio::spawn(async move {
            for i in 0..WRITES {
                put(&feed, "k", &i.to_string()).await;
                tokio::task::yield_now().await;
            }
        })
    };
    let mut streams = Vec::with_capacity(WATCHERS);
    for _ in 0..WATCHERS {
        let mut stream = feed.watch(lightbox_changefeed::watch::FROM_NOW, Vec::new());
        let head = match frame(&mut stream).await {
            Frame::Progress { revision } => revision,
            other => panic!("expected progress first, got {other:?}"),
        };
        streams.push((head, stream));
    }
    writer.await.unwrap_or_else(|err| panic!("writer: {err}"));
    let started_under_writes = streams.iter().filter(|(head, _)| *head < WRITES).count();
    assert!(
        started_under_writes > 256,
        "{started_under_writes} streams began before the last write"
    );
    for (head, stream) in &mut streams {
        for expected in *head + 1..=WRITES {
            assert_eq!(change(stream).await.revision, expected, "a stream that began at {head}");
        }
    }
}

/// The feed's counter row: (head, compacted_revision, tombstone_revision).
async fn horizons(feed: &Feed<User>) -> (i64, i64, i64) {
    sqlx::query_as::<_, (i64, i64, i64)>(
        "SELECT revision, compacted_revision, tombstone_revision FROM feed_state WHERE feed = $1",
    )
    .bind(FEED)
    .fetch_one(feed.db().pool())
    .await
    .unwrap_or_else(|err| panic!("read feed_state: {err}"))
}

/// The changes the changelog holds: how many, and the oldest.
async fn kept(feed: &Feed<User>) -> (i64, Option<i64>) {
    sqlx::query_as::<_, (i64, Option<i64>)>("SELECT COUNT(*), MIN(revision) FROM feed_changes WHERE feed = $1")
        .bind(FEED)
        .fetch_one(feed.db().pool())
        .await
        .unwrap_or_else(|err| panic!("read feed_changes: {err}"))
}

/// Two replicas on one database, each running its retention every 10 ms,
/// while writers commit through both and unfenced compactions
/// ([`Feed::compact`]) run on both at once besides: the horizons only move
/// up, the changelog ends with exactly the changes kept and the tombstones
/// kept, and a watcher that followed all along (resuming when its replica's
/// tail found history trimmed under it) and a replay still get it right.
async fn replicas_running_retention_at_once_keep_the_changelog_correct(db: TestDb) {
    use std::sync::atomic::{AtomicBool, Ordering};
    const KEEP: i64 = 20;
    const KEEP_TOMBSTONES: i64 = 40;
    const WRITES: usize = 80;
    let retaining = FeedOptions {
        retention: Retention {
            keep_changes: KEEP,
            keep_tombstones: KEEP_TOMBSTONES,
            interval: Some(Duration::from_millis(10)),
        },
        ..options()
    };
    let replicas = [open(&db, retaining.clone()).await, open(&db, retaining).await];
    let stop = Arc::new(AtomicBool::new(false));

    // A watcher of the second replica, from the start, applying every frame
    // until told the final head; it resumes from its cursor when its stream
    // ends (the tail restarts watchers when it finds history trimmed under
    // it), as a client would.
    let (goal, mut goal_rx) = tokio::sync::watch::channel(i64::MAX);
    let watcher = {
        let feed = replicas[1].clone();
        tokio::spawn(async move {
            let (mut client, mut resumes) = (Replica::default(), 0);
            let mut stream = feed.watch(0, Vec::new());
            loop {
                if client.cursor >= *goal_rx.borrow() && client.incoming.is_none() {
                    return (client, resumes);
                }
                let item = tokio::select! {
                    changed = goal_rx.changed() => {
                        changed.unwrap_or_else(|_| panic!("the test dropped the goal"));
                        continue;
                    }
                    item = next(&mut stream) => item,
                };
                match item {
                    Ok(frame) => {
                        if let (Frame::Change(change), None) = (&frame, &client.incoming) {
                            assert!(
                                change.revision > client.cursor,
                                "live changes in revision order, none twice: {} after {}",
                                change.revision,
                                client.cursor
                            );
                        }
                        client.apply(frame);
                    }
                    Err(status) if status.code() == Code::Unavailable => {
                        resumes += 1;
                        let since = if client.incoming.take().is_some() {
                            0
                        } else {
                            client.cursor
                        };
                        stream = feed.watch(since, Vec::new());
                    }
                    Err(status) => panic!("the watch failed: {status:?}"),
                }
            }
        })
    };
    // The horizons, sampled all along: they never move back.
    let sampler = {
        let (feed, stop) = (replicas[0].clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let (mut last, mut moves) = ((0, 0), 0);
            while !stop.load(Ordering::Relaxed) {
                let (_, compacted, tombstones) = horizons(&feed).await;
                assert!(
                    compacted >= last.0 && tombstones >= last.1 && tombstones <= compacted,
                    "horizons (compacted, tombstones) went from {last:?} to {:?}",
                    (compacted, tombstones)
                );
                moves += i32::from((compacted, tombstones) != last);
                last = (compacted, tombstones);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            moves
        })
    };
    // Unfenced compactions on both replicas at once, besides the lease
    // holder's: what a paused holder waking up, or an operator, would do.
    let hammers: Vec<_> = replicas
        .iter()
        .map(|feed| {
            let (feed, stop) = (feed.clone(), Arc::clone(&stop));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    feed.compact().await.unwrap_or_else(|err| panic!("compact: {err}"));
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
        .collect();
    // Two writers per replica: upserts, and now and then a deletion.
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..4 {
        let feed = replicas[w % 2].clone();
        writers.spawn(async move {
            for i in 0..WRITES {
                let id = format!("w{w}-{}", i % 5);
                let mut tx = feed.begin().await.unwrap_or_else(|err| panic!("begin: {err}"));
                if i % 9 == 8 {
                    tx.delete(&id).await.unwrap_or_else(|err| panic!("delete: {err}"));
                } else {
                    tx.put(&id, &user(&id, &format!("{i}")))
                        .await
                        .unwrap_or_else(|err| panic!("put: {err}"));
                }
                tx.commit().await.unwrap_or_else(|err| panic!("commit: {err}"));
            }
        });
    }
    while let Some(joined) = writers.join_next().await {
        joined.unwrap_or_else(|err| panic!("writer failed: {err}"));
    }
    let head = committed(&replicas[0]).await;
    assert!(head > KEEP_TOMBSTONES * 4, "enough history to trim: {head}");
    // The lease holder's retention trims to exactly what is kept.
    lightbox_testkit::eventually("retention to trim to exactly the history kept", || async {
        let trimmed = horizons(&replicas[0]).await == (head, head - KEEP, head - KEEP_TOMBSTONES);
        (trimmed && kept(&replicas[0]).await == (KEEP, Some(head - KEEP + 1))).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for hammer in hammers {
        hammer.await.unwrap_or_else(|err| panic!("compactions failed: {err}"));
    }
    let moves = sampler.await.unwrap_or_else(|err| panic!("horizons: {err}"));
    assert!(moves > 1, "the horizons moved while sampled ({moves} times)");
    let purged: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM feed_entities WHERE feed = $1 AND deleted = 1 AND revision <= $2")
            .bind(FEED)
            .bind(head - KEEP_TOMBSTONES)
            .fetch_one(replicas[0].db().pool())
            .await
            .unwrap_or_else(|err| panic!("count tombstones: {err}"));
    assert_eq!(purged, 0, "no tombstone left past the horizon");
    // The watcher's copy is the state; a replay of what is kept is exact.
    goal.send(head).unwrap_or_else(|_| panic!("the watcher stopped"));
    let (client, resumes) = watcher.await.unwrap_or_else(|err| panic!("watcher: {err}"));
    assert_eq!(
        client.entities,
        server_state(&replicas[0]).await,
        "after {resumes} resumes"
    );
    for feed in &replicas {
        let mut stream = feed.watch(head - KEEP, Vec::new());
        for expected in head - KEEP + 1..=head {
            assert_eq!(change(&mut stream).await.revision, expected);
        }
        caught_up(&mut stream, head).await;
    }
    let lease = Lease::current(replicas[0].db(), &retention_lease(FEED))
        .await
        .unwrap_or_else(|err| panic!("read the lease: {err}"))
        .unwrap_or_else(|| panic!("the retention lease was never taken"));
    assert!(lease.holder.is_some() && lease.term.get() >= 1, "{lease:?}");
}

/// The retention lease, driven by hand: one holder at a time, renewed at
/// the same term; taken over once expired, at a higher term; and a
/// compaction under a stale term is refused, with nothing trimmed, while
/// the current holder's goes through. A release hands it over at once.
async fn the_retention_lease_is_held_by_one_at_a_time_and_fences_a_stale_holder(db: TestDb) {
    let feed = open(&db, compacting(5, 10)).await;
    let db = feed.db();
    let name = retention_lease(FEED);
    let ttl = Duration::from_secs(1);
    let acquire = |holder: &'static str| {
        let name = name.clone();
        async move {
            Lease::try_acquire(db, &name, holder, ttl)
                .await
                .unwrap_or_else(|err| panic!("acquire: {err}"))
        }
    };
    let first = acquire("a").await.unwrap_or_else(|| panic!("a free lease is taken"));
    assert_eq!(acquire("b").await, None, "held by a: b cannot take it");
    assert_eq!(acquire("a").await, Some(first), "a renews it at the same term");
    // a stops renewing (paused): once it expires, b takes it, at a new term.
    let second = lightbox_testkit::eventually("b to take over the expired lease", || acquire("b")).await;
    assert!(second > first, "a takeover raises the term: {first} then {second}");
    assert_eq!(acquire("a").await, None, "held by b now");
    let state = Lease::current(db, &name)
        .await
        .unwrap_or_else(|err| panic!("read the lease: {err}"));
    assert!(
        state
            .as_ref()
            .is_some_and(|s| s.holder.as_deref() == Some("b") && s.term == second && s.remaining_ms > 0),
        "{state:?}"
    );
    // a wakes up and compacts with the term it had: refused, nothing trimmed.
    history(&feed).await;
    assert!(
        !feed
            .compact_fenced(first)
            .await
            .unwrap_or_else(|err| panic!("compact: {err}")),
        "a stale term's compaction is refused"
    );
    assert_eq!(horizons(&feed).await, (40, 0, 0));
    assert_eq!(kept(&feed).await, (40, Some(1)));
    // b's goes through.
    assert!(
        feed.compact_fenced(second)
            .await
            .unwrap_or_else(|err| panic!("compact: {err}"))
    );
    assert_eq!(horizons(&feed).await, (40, 35, 30));
    assert_eq!(kept(&feed).await, (5, Some(36)));
    // b releases it: a takes it at once, at a higher term, and b is fenced.
    assert!(
        Lease::release(db, &name, "b")
            .await
            .unwrap_or_else(|err| panic!("release: {err}"))
    );
    let third = acquire("a").await.unwrap_or_else(|| panic!("a released lease is free"));
    assert!(third > second);
    put(&feed, "after", "1").await;
    assert!(
        !feed
            .compact_fenced(second)
            .await
            .unwrap_or_else(|err| panic!("compact: {err}"))
    );
    assert_eq!(horizons(&feed).await, (41, 35, 30));
}
