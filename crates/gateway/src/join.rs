//! A phone's way into the fan-out, one task per source: its own watch,
//! filtered to its user, catches it up (a snapshot from 0, or a resume
//! from its cursor, with the upstream's reset and snapshot when the cursor
//! is too old), then it joins the source's shared stream and drops that
//! watch (see the `fanout` module docs for why nothing is lost or sent
//! twice). While the shared stream is down, the phone's own watch keeps
//! serving it, reconnecting with backoff as before, and it joins once the
//! shared stream is back.

use std::sync::Arc;

use serde_json::json;
use tokio::sync::watch;
use tonic::Status;

use crate::{
    fanout::{Fan, Join, MAX_BACKOFF, MIN_BACKOFF, jittered},
    phone::{Named, Phone, Update},
    upstream::{self, Frame, Upstream},
};

/// How one catch-up watch ended, when it did not fail.
enum Step {
    /// The phone is in the fan-out: this task is done.
    Joined,
    /// The shared stream got ahead: catch up again from where the phone is.
    Again,
    /// The phone's stream has ended.
    Gone,
}

/// One phone's catch-up in one source: owned by the phone's events stream,
/// aborted with it.
pub(crate) struct CatchUp {
    fan: Arc<Fan>,
    upstream: Upstream,
    phone: Arc<Phone>,
    /// The phone has every change of its user up to here (0 while in a
    /// snapshot).
    since: i64,
    /// What the phone was last told of this source's upstream.
    connected: Option<bool>,
    /// The shared stream's (re)connections.
    connections: watch::Receiver<u64>,
}

impl CatchUp {
    /// The catch-up of `phone` in `upstream`'s source from `since`.
    pub(crate) fn new(fan: Arc<Fan>, upstream: Upstream, phone: Arc<Phone>, since: i64) -> CatchUp {
        let connections = fan.connections();
        CatchUp {
            fan,
            upstream,
            phone,
            since,
            connected: None,
            connections,
        }
    }

    /// Catches up and joins, reconnecting with backoff and resuming after
    /// the last revision delivered, until joined or the phone goes away.
    pub(crate) async fn run(mut self) {
        let mut delay = MIN_BACKOFF;
        let mut again = 0;
        loop {
            let lost = match self.watch().await {
                Ok(Step::Joined | Step::Gone) => return,
                Ok(Step::Again) => {
                    // Usually once, when a change came in between; if the
                    // shared stream keeps ahead (a busy feed, or another
                    // replica behind), not in a tight loop.
                    again += 1;
                    if again > 3 {
                        tokio::time::sleep(jittered(MIN_BACKOFF)).await;
                    }
                    continue;
                }
                Err(status) => status,
            };
            if self.connected != Some(false) {
                self.connected = Some(false);
                delay = MIN_BACKOFF;
                let source = self.upstream.source();
                tracing::info!(source = source.name(), user_id = self.phone.user_id(), code = ?lost.code(), message = lost.message(), "a phone's catch-up watch was lost; reconnecting");
                if !self.send(Some(("upstream", upstream::lost(source)))).await {
                    return;
                }
            } else {
                delay = (delay * 2).min(MAX_BACKOFF);
            }
            tokio::time::sleep(jittered(delay)).await;
        }
    }

    /// Queues an update at the phone's position; false once it has gone.
    async fn send(&self, event: Option<Named>) -> bool {
        let update = Update {
            source: self.upstream.source(),
            position: self.since,
            event,
        };
        self.phone.send(update).await
    }

    /// Tries to join the fan-out at the phone's position.
    fn join(&self) -> Option<Step> {
        match self.fan.join(&self.phone, self.since) {
            Join::Joined => Some(Step::Joined),
            Join::Behind => Some(Step::Again),
            Join::Down => None,
        }
    }

    /// One watch call, until the phone joins, the call fails or ends.
    async fn watch(&mut self) -> Result<Step, Status> {
        let mut watch = self.upstream.watch(self.since, Some(self.phone.user_id())).await?;
        let mut in_snapshot = false;
        // Whether the phone has reached a revision the fan-out can take
        // over from; from then on, each reconnection of the shared stream
        // is a chance to join.
        let mut reached = false;
        loop {
            let frame = if reached {
                tokio::select! {
                    frame = watch.next() => frame?,
                    changed = self.connections.changed() => {
                        if changed.is_err() {
                            return Ok(Step::Gone); // the gateway is going away
                        }
                        match self.join() {
                            Some(step) => return Ok(step),
                            None => continue,
                        }
                    }
                }
            } else {
                watch.next().await?
            };
            let Some(frame) = frame else {
                return Err(Status::unavailable("the upstream ended the watch"));
            };
            if self.connected != Some(true) {
                self.connected = Some(true);
                let source = self.upstream.source().name();
                let data = upstream::data(&json!({ "source": source, "connected": true }));
                if !self.send(Some(("upstream", data))).await {
                    return Ok(Step::Gone);
                }
            }
            let (event, at_revision) = self.read(frame, &mut in_snapshot)?;
            if !self.send(event).await {
                return Ok(Step::Gone);
            }
            if at_revision {
                reached = true;
                if let Some(step) = self.join() {
                    return Ok(step);
                }
            }
        }
    }

    /// Reads one frame: moves the phone's position and says what to send,
    /// and whether the phone now stands at a revision it could join from.
    fn read(&mut self, frame: Frame, in_snapshot: &mut bool) -> Result<(Option<Named>, bool), Status> {
        let source = self.upstream.source();
        Ok(match frame {
            Frame::Change { revision, change, .. } => {
                if !*in_snapshot {
                    self.since = revision;
                }
                (Some((source.change_event(), Frame::json(&change)?)), false)
            }
            Frame::SnapshotBegin => {
                *in_snapshot = true;
                self.since = 0;
                (None, false)
            }
            Frame::SnapshotEnd { revision } => {
                *in_snapshot = false;
                self.since = revision;
                let data = upstream::data(&json!({ "source": source.name(), "revision": revision.to_string() }));
                (Some(("synced", data)), true)
            }
            Frame::Progress { revision } if !*in_snapshot => {
                self.since = revision;
                (None, true)
            }
            Frame::Progress { .. } => (None, false),
            Frame::Reset { data } => {
                self.since = 0;
                (Some(("reset", data)), false)
            }
        })
    }
}
