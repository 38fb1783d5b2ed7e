//! Applying what the stream brings: the guard rails first, then one
//! transaction for the entities and the cursor, then the new in-memory
//! snapshot published whole. Nothing is shown to readers before it is
//! durable, and a batch is shown all at once or not at all.
//!
//! Several replicas of a service may follow the same copy in one database.
//! Each keeps its own memory in step with its own stream; the database only
//! ever moves forward (an entity's row is replaced only by a newer revision,
//! the cursor never goes back), whichever replica writes first.

use std::{collections::HashSet, sync::Arc};

use futures_util::TryStreamExt;
use lightbox_changefeed::{Change, Db, FeedError, Snapshot, feed::Entity};
use sqlx::AnyConnection;

use crate::{Cache, Stop, decode_row};

/// Reads the persisted copy `name` and its cursor, in one snapshot of the
/// database, into memory.
pub(crate) async fn load<T: Entity>(db: &Db, name: &str) -> Result<Snapshot<T>, FeedError> {
    let mut tx = db.begin_snapshot().await?;
    let revision: i64 = sqlx::query_scalar("SELECT revision FROM cache_state WHERE cache = $1")
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?
        .unwrap_or(0);
    let mut snapshot = Snapshot::new(revision, false);
    {
        // Streamed: a large copy is never held twice (rows and entities).
        let mut rows = sqlx::query("SELECT entity_id, revision, payload FROM cache_entities WHERE cache = $1")
            .bind(name)
            .fetch(&mut *tx);
        while let Some(row) = rows.try_next().await? {
            snapshot.apply(Arc::new(decode_row::<T>(&row)?));
        }
    }
    tx.commit().await?;
    // Applying set the revision to the newest entity's; the cursor says more.
    snapshot.set_revision(revision);
    Ok(snapshot)
}

impl<T: Entity> Cache<T> {
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
        self.hold(format!(
            "{what} would delete {deleted} of the {size} entities in the copy; held back, reads keep the last good state"
        ));
        true
    }

    /// Whether `next` is larger than the copy may grow; records why if so.
    /// Not for an operator to release: raise `max_entities` (and memory).
    fn over_capacity(&self, next: &Snapshot<T>, what: &str) -> bool {
        let max = self.inner.options.max_entities;
        if next.len() <= max {
            return false;
        }
        self.hold(format!(
            "{what} would grow the copy to {} entities, past its limit of {max} (it is held in memory); \
             held back, reads keep the last good state",
            next.len()
        ));
        true
    }

    fn hold(&self, reason: String) {
        tracing::error!(cache = self.inner.name, %reason, "guard rail");
        self.inner.state.send_modify(|state| {
            state.held = Some(reason);
            state.holds += 1;
        });
    }

    /// Replaces the copy with a snapshot at `revision`: in the database in
    /// one transaction (unless another follower of the same copy already
    /// brought it further and no reset asked for the replacement), then in
    /// memory.
    pub(crate) async fn apply_snapshot(
        &self,
        entities: Vec<Arc<Change<T>>>,
        revision: i64,
        reset: bool,
    ) -> Result<(), Stop> {
        let name = self.inner.name;
        let current = self.snapshot();
        let mut next = Snapshot::new(revision, false);
        let mut kept = HashSet::with_capacity(entities.len());
        for change in &entities {
            kept.insert(change.entity_id.as_str());
            next.apply(Arc::clone(change));
        }
        next.set_revision(revision);
        let deleted = current.iter().filter(|(id, _, _)| !kept.contains(id)).count();
        let what = format!("a snapshot at revision {revision}");
        if self.guard(deleted, current.len(), &what) || self.over_capacity(&next, &what) {
            return Err(Stop::Held);
        }
        let mut tx = self.inner.db.begin_write().await?;
        let stored: i64 = sqlx::query_scalar("SELECT revision FROM cache_state WHERE cache = $1")
            .bind(name)
            .fetch_one(&mut *tx)
            .await?;
        if stored > revision && !reset {
            // The database is further on already; this memory follows its own stream.
            tx.rollback().await?;
        } else {
            sqlx::query("DELETE FROM cache_entities WHERE cache = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?;
            for change in &entities {
                upsert_or_delete(&mut tx, name, change).await?;
            }
            sqlx::query("UPDATE cache_state SET revision = $2 WHERE cache = $1")
                .bind(name)
                .bind(revision)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        self.publish(next);
        tracing::info!(cache = name, revision, entities = entities.len(), "snapshot applied");
        Ok(())
    }

    /// Applies live changes and moves the cursor, in one transaction, then
    /// shows them all at once.
    pub(crate) async fn apply_batch(&self, batch: &[Arc<Change<T>>]) -> Result<(), Stop> {
        let Some(last) = batch.last() else { return Ok(()) };
        let name = self.inner.name;
        let current = self.snapshot();
        let mut next = (*current).clone();
        batch.iter().for_each(|change| next.apply(Arc::clone(change)));
        let what = format!("a batch of changes up to revision {}", last.revision);
        let deletions = batch.iter().filter(|c| c.entity.is_none()).count();
        if (deletions > 1 && self.guard(deletions, current.len(), &what)) || self.over_capacity(&next, &what) {
            return Err(Stop::Held);
        }
        let mut tx = self.inner.db.begin_write().await?;
        for change in batch {
            upsert_or_delete(&mut tx, name, change).await?;
        }
        set_cursor(&mut tx, name, last.revision).await?;
        tx.commit().await?;
        self.publish(next);
        Ok(())
    }

    /// A progress frame: nothing else up to `revision`; the cursor moves.
    pub(crate) async fn advance_to(&self, revision: i64) -> Result<(), Stop> {
        let current = self.snapshot();
        if revision <= current.revision() {
            return Ok(());
        }
        let mut conn = self.inner.db.pool().acquire().await?;
        set_cursor(&mut conn, self.inner.name, revision).await?;
        let mut next = (*current).clone();
        next.set_revision(revision);
        self.publish(next);
        Ok(())
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
