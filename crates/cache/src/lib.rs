//! A local copy of another service's entities, kept current by that
//! service's watch stream, persisted for restarts and read from memory:
//! what lets a service keep answering, one hop and at memory speed, when its
//! upstream is slow or down.
//!
//! # Layout
//!
//! - [`Cache`] (this file): the copy, its reported [`CacheState`], and the
//!   reads: [`Cache::get`] and [`Cache::snapshot`] load the latest in-memory
//!   [`Snapshot`] and touch no database; [`Cache::wait_for`] and
//!   [`Cache::wait_fresh`] wait for a revision (read-your-writes) or for
//!   news from the upstream.
//! - `follow` (private): [`Cache::follow`], the one task that consumes the
//!   watch stream: resume from the cursor (no relist after a restart),
//!   batches, snapshot replacement after a `reset`, reconnection with
//!   exponential backoff and jitter, and a dead stream noticed by missing
//!   progress frames.
//! - `store` (private): applying a batch or a snapshot: the guard rails
//!   (mass deletions, the size cap), one transaction for the entities and
//!   the cursor, then the new in-memory snapshot published whole.
//! - [`Source`], [`sources`]: where the watch stream comes from (the
//!   Lightbox gRPC clients, or anything else that yields frames).
//! - `pull` (private; [`PullSource`], [`PollOptions`], [`FollowMode`]):
//!   [`Cache::poll`], pull mode: the `List…Changes` pages turned into the
//!   frames a watch sends, consumed by the same loop;
//!   [`Cache::follow_upstream`] picks the mode of [`CacheOptions::follow`].
//!
//! # Memory and persistence
//!
//! The database is the durable truth, written before anything is shown;
//! memory is what reads see. At [`Cache::open`] the persisted copy is loaded
//! into memory (no relist, no upstream needed), and after each batch is
//! committed its new state is published as one snapshot, so a read sees the
//! copy at exactly one revision. Informers in client-go keep memory only and
//! relist on every restart; Kubernetes' watch cache serves from memory the
//! same way; this copy does both and survives restarts.

mod follow;
mod pull;
pub mod sources;
mod store;

pub use pull::{FollowMode, Listing, MAX_PAGE_SIZE, PollOptions, PullSource};

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use lightbox_changefeed::{Change, Db, FeedError, Migrations, Published, Snapshot, feed::Entity, watch::WatchStream};
use sqlx::Row;
use tokio::sync::watch;
use tonic::Status;

/// The cache's tables (versions 500 to 999).
pub static MIGRATIONS: Migrations = Migrations {
    sqlite: &sqlx::migrate!("migrations/sqlite"),
    postgres: &sqlx::migrate!("migrations/postgres"),
};

/// Where a watch stream comes from.
pub trait Source<T>: Send + Sync + 'static {
    /// Opens a watch from `since_revision` (0: snapshot first).
    fn watch(&self, since_revision: i64) -> Pin<Box<dyn Future<Output = Result<WatchStream<T>, Status>> + Send>>;
}

/// Tuning of a cache.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// First pause before reconnecting; doubles up to `backoff_max`, with
    /// jitter (each pause drawn between half and all of it).
    pub backoff_min: Duration,
    /// Longest pause between reconnections.
    pub backoff_max: Duration,
    /// A stream silent for this long (no change, no progress frame) is taken
    /// for dead and reconnected. Set it above the upstream's progress
    /// interval (three times is a good margin).
    pub idle_timeout: Duration,
    /// The most changes applied in one transaction.
    pub batch_max: usize,
    /// The guard rail: a snapshot or batch that would delete more than this
    /// share of the copy is held back, not applied...
    pub guard_max_delete_ratio: f64,
    /// ...when the copy has at least this many entities.
    pub guard_min_entities: usize,
    /// The most entities the copy holds (it lives in memory). A snapshot or
    /// batch that would take it past this is held back like a mass
    /// deletion: reads keep the last good state and report why.
    pub max_entities: usize,
    /// How [`Cache::follow_upstream`] follows: watching (push, the
    /// default) or polling the change listing (pull).
    pub follow: FollowMode,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(15),
            batch_max: 256,
            guard_max_delete_ratio: 0.5,
            guard_min_entities: 10,
            max_entities: 5_000_000,
            follow: FollowMode::Watch,
        }
    }
}

/// What a copy reports about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheState {
    /// Whether the watch stream is connected now (pull mode: whether the
    /// last poll was answered).
    pub connected: bool,
    /// When it last connected (if `connected`) or disconnected.
    pub since: SystemTime,
    /// Every upstream change up to this revision is in the copy.
    pub applied_revision: i64,
    /// The latest upstream revision the copy has heard of.
    pub upstream_revision: i64,
    /// When the copy last heard from its upstream (a change or a progress
    /// frame; pull mode: a poll that reached the listing's head); `None`
    /// if never since this process started.
    pub last_heard: Option<SystemTime>,
    /// Why a snapshot or batch is being held back by the guard rail, if one is.
    pub held: Option<String>,
    /// Entities in the copy.
    pub entities: usize,
    /// An estimate of the memory they take (see [`Snapshot::approx_bytes`]).
    pub memory_bytes: usize,
    /// Times the watch was opened again after a stream ended or failed to
    /// open, since this process started.
    pub reconnects: u64,
    /// Times the guard rail held a snapshot or batch back, since this
    /// process started.
    pub holds: u64,
    /// Pull mode: pages of the change listing answered since this process
    /// started. Each cost the upstream one read transaction on its
    /// database (its feed's state row and one page of rows); a watch costs
    /// it nothing per copy once live (one tail per process, fanned out).
    pub polls: u64,
    /// Of `polls`, those that found nothing new: the price of asking.
    pub empty_polls: u64,
}

impl CacheState {
    /// The freshness report of a part answered from this copy, whose own
    /// state is at `revision` (the entity's).
    pub fn freshness(&self, revision: i64) -> lightbox_api::feed::Freshness {
        use lightbox_api::feed::{StreamState, StreamStatus};
        let age = self.age();
        lightbox_api::feed::Freshness {
            source: lightbox_api::feed::Source::Cache as i32,
            revision,
            age: Some(pbjson_types::Duration::from(age)),
            stream_state: Some(StreamStatus {
                state: if self.connected {
                    StreamState::Connected
                } else {
                    StreamState::Disconnected
                } as i32,
                since_time: Some(lightbox_api::request::timestamp_of(self.since)),
            }),
            held_reason: self.held.clone().unwrap_or_default(),
            copy_revision: self.applied_revision,
        }
    }

    /// How old the copy is: the time since it last heard from its upstream
    /// (since it was opened, if never).
    pub fn age(&self) -> Duration {
        let heard = self.last_heard.unwrap_or(self.since);
        SystemTime::now().duration_since(heard).unwrap_or_default()
    }
}

/// The freshness report of a part read from its upstream for this request.
pub fn upstream_freshness(revision: i64) -> lightbox_api::feed::Freshness {
    lightbox_api::feed::Freshness {
        source: lightbox_api::feed::Source::Upstream as i32,
        revision,
        age: Some(pbjson_types::Duration::default()),
        stream_state: None,
        held_reason: String::new(),
        copy_revision: 0,
    }
}

/// A local copy of entities of type `T`, named `name` in its database.
///
/// Cheap to clone; clones share the copy and its state.
pub struct Cache<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for Cache<T> {
    fn clone(&self) -> Self {
        Cache {
            inner: Arc::clone(&self.inner),
        }
    }
}

struct Inner<T> {
    name: &'static str,
    db: Db,
    options: CacheOptions,
    /// What reads see: replaced whole by the follower after each durable
    /// batch, loaded by readers without a lock.
    memory: Published<T>,
    /// The reported state; `applied_revision` also wakes readers waiting for
    /// a revision (read-your-writes). Written after `memory`, so a reader
    /// woken for a revision finds it in memory.
    state: watch::Sender<CacheState>,
    /// Set once the guard rail held something back: the operator's release
    /// lets the next such snapshot or batch through.
    release_guard: Mutex<bool>,
    /// Wakes a follower that is holding back, when the operator releases.
    released: tokio::sync::Notify,
}

/// A failure of the cache.
pub type CacheError = FeedError;

impl<T: Entity> Cache<T> {
    /// Opens the copy `name` in `db` (whose migrations, [`MIGRATIONS`]
    /// included, must have run) and loads it into memory, at the cursor it
    /// had when last closed: nothing is asked of the upstream.
    pub async fn open(db: Db, name: &'static str, options: CacheOptions) -> Result<Cache<T>, CacheError> {
        sqlx::query("INSERT INTO cache_state (cache) VALUES ($1) ON CONFLICT (cache) DO NOTHING")
            .bind(name)
            .execute(db.pool())
            .await?;
        let snapshot = store::load(&db, name).await?;
        let (state, _) = watch::channel(CacheState {
            connected: false,
            since: SystemTime::now(),
            applied_revision: snapshot.revision(),
            upstream_revision: snapshot.revision(),
            last_heard: None,
            held: None,
            entities: snapshot.len(),
            memory_bytes: snapshot.approx_bytes(),
            reconnects: 0,
            holds: 0,
            polls: 0,
            empty_polls: 0,
        });
        tracing::info!(
            cache = name,
            revision = snapshot.revision(),
            entities = snapshot.len(),
            approx_bytes = snapshot.approx_bytes(),
            "copy loaded into memory"
        );
        Ok(Cache {
            inner: Arc::new(Inner {
                name,
                db,
                options,
                memory: Published::new(snapshot),
                state,
                release_guard: Mutex::new(false),
                released: tokio::sync::Notify::new(),
            }),
        })
    }

    /// The copy's state now.
    pub fn state(&self) -> CacheState {
        self.inner.state.borrow().clone()
    }

    /// The copy as it is now, at one revision: read several entities from
    /// one snapshot to see them as of the same upstream revision.
    pub fn snapshot(&self) -> Arc<Snapshot<T>> {
        self.inner.memory.load()
    }

    /// The freshness of a part read from `snapshot` (of this copy), whose
    /// own state is at `revision`: the stream's state now, and the copy at
    /// the snapshot's revision.
    pub fn freshness_of(&self, snapshot: &Snapshot<T>, revision: i64) -> lightbox_api::feed::Freshness {
        let state = self.inner.state.borrow();
        lightbox_api::feed::Freshness {
            copy_revision: snapshot.revision(),
            ..state.freshness(revision)
        }
    }

    /// One entity and the upstream revision of its state, from memory.
    pub fn get(&self, id: &str) -> Option<(T, i64)> {
        let snapshot = self.snapshot();
        snapshot.get(id).map(|(entity, revision)| (entity.clone(), revision))
    }

    /// Every entity of the copy in memory, by id, with its revision (for
    /// comparisons and small copies).
    pub fn all(&self) -> HashMap<String, (T, i64)> {
        let snapshot = self.snapshot();
        snapshot
            .iter()
            .map(|(id, entity, revision)| (id.to_owned(), (entity.clone(), revision)))
            .collect()
    }

    /// Every entity of the copy as persisted in the database, and the
    /// persisted cursor: what the next [`Cache::open`] would load.
    pub async fn persisted(&self) -> Result<(i64, HashMap<String, (T, i64)>), CacheError> {
        let snapshot: Snapshot<T> = store::load(&self.inner.db, self.inner.name).await?;
        let all = snapshot
            .iter()
            .map(|(id, entity, revision)| (id.to_owned(), (entity.clone(), revision)))
            .collect();
        Ok((snapshot.revision(), all))
    }

    /// Waits until the copy has applied `revision`, for at most `timeout`.
    /// Returns whether it has.
    pub async fn wait_for(&self, revision: i64, timeout: Duration) -> bool {
        let mut state = self.inner.state.subscribe();
        let reached = state.wait_for(|s| s.applied_revision >= revision);
        matches!(tokio::time::timeout(timeout, reached).await, Ok(Ok(_)))
    }

    /// Waits until the copy has heard from its upstream within `max_age`
    /// (a change or a progress frame), for at most `timeout`. Returns
    /// whether it has.
    pub async fn wait_fresh(&self, max_age: Duration, timeout: Duration) -> bool {
        let fresh = |state: &CacheState| {
            state
                .last_heard
                .and_then(|heard| SystemTime::now().duration_since(heard).ok())
                .is_some_and(|age| age <= max_age)
        };
        if fresh(&self.state()) {
            return true;
        }
        let mut state = self.inner.state.subscribe();
        matches!(tokio::time::timeout(timeout, state.wait_for(fresh)).await, Ok(Ok(_)))
    }

    /// Whether the copy has heard from its upstream within `max_age`.
    pub fn is_fresh(&self, max_age: Duration) -> bool {
        let state = self.inner.state.borrow();
        state
            .last_heard
            .and_then(|heard| SystemTime::now().duration_since(heard).ok())
            .is_some_and(|age| age <= max_age)
    }

    /// The upstream said, just now, that its latest revision is `head`: if
    /// the copy has applied it, the copy is current as of now (its age
    /// resets, as with a progress frame) and this answers true. This is how a
    /// read with a tight `max_staleness` is served on a quiet stream, the way
    /// Kubernetes' consistent reads from its watch cache ask for a progress
    /// notification instead of refusing.
    pub fn confirm_current(&self, head: i64) -> bool {
        if self.state().applied_revision < head {
            return false;
        }
        self.caught_up(head);
        true
    }

    /// Lets the next snapshot or batch the guard rail would hold back be
    /// applied (an operator's decision that the mass deletion is real).
    pub fn release_guard(&self) {
        if let Ok(mut release) = self.inner.release_guard.lock() {
            *release = true;
        }
        self.inner.released.notify_one();
    }

    fn set_connected(&self, connected: bool) {
        self.inner.state.send_if_modified(|state| {
            if state.connected == connected {
                return false;
            }
            state.connected = connected;
            state.since = SystemTime::now();
            true
        });
        tracing::info!(cache = self.inner.name, connected, "cache stream state changed");
    }

    /// Notes that the copy has applied everything the upstream has sent, up
    /// to `upstream` (a progress frame, a complete snapshot, or a drained
    /// batch): the copy is current as of now. Only then does its age reset,
    /// so a copy replaying a backlog, or holding a snapshot back, ages.
    fn caught_up(&self, upstream: i64) {
        self.inner.state.send_modify(|state| {
            state.last_heard = Some(SystemTime::now());
            state.upstream_revision = state.upstream_revision.max(upstream);
        });
    }

    /// Shows `snapshot` to readers, then moves the reported state to it.
    fn publish(&self, snapshot: Snapshot<T>) {
        let (revision, entities, memory_bytes) = (snapshot.revision(), snapshot.len(), snapshot.approx_bytes());
        self.inner.memory.publish(snapshot);
        self.inner.state.send_modify(|state| {
            state.applied_revision = revision;
            state.upstream_revision = state.upstream_revision.max(revision);
            state.held = None;
            state.entities = entities;
            state.memory_bytes = memory_bytes;
        });
    }
}

/// Why consuming a stream stops.
enum Stop {
    /// The guard rail held a change back.
    Held,
    /// The local database failed.
    Storage(sqlx::Error),
}

impl From<sqlx::Error> for Stop {
    fn from(err: sqlx::Error) -> Self {
        Stop::Storage(err)
    }
}

impl From<FeedError> for Stop {
    fn from(err: FeedError) -> Self {
        match err {
            FeedError::Db(err) => Stop::Storage(err),
            other => Stop::Storage(sqlx::Error::Decode(Box::new(other))),
        }
    }
}

/// Reads a persisted row of `(entity_id, revision, payload)` as a change.
fn decode_row<T: Entity>(row: &sqlx::any::AnyRow) -> Result<Change<T>, FeedError> {
    let entity_id: String = row.try_get(0)?;
    let revision: i64 = row.try_get(1)?;
    let payload: Vec<u8> = row.try_get(2)?;
    let entity = T::decode(payload.as_slice()).map_err(|source| FeedError::Decode {
        entity_id: entity_id.clone(),
        revision,
        source,
    })?;
    Ok(Change::new(revision, entity_id, String::new(), Some(entity)))
}
