//! A phone, as the fan-out sees it: one events stream, its bounded queue of
//! updates, and how that stream is ended.
//!
//! The fan-out never waits for a phone: it offers each update to the phone's
//! queue, and when the queue is full it takes the phone out of the index and
//! ends its stream with an `end` event after what is already queued; the
//! client resumes with its `Last-Event-ID` and loses nothing. Its memory is
//! bounded by its queue. Catch-up tasks do wait for room, but only up to
//! half the queue, so a phone busy with a large snapshot keeps room for the
//! fan-out's live changes.

use std::sync::{
    Arc, Mutex, MutexGuard,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};

use tokio::sync::{Notify, mpsc, oneshot};

use crate::upstream::Source;

/// Locks `mutex`; nothing holding the gateway's locks can panic half-way
/// through an update, so a poisoned lock is used as it is.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// An event to send: its name and its data (JSON, written once and shared
/// by every phone that gets it).
pub(crate) type Named = (&'static str, Arc<str>);

/// What a phone's events stream is told: its new position in one source,
/// and the event to send, if any (progress moves the cursor silently).
pub(crate) struct Update {
    pub(crate) source: Source,
    pub(crate) position: i64,
    pub(crate) event: Option<Named>,
}

/// Why the fan-out could not queue an update.
pub(crate) enum Refused {
    /// The phone is that far behind.
    Full,
    /// The phone's stream has ended.
    Closed,
}

/// One events stream, as the fan-out and its catch-up tasks see it.
pub(crate) struct Phone {
    user_id: String,
    /// Unbounded as a channel, bounded by `queued` and `capacity`: the
    /// fan-out refuses past `capacity`, catch-up tasks wait below half.
    queue: mpsc::UnboundedSender<Update>,
    /// Updates in the queue not yet taken by the events stream.
    queued: AtomicUsize,
    capacity: usize,
    /// Wakes catch-up tasks waiting for room (and when the queue closes).
    room: Notify,
    /// Per source: updates queued and not yet read by the events stream.
    pending: [AtomicUsize; 3],
    /// Per source: whether the phone is in that source's fan-out index
    /// (joined, and not taken out since). Set and cleared under that
    /// index's lock.
    joined: [AtomicBool; 3],
    /// Ends the events stream, once, with the reason told to the client.
    end: Mutex<Option<oneshot::Sender<String>>>,
}

impl Phone {
    /// A phone of `user_id` whose queue holds `capacity` updates, and the
    /// events stream's end of it.
    pub(crate) fn new(user_id: String, capacity: usize) -> (Arc<Phone>, Inbox) {
        let (queue, updates) = mpsc::unbounded_channel();
        let (end, ended) = oneshot::channel();
        let phone = Arc::new(Phone {
            user_id,
            queue,
            queued: AtomicUsize::new(0),
            capacity: capacity.max(1),
            room: Notify::new(),
            pending: Default::default(),
            joined: Default::default(),
            end: Mutex::new(Some(end)),
        });
        let inbox = Inbox {
            phone: Arc::clone(&phone),
            updates,
            ended: Some(ended),
            ending: None,
        };
        (phone, inbox)
    }

    /// The signed-in user.
    pub(crate) fn user_id(&self) -> &str {
        &self.user_id
    }

    /// Completes once the events stream's end of the queue is closed or
    /// gone: nothing can be queued any more.
    pub(crate) async fn closed(&self) {
        self.queue.closed().await;
    }

    /// How many queued updates catch-up tasks may leave waiting.
    fn catch_up_room(&self) -> usize {
        self.capacity.div_ceil(2)
    }

    /// Whether the phone is in `source`'s fan-out index now.
    pub(crate) fn is_joined(&self, source: Source) -> bool {
        self.joined[source.index()].load(Ordering::SeqCst)
    }

    /// Notes that the phone entered or left `source`'s index (under that
    /// index's lock).
    pub(crate) fn set_joined(&self, source: Source, joined: bool) {
        self.joined[source.index()].store(joined, Ordering::SeqCst);
    }

    /// Updates of `source` queued and not yet read by the events stream.
    pub(crate) fn pending(&self, source: Source) -> usize {
        self.pending[source.index()].load(Ordering::SeqCst)
    }

    /// Sends `update`, counted in its source's pending updates.
    fn enqueue(&self, update: Update) -> Result<(), Refused> {
        let source = update.source.index();
        self.pending[source].fetch_add(1, Ordering::SeqCst);
        self.queue.send(update).map_err(|_| {
            self.pending[source].fetch_sub(1, Ordering::SeqCst);
            Refused::Closed
        })
    }

    /// Queues `update` at once, or says why not (the fan-out never waits).
    pub(crate) fn offer(&self, update: Update) -> Result<(), Refused> {
        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.capacity {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::Full);
        }
        self.enqueue(update).inspect_err(|_| {
            self.queued.fetch_sub(1, Ordering::SeqCst);
        })
    }

    /// Queues `update` once the queue is less than half full (catch-up
    /// tasks); false once the events stream has ended.
    pub(crate) async fn send(&self, update: Update) -> bool {
        loop {
            // Registered before the check, so a wake-up in between is kept.
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if self.queue.is_closed() {
                return false;
            }
            if self.queued.load(Ordering::SeqCst) < self.catch_up_room() {
                self.queued.fetch_add(1, Ordering::SeqCst);
                if self.enqueue(update).is_err() {
                    self.queued.fetch_sub(1, Ordering::SeqCst);
                    return false;
                }
                return true;
            }
            room.await;
        }
    }

    /// Ends the events stream after what is queued, telling the client
    /// `reason` (the first reason given wins).
    pub(crate) fn end(&self, reason: String) {
        if let Some(end) = lock(&self.end).take() {
            let _ = end.send(reason);
        }
    }

    /// Why a phone whose queue is full is ended.
    pub(crate) fn too_slow(&self) -> String {
        format!(
            "this events stream fell {} updates behind (read too slowly) and was ended; \
             reconnect with Last-Event-ID to resume where it stopped",
            self.capacity
        )
    }
}

/// What an events stream reads next.
pub(crate) enum Next {
    /// An update.
    Update(Update),
    /// The stream ends, for this reason; the client should resume.
    End(String),
}

/// The events stream's end of a phone's queue.
pub(crate) struct Inbox {
    phone: Arc<Phone>,
    updates: mpsc::UnboundedReceiver<Update>,
    ended: Option<oneshot::Receiver<String>>,
    ending: Option<String>,
}

impl Inbox {
    /// The next update; once the phone is ended, what was queued and then
    /// [`Next::End`]; then `None`.
    pub(crate) async fn next(&mut self) -> Option<Next> {
        loop {
            let update = match self.ended.as_mut() {
                Some(ended) => tokio::select! {
                    biased;
                    update = self.updates.recv() => update,
                    reason = ended => {
                        self.ended = None;
                        if let Ok(reason) = reason {
                            // Nothing more gets in; what is queued drains.
                            self.ending = Some(reason);
                            self.updates.close();
                            self.phone.room.notify_waiters();
                        }
                        continue;
                    }
                },
                None => self.updates.recv().await,
            };
            let Some(update) = update else {
                return self.ending.take().map(Next::End);
            };
            // The caller applies it before it looks at any source's
            // pending count again (see `events::Reader`).
            self.phone.pending[update.source.index()].fetch_sub(1, Ordering::SeqCst);
            if self.phone.queued.fetch_sub(1, Ordering::SeqCst) <= self.phone.catch_up_room() {
                self.phone.room.notify_waiters();
            }
            return Some(Next::Update(update));
        }
    }
}
