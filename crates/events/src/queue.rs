//! The delivery queue and the dead letters (tables `event_queue`,
//! `event_dead_letters`).
//!
//! The reader of a feed inserts the events it read and moves its cursor in
//! one transaction ([`enqueue`]), fenced by the delivery lease's term and
//! the subscription's generation: after a crash nothing read is lost, and
//! nothing is queued twice (the key is the change's revision). Deliveries
//! take the *head* of each entity, the queued event with no older one of
//! the same entity ([`due`]): per-entity order, while other entities go on.
//! An entity whose head fails waits alone for its retry.

use lightbox_changefeed::{Db, Lease, Term};
use serde::{Deserialize, Serialize};
use sqlx::{Row, any::AnyRow};

use crate::{EventsError, source::EntityKind, source::Occurrence, store};

/// The lease under which one replica delivers for every subscription.
pub const DELIVERY_LEASE: &str = "events:delivery";

/// One failed attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// Its number, from 1.
    pub attempt: u32,
    /// When, ms since the Unix epoch.
    pub time_ms: i64,
    /// The HTTP status, 0 when there was none.
    pub status: u16,
    /// What went wrong.
    pub error: String,
}

/// A queued (or dead) event.
#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    /// The rendered change.
    pub event: Occurrence,
    /// Attempts made so far.
    pub attempts: u32,
    /// Their errors, oldest first.
    pub errors: Vec<Attempt>,
    /// For a dead letter: when it was given up on.
    pub dead_time_ms: i64,
}

/// The key of a queued event.
pub type Key = (EntityKind, i64);

const QUEUED: &str = "feed, revision, entity_id, event_type, event_time_ms, data, attempts, errors";

fn decode(row: &AnyRow, dead: bool) -> Result<Queued, EventsError> {
    let feed: String = row.try_get(0)?;
    let kind = EntityKind::from_feed(&feed).ok_or_else(|| EventsError::Corrupt(format!("feed {feed:?}")))?;
    let errors: String = row.try_get(7)?;
    let attempts: i64 = row.try_get(6)?;
    Ok(Queued {
        event: Occurrence {
            kind,
            revision: row.try_get(1)?,
            entity_id: row.try_get(2)?,
            event_type: row.try_get(3)?,
            time_ms: row.try_get(4)?,
            data: row.try_get(5)?,
        },
        attempts: u32::try_from(attempts).unwrap_or(0),
        errors: serde_json::from_str(&errors).map_err(|e| EventsError::Corrupt(format!("attempt errors: {e}")))?,
        dead_time_ms: if dead { row.try_get(8)? } else { 0 },
    })
}

/// What stopped a reader's write.
#[derive(Debug)]
pub enum Fenced {
    /// The lease changed hands, or the subscription changed (or is gone).
    Stale,
    /// The database failed.
    Failed(EventsError),
}

impl<E: Into<EventsError>> From<E> for Fenced {
    fn from(err: E) -> Fenced {
        Fenced::Failed(err.into())
    }
}

/// Queues `events` of `kind` for `sub` and, if given, moves the feed's
/// cursor to `cursor`, in one transaction under the lease at `term` and the
/// subscription at `generation`. Returns how many were new.
pub async fn enqueue(
    db: &Db,
    (sub, generation, term): (&str, i64, Term),
    kind: EntityKind,
    events: &[Occurrence],
    cursor: Option<i64>,
    now_ms: i64,
) -> Result<u64, Fenced> {
    let mut tx = db.begin_write().await?;
    // Lock: the subscription's row, then the lease's (PostgreSQL: held to
    // commit), so neither a replay nor a takeover interleaves this batch.
    if !store::lock(&mut tx, sub, generation).await? || !Lease::fence(&mut tx, DELIVERY_LEASE, term).await? {
        tx.rollback().await?;
        return Err(Fenced::Stale);
    }
    let mut inserted = 0;
    for event in events {
        let done = sqlx::query(
            "INSERT INTO event_queue (subscription, feed, revision, entity_id, event_type, event_time_ms, data, \
             attempts, next_attempt_ms, errors) VALUES ($1, $2, $3, $4, $5, $6, $7, 0, $8, '[]') \
             ON CONFLICT (subscription, feed, revision) DO NOTHING",
        )
        .bind(sub)
        .bind(kind.feed())
        .bind(event.revision)
        .bind(event.entity_id.as_str())
        .bind(event.event_type.as_str())
        .bind(event.time_ms)
        .bind(event.data.as_str())
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        inserted += done.rows_affected();
    }
    if let Some(cursor) = cursor {
        store::set_cursor(&mut tx, sub, kind, cursor).await?;
    }
    tx.commit().await?;
    Ok(inserted)
}

/// Up to `limit` events of `sub` due at `now_ms`, each the head of its
/// entity, oldest first.
pub async fn due(db: &Db, sub: &str, now_ms: i64, limit: i64) -> Result<Vec<Queued>, EventsError> {
    let rows = sqlx::query(
        "SELECT q.feed, q.revision, q.entity_id, q.event_type, q.event_time_ms, q.data, q.attempts, q.errors \
         FROM event_queue q WHERE q.subscription = $1 AND q.next_attempt_ms <= $2 \
         AND NOT EXISTS (SELECT 1 FROM event_queue o WHERE o.subscription = q.subscription \
         AND o.feed = q.feed AND o.entity_id = q.entity_id AND o.revision < q.revision) \
         ORDER BY q.revision LIMIT $3",
    )
    .bind(sub)
    .bind(now_ms)
    .bind(limit)
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(|row| decode(row, false)).collect()
}

/// When the next head of `sub` waiting for a retry is due (after `now_ms`).
pub async fn next_due(db: &Db, sub: &str, now_ms: i64) -> Result<Option<i64>, EventsError> {
    Ok(sqlx::query_scalar(
        "SELECT MIN(q.next_attempt_ms) FROM event_queue q WHERE q.subscription = $1 AND q.next_attempt_ms > $2 \
         AND NOT EXISTS (SELECT 1 FROM event_queue o WHERE o.subscription = q.subscription \
         AND o.feed = q.feed AND o.entity_id = q.entity_id AND o.revision < q.revision)",
    )
    .bind(sub)
    .bind(now_ms)
    .fetch_one(db.pool())
    .await?)
}

/// Events queued for `sub`.
pub async fn count(db: &Db, sub: &str) -> Result<i64, EventsError> {
    Ok(
        sqlx::query_scalar("SELECT COUNT(*) FROM event_queue WHERE subscription = $1")
            .bind(sub)
            .fetch_one(db.pool())
            .await?,
    )
}

/// Drops a delivered event.
pub async fn delivered(db: &Db, sub: &str, (kind, revision): Key) -> Result<(), EventsError> {
    sqlx::query("DELETE FROM event_queue WHERE subscription = $1 AND feed = $2 AND revision = $3")
        .bind(sub)
        .bind(kind.feed())
        .bind(revision)
        .execute(db.pool())
        .await?;
    Ok(())
}

fn errors_json(errors: &[Attempt]) -> Result<String, EventsError> {
    serde_json::to_string(errors).map_err(|e| EventsError::Corrupt(format!("attempt errors: {e}")))
}

/// Records a failed attempt; the event is due again at `next_ms`.
pub async fn retry(
    db: &Db,
    sub: &str,
    (kind, revision): Key,
    errors: &[Attempt],
    next_ms: i64,
) -> Result<(), EventsError> {
    sqlx::query(
        "UPDATE event_queue SET attempts = $4, next_attempt_ms = $5, errors = $6 \
         WHERE subscription = $1 AND feed = $2 AND revision = $3",
    )
    .bind(sub)
    .bind(kind.feed())
    .bind(revision)
    .bind(i64::try_from(errors.len()).unwrap_or(i64::MAX))
    .bind(next_ms)
    .bind(errors_json(errors)?)
    .execute(db.pool())
    .await?;
    Ok(())
}

/// Moves an event to the dead letters with its attempts' errors, in one
/// transaction (copied from its queue row: an event whose subscription was
/// deleted meanwhile leaves nothing behind).
pub async fn dead(
    db: &Db,
    sub: &str,
    (kind, revision): Key,
    errors: &[Attempt],
    now_ms: i64,
) -> Result<(), EventsError> {
    let mut tx = db.begin_write().await?;
    sqlx::query(
        "INSERT INTO event_dead_letters (subscription, feed, revision, entity_id, event_type, event_time_ms, data, \
         attempts, errors, dead_time_ms) SELECT subscription, feed, revision, entity_id, event_type, event_time_ms, \
         data, $4, $5, $6 FROM event_queue WHERE subscription = $1 AND feed = $2 AND revision = $3 \
         ON CONFLICT (subscription, feed, revision) DO UPDATE SET attempts = excluded.attempts, \
         errors = excluded.errors, dead_time_ms = excluded.dead_time_ms",
    )
    .bind(sub)
    .bind(kind.feed())
    .bind(revision)
    .bind(i64::try_from(errors.len()).unwrap_or(i64::MAX))
    .bind(errors_json(errors)?)
    .bind(now_ms)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM event_queue WHERE subscription = $1 AND feed = $2 AND revision = $3")
        .bind(sub)
        .bind(kind.feed())
        .bind(revision)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Dead letters of `sub` after `after` (feed, revision), at most `limit`.
pub async fn dead_letters(db: &Db, sub: &str, after: (&str, i64), limit: i64) -> Result<Vec<Queued>, EventsError> {
    let rows = sqlx::query(
        "SELECT feed, revision, entity_id, event_type, event_time_ms, data, attempts, errors, dead_time_ms \
         FROM event_dead_letters WHERE subscription = $1 AND (feed > $2 OR (feed = $2 AND revision > $3)) \
         ORDER BY feed, revision LIMIT $4",
    )
    .bind(sub)
    .bind(after.0)
    .bind(after.1)
    .bind(limit)
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(|row| decode(row, true)).collect()
}

/// Moves dead letters of `sub` back to the queue, attempts reset: those in
/// `keys`, or all of them when `keys` is `None`. Returns how many.
pub async fn redeliver(db: &Db, sub: &str, keys: Option<&[Key]>, now_ms: i64) -> Result<u64, EventsError> {
    let mut tx = db.begin_write().await?;
    let copy = format!(
        "INSERT INTO event_queue (subscription, {QUEUED}, next_attempt_ms) \
         SELECT subscription, feed, revision, entity_id, event_type, event_time_ms, data, 0, '[]', $2 \
         FROM event_dead_letters WHERE subscription = $1{} ON CONFLICT (subscription, feed, revision) DO NOTHING",
        if keys.is_some() {
            " AND feed = $3 AND revision = $4"
        } else {
            ""
        }
    );
    let remove = format!(
        "DELETE FROM event_dead_letters WHERE subscription = $1{}",
        if keys.is_some() {
            " AND feed = $2 AND revision = $3"
        } else {
            ""
        }
    );
    let mut moved = 0;
    match keys {
        None => {
            moved += sqlx::query(sqlx::AssertSqlSafe(copy))
                .bind(sub)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query(sqlx::AssertSqlSafe(remove))
                .bind(sub)
                .execute(&mut *tx)
                .await?;
        }
        Some(keys) => {
            for (kind, revision) in keys {
                moved += sqlx::query(sqlx::AssertSqlSafe(copy.clone()))
                    .bind(sub)
                    .bind(now_ms)
                    .bind(kind.feed())
                    .bind(*revision)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                sqlx::query(sqlx::AssertSqlSafe(remove.clone()))
                    .bind(sub)
                    .bind(kind.feed())
                    .bind(*revision)
                    .execute(&mut *tx)
                    .await?;
            }
        }
    }
    tx.commit().await?;
    Ok(moved)
}
