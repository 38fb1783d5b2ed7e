//! The fan-out: one tail per feed and process publishes each change once,
//! in revision order, into a bounded ring ([`crate::ring`]) that every
//! watcher of the process reads at its own pace. Watchers never query
//! the database while live; writers never wait for watchers; a watcher that
//! falls a whole ring behind learns it (lag) and its stream is ended for it
//! to resume, instead of skipping changes.
//!
//! Where the tail gets the changes: a commit in this process hands its own
//! changes over ([`Hub::hand_over`]), and the tail publishes them without
//! reading them back, as long as they follow its cursor with no gap. The
//! changelog is read only for what the hand-over cannot say: another
//! replica's commits (a PostgreSQL notification), a gap in what was handed
//! over (another replica committed in between), a hand-over too large to
//! hold, and the periodic poll. The tail's publishing and the watchers are
//! the same either way; only the source of the changes differs.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Notify, Semaphore};

use crate::{
    change::{Change, Entity},
    db::Db,
    log::{NOTIFY_CHANNEL, changes_since},
    ring::{GROUP, Ring, Subscription},
};

/// The ring and the head of one feed in this process.
pub(crate) struct Hub<T> {
    /// The ring. Restarted (closing every receiver) if the tail ever finds
    /// a hole in the changelog, so that watchers resume rather than skip.
    ring: Ring<T>,
    /// Raised by [`Hub::close`] (graceful shutdown): watchers end with the
    /// revision to resume from instead of waiting for more changes.
    closing: AtomicBool,
    /// Queries the tail made of the changelog (for metrics, and for tests
    /// proving watchers do not poll the database).
    pub(crate) tail_reads: AtomicU64,
    /// Watch streams alive.
    pub(crate) watchers: AtomicI64,
    /// Changes sent to watchers, every stream counted.
    pub(crate) events_sent: AtomicU64,
    /// Watchers ended for falling a whole ring behind.
    pub(crate) slow_watchers_ended: AtomicU64,
    /// Snapshots being read now.
    pub(crate) snapshots: Arc<AtomicI64>,
    /// Turns to read a snapshot: each holds a database connection.
    pub(crate) snapshot_turns: Arc<Semaphore>,
    /// Changes encoded as watch responses (each live change once, however
    /// many streams it goes to).
    pub(crate) changes_encoded: AtomicU64,
    /// Wakes the tail to read the changelog: on PostgreSQL the listener, on
    /// each notification from any replica.
    wake: Notify,
    /// Changes committed in this process, not yet taken by the tail.
    handed: Mutex<HandOver<T>>,
    /// Wakes the tail to take what was handed over.
    handed_wake: Notify,
}

/// What commits in this process handed to the tail since it last looked.
struct HandOver<T> {
    /// The changes, each commit's in revision order (commits may hand over
    /// out of order: the tail sorts). At most [`Hub::capacity`].
    changes: Vec<Arc<Change<T>>>,
    /// Some changes did not fit: the tail reads the changelog.
    overflowed: bool,
}

impl<T> Hub<T> {
    pub(crate) fn new(capacity: usize, head: i64, max_snapshots: usize) -> Hub<T> {
        Hub {
            ring: Ring::new(capacity, head),
            closing: AtomicBool::new(false),
            tail_reads: AtomicU64::new(0),
            watchers: AtomicI64::new(0),
            events_sent: AtomicU64::new(0),
            slow_watchers_ended: AtomicU64::new(0),
            snapshots: Arc::new(AtomicI64::new(0)),
            snapshot_turns: Arc::new(Semaphore::new(max_snapshots)),
            changes_encoded: AtomicU64::new(0),
            wake: Notify::new(),
            handed: Mutex::new(HandOver {
                changes: Vec::new(),
                overflowed: false,
            }),
            handed_wake: Notify::new(),
        }
    }

    /// The last revision published to every watcher.
    pub(crate) fn head(&self) -> i64 {
        self.ring.head()
    }

    /// The last revision sent to any watcher (see `Ring::sent`).
    pub(crate) fn sent(&self) -> i64 {
        self.ring.sent()
    }

    /// How many changes a watcher may fall behind.
    pub(crate) fn capacity(&self) -> usize {
        self.ring.capacity()
    }

    /// Makes the tail read the changelog (a commit elsewhere).
    pub(crate) fn wake(&self) {
        // A permit is stored if the tail is busy reading, so no commit is missed.
        self.wake.notify_one();
    }

    /// Hands the changes of a commit in this process to the tail (`None`:
    /// the commit wrote more than a hand-over holds; the tail reads them).
    /// Called after the commit succeeded, never before: the tail publishes
    /// what it is handed as committed.
    pub(crate) fn hand_over(&self, changes: Option<Vec<Arc<Change<T>>>>) {
        {
            let mut handed = match self.handed.lock() {
                Ok(handed) => handed,
                Err(poisoned) => poisoned.into_inner(),
            };
            match changes {
                Some(changes) if handed.changes.len() + changes.len() <= self.capacity() => {
                    handed.changes.extend(changes);
                }
                _ => handed.overflowed = true,
            }
        }
        self.handed_wake.notify_one();
    }

    /// Takes what was handed over: the changes in revision order, and
    /// whether some did not fit.
    fn take_handed(&self) -> (Vec<Arc<Change<T>>>, bool) {
        let mut handed = match self.handed.lock() {
            Ok(handed) => handed,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut changes = std::mem::take(&mut handed.changes);
        let overflowed = std::mem::take(&mut handed.overflowed);
        drop(handed);
        changes.sort_unstable_by_key(|change| change.revision);
        (changes, overflowed)
    }

    /// A place in the ring: its receiver gets exactly the changes after
    /// the head it comes with (in its generation).
    pub(crate) fn subscribe(&self) -> Subscription<T> {
        self.ring.subscribe()
    }

    /// The ring's generation now.
    pub(crate) fn generation(&self) -> u64 {
        self.ring.generation()
    }

    /// Whether the feed is shutting down.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Ends every watch stream: raises the flag, then closes the ring, which
    /// wakes every watcher (no watcher pays for a second wake-up source).
    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.ring.restart();
    }
}

/// The feed's progress ticker: every `progress` interval, a tick into every
/// group of the ring ([`Ring::tick`]). A task of its own, beside the tail:
/// idle streams keep getting progress while the tail waits for the
/// database, and a commit's fan-out never waits behind a tick's.
pub(crate) async fn ticker<T>(hub: Arc<Hub<T>>, progress: Duration) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + progress, progress);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        hub.ring.tick().await;
    }
}

/// The tail: publishes every change after the last published one, from
/// what this process's commits hand over or else from the changelog (see
/// the module docs), then sleeps until woken (or `poll`), and repeats. Runs
/// for the life of the feed `name` in `db`, or until `db` is closed.
pub(crate) async fn tail<T: Entity>(hub: Arc<Hub<T>>, db: Db, name: &'static str, poll: Duration) {
    let mut cursor = hub.head();
    // The first round reads: commits may have landed since the head was read.
    let mut read = true;
    // The poll's deadline, kept across hand-overs: steady local commits do
    // not put it off.
    let mut next_poll = tokio::time::Instant::now();
    loop {
        let (handed, overflowed) = hub.take_handed();
        read |= overflowed;
        // What follows the cursor with no gap; a gap is a commit from
        // elsewhere in between, read from the changelog.
        let fresh: Vec<_> = handed.into_iter().filter(|change| change.revision > cursor).collect();
        let follows = fresh
            .iter()
            .zip(cursor + 1..)
            .take_while(|(change, expected)| change.revision == *expected)
            .count();
        read |= follows < fresh.len();
        if let Some(last) = fresh[..follows].last() {
            cursor = last.revision;
            // The commit's own acknowledgement first, when there are more
            // watchers than one group holds: what became ready with the
            // commit (its response, its connection's write) runs before the
            // first group is woken, so the writer does not wait for a
            // group's worth of deliveries. A fan-out within one group goes
            // at once: it costs the writer at most that group, and the
            // watchers are spared the scheduler round (tens of
            // microseconds) a yield costs them.
            if hub.watchers.load(Ordering::Relaxed) > GROUP as i64 {
                tokio::task::yield_now().await;
            }
            hub.ring.publish(&fresh[..follows]).await;
        }
        if read {
            let Some(read) = read_changelog(&hub, &db, name, cursor).await else {
                tracing::debug!(feed = name, cursor, "changefeed tail stops: its database was closed");
                return;
            };
            cursor = read;
            next_poll = tokio::time::Instant::now() + poll;
        }
        read = tokio::select! {
            _ = hub.handed_wake.notified() => false,
            _ = hub.wake.notified() => true,
            _ = tokio::time::sleep_until(next_poll) => true,
        };
    }
}

/// Publishes every change in the changelog after `cursor`; answers the new
/// cursor (the same on an error, logged: retried at the next read), or
/// `None` once the database was closed (the process is shutting down).
async fn read_changelog<T: Entity>(hub: &Hub<T>, db: &Db, name: &'static str, mut cursor: i64) -> Option<i64> {
    loop {
        hub.tail_reads.fetch_add(1, Ordering::Relaxed);
        let batch = async {
            let mut conn = db.pool().acquire().await?;
            changes_since::<T>(&mut conn, name, cursor, 512, None).await
        }
        .await;
        let changes = match batch {
            Ok(changes) => changes,
            Err(_) if db.is_closed() => return None,
            Err(err) => {
                // Loud, and retried at the next wake-up or poll: never skipped.
                tracing::error!(feed = name, cursor, %err, "changefeed tail cannot read the changelog");
                return Some(cursor);
            }
        };
        let full = changes.len() == 512;
        let mut rest = changes.as_slice();
        while let Some(first) = rest.first() {
            if first.revision != cursor + 1 {
                // Only possible if history was trimmed under a tail that fell
                // behind: make every watcher resume from the database.
                tracing::warn!(
                    feed = name,
                    cursor,
                    next = first.revision,
                    "changefeed tail found a hole; restarting watchers"
                );
                hub.ring.restart();
            }
            // The run of consecutive revisions from here.
            let run = 1 + rest
                .windows(2)
                .take_while(|pair| pair[1].revision == pair[0].revision + 1)
                .count();
            let (batch, after) = rest.split_at(run);
            hub.ring.publish(batch).await;
            if let Some(last) = batch.last() {
                cursor = last.revision;
            }
            rest = after;
        }
        if !full {
            return Some(cursor);
        }
    }
}

/// On PostgreSQL: wakes the tail on every commit to this feed by any
/// replica. Reconnects by itself; what it misses meanwhile, the poll catches.
/// `ready` is told once the first subscription is in place.
pub(crate) async fn listen<T: Entity>(
    hub: Arc<Hub<T>>,
    db: Db,
    name: &'static str,
    poll: Duration,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    loop {
        if db.is_closed() {
            return;
        }
        let result: Result<(), sqlx::Error> = async {
            let mut listener = sqlx::postgres::PgListener::connect(db.url()).await?;
            listener.listen(NOTIFY_CHANNEL).await?;
            if let Some(ready) = ready.take() {
                let _ = ready.send(());
            }
            // Ends with the pool: its own connection would outlive it.
            let closed = db.pool().close_event();
            tokio::pin!(closed);
            loop {
                tokio::select! {
                    () = &mut closed => return Ok(()),
                    notification = listener.recv() => {
                        if notification?.payload() == name {
                            hub.wake();
                        }
                    }
                }
            }
        }
        .await;
        if let Err(err) = result {
            tracing::warn!(feed = name, %err, "changefeed listener lost its connection; polling until it is back");
        }
        hub.wake();
        tokio::time::sleep(poll).await;
    }
}
