//! The watch stream of a feed: what a `Watch…` RPC serves.
//!
//! A watcher subscribes to the hub's ring *before* it reads the database,
//! so every change committed after its read reaches it through the ring, and
//! the ring's copies of what it already read are skipped by revision: no gap
//! and no duplicate between the snapshot (or replay) and the live changes.
//!
//! Where a stream starts ([`Feed::watch`]'s `since_revision`):
//!
//! - `0`: a snapshot at one revision R (`SnapshotBegin`, the entities,
//!   `SnapshotEnd{R}`), then the changes after R. The snapshot is read in
//!   pages in one transaction, as the stream sends them: its memory is a
//!   few pages whatever the feed's size. At most
//!   [`crate::FeedOptions::max_snapshots`] are read at once per feed (each
//!   holds a database connection); the next waits its turn;
//! - `N > 0`: a replay of the changes after N (or their consolidated delta,
//!   or a reset and a snapshot), then at once `Progress{head}`: the replay
//!   reached the head, so a resuming client knows it is current without
//!   waiting a progress interval; then live;
//! - [`FROM_NOW`] (`-1`): no snapshot and no replay: `Progress{head}` first,
//!   with the head read in the same step as the subscription to the ring
//!   (the ring then holds exactly the changes after it), then live. For a
//!   client that has its state from elsewhere (the gateway's one shared
//!   stream per upstream, whose phones each catch up on their own).
//!
//! The stream is lazy: it reads the ring only when the transport asks for
//! the next frame, so a client that stops reading holds no growing buffer;
//! once it is a whole ring behind, its stream ends with `RESOURCE_EXHAUSTED`
//! naming the revision to resume from.
//!
//! A [`WatchFilter`] narrows a stream to some ids and/or one scope, on every
//! path: the snapshot reads only the matching entities (a scope through its
//! index), the replay and the consolidated delta read only the scope's rows,
//! and the live tail drops what does not match. A filtered-out change still
//! moves the stream's cursor, so progress frames go past it.

use std::{collections::HashSet, collections::VecDeque, pin::Pin, sync::Arc};

use futures_util::Stream;
use tokio::sync::broadcast;
use tonic::Status;

use crate::{
    change::{Change, Entity, Frame},
    error::FeedError,
    feed::Feed,
    log::{CatchUp, catch_up},
    ring::{Group, Item, Subscription},
    snapshot::{Failed, Pages, Part, Scan},
};

/// A watch stream, as a tonic server-streaming handler returns it.
pub type WatchStream<T> = Pin<Box<dyn Stream<Item = Result<Frame<T>, Status>> + Send + 'static>>;

/// A watch stream converted to an API message, as a tonic handler returns it.
pub type MappedStream<R> = Pin<Box<dyn Stream<Item = Result<R, Status>> + Send + 'static>>;

/// The `since_revision` of a watch from now: see the module docs.
pub const FROM_NOW: i64 = lightbox_api::request::WATCH_FROM_NOW;

/// The most ids one watch may filter on.
pub const MAX_WATCH_IDS: usize = 1000;

const PAGE: i64 = 512;

/// Which changes a watch stream carries: those matching every filter set
/// (the default, no filter: every change).
///
/// A `Vec<String>` of ids converts into an id filter, so
/// `feed.watch(0, ids)` reads as before.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchFilter {
    /// If not empty, only changes to these entities.
    pub ids: Vec<String>,
    /// If set, only changes to entities in this scope (see
    /// [`crate::WriteTx::put_scoped`]), deletions included. The match is on
    /// the scope a change was written in: an entity moved to another scope
    /// is not announced to its old scope's watchers.
    pub scope: Option<String>,
}

impl WatchFilter {
    /// Changes to these entities only.
    pub fn ids(ids: impl IntoIterator<Item = impl Into<String>>) -> WatchFilter {
        WatchFilter {
            ids: ids.into_iter().map(Into::into).collect(),
            scope: None,
        }
    }

    /// Changes to the entities of `scope` only.
    pub fn scope(scope: impl Into<String>) -> WatchFilter {
        WatchFilter {
            ids: Vec::new(),
            scope: Some(scope.into()),
        }
    }

    /// This filter, narrowed to the entities of `scope`.
    pub fn in_scope(self, scope: impl Into<String>) -> WatchFilter {
        WatchFilter {
            scope: Some(scope.into()),
            ..self
        }
    }
}

impl From<Vec<String>> for WatchFilter {
    fn from(ids: Vec<String>) -> WatchFilter {
        WatchFilter { ids, scope: None }
    }
}

impl<T: Entity> Feed<T> {
    /// Watches the feed from `since_revision` (0: snapshot first; N > 0:
    /// after revision N; [`FROM_NOW`]: from the current revision, see the
    /// module docs), for the changes that pass `filter` only (a
    /// [`WatchFilter`], or a `Vec` of ids; empty: every change). The caller
    /// validates the arguments (a revision of at least [`FROM_NOW`], at most
    /// [`MAX_WATCH_IDS`] ids).
    pub fn watch(&self, since_revision: i64, filter: impl Into<WatchFilter>) -> WatchStream<T> {
        let filter = filter.into();
        self.inner
            .shared
            .hub
            .watchers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Subscribe first: see the module docs.
        let Subscription {
            receiver: ring,
            group,
            generation,
            head,
        } = self.inner.shared.hub.subscribe();
        let from_now = since_revision == FROM_NOW;
        let watcher = Watcher {
            ring,
            group,
            generation,
            feed: self.clone(),
            cursor: if from_now { head } else { since_revision },
            ids: if filter.ids.is_empty() {
                None
            } else {
                Some(filter.ids.into_iter().collect())
            },
            scope: filter.scope,
            pending: if from_now {
                VecDeque::from([Frame::Progress { revision: head }])
            } else {
                VecDeque::new()
            },
            phase: match since_revision {
                0 => Phase::Snapshot(None),
                FROM_NOW => Phase::Live,
                _ => Phase::CatchUp,
            },
            sent_since_tick: false,
            lagged: false,
        };
        Box::pin(futures_util::stream::unfold(watcher, |mut watcher| async move {
            watcher.next().await.map(|frame| (frame, watcher))
        }))
    }
}

enum Phase<T> {
    /// Start a snapshot (after a reset frame saying why, if set).
    Snapshot(Option<String>),
    /// Send the snapshot's pages as they are read, then go live.
    Paging {
        pages: Pages<T>,
        /// The reason of the reset to send first, if any.
        reset: Option<String>,
        /// The snapshot's revision, once it has begun.
        at: i64,
    },
    /// Replay from the database after the cursor, then go live.
    CatchUp,
    /// Follow the ring.
    Live,
    /// The stream has ended.
    Done,
}

/// The state of one watch stream; owned by the stream, dropped with it when
/// the client goes away.
struct Watcher<T> {
    feed: Feed<T>,
    ring: broadcast::Receiver<Item<T>>,
    /// The group of the ring `ring` reads (for its head).
    group: Arc<Group<T>>,
    /// The generation of `ring`: if the hub has replaced it since, this
    /// watcher's empty ring says nothing about the new head.
    generation: u64,
    /// Every change up to here was delivered (or filtered out).
    cursor: i64,
    /// The id filter, if any (a set: checked on every live change).
    ids: Option<HashSet<String>>,
    /// The scope filter, if any.
    scope: Option<String>,
    /// Frames read from the database, not yet sent.
    pending: VecDeque<Frame<T>>,
    phase: Phase<T>,
    /// Whether a frame went out since the last progress tick (the ring
    /// carries the feed's ticks: a tick after which nothing was sent sends a
    /// progress frame).
    sent_since_tick: bool,
    /// The ring overwrote items this watcher had not read. Harmless if they
    /// were ticks or changes it had already (from its snapshot or replay);
    /// otherwise the next change, or the next tick, shows a hole and the
    /// stream ends for the client to resume.
    lagged: bool,
}

impl<T> Drop for Watcher<T> {
    fn drop(&mut self) {
        self.feed
            .inner
            .shared
            .hub
            .watchers
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl<T: Entity> Watcher<T> {
    fn wanted(&self, change: &Change<T>) -> bool {
        self.ids.as_ref().is_none_or(|ids| ids.contains(&change.entity_id))
            && self.scope.as_ref().is_none_or(|scope| *scope == change.scope)
    }

    async fn next(&mut self) -> Option<Result<Frame<T>, Status>> {
        loop {
            if let Some(frame) = self.pending.pop_front() {
                self.sent_since_tick = true;
                self.count(&frame);
                return Some(Ok(frame));
            }
            let result = match self.phase {
                Phase::Done => return None,
                Phase::Snapshot(ref mut reset) => {
                    let reset = reset.take();
                    self.start_snapshot(reset);
                    Ok(())
                }
                Phase::Paging { .. } => self.page().await,
                Phase::CatchUp => self.catch_up().await,
                Phase::Live => match self.live().await {
                    // A progress frame does not count as "sent" for the next
                    // tick: an idle stream gets one every interval, not every
                    // other one (and a copy's age stays within one interval).
                    Ok(Some(frame @ Frame::Progress { .. })) => return Some(Ok(frame)),
                    Ok(Some(frame)) => {
                        self.sent_since_tick = true;
                        self.count(&frame);
                        return Some(Ok(frame));
                    }
                    Ok(None) => Ok(()),
                    Err(status) => Err(status),
                },
            };
            if let Err(status) = result {
                self.phase = Phase::Done;
                return Some(Err(status));
            }
        }
    }

    /// Counts a change sent (for the feed's stats).
    fn count(&self, frame: &Frame<T>) {
        if matches!(frame, Frame::Change(_)) {
            let hub = &self.feed.inner.shared.hub;
            hub.events_sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Starts reading a snapshot (sent after a reset frame if `reset`
    /// says why): in pages, once the feed has a turn free.
    fn start_snapshot(&mut self, reset: Option<String>) {
        let shared = &self.feed.inner.shared;
        let ids: Option<Vec<String>> = self.ids.as_ref().map(|ids| {
            let mut ids: Vec<String> = ids.iter().cloned().collect();
            ids.sort_unstable();
            ids
        });
        let scan = Scan {
            db: shared.db.clone(),
            feed: shared.name,
            ids,
            scope: self.scope.clone(),
        };
        let pages = Pages::start(
            scan,
            Arc::clone(&shared.hub.snapshot_turns),
            Arc::clone(&shared.hub.snapshots),
            shared.options.snapshot_stall,
        );
        self.phase = Phase::Paging { pages, reset, at: 0 };
    }

    /// Queues the snapshot's next part; after its end, goes live.
    async fn page(&mut self) -> Result<(), Status> {
        let Phase::Paging { pages, reset, at } = &mut self.phase else {
            return Ok(());
        };
        match pages.next().await {
            Ok(Part::Begin { revision }) => {
                *at = revision;
                if let Some(reason) = reset.take() {
                    self.pending.push_back(Frame::Reset { revision, reason });
                }
                self.pending.push_back(Frame::SnapshotBegin { revision });
            }
            Ok(Part::Page(changes)) => self.pending.extend(changes.into_iter().map(Frame::Change)),
            Ok(Part::End) => {
                let revision = *at;
                self.pending.push_back(Frame::SnapshotEnd { revision });
                self.cursor = revision;
                self.phase = Phase::Live;
            }
            Err(Failed::Storage(err)) => return Err(storage_error(err)),
            Err(Failed::Stalled(after)) => {
                return Err(Status::resource_exhausted(format!(
                    "this watcher took no snapshot page for {} s and was dropped; watch again with since_revision=0",
                    after.as_secs()
                )));
            }
        }
        Ok(())
    }

    /// Queues the next page of what follows the cursor in the database.
    async fn catch_up(&mut self) -> Result<(), Status> {
        let shared = &self.feed.inner.shared;
        let page = catch_up(&shared.db, shared.name, self.cursor, PAGE, self.scope.as_deref())
            .await
            .map_err(storage_error)?;
        match page {
            CatchUp::Reset { reason } => {
                self.phase = Phase::Snapshot(Some(reason));
                Ok(())
            }
            CatchUp::Page { changes, head } => {
                let last_page = (changes.len() as i64) < PAGE;
                for change in changes {
                    self.cursor = change.revision;
                    if self.wanted(&change) {
                        self.pending.push_back(Frame::Change(change));
                    }
                }
                if last_page {
                    // A short page holds everything up to the head it was
                    // read at: say so at once (the client is current).
                    self.cursor = self.cursor.max(head);
                    self.pending.push_back(Frame::Progress { revision: self.cursor });
                    self.phase = Phase::Live;
                }
                Ok(())
            }
        }
    }

    /// Waits for the next frame from the ring: a wanted change, or progress
    /// when idle (at the feed's tick). `Ok(None)`: nothing to send yet (a
    /// change filtered out, a tick on a busy stream).
    async fn live(&mut self) -> Result<Option<Frame<T>>, Status> {
        // Fast path: an item is already waiting (a burst, or a watcher
        // catching up): no waiting machinery at all.
        let received = match self.ring.try_recv() {
            Err(broadcast::error::TryRecvError::Empty) => {
                if self.feed.inner.shared.hub.is_closing() {
                    return Err(self.closed());
                }
                self.ring.recv().await
            }
            Ok(item) => Ok(item),
            Err(broadcast::error::TryRecvError::Lagged(n)) => Err(broadcast::error::RecvError::Lagged(n)),
            Err(broadcast::error::TryRecvError::Closed) => Err(broadcast::error::RecvError::Closed),
        };
        match received {
            Ok(Item::Change(change)) => self.on_change(change),
            Ok(Item::Tick(number)) => self.on_tick(number),
            Err(broadcast::error::RecvError::Lagged(_)) => {
                self.lagged = true;
                Ok(None)
            }
            Err(broadcast::error::RecvError::Closed) => Err(self.closed()),
        }
    }

    fn on_change(&mut self, change: Arc<Change<T>>) -> Result<Option<Frame<T>>, Status> {
        if change.revision <= self.cursor {
            return Ok(None); // already sent by the snapshot or replay
        }
        if change.revision != self.cursor + 1 {
            return Err(if self.lagged {
                self.fell_behind()
            } else {
                // Cannot happen while revisions are gapless; never skip silently.
                Status::unavailable(format!(
                    "the watch missed revisions {}..{}; resume with since_revision={}",
                    self.cursor + 1,
                    change.revision - 1,
                    self.cursor
                ))
            });
        }
        self.cursor = change.revision;
        self.lagged = false;
        Ok(self.wanted(&change).then_some(Frame::Change(change)))
    }

    /// Progress tick `number`: a progress frame if nothing was sent since
    /// the previous one. `Ok(None)`: nothing to say (a busy stream, or a
    /// stale tick).
    fn on_tick(&mut self, number: u64) -> Result<Option<Frame<T>>, Status> {
        // A newer tick is already on its way (the watcher was busy, or read
        // a snapshot while ticks queued up): that one says where it is, so
        // ticks queued together give one frame, not a burst.
        if number < self.group.last_tick() {
            return Ok(None);
        }
        if std::mem::take(&mut self.sent_since_tick) {
            return Ok(None);
        }
        // Head first, then the ring: if the ring is empty, every change up to
        // that head has been received...
        let hub = &self.feed.inner.shared.hub;
        let head = self.group.head();
        if self.ring.is_empty() && hub.generation() == self.generation {
            if self.lagged && head > self.cursor {
                // ...unless the ring overwrote some this watcher had not
                // read: no later change is left to show the hole, so this
                // tick must not claim them.
                return Err(self.fell_behind());
            }
            self.cursor = self.cursor.max(head);
        }
        Ok(Some(Frame::Progress { revision: self.cursor }))
    }

    /// The ring overwrote what this watcher had not read: its stream ends,
    /// saying where to resume.
    fn fell_behind(&self) -> Status {
        let hub = &self.feed.inner.shared.hub;
        hub.slow_watchers_ended
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Status::resource_exhausted(format!(
            "this watcher fell a whole buffer ({} changes and progress ticks) behind and was dropped; resume with since_revision={}",
            hub.capacity(),
            self.cursor
        ))
    }

    /// The ring was closed: shutdown, or the tail restarting after a hole.
    fn closed(&self) -> Status {
        if self.feed.inner.shared.hub.is_closing() {
            Status::unavailable(format!(
                "the server is shutting down; resume with since_revision={}",
                self.cursor
            ))
        } else {
            Status::unavailable(format!(
                "the changefeed restarted; resume with since_revision={}",
                self.cursor
            ))
        }
    }
}

fn storage_error(err: FeedError) -> Status {
    tracing::error!(%err, "watch stream cannot read the changefeed");
    Status::unavailable("the changefeed's storage is unavailable; retry with the same since_revision")
}
