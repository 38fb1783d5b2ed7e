//! The delivery task of one subscription: a reader per feed it follows,
//! which fills the queue from the feed's watch stream, and the dispatcher,
//! which delivers the queue's due heads, several entities at once.
//!
//! Ordering: an entity's events go out one at a time, oldest first; the
//! next is due only once the one before it is delivered or dead-lettered
//! (the queue's head rule). Entities do not wait for each other: up to
//! `max_in_flight` are in flight at once, and one whose endpoint keeps
//! failing only holds its own later events back (they stay in the
//! database, not in memory).
//!
//! Bounds: the dispatcher holds at most `max_in_flight` events in memory; a
//! reader holds one batch (`batch_max`) and stops reading once its
//! subscription has `max_queued` events waiting (the watch stream then
//! falls behind and is resumed from the cursor later, as any slow watcher).
//!
//! Lifecycle: the supervisor starts a task per active subscription at its
//! generation under the delivery lease's term, and stops it by its `stop`
//! channel; a reader that finds the generation or the term moved (a
//! replay, a pause, a takeover) stops the whole task the same way. On stop,
//! deliveries in flight get their timeout to finish; an attempt cut short
//! is made again later (at least once).

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, SystemTime},
};

use lightbox_changefeed::{Db, Term};
use tokio::{sync::Notify, sync::watch, task::JoinSet, time::Instant};

use crate::{
    EventsOptions,
    policy::{RateLimiter, Verdict},
    queue::{self, Attempt, Queued},
    send::{Sender, Sent},
    source::{EntityKind, Sources, millis},
    store::Subscription,
};

/// What every delivery task shares: one per [`crate::EventsService`].
pub(crate) struct Engine {
    pub db: Db,
    pub options: EventsOptions,
    pub sources: Sources,
    pub sender: Sender,
    /// Wakes the supervisor (a subscription changed, a task stopped).
    pub poke: Notify,
}

/// A running delivery task, owned by the supervisor.
pub(crate) struct Runner {
    pub generation: i64,
    stop: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
    drain: Duration,
}

impl Runner {
    /// Starts the task of `sub` under `term`.
    pub fn start(engine: Arc<Engine>, sub: Subscription, term: Term) -> Runner {
        let (stop, _) = watch::channel(false);
        let stop = Arc::new(stop);
        let drain = sub.timeout + Duration::from_secs(1);
        let generation = sub.generation;
        let task = tokio::spawn(run(engine, Arc::new(sub), term, Arc::clone(&stop)));
        Runner {
            generation,
            stop,
            task,
            drain,
        }
    }

    /// Whether the task has ended by itself (stale, or a panic).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Asks the task to stop (see [`Runner::join`]).
    pub fn signal(&self) {
        self.stop.send_replace(true);
    }

    /// Stops the task: deliveries in flight get their timeout, then it is
    /// aborted.
    pub async fn join(self) {
        self.signal();
        let mut task = self.task;
        if tokio::time::timeout(self.drain + Duration::from_secs(1), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

/// Counters a task's reader and dispatcher share.
pub(crate) struct Shared {
    /// Events queued for the subscription (kept by both; recounted when
    /// it says the queue is full, as redeliveries add rows unseen).
    pub(crate) queued: AtomicI64,
    /// Wakes the dispatcher: a reader queued events.
    pub(crate) queued_more: Notify,
    /// Wakes readers waiting for room: the dispatcher took events off.
    pub(crate) room: Notify,
}

/// Resolves once `stop` says so (at once if it already does, or if its
/// sender is gone).
pub(crate) async fn until_stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

async fn run(engine: Arc<Engine>, sub: Arc<Subscription>, term: Term, stop: Arc<watch::Sender<bool>>) {
    let shared = Arc::new(Shared {
        queued: AtomicI64::new(queue::count(&engine.db, &sub.id).await.unwrap_or(0)),
        queued_more: Notify::new(),
        room: Notify::new(),
    });
    let mut readers = JoinSet::new();
    for kind in &sub.kinds {
        if engine.sources.kinds().contains(kind) {
            let reader = crate::reader::Reader {
                engine: Arc::clone(&engine),
                sub: Arc::clone(&sub),
                kind: *kind,
                term,
                shared: Arc::clone(&shared),
                stop: Arc::clone(&stop),
                position: None,
            };
            readers.spawn(reader.run());
        } else {
            tracing::warn!(subscription = %sub.id, entity = kind.name(), "no source of this entity type here; its changes wait");
        }
    }
    dispatch(&engine, &sub, &shared, &stop).await;
    stop.send_replace(true);
    while readers.join_next().await.is_some() {}
    engine.poke.notify_one();
}

/// Delivers due heads until stopped.
async fn dispatch(engine: &Arc<Engine>, sub: &Arc<Subscription>, shared: &Shared, stop: &watch::Sender<bool>) {
    let options = &engine.options;
    let mut stopped = stop.subscribe();
    let mut limiter = RateLimiter::new(sub.rate_limit);
    // The entity each delivery in flight is for, by task: an entity is
    // never in flight twice (its order), even when an attempt panics.
    let mut in_flight: HashMap<tokio::task::Id, (EntityKind, String)> = HashMap::new();
    let mut deliveries: JoinSet<(Queued, Sent)> = JoinSet::new();
    loop {
        if *stopped.borrow() {
            break;
        }
        let mut wake_at = Instant::now() + options.poll_interval;
        let capacity = options.max_in_flight.saturating_sub(deliveries.len());
        if capacity > 0 {
            let now_ms = millis(SystemTime::now());
            let limit = i64::try_from(capacity + in_flight.len()).unwrap_or(i64::MAX);
            let mut limited = false;
            match queue::due(&engine.db, &sub.id, now_ms, limit).await {
                Ok(rows) => {
                    for row in rows {
                        let key = (row.event.kind, row.event.entity_id.clone());
                        if in_flight.values().any(|busy| *busy == key) {
                            continue;
                        }
                        if deliveries.len() >= options.max_in_flight {
                            break;
                        }
                        if let Err(at) = limiter.try_take(Instant::now()) {
                            wake_at = wake_at.min(at);
                            limited = true;
                            break;
                        }
                        let engine = Arc::clone(engine);
                        let sub = Arc::clone(sub);
                        let task = deliveries.spawn(async move {
                            let sent = engine.sender.send(&sub, &row).await;
                            (row, sent)
                        });
                        in_flight.insert(task.id(), key);
                    }
                }
                Err(err) => tracing::warn!(subscription = %sub.id, %err, "cannot read the delivery queue; will retry"),
            }
            if !limited && deliveries.len() < options.max_in_flight {
                // Sleep until the next retry is due, if it is sooner.
                if let Ok(Some(next_ms)) = queue::next_due(&engine.db, &sub.id, now_ms).await {
                    let wait = u64::try_from(next_ms - now_ms).unwrap_or(0);
                    wake_at = wake_at.min(Instant::now() + Duration::from_millis(wait));
                }
            }
        }
        tokio::select! {
            _ = until_stopped(&mut stopped) => {}
            Some(joined) = deliveries.join_next_with_id(), if !deliveries.is_empty() => {
                settle(engine, sub, shared, &mut in_flight, joined).await;
            }
            _ = shared.queued_more.notified() => {}
            _ = tokio::time::sleep_until(wake_at) => {}
        }
    }
    // Draining: deliveries in flight finish within their timeout.
    let deadline = Instant::now() + sub.timeout + Duration::from_millis(500);
    while let Ok(Some(joined)) = tokio::time::timeout_at(deadline, deliveries.join_next_with_id()).await {
        settle(engine, sub, shared, &mut in_flight, joined).await;
    }
    deliveries.abort_all();
}

/// Records what an attempt came to.
async fn settle(
    engine: &Engine,
    sub: &Subscription,
    shared: &Shared,
    in_flight: &mut HashMap<tokio::task::Id, (EntityKind, String)>,
    joined: Result<(tokio::task::Id, (Queued, Sent)), tokio::task::JoinError>,
) {
    let (row, sent) = match joined {
        Ok((task, done)) => {
            in_flight.remove(&task);
            done
        }
        Err(err) => {
            // A panic in an attempt: its event is tried again after the poll.
            tracing::error!(subscription = %sub.id, %err, "a delivery attempt failed to run");
            in_flight.remove(&err.id());
            return;
        }
    };
    let key = (row.event.kind, row.event.revision);
    let now_ms = millis(SystemTime::now());
    let mut errors = row.errors.clone();
    let written = match sent.verdict {
        Verdict::Delivered => queue::delivered(&engine.db, &sub.id, key).await.map(|()| true),
        verdict => {
            errors.push(Attempt {
                attempt: row.attempts + 1,
                time_ms: now_ms,
                status: sent.status,
                error: sent.error.clone(),
            });
            let attempts = row.attempts + 1;
            match verdict {
                Verdict::Retry { retry_after } if attempts < sub.max_attempts => {
                    let delay = engine.options.backoff.delay(attempts, retry_after);
                    let next_ms = now_ms + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2);
                    tracing::debug!(subscription = %sub.id, revision = key.1, attempts, error = %sent.error, ?delay, "delivery failed; will retry");
                    queue::retry(&engine.db, &sub.id, key, &errors, next_ms)
                        .await
                        .map(|()| false)
                }
                _ => {
                    tracing::warn!(subscription = %sub.id, feed = key.0.feed(), revision = key.1, attempts, error = %sent.error, "event dead-lettered");
                    queue::dead(&engine.db, &sub.id, key, &errors, now_ms)
                        .await
                        .map(|()| true)
                }
            }
        }
    };
    match written {
        Ok(true) => {
            shared.queued.fetch_sub(1, Ordering::Relaxed);
            shared.room.notify_waiters();
        }
        Ok(false) => {}
        // The row keeps its previous state: the attempt is made again.
        Err(err) => tracing::warn!(subscription = %sub.id, %err, "cannot record a delivery's result"),
    }
}
