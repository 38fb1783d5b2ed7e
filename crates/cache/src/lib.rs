//! A local, persisted copy of another service's entities, kept current by
//! that service's watch stream: what lets a service keep answering, one hop,
//! when its upstream is slow or down.
//!
//! # Layout
//!
//! - [`Cache`]: the copy in a local database (SQLite or PostgreSQL), its
//!   cursor (the last upstream revision applied), reads, and the wait for a
//!   revision (read-your-writes).
//! - [`Cache::follow`]: the one task that consumes the watch stream into the
//!   copy: resume from the cursor (no relist after a restart), one
//!   transaction per batch, snapshot replacement after a `reset`, the guard
//!   rail against snapshots or batches that would delete most of the copy,
//!   reconnection with exponential backoff and jitter, and a dead stream
//!   noticed by missing progress frames.
//! - [`CacheState`]: what the copy reports: connected or not since when, the
//!   revision applied, the upstream's last known revision, the copy's age.
//! - [`Source`], [`sources`]: where the watch stream comes from (the
//!   Lightbox gRPC clients, or anything else that yields frames).
//!
//! Informers in client-go keep memory only and relist on every restart;
//! this copy survives restarts and resumes from its cursor.

pub mod sources;

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use futures_util::{FutureExt, StreamExt};
use lightbox_changefeed::{Change, Db, FeedError, Frame, Migrations, feed::Entity, watch::WatchStream};
use sqlx::{AnyConnection, Row};
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
        }
    }
}

/// What a copy reports about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheState {
    /// Whether the watch stream is connected now.
    pub connected: bool,
    /// When it last connected (if `connected`) or disconnected.
    pub since: SystemTime,
    /// Every upstream change up to this revision is in the copy.
    pub applied_revision: i64,
    /// The latest upstream revision the copy has heard of.
    pub upstream_revision: i64,
    /// When the copy last heard from its upstream (a change or a progress
    /// frame); `None` if never since this process started.
    pub last_heard: Option<SystemTime>,
    /// Why a snapshot or batch is being held back by the guard rail, if one is.
    pub held: Option<String>,
}

impl CacheState {
    /// The freshness report of a part answered from this copy.
    pub fn freshness(&self) -> lightbox_api::feed::Freshness {
        let age = self.age();
        lightbox_api::feed::Freshness {
            source: lightbox_api::feed::Source::Cache as i32,
            revision: self.applied_revision,
            age: Some(pbjson_types::Duration::from(age)),
            stream_state: Some(lightbox_api::feed::StreamState {
                connected: self.connected,
                since_time: Some(lightbox_api::request::timestamp_of(self.since)),
            }),
            held_reason: self.held.clone().unwrap_or_default(),
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
    }
}

/// A local copy of entities of type `T`, named `name` in its database.
///
/// Cheap to clone; clones share the copy and its state.
pub struct Cache<T> {
    inner: Arc<Inner>,
    _entity: std::marker::PhantomData<fn() -> T>,
}

impl<T> Clone for Cache<T> {
    fn clone(&self) -> Self {
        Cache {
            inner: Arc::clone(&self.inner),
            _entity: std::marker::PhantomData,
        }
    }
}

struct Inner {
    name: &'static str,
    db: Db,
    options: CacheOptions,
    /// The reported state; `applied_revision` also wakes readers waiting for
    /// a revision (read-your-writes).
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
    /// included, must have run), at the cursor it had when last closed.
    pub async fn open(db: Db, name: &'static str, options: CacheOptions) -> Result<Cache<T>, CacheError> {
        sqlx::query("INSERT INTO cache_state (cache) VALUES ($1) ON CONFLICT (cache) DO NOTHING")
            .bind(name)
            .execute(db.pool())
            .await?;
        let revision: i64 = sqlx::query_scalar("SELECT revision FROM cache_state WHERE cache = $1")
            .bind(name)
            .fetch_one(db.pool())
            .await?;
        let (state, _) = watch::channel(CacheState {
            connected: false,
            since: SystemTime::now(),
            applied_revision: revision,
            upstream_revision: revision,
            last_heard: None,
            held: None,
        });
        Ok(Cache {
            inner: Arc::new(Inner {
                name,
                db,
                options,
                state,
                release_guard: Mutex::new(false),
                released: tokio::sync::Notify::new(),
            }),
            _entity: std::marker::PhantomData,
        })
    }

    /// The copy's state now.
    pub fn state(&self) -> CacheState {
        self.inner.state.borrow().clone()
    }

    /// One entity and the upstream revision of its state, from the copy.
    pub async fn get(&self, id: &str) -> Result<Option<(T, i64)>, CacheError> {
        let row = sqlx::query("SELECT payload, revision FROM cache_entities WHERE cache = $1 AND entity_id = $2")
            .bind(self.inner.name)
            .bind(id)
            .fetch_optional(self.inner.db.pool())
            .await?;
        let Some(row) = row else { return Ok(None) };
        let payload: Vec<u8> = row.try_get(0)?;
        let revision: i64 = row.try_get(1)?;
        let entity = T::decode(payload.as_slice()).map_err(|source| FeedError::Decode {
            entity_id: id.to_owned(),
            revision,
            source,
        })?;
        Ok(Some((entity, revision)))
    }

    /// Every entity of the copy, by id, with its revision (for comparisons
    /// and small copies; not paged).
    pub async fn all(&self) -> Result<HashMap<String, (T, i64)>, CacheError> {
        let rows = sqlx::query("SELECT entity_id, payload, revision FROM cache_entities WHERE cache = $1")
            .bind(self.inner.name)
            .fetch_all(self.inner.db.pool())
            .await?;
        let mut all = HashMap::with_capacity(rows.len());
        for row in rows {
            let id: String = row.try_get(0)?;
            let payload: Vec<u8> = row.try_get(1)?;
            let revision: i64 = row.try_get(2)?;
            let entity = T::decode(payload.as_slice()).map_err(|source| FeedError::Decode {
                entity_id: id.clone(),
                revision,
                source,
            })?;
            all.insert(id, (entity, revision));
        }
        Ok(all)
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

    /// Lets the next snapshot or batch the guard rail would hold back be
    /// applied (an operator's decision that the mass deletion is real).
    pub fn release_guard(&self) {
        if let Ok(mut release) = self.inner.release_guard.lock() {
            *release = true;
        }
        self.inner.released.notify_one();
    }

    /// Follows `source` into the copy until the future is dropped: connect
    /// from the cursor, apply, reconnect with backoff when the stream fails,
    /// ends or falls silent. Run it in its own task.
    pub async fn follow(&self, source: impl Source<T>) {
        let options = &self.inner.options;
        let mut backoff = options.backoff_min;
        loop {
            let cursor = self.state().applied_revision;
            match source.watch(cursor).await {
                Ok(stream) => {
                    self.set_connected(true);
                    let progressed = self.consume(stream).await;
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

    /// Consumes one stream until it fails, ends or falls silent. Returns
    /// whether anything was applied (to reset the backoff).
    async fn consume(&self, mut stream: WatchStream<T>) -> bool {
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
            let next = match tokio::time::timeout(options.idle_timeout, stream.next()).await {
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
                    tracing::warn!(cache = name, idle = ?options.idle_timeout, "watch stream silent (no progress frames); reconnecting");
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
                    let drained = trailing.is_none() && batch.len() < options.batch_max;
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

    fn applied(&self, revision: i64) {
        self.inner.state.send_modify(|state| {
            state.applied_revision = revision;
            state.upstream_revision = state.upstream_revision.max(revision);
            state.held = None;
        });
    }

    /// Whether the guard rail holds back a change deleting `deleted` of the
    /// copy's `size` entities; records why if so.
    fn guard(&self, deleted: usize, size: usize, what: &str) -> bool {
        let options = &self.inner.options;
        let too_many =
            size >= options.guard_min_entities && deleted as f64 > size as f64 * options.guard_max_delete_ratio;
        if !too_many {
            return false;
        }
        let released = self
            .inner
            .release_guard
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or(false);
        if released {
            tracing::warn!(
                cache = self.inner.name,
                deleted,
                size,
                "guard rail released by the operator: applying {what}"
            );
            return false;
        }
        let reason = format!(
            "{what} would delete {deleted} of the {size} entities in the copy; held back, reads keep the last good state"
        );
        tracing::error!(cache = self.inner.name, %reason, "guard rail");
        self.inner.state.send_modify(|state| state.held = Some(reason));
        true
    }

    /// Replaces the copy with a snapshot at `revision`, in one transaction;
    /// unless another follower of the same copy (a replica of this service
    /// on the same database) has already brought it further, and no reset
    /// asked for the replacement.
    async fn apply_snapshot(&self, entities: Vec<Arc<Change<T>>>, revision: i64, reset: bool) -> Result<(), Stop> {
        let name = self.inner.name;
        let mut tx = self.inner.db.begin_write().await.map_err(Stop::from)?;
        let stored: i64 = sqlx::query_scalar("SELECT revision FROM cache_state WHERE cache = $1")
            .bind(name)
            .fetch_one(&mut *tx)
            .await
            .map_err(Stop::from)?;
        if stored > revision && !reset {
            tx.rollback().await.map_err(Stop::from)?;
            self.applied(stored);
            return Ok(());
        }
        let current: Vec<String> = sqlx::query_scalar("SELECT entity_id FROM cache_entities WHERE cache = $1")
            .bind(name)
            .fetch_all(&mut *tx)
            .await
            .map_err(Stop::from)?;
        let kept: std::collections::HashSet<&str> = entities.iter().map(|c| c.entity_id.as_str()).collect();
        let deleted = current.iter().filter(|id| !kept.contains(id.as_str())).count();
        if self.guard(deleted, current.len(), &format!("a snapshot at revision {revision}")) {
            return Err(Stop::Held);
        }
        sqlx::query("DELETE FROM cache_entities WHERE cache = $1")
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(Stop::from)?;
        for change in &entities {
            upsert_or_delete(&mut tx, name, change).await?;
        }
        sqlx::query("UPDATE cache_state SET revision = $2 WHERE cache = $1")
            .bind(name)
            .bind(revision)
            .execute(&mut *tx)
            .await
            .map_err(Stop::from)?;
        tx.commit().await.map_err(Stop::from)?;
        self.applied(revision);
        tracing::info!(cache = name, revision, entities = entities.len(), "snapshot applied");
        Ok(())
    }

    /// Applies live changes and moves the cursor, in one transaction.
    async fn apply_batch(&self, batch: &[Arc<Change<T>>]) -> Result<(), Stop> {
        let Some(last) = batch.last() else { return Ok(()) };
        let name = self.inner.name;
        let mut tx = self.inner.db.begin_write().await.map_err(Stop::from)?;
        let deletions = batch.iter().filter(|c| c.entity.is_none()).count();
        if deletions > 1 {
            let size: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM cache_entities WHERE cache = $1")
                .bind(name)
                .fetch_one(&mut *tx)
                .await
                .map_err(Stop::from)?;
            let what = format!("a batch of changes up to revision {}", last.revision);
            if self.guard(deletions, usize::try_from(size).unwrap_or(0), &what) {
                return Err(Stop::Held);
            }
        }
        for change in batch {
            upsert_or_delete(&mut tx, name, change).await?;
        }
        set_cursor(&mut tx, name, last.revision).await?;
        tx.commit().await.map_err(Stop::from)?;
        self.applied(last.revision);
        Ok(())
    }

    /// A progress frame: nothing else up to `revision`; the cursor moves.
    async fn advance_to(&self, revision: i64) -> Result<(), Stop> {
        if revision <= self.state().applied_revision {
            return Ok(());
        }
        let mut conn = self.inner.db.pool().acquire().await.map_err(Stop::from)?;
        set_cursor(&mut conn, self.inner.name, revision).await?;
        self.applied(revision);
        Ok(())
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

async fn upsert_or_delete<T: Entity>(conn: &mut AnyConnection, cache: &str, change: &Change<T>) -> Result<(), Stop> {
    match &change.entity {
        Some(entity) => {
            sqlx::query(
                "INSERT INTO cache_entities (cache, entity_id, revision, payload) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (cache, entity_id) DO UPDATE SET revision = excluded.revision, payload = excluded.payload \
                 WHERE cache_entities.revision < excluded.revision",
            )
            .bind(cache)
            .bind(change.entity_id.as_str())
            .bind(change.revision)
            .bind(entity.encode_to_vec())
            .execute(conn)
            .await?;
        }
        None => {
            // Not a newer state another follower of the copy already wrote.
            sqlx::query("DELETE FROM cache_entities WHERE cache = $1 AND entity_id = $2 AND revision < $3")
                .bind(cache)
                .bind(change.entity_id.as_str())
                .bind(change.revision)
                .execute(conn)
                .await?;
        }
    }
    Ok(())
}

/// Moves the copy's cursor forward (never back: another follower of the same
/// copy may be ahead).
async fn set_cursor(conn: &mut AnyConnection, cache: &str, revision: i64) -> Result<(), Stop> {
    sqlx::query("UPDATE cache_state SET revision = $2 WHERE cache = $1 AND revision < $2")
        .bind(cache)
        .bind(revision)
        .execute(conn)
        .await?;
    Ok(())
}
