//! The fan-out: one tail per feed and process reads the changelog in
//! revision order and publishes each change once into a bounded ring
//! (a tokio broadcast channel) that every watcher of the process reads at its
//! own pace. Watchers never query the database while live; writers never wait
//! for watchers; a watcher that falls a whole ring behind learns it (lag) and
//! its stream is ended for it to resume, instead of skipping changes.

use std::{
    sync::{
        Arc, RwLock,
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
    /// Wakes the tail: local commits call it directly; on PostgreSQL the
    /// listener calls it on each notification from any replica.
    wake: Notify,
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
        }
    }

    pub(crate) fn head(&self) -> i64 {
        self.head.load(Ordering::SeqCst)
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn wake(&self) {
        // A permit is stored if the tail is busy reading, so no commit is missed.
        self.wake.notify_one();
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

/// The tail: reads every change after the last published one, publishes it,
/// sleeps until woken (or `poll`), repeats. Runs for the life of the feed
/// `name` in `db`.
pub(crate) async fn tail<T: Entity>(hub: Arc<Hub<T>>, db: Db, name: &'static str, poll: Duration) {
    let mut cursor = hub.head();
    loop {
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
                    break;
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
                break;
            }
        }
        tokio::select! {
            _ = hub.wake.notified() => {}
            _ = tokio::time::sleep(poll) => {}
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
