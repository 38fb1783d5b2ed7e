//! The reader of one feed for one subscription: it follows the feed's
//! watch stream from the subscription's cursor and queues what it reads,
//! the cursor moving in the same transaction (see [`crate::queue::enqueue`]).
//!
//! A snapshot (a start from 0, or the state after a `Reset`) is queued in
//! batches without moving the cursor, which moves to the snapshot's
//! revision at its end: a crash in the middle reads the snapshot again
//! (its rows are keyed by revision, so what is still queued is not queued
//! twice). Progress frames move the cursor past changes the filter left
//! out. A stream that ends, fails or falls silent is reopened from where
//! this reader got to, with backoff and jitter.

use std::{
    sync::{Arc, atomic::Ordering},
    time::SystemTime,
};

use futures_util::{FutureExt, StreamExt};
use lightbox_changefeed::{Term, watch::FROM_NOW};
use tokio::sync::watch;

use crate::{
    delivery::{Engine, Shared, until_stopped},
    queue::{self, Fenced},
    source::{EntityKind, Item, ItemStream, Occurrence, millis},
    store::{self, Subscription},
};

/// The reader of one feed for one subscription.
pub(crate) struct Reader {
    pub engine: Arc<Engine>,
    pub sub: Arc<Subscription>,
    pub kind: EntityKind,
    pub term: Term,
    pub shared: Arc<Shared>,
    pub stop: Arc<watch::Sender<bool>>,
    /// Where this reader has queued up to; read from the cursor at start.
    pub position: Option<i64>,
}

/// Why a reader stops reading a stream.
enum Halt {
    /// The stream ended, failed or fell silent: reconnect.
    Reconnect { progressed: bool },
    /// The task is stopping (asked, or stale).
    Stop,
}

impl Reader {
    pub async fn run(mut self) {
        let options = self.engine.options.clone();
        let mut stopped = self.stop.subscribe();
        let mut backoff = options.reconnect_min;
        loop {
            if *stopped.borrow() {
                return;
            }
            let halt = self.connect().await;
            match halt {
                Halt::Stop => return,
                Halt::Reconnect { progressed: true } => backoff = options.reconnect_min,
                Halt::Reconnect { progressed: false } => {}
            }
            let pause = backoff.mul_f64(0.5 + fastrand::f64() * 0.5);
            tokio::select! {
                _ = until_stopped(&mut stopped) => return,
                _ = tokio::time::sleep(pause) => {}
            }
            backoff = (backoff * 2).min(options.reconnect_max);
        }
    }

    async fn connect(&mut self) -> Halt {
        let cursor = match self.position {
            Some(position) => position,
            None => match store::cursor(&self.engine.db, &self.sub.id, self.kind).await {
                Ok(Some(cursor)) => cursor,
                Ok(None) => return self.stale(),
                Err(err) => {
                    tracing::warn!(subscription = %self.sub.id, %err, "cannot read the cursor; will retry");
                    return Halt::Reconnect { progressed: false };
                }
            },
        };
        self.position = Some(cursor);
        let since = if cursor < 0 { FROM_NOW } else { cursor };
        let Some(opening) = self.engine.sources.watch(self.kind, since, self.sub.ids.clone()) else {
            return Halt::Stop;
        };
        let mut stopped = self.stop.subscribe();
        // Opening has the idle deadline too: a source that accepts the call
        // and says nothing would hold the subscription for ever.
        let idle = self.engine.options.idle_timeout;
        let opened = tokio::select! {
            _ = until_stopped(&mut stopped) => return Halt::Stop,
            opened = tokio::time::timeout(idle, opening) => opened,
        };
        let opened = opened.unwrap_or_else(|_| {
            Err(tonic::Status::unavailable(format!(
                "the watch did not open within {idle:?}"
            )))
        });
        match opened {
            Ok(stream) => self.consume(stream).await,
            Err(status) => {
                tracing::debug!(subscription = %self.sub.id, feed = self.kind.feed(), code = ?status.code(), message = status.message(), "cannot open the watch");
                Halt::Reconnect { progressed: false }
            }
        }
    }

    fn stale(&self) -> Halt {
        tracing::info!(subscription = %self.sub.id, "the subscription changed or moved to another replica; its delivery task restarts");
        self.stop.send_replace(true);
        Halt::Stop
    }

    async fn consume(&mut self, mut stream: ItemStream) -> Halt {
        let options = self.engine.options.clone();
        let mut stopped = self.stop.subscribe();
        let mut progressed = false;
        let mut in_snapshot = false;
        // After a reset the snapshot's revision may be below the cursor (a
        // source whose database was replaced): the cursor follows it there.
        let mut reset = false;
        loop {
            let first = tokio::select! {
                _ = until_stopped(&mut stopped) => return Halt::Stop,
                next = tokio::time::timeout(options.idle_timeout, stream.next()) => next,
            };
            let first = match first {
                Ok(Some(Ok(item))) => item,
                Ok(Some(Err(status))) => {
                    tracing::info!(subscription = %self.sub.id, feed = self.kind.feed(), code = ?status.code(), message = status.message(), "watch ended; resuming");
                    return Halt::Reconnect { progressed };
                }
                Ok(None) => return Halt::Reconnect { progressed },
                Err(_) => {
                    tracing::warn!(subscription = %self.sub.id, feed = self.kind.feed(), "watch silent; reconnecting");
                    return Halt::Reconnect { progressed };
                }
            };
            // Take whatever else is ready: one transaction per batch.
            let mut items = vec![first];
            let mut ended = false;
            while items.len() < options.batch_max {
                match stream.next().now_or_never() {
                    Some(Some(Ok(item))) => items.push(item),
                    Some(_) => {
                        ended = true;
                        break;
                    }
                    None => break,
                }
            }
            let mut batch = Vec::new();
            for item in items {
                let flushed = match item {
                    Item::Event(event) => {
                        batch.push(event);
                        Ok(())
                    }
                    Item::SnapshotBegin => {
                        let cursor = (!in_snapshot).then(|| batch.last().map(|e| e.revision)).flatten();
                        in_snapshot = true;
                        self.flush(&mut batch, cursor, false).await
                    }
                    Item::SnapshotEnd(revision) => {
                        in_snapshot = false;
                        self.flush(&mut batch, Some(revision), std::mem::take(&mut reset)).await
                    }
                    Item::Progress(revision) if !in_snapshot => self.flush(&mut batch, Some(revision), false).await,
                    Item::Progress(_) => Ok(()),
                    Item::Reset(reason) => {
                        tracing::warn!(subscription = %self.sub.id, feed = self.kind.feed(), %reason, "the feed cannot resume from the cursor: its current state follows as events");
                        reset = true;
                        Ok(())
                    }
                };
                if let Err(halt) = flushed {
                    return halt;
                }
            }
            let cursor = if in_snapshot {
                None
            } else {
                batch.last().map(|e| e.revision)
            };
            if let Err(halt) = self.flush(&mut batch, cursor, false).await {
                return halt;
            }
            progressed = true;
            if ended {
                return Halt::Reconnect { progressed };
            }
        }
    }

    /// Queues `batch` and moves the cursor to `cursor` (if further, or
    /// anywhere after a reset), in one transaction; waits for room in the
    /// queue first.
    async fn flush(&mut self, batch: &mut Vec<Occurrence>, cursor: Option<i64>, reset: bool) -> Result<(), Halt> {
        let cursor = cursor.filter(|c| reset || Some(*c) > self.position);
        if batch.is_empty() && cursor.is_none() {
            return Ok(());
        }
        if !batch.is_empty() {
            self.wait_for_room().await?;
        }
        let sub = &self.sub;
        let now_ms = millis(SystemTime::now());
        let fence = (sub.id.as_str(), sub.generation, self.term);
        match queue::enqueue(&self.engine.db, fence, self.kind, batch, cursor, now_ms).await {
            Ok(inserted) => {
                batch.clear();
                if let Some(cursor) = cursor {
                    self.position = Some(cursor);
                }
                if inserted > 0 {
                    self.shared
                        .queued
                        .fetch_add(i64::try_from(inserted).unwrap_or(0), Ordering::Relaxed);
                    self.shared.queued_more.notify_one();
                }
                Ok(())
            }
            Err(Fenced::Stale) => Err(self.stale()),
            Err(Fenced::Failed(err)) => {
                tracing::warn!(subscription = %sub.id, %err, "cannot queue events; resuming from the cursor");
                Err(Halt::Reconnect { progressed: false })
            }
        }
    }

    async fn wait_for_room(&self) -> Result<(), Halt> {
        let max = self.engine.options.max_queued;
        let mut stopped = self.stop.subscribe();
        while self.shared.queued.load(Ordering::Relaxed) >= max {
            if let Ok(count) = queue::count(&self.engine.db, &self.sub.id).await {
                self.shared.queued.store(count, Ordering::Relaxed);
                if count < max {
                    break;
                }
            }
            tokio::select! {
                _ = until_stopped(&mut stopped) => return Err(Halt::Stop),
                _ = self.shared.room.notified() => {}
                _ = tokio::time::sleep(self.engine.options.poll_interval) => {}
            }
        }
        Ok(())
    }
}
