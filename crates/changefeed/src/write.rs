//! A write on a feed: the entity changes and their changelog rows in one
//! transaction (the outbox), handed to this process's fan-out at commit.

use std::sync::Arc;

use sqlx::{Any, AnyConnection, Transaction};

use crate::{
    change::{Change, Entity},
    db::{Backend, Db},
    error::FeedError,
    hub::Hub,
    log::{NOTIFY_CHANNEL, get_entity, now_micros},
};

/// A write transaction on a feed: the entity changes and their changelog
/// rows commit together (the outbox), each change with the next revision.
///
/// Dropping it without [`WriteTx::commit`] rolls everything back.
pub struct WriteTx<T> {
    tx: Transaction<'static, Any>,
    /// The feed's name.
    feed: &'static str,
    backend: Backend,
    /// The feed's fan-out in this process, which the commit hands the
    /// changes to.
    hub: Arc<Hub<T>>,
    /// The revision committed before this transaction.
    start: i64,
    /// The last revision handed out in this transaction.
    revision: i64,
    /// The changes written, for the tail once committed (see
    /// [`crate::hub`]); `None` past a ring's worth (the tail reads those).
    written: Option<Vec<Arc<Change<T>>>>,
}

impl<T: Entity> WriteTx<T> {
    /// Begins a write on the feed `feed`: takes its counter lock, so that
    /// revisions are handed out in commit order (see the crate docs).
    pub(crate) async fn begin(db: &Db, feed: &'static str, hub: Arc<Hub<T>>) -> Result<WriteTx<T>, FeedError> {
        let mut tx = db.begin_write().await?;
        // Lock: the counter row. Held to commit: the next writer of this feed
        // waits here, then reads the revision this one committed.
        let revision: i64 =
            sqlx::query_scalar("UPDATE feed_state SET revision = revision WHERE feed = $1 RETURNING revision")
                .bind(feed)
                .fetch_one(&mut *tx)
                .await?;
        Ok(WriteTx {
            tx,
            feed,
            backend: db.backend(),
            hub,
            start: revision,
            revision,
            written: Some(Vec::new()),
        })
    }

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
        get_entity(&mut self.tx, self.feed, id).await
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
        .bind(self.feed)
        .bind(id)
        .bind(revision)
        .bind(payload.clone())
        .bind(scope)
        .execute(&mut *self.tx)
        .await?;
        self.record(revision, id, scope, Some(payload)).await?;
        self.keep(Change::new(revision, id.into(), scope.into(), Some(entity.clone())));
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
        .bind(self.feed)
        .bind(id)
        .bind(revision)
        .fetch_optional(&mut *self.tx)
        .await?;
        let Some(scope) = scope else {
            return Ok(None);
        };
        self.record(revision, id, &scope, None).await?;
        self.keep(Change::new(revision, id.into(), scope, None));
        Ok(Some(revision))
    }

    /// Keeps a change written, for the tail (up to a ring's worth).
    fn keep(&mut self, change: Change<T>) {
        let capacity = self.hub.capacity();
        if let Some(written) = &mut self.written {
            if written.len() < capacity {
                written.push(Arc::new(change));
            } else {
                self.written = None;
            }
        }
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
        .bind(self.feed)
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
    /// this transaction if it wrote nothing). Hands the changes to this
    /// process's tail at once (it publishes them without reading them
    /// back), and on PostgreSQL wakes every other replica's through a
    /// notification.
    pub async fn commit(mut self) -> Result<i64, FeedError> {
        if self.revision == self.start {
            self.tx.rollback().await?;
            return Ok(self.start);
        }
        sqlx::query("UPDATE feed_state SET revision = $2 WHERE feed = $1")
            .bind(self.feed)
            .bind(self.revision)
            .execute(&mut *self.tx)
            .await?;
        if self.backend == Backend::Postgres {
            // Delivered at commit, to every listening replica.
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(NOTIFY_CHANNEL)
                .bind(self.feed)
                .execute(&mut *self.tx)
                .await?;
        }
        self.tx.commit().await?;
        self.hub.hand_over(self.written.take());
        Ok(self.revision)
    }
}
