//! The fan-out: one tail per feed and process publishes each change once,
//! in revision order, into a bounded ring (a tokio broadcast channel) that
//! every watcher of the process reads at its own pace. Watchers never query
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
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Notify, Semaphore, broadcast};

use crate::{
    change::{Change, Entity},
    db::Db,
    log::{NOTIFY_CHANNEL, changes_since},
};

/// The ring and the head of one feed in this process.
pub(crate) struct Hub<T> {
    /// The ring. Replaced (closing every receiver) if the tail ever finds a
    /// hole in the changelog, so that watchers resume rather than skip.
    sender: RwLock<broadcast::Sender<Arc<Change<T>>>>,
    capacity: usize,
    /// The last revision published into the ring. Stored after the send, so
    /// a watcher that reads it and then finds its receiver empty has seen
    /// every change up to it.
    head: AtomicI64,
    /// Raised by [`Hub::close`] (graceful shutdown): watchers end with the
    /// revision to resume from instead of waiting for more changes.
    closing: AtomicBool,
    /// Bumped each time the ring is replaced: a watcher whose ring was
    /// replaced must not claim progress from the new head.
    generation: AtomicU64,
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
        let (sender, _) = broadcast::channel(capacity);
        Hub {
            sender: RwLock::new(sender),
            capacity,
            head: AtomicI64::new(head),
            closing: AtomicBool::new(false),
            generation: AtomicU64::new(0),
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

    pub(crate) fn head(&self) -> i64 {
        self.head.load(Ordering::SeqCst)
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
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
                Some(changes) if handed.changes.len() + changes.len() <= self.capacity => {
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

    /// A receiver of the ring, the ring's generation, and the head: the
    /// receiver gets exactly the changes after that head (in that
    /// generation).
    pub(crate) fn subscribe(&self) -> (broadcast::Receiver<Arc<Change<T>>>, u64, i64) {
        // The write lock: `restart` replaces the ring under it, and `publish`
        // sends and moves the head under the read lock, so no publish is
        // half done (sent but not yet counted in the head) while the three
        // are read. Held for three loads, once per watch.
        let sender = match self.sender.write() {
            Ok(sender) => sender,
            Err(poisoned) => poisoned.into_inner(),
        };
        (
            sender.subscribe(),
            self.generation.load(Ordering::SeqCst),
            self.head.load(Ordering::SeqCst),
        )
    }

    /// The ring's generation now.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn publish(&self, change: Arc<Change<T>>) {
        let revision = change.revision;
        let sender = match self.sender.read() {
            Ok(sender) => sender,
            Err(poisoned) => poisoned.into_inner(),
        };
        // An error only means nobody is watching right now.
        let _ = sender.send(change);
        // Under the lock still: see `subscribe`.
        self.head.store(revision, Ordering::SeqCst);
    }

    /// Whether the feed is shutting down.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Ends every watch stream: raises the flag, then closes the ring, which
    /// wakes every watcher (no watcher pays for a second wake-up source).
    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.restart();
    }

    /// Closes the ring for every current watcher (they end and resume from
    /// the database) and opens a new one.
    fn restart(&self) {
        let mut sender = match self.sender.write() {
            Ok(sender) => sender,
            Err(poisoned) => poisoned.into_inner(),
        };
        self.generation.fetch_add(1, Ordering::SeqCst);
        *sender = broadcast::channel(self.capacity).0;
    }
}

/// The tail: publishes every change after the last published one, from
/// what this process's commits hand over or else from the changelog (see
/// the module docs), then sleeps until woken (or `poll`), and repeats. Runs
/// for the life of the feed `name` in `db`.
pub(crate) async fn tail<T: Entity>(hub: Arc<Hub<T>>, db: Db, name: &'static str, poll: Duration) {
    let mut cursor = hub.head();
    // The first round reads: commits may have landed since the head was read.
    let mut read = true;
    loop {
        let (handed, overflowed) = hub.take_handed();
        read |= overflowed;
        for change in handed {
            if change.revision <= cursor {
                continue; // read from the changelog already
            }
            if change.revision != cursor + 1 {
                read = true; // a commit from elsewhere came in between
                break;
            }
            cursor = change.revision;
            hub.publish(change);
        }
        if read {
            cursor = read_changelog(&hub, &db, name, cursor).await;
        }
        read = tokio::select! {
            _ = hub.handed_wake.notified() => false,
            _ = hub.wake.notified() => true,
            _ = tokio::time::sleep(poll) => true,
        };
    }
}

/// Publishes every change in the changelog after `cursor`; answers the new
/// cursor (the same on an error, logged: retried at the next read).
async fn read_changelog<T: Entity>(hub: &Hub<T>, db: &Db, name: &'static str, mut cursor: i64) -> i64 {
    loop {
        hub.tail_reads.fetch_add(1, Ordering::Relaxed);
        let batch = async {
            let mut conn = db.pool().acquire().await?;
            changes_since::<T>(&mut conn, name, cursor, 512, None).await
        }
        .await;
        let changes = match batch {
            Ok(changes) => changes,
            Err(err) => {
                // Loud, and retried at the next wake-up or poll: never skipped.
                tracing::error!(feed = name, cursor, %err, "changefeed tail cannot read the changelog");
                return cursor;
            }
        };
        let full = changes.len() == 512;
        for change in changes {
            if change.revision != cursor + 1 {
                // Only possible if history was trimmed under a tail that fell
                // behind: make every watcher resume from the database.
                tracing::warn!(
                    feed = name,
                    cursor,
                    next = change.revision,
                    "changefeed tail found a hole; restarting watchers"
                );
                hub.restart();
            }
            cursor = change.revision;
            hub.publish(change);
        }
        if !full {
            return cursor;
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
        let result: Result<(), sqlx::Error> = async {
            let mut listener = sqlx::postgres::PgListener::connect(db.url()).await?;
            listener.listen(NOTIFY_CHANNEL).await?;
            if let Some(ready) = ready.take() {
                let _ = ready.send(());
            }
            loop {
                let notification = listener.recv().await?;
                if notification.payload() == name {
                    hub.wake();
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
