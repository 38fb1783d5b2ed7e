//! [`Cache::follow`]: the one task that consumes a watch stream into the
//! copy, and reconnects it.

use std::{sync::Arc, time::Duration};

use futures_util::{FutureExt, StreamExt};
use lightbox_changefeed::{Change, Frame, feed::Entity, watch::WatchStream};

use crate::{Cache, Source, Stop};

impl<T: Entity> Cache<T> {
    /// Follows `source` into the copy until the future is dropped: connect
    /// from the cursor, apply, reconnect with backoff when the stream fails,
    /// ends, falls silent or takes the idle timeout to open. Run it in its
    /// own task.
    pub async fn follow(&self, source: impl Source<T>) {
        self.follow_with(&source, self.inner.options.idle_timeout).await;
    }

    /// [`Cache::follow`], taking a stream silent for `idle` for dead (pull
    /// mode polls on its own schedule).
    pub(crate) async fn follow_with(&self, source: &impl Source<T>, idle: Duration) {
        let options = &self.inner.options;
        let mut backoff = options.backoff_min;
        let mut first = true;
        loop {
            if !std::mem::take(&mut first) {
                self.inner.state.send_modify(|state| state.reconnects += 1);
            }
            let cursor = self.state().applied_revision;
            // Opening has the idle deadline too: an upstream that accepts
            // the call and says nothing would hold the copy for ever.
            let opened = tokio::time::timeout(idle, source.watch(cursor))
                .await
                .unwrap_or_else(|_| {
                    Err(tonic::Status::unavailable(format!(
                        "the watch did not open within {idle:?}"
                    )))
                });
            match opened {
                Ok(stream) => {
                    self.set_connected(true);
                    let progressed = self.consume(stream, idle).await;
                    self.set_connected(false);
                    if progressed {
                        backoff = options.backoff_min;
                    }
                }
                Err(status) => {
                    tracing::debug!(cache = self.inner.name, code = ?status.code(), message = status.message(), "cannot open the watch");
                }
            }
            if self.state().held.is_some() {
                // Reconnecting now would download the same snapshot to hold it
                // back again: wait for the operator (or try again much later).
                tokio::select! {
                    _ = self.inner.released.notified() => {}
                    _ = tokio::time::sleep(options.backoff_max * 6) => {}
                }
            }
            // Jitter: a fleet of caches restarted together does not reconnect in step.
            let pause = backoff.mul_f64(0.5 + fastrand::f64() * 0.5);
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(options.backoff_max);
        }
    }

    /// Consumes one stream until it fails, ends or falls silent. Returns
    /// whether anything was applied (to reset the backoff).
    ///
    /// A batch of live changes with nothing ready behind it counts as the
    /// upstream's head (the copy's age resets), unless the stream's
    /// `size_hint` says more frames follow at once (pull mode between full
    /// pages: see `pull`).
    async fn consume(&self, mut stream: WatchStream<T>, idle: Duration) -> bool {
        let name = self.inner.name;
        let options = &self.inner.options;
        let mut progressed = false;
        // Between a snapshot's begin and end: the entities it holds, and
        // whether a reset announced it (the copy is replaced either way).
        let mut snapshot: Option<Vec<Arc<Change<T>>>> = None;
        // Whether the snapshot coming was announced by a reset: then it
        // replaces the copy even if the copy is ahead of it.
        let mut reset = false;
        loop {
            let next = match tokio::time::timeout(idle, stream.next()).await {
                Ok(Some(Ok(frame))) => frame,
                Ok(Some(Err(status))) => {
                    tracing::info!(cache = name, code = ?status.code(), message = status.message(), "watch stream ended; resuming");
                    return progressed;
                }
                Ok(None) => {
                    tracing::info!(cache = name, "watch stream closed; resuming");
                    return progressed;
                }
                Err(_) => {
                    tracing::warn!(
                        cache = name,
                        ?idle,
                        "watch stream silent (no progress frames); reconnecting"
                    );
                    return progressed;
                }
            };
            let result = match next {
                Frame::Reset { reason, .. } => {
                    tracing::warn!(cache = name, %reason, "upstream reset: the copy will be replaced by a snapshot");
                    reset = true;
                    Ok(())
                }
                Frame::SnapshotBegin { .. } => {
                    snapshot = Some(Vec::new());
                    Ok(())
                }
                Frame::Change(change) if snapshot.is_some() => {
                    if let Some(entities) = snapshot.as_mut() {
                        entities.push(change);
                    }
                    Ok(())
                }
                Frame::SnapshotEnd { revision } => {
                    let entities = snapshot.take().unwrap_or_default();
                    let applied = self
                        .apply_snapshot(entities, revision, std::mem::take(&mut reset))
                        .await;
                    if applied.is_ok() {
                        self.caught_up(revision);
                    }
                    applied
                }
                Frame::Change(change) => {
                    // Take whatever else is already waiting: one transaction per
                    // batch. A progress frame right behind it is applied after it.
                    let mut batch = vec![change];
                    let mut trailing = None;
                    while batch.len() < options.batch_max {
                        match stream.next().now_or_never() {
                            Some(Some(Ok(Frame::Change(change)))) => batch.push(change),
                            Some(Some(Ok(other))) => {
                                trailing = Some(other);
                                break;
                            }
                            // Nothing more ready; a failure shows on the next read.
                            _ => break,
                        }
                    }
                    let drained = trailing.is_none() && batch.len() < options.batch_max && stream.size_hint().0 == 0;
                    match self.apply_batch(&batch).await {
                        Err(stop) => Err(stop),
                        Ok(()) => match trailing {
                            Some(Frame::Progress { revision }) => {
                                let advanced = self.advance_to(revision).await;
                                if advanced.is_ok() {
                                    self.caught_up(revision);
                                }
                                advanced
                            }
                            Some(other) => {
                                tracing::warn!(cache = name, frame = ?std::mem::discriminant(&other), "unexpected frame among live changes; resuming");
                                return progressed;
                            }
                            None => {
                                if drained {
                                    // Everything the stream had sent is applied.
                                    self.caught_up(self.state().applied_revision);
                                }
                                Ok(())
                            }
                        },
                    }
                }
                Frame::Progress { revision } => {
                    let advanced = self.advance_to(revision).await;
                    if advanced.is_ok() {
                        self.caught_up(revision);
                    }
                    advanced
                }
            };
            match result {
                Ok(()) => progressed = true,
                Err(Stop::Held) => return progressed,
                Err(Stop::Storage(err)) => {
                    tracing::error!(cache = name, %err, "cannot write the copy; resuming from its cursor");
                    return progressed;
                }
            }
        }
    }
}
