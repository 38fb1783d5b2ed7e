//! Subscriptions and their cursors in the database (tables
//! `event_subscriptions`, `event_cursors`; see the migrations).
//!
//! Every change an operator makes (pause, resume, replay, secrets) raises
//! the subscription's `generation` in the same transaction. The delivery
//! task of a subscription was started at one generation, and every batch it
//! reads into the queue first locks the subscription's row at that
//! generation ([`lock`]): after a replay has moved a cursor, a task still
//! running on the old generation can no longer write its own cursor over
//! the replayed one; it stops, and the next one starts from the new cursor.

use std::time::Duration;

use lightbox_changefeed::Db;
use sqlx::{AnyConnection, Row, any::AnyRow};

use crate::{
    EventsError,
    cloudevent::Mode,
    signing::Secret,
    source::{EntityKind, millis},
};

/// A subscription: which changes go where, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    /// Its id (`subscriptions/{id}`).
    pub id: String,
    /// The `http://` endpoint.
    pub endpoint: String,
    /// The entity types delivered.
    pub kinds: Vec<EntityKind>,
    /// If not empty, only these entities.
    pub ids: Vec<String>,
    /// The content mode.
    pub mode: Mode,
    /// The signing secrets, newest first (two during a rotation).
    pub secrets: Vec<Secret>,
    /// Paused: neither reading nor delivering.
    pub paused: bool,
    /// Deliveries per second (0: no limit).
    pub rate_limit: f64,
    /// Attempts per event before the dead letters.
    pub max_attempts: u32,
    /// How long one delivery may take.
    pub timeout: Duration,
    /// Raised by every change (see the module docs).
    pub generation: i64,
    /// When it was created, ms since the Unix epoch.
    pub create_time_ms: i64,
    /// When it was last changed.
    pub update_time_ms: i64,
}

/// Where a subscription stands in one feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CursorState {
    /// The feed's kind.
    pub kind: EntityKind,
    /// Every change up to here is queued (or filtered out); -1: from now,
    /// not connected yet.
    pub read_revision: i64,
    /// Every change up to here is delivered or dead-lettered.
    pub delivered_revision: i64,
}

const COLUMNS: &str = "id, endpoint, entity_types, entity_ids, content_mode, secrets, state, rate_limit, \
                       max_attempts, timeout_ms, generation, create_time_ms, update_time_ms";

fn mode_code(mode: Mode) -> i64 {
    match mode {
        Mode::Binary => 1,
        Mode::Structured => 2,
    }
}

fn decode(row: &AnyRow) -> Result<Subscription, EventsError> {
    let kinds: String = row.try_get(2)?;
    let ids: String = row.try_get(3)?;
    let secrets: String = row.try_get(5)?;
    let timeout_ms: i64 = row.try_get(9)?;
    let max_attempts: i64 = row.try_get(8)?;
    Ok(Subscription {
        id: row.try_get(0)?,
        endpoint: row.try_get(1)?,
        kinds: kinds.split(',').filter_map(EntityKind::from_name).collect(),
        ids: ids.split(',').filter(|id| !id.is_empty()).map(str::to_owned).collect(),
        mode: if row.try_get::<i64, _>(4)? == 2 {
            Mode::Structured
        } else {
            Mode::Binary
        },
        secrets: secrets
            .lines()
            .map(Secret::parse)
            .collect::<Result<_, _>>()
            .map_err(|e| EventsError::Corrupt(format!("a stored secret: {e}")))?,
        paused: row.try_get::<i64, _>(6)? == 2,
        rate_limit: row.try_get(7)?,
        max_attempts: u32::try_from(max_attempts).unwrap_or(1),
        timeout: Duration::from_millis(u64::try_from(timeout_ms).unwrap_or(0)),
        generation: row.try_get(10)?,
        create_time_ms: row.try_get(11)?,
        update_time_ms: row.try_get(12)?,
    })
}

fn now_ms() -> i64 {
    millis(std::time::SystemTime::now())
}

/// Stores a new subscription and its cursors at `start_revision` (-1: from
/// now); `false` if the id is taken.
pub async fn insert(db: &Db, sub: &Subscription, start_revision: i64) -> Result<bool, EventsError> {
    let mut tx = db.begin_write().await?;
    let kinds: Vec<&str> = sub.kinds.iter().map(|k| k.name()).collect();
    let secrets: Vec<&str> = sub.secrets.iter().map(Secret::expose).collect();
    let done = sqlx::query(
        "INSERT INTO event_subscriptions (id, endpoint, entity_types, entity_ids, content_mode, secrets, state, \
         rate_limit, max_attempts, timeout_ms, generation, create_time_ms, update_time_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 1, $11, $11) ON CONFLICT (id) DO NOTHING",
    )
    .bind(sub.id.as_str())
    .bind(sub.endpoint.as_str())
    .bind(kinds.join(","))
    .bind(sub.ids.join(","))
    .bind(mode_code(sub.mode))
    .bind(secrets.join("\n"))
    .bind(if sub.paused { 2i64 } else { 1 })
    .bind(sub.rate_limit)
    .bind(i64::from(sub.max_attempts))
    .bind(i64::try_from(sub.timeout.as_millis()).unwrap_or(i64::MAX))
    .bind(sub.create_time_ms)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 0 {
        tx.rollback().await?;
        return Ok(false);
    }
    for kind in &sub.kinds {
        sqlx::query("INSERT INTO event_cursors (subscription, feed, revision) VALUES ($1, $2, $3)")
            .bind(sub.id.as_str())
            .bind(kind.feed())
            .bind(start_revision)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// One subscription.
pub async fn get(db: &Db, id: &str) -> Result<Option<Subscription>, EventsError> {
    let sql = sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM event_subscriptions WHERE id = $1"));
    let row = sqlx::query(sql).bind(id).fetch_optional(db.pool()).await?;
    row.as_ref().map(decode).transpose()
}

/// Subscriptions after `after` in id order, at most `limit`.
pub async fn list(db: &Db, after: &str, limit: i64) -> Result<Vec<Subscription>, EventsError> {
    let sql = sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM event_subscriptions WHERE id > $1 ORDER BY id LIMIT $2"
    ));
    let rows = sqlx::query(sql).bind(after).bind(limit).fetch_all(db.pool()).await?;
    rows.iter().map(decode).collect()
}

/// Raises the generation of `id` on `conn`; whether the subscription exists.
async fn touch(conn: &mut AnyConnection, id: &str) -> Result<bool, EventsError> {
    let done =
        sqlx::query("UPDATE event_subscriptions SET generation = generation + 1, update_time_ms = $2 WHERE id = $1")
            .bind(id)
            .bind(now_ms())
            .execute(conn)
            .await?;
    Ok(done.rows_affected() == 1)
}

/// Pauses or resumes (raising the generation); `false` if there is no
/// such subscription.
pub async fn set_paused(db: &Db, id: &str, paused: bool) -> Result<bool, EventsError> {
    let done = sqlx::query(
        "UPDATE event_subscriptions SET generation = generation + 1, update_time_ms = $2, state = $3 WHERE id = $1",
    )
    .bind(id)
    .bind(now_ms())
    .bind(if paused { 2i64 } else { 1 })
    .execute(db.pool())
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Replaces the secrets (raising the generation); `false` if there is no
/// such subscription.
pub async fn set_secrets(db: &Db, id: &str, secrets: &[Secret]) -> Result<bool, EventsError> {
    let text: Vec<&str> = secrets.iter().map(Secret::expose).collect();
    let done = sqlx::query(
        "UPDATE event_subscriptions SET generation = generation + 1, update_time_ms = $2, secrets = $3 WHERE id = $1",
    )
    .bind(id)
    .bind(now_ms())
    .bind(text.join("\n"))
    .execute(db.pool())
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Moves the cursors of `kinds` to `since_revision`, in one transaction with
/// the generation (see the module docs); `false` if there is no such
/// subscription.
pub async fn replay(db: &Db, id: &str, kinds: &[EntityKind], since_revision: i64) -> Result<bool, EventsError> {
    let mut tx = db.begin_write().await?;
    if !touch(&mut tx, id).await? {
        tx.rollback().await?;
        return Ok(false);
    }
    for kind in kinds {
        set_cursor(&mut tx, id, *kind, since_revision).await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// Deletes a subscription with its cursors, queue and dead letters; whether
/// it existed.
pub async fn delete(db: &Db, id: &str) -> Result<bool, EventsError> {
    let mut tx = db.begin_write().await?;
    let done = sqlx::query("DELETE FROM event_subscriptions WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    for sql in [
        "DELETE FROM event_cursors WHERE subscription = $1",
        "DELETE FROM event_queue WHERE subscription = $1",
        "DELETE FROM event_dead_letters WHERE subscription = $1",
    ] {
        sqlx::query(sql).bind(id).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(done.rows_affected() == 1)
}

/// The fence of a delivery task: locks the subscription's row, if it is
/// still at `generation` (see the module docs). Call first in a write
/// transaction.
pub async fn lock(conn: &mut AnyConnection, id: &str, generation: i64) -> Result<bool, EventsError> {
    let done = sqlx::query("UPDATE event_subscriptions SET generation = generation WHERE id = $1 AND generation = $2")
        .bind(id)
        .bind(generation)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// The read cursor of one feed (-1: from now, not connected yet).
pub async fn cursor(db: &Db, id: &str, kind: EntityKind) -> Result<Option<i64>, EventsError> {
    Ok(
        sqlx::query_scalar("SELECT revision FROM event_cursors WHERE subscription = $1 AND feed = $2")
            .bind(id)
            .bind(kind.feed())
            .fetch_optional(db.pool())
            .await?,
    )
}

/// Sets the read cursor of one feed.
pub async fn set_cursor(
    conn: &mut AnyConnection,
    id: &str,
    kind: EntityKind,
    revision: i64,
) -> Result<(), EventsError> {
    sqlx::query("UPDATE event_cursors SET revision = $3 WHERE subscription = $1 AND feed = $2")
        .bind(id)
        .bind(kind.feed())
        .bind(revision)
        .execute(conn)
        .await?;
    Ok(())
}

/// Where a subscription stands: its cursors, its queue and dead letters.
pub async fn progress(db: &Db, sub: &Subscription) -> Result<(Vec<CursorState>, i64, i64), EventsError> {
    let mut tx = db.begin_snapshot().await?;
    let mut cursors = Vec::with_capacity(sub.kinds.len());
    for kind in &sub.kinds {
        let read: Option<i64> =
            sqlx::query_scalar("SELECT revision FROM event_cursors WHERE subscription = $1 AND feed = $2")
                .bind(sub.id.as_str())
                .bind(kind.feed())
                .fetch_optional(&mut *tx)
                .await?;
        let oldest: Option<i64> =
            sqlx::query_scalar("SELECT MIN(revision) FROM event_queue WHERE subscription = $1 AND feed = $2")
                .bind(sub.id.as_str())
                .bind(kind.feed())
                .fetch_one(&mut *tx)
                .await?;
        let read = read.unwrap_or(-1);
        cursors.push(CursorState {
            kind: *kind,
            read_revision: read,
            delivered_revision: oldest.map_or(read, |oldest| (oldest - 1).min(read)),
        });
    }
    let count = |sql: &'static str| sqlx::query_scalar::<_, i64>(sql).bind(sub.id.as_str());
    let pending = count("SELECT COUNT(*) FROM event_queue WHERE subscription = $1")
        .fetch_one(&mut *tx)
        .await?;
    let dead = count("SELECT COUNT(*) FROM event_dead_letters WHERE subscription = $1")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok((cursors, pending, dead))
}
