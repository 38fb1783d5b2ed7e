//! The changelog's reads, shared by the feed's handles, its tail and its
//! watch streams: the state row, changes and consolidated deltas after a
//! revision, the catch-up answer, and the state at one revision. Each
//! takes the database and the feed's name, nothing of the feed itself, so
//! that the tail ([`crate::hub`]) and the feed depend on it and not on each
//! other.

use std::sync::Arc;

use sqlx::{AnyConnection, Row, any::AnyRow};

use crate::{
    change::{Change, Entity},
    db::Db,
    error::FeedError,
};

/// The PostgreSQL notification channel writers signal on commit, so that
/// every replica's tail wakes at once instead of waiting for its poll.
pub(crate) const NOTIFY_CHANNEL: &str = "lightbox_changefeed";

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

pub(crate) async fn get_entity<T: Entity>(
    conn: &mut AnyConnection,
    feed: &str,
    id: &str,
) -> Result<Option<T>, FeedError> {
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
    Ok(Change::new(revision, entity_id, scope, entity))
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
    db: &Db,
    feed: &str,
    cursor: i64,
    limit: i64,
    scope: Option<&str>,
) -> Result<CatchUp<T>, FeedError> {
    let mut tx = db.begin_snapshot().await?;
    let state = read_state(&mut tx, feed).await?;
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
            changes: changes_since(&mut tx, feed, cursor, limit, scope).await?,
            head: state.revision,
        }
    } else {
        CatchUp::Page {
            changes: entities_since(&mut tx, feed, cursor, limit, scope).await?,
            head: state.revision,
        }
    };
    tx.commit().await?;
    Ok(result)
}
