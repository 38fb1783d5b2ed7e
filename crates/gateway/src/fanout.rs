//! The fan-out: the gateway follows each upstream once, with one
//! unfiltered watch, and hands each change to the phones it concerns
//! through an index by user id. A change costs work in proportion to the
//! phones it concerns (its JSON is written once and shared by them), not to
//! all the phones connected; a phone, once joined, holds no upstream stream.
//!
//! # Who owns what
//!
//! - [`Fanout`], owned by the `Gateway`, holds one [`Fan`] per source. The
//!   first events stream starts one follower task per source; followers run
//!   until the gateway shuts down (or the `Fanout` is dropped).
//! - A follower owns its source's shared watch. It opens it "from now"
//!   (`since_revision = -1`: no snapshot of everything), reconnects with
//!   backoff and jitter from the revision it reached, and delivers each
//!   change to the phones of the change's owner.
//! - A [`Fan`]'s index maps a user id to that user's phones, each with the
//!   revision it joined from. It sits behind a std mutex, held for one
//!   change, one progress round, one join or one leave at a time, never
//!   across an await.
//! - A [`Phone`] (one events stream, in the `phone` module) is shared by
//!   its stream, its catch-up tasks (`join`) and the indexes it is in.
//!
//! # Joining, per source, with nothing lost or repeated
//!
//! A phone first catches up on its own short-lived watch filtered to its
//! user (a snapshot, or a resume from its cursor) until it reaches a
//! revision R (`SnapshotEnd{R}`, or the `Progress{R}` upstreams send right
//! after a replay). Then, under the index lock, [`Fan::join`]: if the shared
//! stream has delivered up to P <= R, the phone is registered from R (the
//! fan-out skips changes up to R for it) and its catch-up watch is dropped;
//! if P > R (the shared stream got ahead meanwhile), it catches up again
//! from R. While the shared stream is down, the phone's own watch keeps
//! serving it, and it joins once the shared stream is back.
//!
//! A phone that stops reading is ended rather than waited for: see the
//! `phone` module.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, Once,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use lightbox_server::Shutdown;
use prost_reflect::DynamicMessage;
use serde_json::json;
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    phone::{Phone, Refused, Update, lock},
    upstream::{self, Frame, Source, Upstream},
};

/// The `since_revision` of a watch from now.
const FROM_NOW: i64 = -1;

/// The first pause before reconnecting a lost watch; doubled per failure.
pub(crate) const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// The longest pause between reconnection attempts.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// `delay` plus up to half of it again, at random, so that streams lost
/// together do not all come back at once.
pub(crate) fn jittered(delay: Duration) -> Duration {
    delay + Duration::from_millis(fastrand::u64(0..=delay.as_millis() as u64 / 2))
}

/// A phone in an index, with the revision it joined from.
struct Member {
    phone: Arc<Phone>,
    from: i64,
}

impl Member {
    /// Where this phone is once the fan-out is at `position`.
    fn at(&self, position: Option<i64>) -> i64 {
        position.unwrap_or(self.from).max(self.from)
    }
}

/// What [`Fan::join`] found.
pub(crate) enum Join {
    /// The phone is in the index: the fan-out serves it from now on.
    Joined,
    /// The shared stream is past the phone's revision: catch up again.
    Behind,
    /// The shared stream is not connected: keep following your own watch.
    Down,
}

#[derive(Default)]
struct Index {
    /// Every change up to here was offered to the phones in `phones`;
    /// `None` until the shared stream's first frame.
    position: Option<i64>,
    /// Whether the shared stream is connected.
    live: bool,
    /// Whether the phones were told that the shared stream was lost (and
    /// so must be told when it is back).
    told_lost: bool,
    /// The phones of each user.
    phones: HashMap<String, Vec<Member>>,
}

/// Where each source's shared stream is, for the events streams to read
/// without a lock: -1 while unknown. A fan stores its position only after
/// it has offered every change up to it to its phones.
pub(crate) type Positions = [AtomicI64; 3];

/// One source's shared stream: where it is, and the phones following it.
pub(crate) struct Fan {
    source: Source,
    index: Mutex<Index>,
    positions: Arc<Positions>,
    /// Bumped each time the shared stream (re)connects, so that catch-up
    /// tasks waiting for it try to join again.
    connections: watch::Sender<u64>,
}

impl Fan {
    fn new(source: Source, positions: Arc<Positions>) -> Fan {
        Fan {
            source,
            index: Mutex::new(Index::default()),
            positions,
            connections: watch::Sender::new(0),
        }
    }

    /// Tells each (re)connection of the shared stream.
    pub(crate) fn connections(&self) -> watch::Receiver<u64> {
        self.connections.subscribe()
    }

    /// Registers `phone`, which has every change of its user up to
    /// `reached`, if the shared stream is connected and not past it.
    pub(crate) fn join(&self, phone: &Arc<Phone>, reached: i64) -> Join {
        let mut index = lock(&self.index);
        match index.position {
            Some(position) if index.live => {
                if position > reached {
                    return Join::Behind;
                }
                index
                    .phones
                    .entry(phone.user_id().to_owned())
                    .or_default()
                    .push(Member {
                        phone: Arc::clone(phone),
                        from: reached,
                    });
                phone.set_joined(self.source, true);
                Join::Joined
            }
            _ => Join::Down,
        }
    }

    /// Takes `phone` out of the index, if it is there.
    pub(crate) fn leave(&self, phone: &Arc<Phone>) {
        let mut index = lock(&self.index);
        phone.set_joined(self.source, false);
        if let Some(members) = index.phones.get_mut(phone.user_id()) {
            members.retain(|member| !Arc::ptr_eq(&member.phone, phone));
            if members.is_empty() {
                index.phones.remove(phone.user_id());
            }
        }
    }

    fn position(&self) -> Option<i64> {
        lock(&self.index).position
    }

    /// Shows the index's position to the events streams: called, under the
    /// index's lock, once everything up to it has been offered.
    fn publish(&self, index: &Index) {
        self.positions[self.source.index()].store(index.position.unwrap_or(-1), Ordering::SeqCst);
    }

    /// The shared stream delivered its first frame; `from_now`: it was
    /// opened from now, at that revision.
    fn connected(&self, from_now: Option<i64>) {
        let mut index = lock(&self.index);
        if let Some(at) = from_now {
            if index.position.is_some_and(|position| position != at) {
                // Changes may have come and gone in between: the phones
                // resume on their own, each from its cursor.
                let reason = format!(
                    "the gateway lost its place in the {} changes; reconnect with Last-Event-ID to resume",
                    self.source.name()
                );
                end_all(&mut index, &reason, self.source);
            }
            index.position = Some(at);
            self.publish(&index);
        }
        index.live = true;
        if std::mem::take(&mut index.told_lost) {
            let data = upstream::data(&json!({ "source": self.source.name(), "connected": true }));
            self.broadcast(&mut index, "upstream", data);
        }
        drop(index);
        self.connections.send_modify(|n| *n += 1);
    }

    /// The shared stream was lost (the cause is logged by its follower).
    fn lost(&self) {
        let mut index = lock(&self.index);
        index.live = false;
        if !std::mem::replace(&mut index.told_lost, true) {
            self.broadcast(&mut index, "upstream", upstream::lost(self.source));
        }
    }

    /// The shared stream cannot go on from where it is: every phone resumes
    /// on its own, and the stream starts again from now.
    fn lost_place(&self, reason: &str) {
        let mut index = lock(&self.index);
        end_all(&mut index, reason, self.source);
        index.position = None;
        index.live = false;
        self.publish(&index);
    }

    /// A change: to each phone of `owner` that joined before it; then the
    /// position moves past it for every phone of the source.
    fn change(&self, revision: i64, owner: &str, change: &DynamicMessage) {
        let mut guard = lock(&self.index);
        let index = &mut *guard;
        index.position = Some(revision);
        self.offer_change(index, revision, owner, change);
        self.publish(index);
    }

    fn offer_change(&self, index: &mut Index, revision: i64, owner: &str, change: &DynamicMessage) {
        let Some(members) = index.phones.get_mut(owner) else {
            return;
        };
        if members.iter().all(|member| revision <= member.from) {
            return;
        }
        let data = match Frame::json(change) {
            Ok(data) => data,
            Err(status) => {
                tracing::error!(source = self.source.name(), revision, %status, "a change cannot be sent to its phones");
                for member in members.drain(..) {
                    member.phone.set_joined(self.source, false);
                    member
                        .phone
                        .end(format!("{}; reconnect with Last-Event-ID", status.message()));
                }
                index.phones.remove(owner);
                return;
            }
        };
        let name = self.source.change_event();
        members.retain(|member| {
            if revision <= member.from {
                return true; // it had this one from its own catch-up
            }
            let update = Update {
                source: self.source,
                position: revision,
                event: Some((name, Arc::clone(&data))),
            };
            offer_or_end(member, update)
        });
        if members.is_empty() {
            index.phones.remove(owner);
        }
    }

    /// Progress: nothing for any phone up to `revision`. No phone is told:
    /// each events stream reads the position when it next sends an event
    /// (see `events::Reader`), so an idle gateway with many phones does no
    /// work per phone.
    fn progress(&self, revision: i64) {
        let mut index = lock(&self.index);
        index.position = Some(revision);
        self.publish(&index);
    }

    /// An event to every phone of the source.
    fn broadcast(&self, index: &mut Index, name: &'static str, data: Arc<str>) {
        let position = index.position;
        let source = self.source;
        index.phones.retain(|_, members| {
            members.retain(|member| {
                let update = Update {
                    source,
                    position: member.at(position),
                    event: Some((name, Arc::clone(&data))),
                };
                offer_or_end(member, update)
            });
            !members.is_empty()
        });
    }
}

/// Offers `update` to a member; a full queue ends its stream. Whether it
/// stays in the index (one that leaves is no longer joined, so its stream
/// stops reading this source's position: it did not get this update).
fn offer_or_end(member: &Member, update: Update) -> bool {
    let source = update.source;
    let stays = match member.phone.offer(update) {
        Ok(()) => true,
        Err(Refused::Full) => {
            member.phone.end(member.phone.too_slow());
            false
        }
        Err(Refused::Closed) => false,
    };
    if !stays {
        member.phone.set_joined(source, false);
    }
    stays
}

/// Ends the stream of every phone in `index`, and empties it.
fn end_all(index: &mut Index, reason: &str, source: Source) {
    for member in index.phones.drain().flat_map(|(_, members)| members) {
        member.phone.set_joined(source, false);
        member.phone.end(reason.to_owned());
    }
}

/// Every source's [`Fan`], and their followers.
pub(crate) struct Fanout {
    fans: [Arc<Fan>; 3],
    /// Where each fan is, shared with every events stream.
    positions: Arc<Positions>,
    upstreams: [Upstream; 3],
    shutdown: Shutdown,
    started: Once,
    followers: Mutex<Vec<JoinHandle<()>>>,
}

impl Fanout {
    /// The fan-out over `upstreams` (in [`Source::ALL`] order). A shared
    /// stream silent for its upstream's idle timeout is taken for dead and
    /// reopened.
    pub(crate) fn new(upstreams: [Upstream; 3], shutdown: Shutdown) -> Fanout {
        let positions: Arc<Positions> = Arc::new([AtomicI64::new(-1), AtomicI64::new(-1), AtomicI64::new(-1)]);
        Fanout {
            fans: Source::ALL.map(|source| Arc::new(Fan::new(source, Arc::clone(&positions)))),
            positions,
            upstreams,
            shutdown,
            started: Once::new(),
            followers: Mutex::new(Vec::new()),
        }
    }

    /// Where each source's shared stream is (see [`Positions`]).
    pub(crate) fn positions(&self) -> &Arc<Positions> {
        &self.positions
    }

    /// The fan of `source`.
    pub(crate) fn fan(&self, source: Source) -> &Arc<Fan> {
        &self.fans[source.index()]
    }

    /// How to watch `source`.
    pub(crate) fn upstream(&self, source: Source) -> &Upstream {
        &self.upstreams[source.index()]
    }

    /// Starts the followers, the first time only (the first events stream:
    /// a gateway no phone follows opens no upstream stream).
    pub(crate) fn start(&self) {
        self.started.call_once(|| {
            let mut followers = lock(&self.followers);
            for (fan, upstream) in self.fans.iter().zip(&self.upstreams) {
                let (fan, upstream, shutdown) = (Arc::clone(fan), upstream.clone(), self.shutdown.clone());
                followers.push(tokio::spawn(async move {
                    tokio::select! {
                        () = follow(fan, upstream) => {}
                        () = shutdown.wait() => {}
                    }
                }));
            }
        });
    }
}

impl Drop for Fanout {
    fn drop(&mut self) {
        lock(&self.followers).iter().for_each(JoinHandle::abort);
    }
}

/// How a shared stream ended.
enum Lost {
    /// The connection or the call failed: reconnect from where it was.
    Stream(String),
    /// It cannot go on from where it was: start from now.
    Place(String),
}

/// Follows one source for the gateway's life.
async fn follow(fan: Arc<Fan>, upstream: Upstream) {
    let mut delay = MIN_BACKOFF;
    loop {
        let since = match fan.position() {
            Some(position) if position > 0 => position,
            // Nothing to resume from (an empty feed is at 0, which would
            // mean a snapshot): from now, checking it starts where it was.
            _ => FROM_NOW,
        };
        let mut connected = false;
        match follow_once(&fan, &upstream, since, &mut connected).await {
            Lost::Place(reason) => {
                tracing::warn!(source = upstream.source().name(), %reason, "the shared upstream watch starts again from now");
                fan.lost_place(&reason);
                delay = MIN_BACKOFF;
                // Not at once: an upstream that cannot serve this gateway's
                // watches should not be asked again in a tight loop.
                tokio::time::sleep(jittered(delay)).await;
            }
            Lost::Stream(message) => {
                tracing::warn!(source = upstream.source().name(), %message, "the shared upstream watch was lost; reconnecting");
                fan.lost();
                delay = if connected {
                    MIN_BACKOFF
                } else {
                    (delay * 2).min(MAX_BACKOFF)
                };
                tokio::time::sleep(jittered(delay)).await;
            }
        }
    }
}

/// One shared watch call from `since`, until it is lost.
async fn follow_once(fan: &Fan, upstream: &Upstream, since: i64, connected: &mut bool) -> Lost {
    let name = upstream.source().name();
    // Opening and each frame have the upstream's idle timeout (`Upstream`).
    let mut watch = match upstream.watch(since, None).await {
        Ok(watch) => watch,
        Err(status) => return Lost::Stream(status.message().to_owned()),
    };
    loop {
        let frame = match watch.next().await {
            Err(status) => return Lost::Stream(status.message().to_owned()),
            Ok(None) => return Lost::Stream("the upstream ended the watch".to_owned()),
            Ok(Some(frame)) => frame,
        };
        if let Frame::Reset { .. } | Frame::SnapshotBegin | Frame::SnapshotEnd { .. } = frame {
            return Lost::Place(format!(
                "the {name} upstream cannot resume the gateway's watch from revision {since}"
            ));
        }
        if !*connected {
            *connected = true;
            match (&frame, since == FROM_NOW) {
                (Frame::Progress { revision }, true) => fan.connected(Some(*revision)),
                (_, true) => return Lost::Place(format!("the {name} watch from now did not start with its revision")),
                (_, false) => fan.connected(None),
            }
        }
        match frame {
            Frame::Change {
                revision,
                owner,
                change,
            } => {
                fan.change(revision, &owner, &change);
            }
            Frame::Progress { revision } => {
                fan.progress(revision);
            }
            Frame::Reset { .. } | Frame::SnapshotBegin | Frame::SnapshotEnd { .. } => {}
        }
    }
}
