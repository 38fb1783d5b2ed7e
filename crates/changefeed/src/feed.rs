//! A feed: the entities of one kind in a database, their changelog, and the
//! reads, writes and listings over them.

use std::{sync::Arc, time::Duration};

use tokio::task::JoinHandle;

pub use crate::{
    change::{Change, ChangePage, Entity, Frame},
    error::{FeedError, is_transient},
    retention::Retention,
    write::WriteTx,
};
use crate::{
    db::{Backend, Db},
    hub::{self, Hub},
    lease::Term,
    log::{CatchUp, catch_up, decode_row, get_entity, read_state},
    retention,
};

/// Tuning of a feed.
#[derive(Debug, Clone)]
pub struct FeedOptions {
    /// How many changes a watcher may fall behind the live head before its
    /// stream is ended (`RESOURCE_EXHAUSTED`, when it next reads) for it to
    /// resume. A progress tick takes a place too: on a quiet feed, a change
    /// left unread for this many progress intervals is overwritten. Shared
    /// ring: memory does not grow with the number of watchers.
    pub watcher_buffer: usize,
    /// An idle watch stream gets a progress frame this often.
    pub progress_interval: Duration,
    /// The tail reads the changelog at least this often even without a
    /// wake-up (a missed PostgreSQL notification costs at most this).
    pub poll_interval: Duration,
    /// History kept.
    pub retention: Retention,
    /// Snapshots (`Watch(since_revision=0)`, or after a reset) read at once;
    /// each holds a database connection while it streams, and the next
    /// waits for a turn (see [`crate::watch`]).
    pub max_snapshots: usize,
    /// A snapshot whose stream takes no page for this long gives up its
    /// turn and its transaction; the stream ends with `RESOURCE_EXHAUSTED`.
    pub snapshot_stall: Duration,
}

impl Default for FeedOptions {
    fn default() -> Self {
        FeedOptions {
            watcher_buffer: 1024,
            progress_interval: Duration::from_secs(5),
            poll_interval: Duration::from_secs(1),
            retention: Retention::default(),
            max_snapshots: 4,
            snapshot_stall: Duration::from_secs(30),
        }
    }
}

/// Counters of a feed in one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedStats {
    /// The latest revision fanned out.
    pub head: i64,
    /// Watch streams open now.
    pub watchers: i64,
    /// Queries the tail made of the changelog since the feed opened: one
    /// per notification of a commit (on PostgreSQL, where this process's
    /// own commits notify too: the read then usually finds them handed over
    /// already) and per poll, whatever the number of watchers; none for the
    /// commits of this process on SQLite.
    pub tail_reads: u64,
    /// Changes sent on watch streams since the feed opened, every stream
    /// counted.
    pub events_sent: u64,
    /// Watch streams ended for falling a whole ring behind (they resume).
    pub slow_watchers_ended: u64,
    /// Snapshots (`since_revision = 0`, or a reset) being read now.
    pub snapshots: i64,
    /// Changes encoded as watch responses since the feed opened: a live
    /// change once, whatever the number of streams it is written to.
    pub changes_encoded: u64,
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

/// A named feed of entities of type `T` (a protobuf message) in a database.
///
/// Cheap to clone. The feed's background tasks (the changelog tail, the
/// progress ticker, the PostgreSQL listener, retention) run while any clone, or any watch stream
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
    pub(crate) hub: Arc<Hub<T>>,
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
        if options.max_snapshots == 0 || options.snapshot_stall.is_zero() {
            return Err(FeedError::Options(
                "max_snapshots must be at least 1, and snapshot_stall longer than zero".into(),
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
            hub: Arc::new(Hub::new(options.watcher_buffer, state.revision, options.max_snapshots)),
            db,
            options,
        });
        let (hub, db, name, poll) = (&shared.hub, &shared.db, shared.name, shared.options.poll_interval);
        let mut tasks = vec![
            tokio::spawn(hub::tail(Arc::clone(hub), db.clone(), name, poll)),
            tokio::spawn(hub::ticker(Arc::clone(hub), shared.options.progress_interval)),
        ];
        if shared.db.backend() == Backend::Postgres {
            let (ready, listening) = tokio::sync::oneshot::channel();
            tasks.push(tokio::spawn(hub::listen(
                Arc::clone(hub),
                db.clone(),
                name,
                poll,
                ready,
            )));
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
            tasks.push(tokio::spawn(retention::retain(
                shared.db.clone(),
                shared.name,
                shared.options.retention.clone(),
                every,
            )));
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

    /// The latest revision any of this process's watch streams may have
    /// been given: ahead of [`Feed::head`] while a fan-out is under way. A
    /// read from a [`crate::View`] that must show whatever a client saw on a
    /// watch waits for the view to reach it.
    pub fn sent_head(&self) -> i64 {
        self.inner.shared.hub.sent()
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
            changes_encoded: hub.changes_encoded.load(std::sync::atomic::Ordering::Relaxed),
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
        let shared = &self.inner.shared;
        WriteTx::begin(&shared.db, shared.name, Arc::clone(&shared.hub)).await
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
            let (changes, head) = match catch_up(&shared.db, shared.name, since, limit, None).await? {
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
        let shared = &self.inner.shared;
        retention::compact(&shared.db, shared.name, &shared.options.retention, None)
            .await
            .map(|_| ())
    }

    /// Trims history now as the holder of this feed's retention lease
    /// ([`crate::lease::retention_lease`]) at `term`: `Ok(false)`, with
    /// nothing done, if the lease has changed hands since (the fence is
    /// checked inside the compaction's transaction).
    pub async fn compact_fenced(&self, term: Term) -> Result<bool, FeedError> {
        let shared = &self.inner.shared;
        retention::compact(&shared.db, shared.name, &shared.options.retention, Some(term)).await
    }
}
