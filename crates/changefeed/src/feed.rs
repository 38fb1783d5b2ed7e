//! A feed: the entities of one kind in a database, their changelog, and the
//! reads, writes and listings over them.

use std::{sync::Arc, time::Duration};

use sqlx::{Any, AnyConnection, Row, Transaction, any::AnyRow};
use tokio::task::JoinHandle;

use crate::{
    db::{Backend, Db},
    hub::{self, Hub},
    lease::{Lease, Term},
};

/// The PostgreSQL notification channel writers signal on commit, so that
/// every replica's tail wakes at once instead of waiting for its poll.
pub(crate) const NOTIFY_CHANNEL: &str = "lightbox_changefeed";

/// One committed change to an entity.
#[derive(Debug, Clone, PartialEq)]
pub struct Change<T> {
    /// The revision of the change.
    pub revision: i64,
    /// The entity's id.
    pub entity_id: String,
    /// The scope the entity belongs to (its owner's id, see
    /// [`WriteTx::put_scoped`]; empty for none). A deletion carries the
    /// scope of the entity it deleted. The API's watch messages carry it
    /// where the entity has an owner (`ContractChange.holder_user_id`,
    /// `PhotoChange.user_id`), and it is read back from them; a change read
    /// back from a watch of users has the empty scope.
    pub scope: String,
    /// The entity after the change; `None` for a deletion.
    pub entity: Option<T>,
}

/// One frame of a watch stream.
#[derive(Debug, Clone)]
pub enum Frame<T> {
    /// A change (in a snapshot, the entity's current state at its revision).
    Change(Arc<Change<T>>),
    /// A snapshot at `revision` starts.
    SnapshotBegin {
        /// The revision the snapshot is taken at.
        revision: i64,
    },
    /// The snapshot at `revision` is complete.
    SnapshotEnd {
        /// The revision the snapshot is taken at.
        revision: i64,
    },
    /// Every matching change up to `revision` was delivered.
    Progress {
        /// The revision the watcher is now at.
        revision: i64,
    },
    /// The watch cannot resume; a snapshot at `revision` follows.
    Reset {
        /// The revision of the snapshot that follows.
        revision: i64,
        /// Why, for people and logs.
        reason: String,
    },
}

/// How much history a feed keeps. Counted in revisions: the changelog keeps
/// the last `keep_changes` changes; tombstones of deleted entities are kept
/// for the last `keep_tombstones` revisions, which must be at least as many.
///
/// Replicas of a service on one database trim once between them: the
/// periodic retention runs on the replica holding the lease
/// `retention:<feed>` ([`crate::lease`]), each compaction fenced by its
/// term. A compaction is correct even if two run at once anyway (a paused
/// holder waking up, a manual [`Feed::compact`]): see `compact`.
#[derive(Debug, Clone)]
pub struct Retention {
    /// Changes kept in the changelog.
    pub keep_changes: i64,
    /// Revisions for which deletions are remembered (tombstones).
    pub keep_tombstones: i64,
    /// How often the feed trims; `None`: only when [`Feed::compact`] is called.
    pub interval: Option<Duration>,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            keep_changes: 100_000,
            keep_tombstones: 1_000_000,
            interval: Some(Duration::from_secs(60)),
        }
    }
}

/// Tuning of a feed.
#[derive(Debug, Clone)]
pub struct FeedOptions {
    /// How many changes a watcher may fall behind the live head before its
    /// stream is ended (`RESOURCE_EXHAUSTED`) for it to resume. Shared ring:
    /// memory does not grow with the number of watchers.
    pub watcher_buffer: usize,
    /// An idle watch stream gets a progress frame this often.
    pub progress_interval: Duration,
    /// The tail reads the changelog at least this often even without a
    /// wake-up (a missed PostgreSQL notification costs at most this).
    pub poll_interval: Duration,
    /// History kept.
    pub retention: Retention,
}

impl Default for FeedOptions {
    fn default() -> Self {
        FeedOptions {
            watcher_buffer: 1024,
            progress_interval: Duration::from_secs(5),
            poll_interval: Duration::from_secs(1),
            retention: Retention::default(),
        }
    }
}

/// A failure of the changefeed's storage.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// A stored payload does not decode: a bug or a corrupted database.
    #[error("stored entity {entity_id:?} at revision {revision} does not decode: {source}")]
    Decode {
        /// The entity.
        entity_id: String,
        /// Its revision.
        revision: i64,
        /// The decoder's complaint.
        source: prost::DecodeError,
    },
    /// The database could not be migrated.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A request to the feed is malformed (a forged page token, a token
    /// given with a revision).
    #[error("{0}")]
    InvalidRequest(String),
    /// A feed option is out of range.
    #[error("invalid feed options: {0}")]
    Options(String),
}

impl From<FeedError> for lightbox_api::ApiError {
    fn from(err: FeedError) -> Self {
        match err {
            FeedError::InvalidRequest(message) => lightbox_api::ApiError::InvalidArgument(message),
            // A database that is down, restarting or out of connections is
            // an outage callers retry, not a bug: UNAVAILABLE (503), saying so.
            FeedError::Db(err) if is_transient(&err) => {
                lightbox_api::ApiError::Unavailable(format!("the database is unreachable ({err}); retry in a moment"))
            }
            other => lightbox_api::ApiError::internal(other),
        }
    }
}

/// Whether a database error is the database being unreachable, restarting
/// or out of connections (an outage that passes), rather than a bug: a lost
/// or refused connection, a pool that timed out or was closed, PostgreSQL's
/// connection-exception class (08) and shutdown / too-many-connections
/// codes, SQLite's busy and locked.
pub fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02" | "57P03" | "53300" | "5" | "6")
        }),
        _ => false,
    }
}

/// Counters of a feed in one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedStats {
    /// The latest revision fanned out.
    pub head: i64,
    /// Watch streams open now.
    pub watchers: i64,
    /// Queries the tail made of the changelog since the feed opened: one per
    /// wake-up or poll, whatever the number of watchers.
    pub tail_reads: u64,
    /// Changes sent on watch streams since the feed opened, every stream
    /// counted.
    pub events_sent: u64,
    /// Watch streams ended for falling a whole ring behind (they resume).
    pub slow_watchers_ended: u64,
    /// Snapshots (`since_revision = 0`, or a reset) being read now.
    pub snapshots: i64,
}

/// A page of the pull listing.
#[derive(Debug, Clone)]
pub struct ChangePage<T> {
    /// The changes, in revision order (in entity id order while listing the
    /// state from 0).
    pub changes: Vec<Arc<Change<T>>>,
    /// The revision to list from next (0 while the state listing goes on).
    pub next_since_revision: i64,
    /// While listing the state from 0: the token of the next page.
    pub next_page_token: String,
    /// Set when the requested revision cannot be resumed from: the client
    /// drops its copy and lists again from 0. Holds the reason.
    pub reset: Option<String>,
}

impl<T> ChangePage<T> {
    fn reset(reason: String) -> ChangePage<T> {
        ChangePage {
            changes: Vec::new(),
            next_since_revision: 0,
            next_page_token: String::new(),
            reset: Some(reason),
        }
    }
}

/// The position of a state listing: the revision it lists the state at,
/// and the last entity id listed, as an opaque token good for that feed's
/// state listing only.
struct StatePage;

impl StatePage {
    fn listing(feed: &str) -> String {
        format!("the {feed} changes from since_revision 0")
    }

    fn encode(feed: &str, at: i64, after: &str) -> String {
        lightbox_api::request::encode_page_token(&StatePage::listing(feed), &format!("{at}:{after}"))
    }

    fn decode(feed: &str, token: &str) -> Option<(i64, String)> {
        if token.is_empty() {
            return None;
        }
        let raw = lightbox_api::request::decode_page_token(&StatePage::listing(feed), token).ok()?;
        let (at, after) = raw.split_once(':')?;
        Some((at.parse().ok()?, after.to_owned()))
    }
}

/// What the feed_state row says.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FeedState {
    pub revision: i64,
    pub compacted_revision: i64,
    pub tombstone_revision: i64,
}

/// The answer to "what comes after revision N".
pub(crate) enum CatchUp<T> {
    /// Changes after N in revision order (at most the page size), and the
    /// head they were read at.
    Page { changes: Vec<Arc<Change<T>>>, head: i64 },
    /// N cannot be resumed from; the client needs a snapshot.
    Reset { reason: String },
}

/// Bound on what an entity type must be to travel through a feed.
pub trait Entity: prost::Message + Default + Clone + Send + Sync + 'static {}
impl<T: prost::Message + Default + Clone + Send + Sync + 'static> Entity for T {}

/// A named feed of entities of type `T` (a protobuf message) in a database.
///
/// Cheap to clone. The feed's background tasks (the changelog tail, the
/// PostgreSQL listener, retention) run while any clone, or any watch stream
/// made from one, is alive, and stop when the last is dropped.
pub struct Feed<T> {
    pub(crate) inner: Arc<Inner<T>>,
}

impl<T> Clone for Feed<T> {
    fn clone(&self) -> Self {
        Feed {
            inner: Arc::clone(&self.inner),
        }
    }
}

pub(crate) struct Inner<T> {
    pub(crate) shared: Arc<Shared<T>>,
    /// The background tasks; aborted when the last handle drops.
    tasks: Vec<JoinHandle<()>>,
}

impl<T> Drop for Inner<T> {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// What the background tasks share with the handles.
pub(crate) struct Shared<T> {
    pub(crate) name: &'static str,
    pub(crate) db: Db,
    pub(crate) hub: Hub<T>,
    pub(crate) options: FeedOptions,
}

impl<T: Entity> Feed<T> {
    /// Opens the feed `name` in `db` (whose migrations must have run),
    /// creating its state row if needed, and starts its background tasks.
    pub async fn open(db: Db, name: &'static str, options: FeedOptions) -> Result<Feed<T>, FeedError> {
        if options.watcher_buffer == 0 {
            return Err(FeedError::Options("watcher_buffer must be at least 1".into()));
        }
        if options.progress_interval.is_zero() || options.poll_interval.is_zero() {
            return Err(FeedError::Options(
                "progress and poll intervals must be longer than zero".into(),
            ));
        }
        if options.retention.interval.is_some_and(|every| every.is_zero()) {
            return Err(FeedError::Options(
                "the retention interval must be longer than zero".into(),
            ));
        }
        if options.retention.keep_changes < 1 || options.retention.keep_tombstones < options.retention.keep_changes {
            return Err(FeedError::Options(
                "retention must keep at least one change, and tombstones at least as long as changes".into(),
            ));
        }
        sqlx::query("INSERT INTO feed_state (feed) VALUES ($1) ON CONFLICT (feed) DO NOTHING")
            .bind(name)
            .execute(db.pool())
            .await?;
        let state = read_state(&mut *db.pool().acquire().await?, name).await?;
        let shared = Arc::new(Shared {
            name,
            hub: Hub::new(options.watcher_buffer, state.revision),
            db,
            options,
        });
        let mut tasks = vec![tokio::spawn(hub::tail(Arc::clone(&shared)))];
        if shared.db.backend() == Backend::Postgres {
            let (ready, listening) = tokio::sync::oneshot::channel();
            tasks.push(tokio::spawn(hub::listen(Arc::clone(&shared), ready)));
            // Ready to be woken by other replicas before answering anyone; if
            // the listener cannot connect, the poll still finds every change.
            if tokio::time::timeout(Duration::from_secs(5), listening).await.is_err() {
                tracing::warn!(
                    feed = name,
                    "changefeed listener not connected yet; relying on polling meanwhile"
                );
            }
        }
        if let Some(every) = shared.options.retention.interval {
            tasks.push(tokio::spawn(retain(Arc::clone(&shared), every)));
        }
        Ok(Feed {
            inner: Arc::new(Inner { shared, tasks }),
        })
    }

    /// The feed's name.
    pub fn name(&self) -> &'static str {
        self.inner.shared.name
    }

    /// The database the feed lives in.
    pub fn db(&self) -> &Db {
        &self.inner.shared.db
    }

    /// The latest revision this process has fanned out to its watchers.
    pub fn head(&self) -> i64 {
        self.inner.shared.hub.head()
    }

    /// The latest committed revision, read from the database (the fan-out
    /// may not have published it yet: see [`Feed::head`]).
    pub async fn committed_revision(&self) -> Result<i64, FeedError> {
        let mut conn = self.db().pool().acquire().await?;
        Ok(read_state(&mut conn, self.name()).await?.revision)
    }

    /// Counters of this feed in this process.
    pub fn stats(&self) -> FeedStats {
        let hub = &self.inner.shared.hub;
        FeedStats {
            head: hub.head(),
            watchers: hub.watchers.load(std::sync::atomic::Ordering::Relaxed),
            tail_reads: hub.tail_reads.load(std::sync::atomic::Ordering::Relaxed),
            events_sent: hub.events_sent.load(std::sync::atomic::Ordering::Relaxed),
            slow_watchers_ended: hub.slow_watchers_ended.load(std::sync::atomic::Ordering::Relaxed),
            snapshots: hub.snapshots.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Whether [`Feed::close`] was called (the process is shutting down).
    pub fn is_closing(&self) -> bool {
        self.inner.shared.hub.is_closing()
    }

    /// Ends every watch stream of this feed (they answer `UNAVAILABLE` with
    /// the revision to resume from), for a graceful shutdown.
    pub fn close(&self) {
        self.inner.shared.hub.close();
    }

    /// Begins a write: takes the feed's counter lock, so that revisions are
    /// handed out in commit order (see the crate docs).
    pub async fn begin(&self) -> Result<WriteTx<T>, FeedError> {
        let mut tx = self.db().begin_write().await?;
        // Lock: the counter row. Held to commit: the next writer of this feed
        // waits here, then reads the revision this one committed.
        let revision: i64 =
            sqlx::query_scalar("UPDATE feed_state SET revision = revision WHERE feed = $1 RETURNING revision")
                .bind(self.name())
                .fetch_one(&mut *tx)
                .await?;
        Ok(WriteTx {
            tx,
            feed: self.clone(),
            start: revision,
            revision,
        })
    }

    /// The current state of one entity (`None` if absent or deleted).
    pub async fn get(&self, id: &str) -> Result<Option<T>, FeedError> {
        get_entity(&mut *self.db().pool().acquire().await?, self.name(), id).await
    }

    /// Current entities in id order, after `after_id` (exclusive), at most `limit`.
    pub async fn list(&self, after_id: &str, limit: i64) -> Result<Vec<(String, T)>, FeedError> {
        let rows = sqlx::query(
            "SELECT entity_id, revision, payload, scope FROM feed_entities \
             WHERE feed = $1 AND deleted = 0 AND entity_id > $2 ORDER BY entity_id LIMIT $3",
        )
        .bind(self.name())
        .bind(after_id)
        .bind(limit)
        .fetch_all(self.db().pool())
        .await?;
        rows.iter()
            .map(|row| {
                let change = decode_row::<T>(row)?;
                Ok((change.entity_id, change.entity.unwrap_or_default()))
            })
            .collect()
    }

    /// Up to `limit` current entities of `scope` in id order, from just
    /// after `from` (ascending), or just before it when `descending`: one
    /// query on the `feed_entities_by_scope` index.
    pub async fn list_scope(
        &self,
        scope: &str,
        from: Option<&str>,
        limit: i64,
        descending: bool,
    ) -> Result<Vec<T>, FeedError> {
        let sql: &'static str = match (from.is_some(), descending) {
            (false, false) => {
                "SELECT entity_id, revision, payload, scope FROM feed_entities \
                 WHERE feed = $1 AND scope = $2 AND deleted = 0 ORDER BY entity_id LIMIT $3"
            }
            (false, true) => {
                "SELECT entity_id, revision, payload, scope FROM feed_entities \
                 WHERE feed = $1 AND scope = $2 AND deleted = 0 ORDER BY entity_id DESC LIMIT $3"
            }
            (true, false) => {
                "SELECT entity_id, revision, payload, scope FROM feed_entities \
                 WHERE feed = $1 AND scope = $2 AND deleted = 0 AND entity_id > $4 ORDER BY entity_id LIMIT $3"
            }
            (true, true) => {
                "SELECT entity_id, revision, payload, scope FROM feed_entities \
                 WHERE feed = $1 AND scope = $2 AND deleted = 0 AND entity_id < $4 ORDER BY entity_id DESC LIMIT $3"
            }
        };
        let mut query = sqlx::query(sql).bind(self.name()).bind(scope).bind(limit);
        if let Some(from) = from {
            query = query.bind(from);
        }
        let rows = query.fetch_all(self.db().pool()).await?;
        rows.iter()
            .map(|row| Ok(decode_row::<T>(row)?.entity.unwrap_or_default()))
            .collect()
    }

    /// The pull listing: what changed after `since`, at most `limit` changes.
    /// Same revisions and compaction rule as the watch: a compacted `since`
    /// gets the latest state of every entity changed since (deletions
    /// included); one older than the tombstones kept gets `reset`.
    ///
    /// `since` 0 lists the current state as of one revision R, in entity id
    /// order, page after page (`page` is the previous answer's
    /// `next_page_token`); the last page answers `next_since_revision` R,
    /// from which the changes continue. (Paging by entity revision instead
    /// would start the next page at an old revision, soon older than the
    /// tombstones kept: a listing that never ends on a large, old state.)
    pub async fn list_changes(&self, since: i64, limit: i64, page: &str) -> Result<ChangePage<T>, FeedError> {
        let shared = &self.inner.shared;
        if since != 0 {
            if !page.is_empty() {
                return Err(FeedError::InvalidRequest(
                    "page_token continues a listing from since_revision 0 only".into(),
                ));
            }
            let (changes, head) = match catch_up(shared, since, limit, None).await? {
                CatchUp::Page { changes, head } => (changes, head),
                CatchUp::Reset { reason } => return Ok(ChangePage::reset(reason)),
            };
            // A short page holds everything up to the head it was read at.
            let next_since_revision = match changes.last() {
                Some(last) if changes.len() as i64 >= limit => last.revision,
                _ => head.max(since),
            };
            return Ok(ChangePage {
                changes,
                next_since_revision,
                next_page_token: String::new(),
                reset: None,
            });
        }
        let mut tx = shared.db.begin_snapshot().await?;
        let state = read_state(&mut tx, shared.name).await?;
        let (at, after) = match StatePage::decode(shared.name, page) {
            Some(position) => position,
            None if page.is_empty() => (state.revision, String::new()),
            None => {
                return Err(FeedError::InvalidRequest(
                    "page_token is not a token this service issued".into(),
                ));
            }
        };
        if at < state.tombstone_revision {
            tx.commit().await?;
            return Ok(ChangePage::reset(format!(
                "this listing of the state at revision {at} took longer than the deletions are kept; list again from 0"
            )));
        }
        // Entities written after `at` are left out here: their latest state
        // comes with the changes after `at`, which follow the last page.
        let rows = sqlx::query(
            "SELECT entity_id, revision, payload, scope FROM feed_entities \
             WHERE feed = $1 AND deleted = 0 AND revision <= $2 AND entity_id > $3 ORDER BY entity_id LIMIT $4",
        )
        .bind(shared.name)
        .bind(at)
        .bind(after.as_str())
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let changes = rows
            .iter()
            .map(|row| decode_row(row).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let full = changes.len() as i64 >= limit;
        let next_page_token = match changes.last() {
            Some(last) if full => StatePage::encode(shared.name, at, &last.entity_id),
            _ => String::new(),
        };
        Ok(ChangePage {
            changes,
            next_since_revision: if full { 0 } else { at },
            next_page_token,
            reset: None,
        })
    }

    /// Trims history now, per the retention policy, whether or not this
    /// replica holds the retention lease (an operator's or a test's call):
    /// compaction is safe to run on several replicas at once (see
    /// [`Retention`]), so the lease only saves the repeated work.
    pub async fn compact(&self) -> Result<(), FeedError> {
        compact(&self.inner.shared, None).await.map(|_| ())
    }

    /// Trims history now as the holder of this feed's retention lease
    /// ([`crate::lease::retention_lease`]) at `term`: `Ok(false)`, with
    /// nothing done, if the lease has changed hands since (the fence is
    /// checked inside the compaction's transaction).
    pub async fn compact_fenced(&self, term: Term) -> Result<bool, FeedError> {
        compact(&self.inner.shared, Some(term)).await
    }
}

/// A write transaction on a feed: the entity changes and their changelog
/// rows commit together (the outbox), each change with the next revision.
///
/// Dropping it without [`WriteTx::commit`] rolls everything back.
pub struct WriteTx<T> {
    tx: Transaction<'static, Any>,
    feed: Feed<T>,
    /// The revision committed before this transaction.
    start: i64,
    /// The last revision handed out in this transaction.
    revision: i64,
}

impl<T: Entity> WriteTx<T> {
    /// The revision the next [`WriteTx::put`], [`WriteTx::put_scoped`] or
    /// [`WriteTx::delete`] gets, for the entity to carry its own revision.
    pub fn next_revision(&self) -> i64 {
        self.revision + 1
    }

    /// The connection, for the service's own tables (indexes, constraints)
    /// in the same transaction.
    pub fn conn(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }

    /// The current state of an entity, as this transaction sees it.
    pub async fn get(&mut self, id: &str) -> Result<Option<T>, FeedError> {
        get_entity(&mut self.tx, self.feed.name(), id).await
    }

    /// Writes an entity's new state, in no scope (the empty scope; see
    /// [`WriteTx::put_scoped`]); returns the change's revision.
    pub async fn put(&mut self, id: &str, entity: &T) -> Result<i64, FeedError> {
        self.put_scoped(id, "", entity).await
    }

    /// Writes an entity's new state in `scope` (its owner's id: watchers may
    /// follow one scope only, see [`crate::WatchFilter`]); returns the
    /// change's revision. The scope is the entity's from this change on: a
    /// write in another scope moves it there. (A watcher of the old scope
    /// is not told that it left: see the crate docs.)
    pub async fn put_scoped(&mut self, id: &str, scope: &str, entity: &T) -> Result<i64, FeedError> {
        let revision = self.next_revision();
        let payload = entity.encode_to_vec();
        sqlx::query(
            "INSERT INTO feed_entities (feed, entity_id, revision, deleted, payload, scope) VALUES ($1, $2, $3, 0, $4, $5) \
             ON CONFLICT (feed, entity_id) DO UPDATE SET revision = excluded.revision, deleted = 0, \
             payload = excluded.payload, scope = excluded.scope",
        )
        .bind(self.feed.name())
        .bind(id)
        .bind(revision)
        .bind(payload.clone())
        .bind(scope)
        .execute(&mut *self.tx)
        .await?;
        self.record(revision, id, scope, Some(payload)).await?;
        Ok(revision)
    }

    /// Deletes an entity, leaving a tombstone; returns the change's revision,
    /// or `None` if there was nothing to delete. The change and the tombstone
    /// keep the scope the entity had, so that its scope's watchers see the
    /// deletion.
    pub async fn delete(&mut self, id: &str) -> Result<Option<i64>, FeedError> {
        let revision = self.next_revision();
        let scope: Option<String> = sqlx::query_scalar(
            "UPDATE feed_entities SET revision = $3, deleted = 1, payload = NULL \
             WHERE feed = $1 AND entity_id = $2 AND deleted = 0 RETURNING scope",
        )
        .bind(self.feed.name())
        .bind(id)
        .bind(revision)
        .fetch_optional(&mut *self.tx)
        .await?;
        let Some(scope) = scope else {
            return Ok(None);
        };
        self.record(revision, id, &scope, None).await?;
        Ok(Some(revision))
    }

    async fn record(
        &mut self,
        revision: i64,
        id: &str,
        scope: &str,
        payload: Option<Vec<u8>>,
    ) -> Result<(), FeedError> {
        sqlx::query(
            "INSERT INTO feed_changes (feed, revision, entity_id, deleted, payload, commit_time_us, scope) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(self.feed.name())
        .bind(revision)
        .bind(id)
        .bind(i64::from(payload.is_none()))
        .bind(payload)
        .bind(now_micros())
        .bind(scope)
        .execute(&mut *self.tx)
        .await?;
        self.revision = revision;
        Ok(())
    }

    /// Commits; returns the last revision written (the feed's head before
    /// this transaction if it wrote nothing). Wakes this process's tail at
    /// once, and on PostgreSQL every other replica's through a notification.
    pub async fn commit(mut self) -> Result<i64, FeedError> {
        if self.revision == self.start {
            self.tx.rollback().await?;
            return Ok(self.start);
        }
        sqlx::query("UPDATE feed_state SET revision = $2 WHERE feed = $1")
            .bind(self.feed.name())
            .bind(self.revision)
            .execute(&mut *self.tx)
            .await?;
        if self.feed.db().backend() == Backend::Postgres {
            // Delivered at commit, to every listening replica.
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(NOTIFY_CHANNEL)
                .bind(self.feed.name())
                .execute(&mut *self.tx)
                .await?;
        }
        self.tx.commit().await?;
        self.feed.inner.shared.hub.wake();
        Ok(self.revision)
    }
}

pub(crate) fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

pub(crate) async fn read_state(conn: &mut AnyConnection, feed: &str) -> Result<FeedState, FeedError> {
    let row = sqlx::query("SELECT revision, compacted_revision, tombstone_revision FROM feed_state WHERE feed = $1")
        .bind(feed)
        .fetch_one(conn)
        .await?;
    Ok(FeedState {
        revision: row.try_get(0)?,
        compacted_revision: row.try_get(1)?,
        tombstone_revision: row.try_get(2)?,
    })
}

async fn get_entity<T: Entity>(conn: &mut AnyConnection, feed: &str, id: &str) -> Result<Option<T>, FeedError> {
    let row = sqlx::query(
        "SELECT entity_id, revision, payload, scope FROM feed_entities WHERE feed = $1 AND entity_id = $2 AND deleted = 0",
    )
    .bind(feed)
    .bind(id)
    .fetch_optional(conn)
    .await?;
    match row {
        Some(row) => Ok(decode_row::<T>(&row)?.entity),
        None => Ok(None),
    }
}

/// Decodes a row of `(entity_id, revision, payload, scope)`; a NULL payload
/// is a deletion.
pub(crate) fn decode_row<T: Entity>(row: &AnyRow) -> Result<Change<T>, FeedError> {
    let entity_id: String = row.try_get(0)?;
    let revision: i64 = row.try_get(1)?;
    let payload: Option<Vec<u8>> = row.try_get(2)?;
    let scope: String = row.try_get(3)?;
    let entity = match payload {
        Some(bytes) => Some(T::decode(bytes.as_slice()).map_err(|source| FeedError::Decode {
            entity_id: entity_id.clone(),
            revision,
            source,
        })?),
        None => None,
    };
    Ok(Change {
        revision,
        entity_id,
        scope,
        entity,
    })
}

/// Changes after `cursor` from the changelog, in revision order; with a
/// `scope`, only the changes in it (the page then ends at the last of them).
pub(crate) async fn changes_since<T: Entity>(
    conn: &mut AnyConnection,
    feed: &str,
    cursor: i64,
    limit: i64,
    scope: Option<&str>,
) -> Result<Vec<Arc<Change<T>>>, FeedError> {
    let sql = [
        "SELECT entity_id, revision, payload, scope FROM feed_changes \
         WHERE feed = $1 AND revision > $2 ORDER BY revision LIMIT $3",
        "SELECT entity_id, revision, payload, scope FROM feed_changes \
         WHERE feed = $1 AND revision > $2 AND scope = $4 ORDER BY revision LIMIT $3",
    ];
    rows_since(conn, sql, feed, cursor, limit, scope).await
}

/// The latest state of each entity written after `cursor`, deletions
/// included, in revision order (the consolidated delta); with a `scope`,
/// only the entities in it.
pub(crate) async fn entities_since<T: Entity>(
    conn: &mut AnyConnection,
    feed: &str,
    cursor: i64,
    limit: i64,
    scope: Option<&str>,
) -> Result<Vec<Arc<Change<T>>>, FeedError> {
    let sql = [
        "SELECT entity_id, revision, payload, scope FROM feed_entities \
         WHERE feed = $1 AND revision > $2 ORDER BY revision LIMIT $3",
        "SELECT entity_id, revision, payload, scope FROM feed_entities \
         WHERE feed = $1 AND revision > $2 AND scope = $4 ORDER BY revision LIMIT $3",
    ];
    rows_since(conn, sql, feed, cursor, limit, scope).await
}

/// Runs `sql` (`[unscoped, scoped]`: the second binds the scope as `$4`)
/// and decodes the rows.
async fn rows_since<T: Entity>(
    conn: &mut AnyConnection,
    [unscoped, scoped]: [&'static str; 2],
    feed: &str,
    cursor: i64,
    limit: i64,
    scope: Option<&str>,
) -> Result<Vec<Arc<Change<T>>>, FeedError> {
    let mut query = sqlx::query(if scope.is_some() { scoped } else { unscoped })
        .bind(feed)
        .bind(cursor)
        .bind(limit);
    if let Some(scope) = scope {
        query = query.bind(scope);
    }
    let rows = query.fetch_all(conn).await?;
    rows.iter().map(|row| decode_row(row).map(Arc::new)).collect()
}

/// What comes after `cursor` (> 0): changelog replay while the history is
/// kept, the consolidated delta once it was trimmed, a reset past the
/// tombstones or past the head. Reads state and rows in one snapshot. With a
/// `scope`, the page holds only that scope's changes, and a short page still
/// means everything up to the head was read.
pub(crate) async fn catch_up<T: Entity>(
    shared: &Shared<T>,
    cursor: i64,
    limit: i64,
    scope: Option<&str>,
) -> Result<CatchUp<T>, FeedError> {
    let mut tx = shared.db.begin_snapshot().await?;
    let state = read_state(&mut tx, shared.name).await?;
    let result = if cursor > state.revision {
        CatchUp::Reset {
            reason: format!(
                "revision {cursor} is ahead of this server's latest revision {} (was its database replaced?)",
                state.revision
            ),
        }
    } else if cursor < state.tombstone_revision {
        CatchUp::Reset {
            reason: format!(
                "revision {cursor} is older than the deletions this server keeps (from revision {})",
                state.tombstone_revision
            ),
        }
    } else if cursor >= state.compacted_revision {
        CatchUp::Page {
            changes: changes_since(&mut tx, shared.name, cursor, limit, scope).await?,
            head: state.revision,
        }
    } else {
        CatchUp::Page {
            changes: entities_since(&mut tx, shared.name, cursor, limit, scope).await?,
            head: state.revision,
        }
    };
    tx.commit().await?;
    Ok(result)
}

/// The current state at one revision, which it returns: of the entities in
/// `ids` if given (in id order), else of every entity; with a `scope`, only
/// those in it (through the `feed_entities_by_scope` index).
pub(crate) async fn snapshot<T: Entity>(
    shared: &Shared<T>,
    ids: Option<&[String]>,
    scope: Option<&str>,
) -> Result<(i64, Vec<Arc<Change<T>>>), FeedError> {
    let mut tx = shared.db.begin_snapshot().await?;
    let state = read_state(&mut tx, shared.name).await?;
    let mut changes = Vec::new();
    match ids {
        Some(ids) => {
            for id in ids {
                let row = sqlx::query(
                    "SELECT entity_id, revision, payload, scope FROM feed_entities \
                     WHERE feed = $1 AND entity_id = $2 AND deleted = 0",
                )
                .bind(shared.name)
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(row) = row {
                    let change = decode_row(&row)?;
                    if scope.is_none_or(|scope| change.scope == scope) {
                        changes.push(Arc::new(change));
                    }
                }
            }
        }
        None => {
            let query = match scope {
                None => sqlx::query(
                    "SELECT entity_id, revision, payload, scope FROM feed_entities \
                     WHERE feed = $1 AND deleted = 0 ORDER BY entity_id",
                )
                .bind(shared.name),
                Some(scope) => sqlx::query(
                    "SELECT entity_id, revision, payload, scope FROM feed_entities \
                     WHERE feed = $1 AND scope = $2 AND deleted = 0 ORDER BY entity_id",
                )
                .bind(shared.name)
                .bind(scope),
            };
            for row in &query.fetch_all(&mut *tx).await? {
                changes.push(Arc::new(decode_row(row)?));
            }
        }
    }
    tx.commit().await?;
    Ok((state.revision, changes))
}

/// The periodic retention of a feed: every `every`, on the one replica that
/// holds the feed's retention lease (taken or renewed each time, for three
/// intervals: a replica that dies hands it over after at most that), a
/// compaction fenced by the lease's term.
async fn retain<T: Entity>(shared: Arc<Shared<T>>, every: Duration) {
    let lease = crate::lease::retention_lease(shared.name);
    let holder = crate::lease::holder_id();
    let ttl = every.saturating_mul(3);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let term = match Lease::try_acquire(&shared.db, &lease, &holder, ttl).await {
            Ok(Some(term)) => term,
            // Another replica holds it.
            Ok(None) => continue,
            Err(err) => {
                tracing::warn!(feed = shared.name, %err, "changefeed retention cannot take its lease; will retry");
                continue;
            }
        };
        match compact(&shared, Some(term)).await {
            Ok(true) => {}
            Ok(false) => tracing::info!(
                feed = shared.name,
                %term,
                "changefeed retention skipped: its lease changed hands meanwhile"
            ),
            Err(err) => tracing::warn!(feed = shared.name, %err, "changefeed retention failed; will retry"),
        }
    }
}

/// Trims the changelog and the tombstones per the retention policy; with a
/// `fence`, only while the feed's retention lease is at that term (else
/// `Ok(false)`, nothing done).
///
/// Safe to run on several replicas at once, fenced or not: every input
/// (head, horizons) is read in the transaction under the counter row's
/// lock, which concurrent compactions (and writers) take in turn, so the
/// second one reads what the first committed; the horizons only move up
/// (`max` with the stored ones); and the deletes are of ranges below them,
/// which a repeat finds already gone.
async fn compact<T: Entity>(shared: &Shared<T>, fence: Option<Term>) -> Result<bool, FeedError> {
    let retention = &shared.options.retention;
    let mut tx = shared.db.begin_write().await?;
    // First the fence (so a stale holder never waits on the writers' lock):
    // on PostgreSQL it locks the lease's row to commit, so the lease cannot
    // change hands while this compaction is under way.
    if let Some(term) = fence
        && !Lease::fence(&mut tx, &crate::lease::retention_lease(shared.name), term).await?
    {
        tx.rollback().await?;
        return Ok(false);
    }
    // Lock: the counter row, so no writer commits between reading the head
    // and moving the horizons; held for two range deletes only.
    let row = sqlx::query(
        "UPDATE feed_state SET revision = revision WHERE feed = $1 \
         RETURNING revision, compacted_revision, tombstone_revision",
    )
    .bind(shared.name)
    .fetch_one(&mut *tx)
    .await?;
    let (head, compacted, tombstones): (i64, i64, i64) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
    let compact_to = head - retention.keep_changes;
    let tombstones_to = head - retention.keep_tombstones;
    if compact_to <= compacted && tombstones_to <= tombstones {
        tx.rollback().await?;
        return Ok(true);
    }
    let compact_to = compact_to.max(compacted);
    let tombstones_to = tombstones_to.max(tombstones);
    sqlx::query("DELETE FROM feed_changes WHERE feed = $1 AND revision <= $2")
        .bind(shared.name)
        .bind(compact_to)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM feed_entities WHERE feed = $1 AND deleted = 1 AND revision <= $2")
        .bind(shared.name)
        .bind(tombstones_to)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE feed_state SET compacted_revision = $2, tombstone_revision = $3 WHERE feed = $1")
        .bind(shared.name)
        .bind(compact_to)
        .bind(tombstones_to)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::debug!(feed = shared.name, compact_to, tombstones_to, "changefeed compacted");
    Ok(true)
}
