//! The photo jobs in the database (tables `photo_jobs`, `photo_job_errors`,
//! `photo_uploads`; migration 3002): the statements of the job's life.
//!
//! - **Outbox**: [`enqueue`] runs on the connection of the transaction that
//!   writes the photo, so the photo and its job commit together or not at
//!   all; the image waits in `photo_uploads` until the job is done.
//! - **Claim**: [`claim`] takes the oldest due `queued` job and starts its
//!   next attempt in one statement: on PostgreSQL the row is picked `FOR
//!   UPDATE SKIP LOCKED` (concurrent claimers, on any replica, take
//!   different jobs and never wait on each other); on SQLite the statement
//!   holds the database's write lock, which serialises claimers the same way.
//! - **Lease**: a claim holds the job until `lease_until_ms` (the
//!   database's clock, as `lease.rs` does: replicas' clocks never compare);
//!   the worker [`renew`]s it; [`expired`] lists the lapsed ones for rescue.
//! - **Fencing**: every write of a worker names its attempt and applies only
//!   while the job is `running` at that attempt: a stale worker
//!   (paused, partitioned, its job rescued and claimed again) writes
//!   nothing.
//!
//! All times are milliseconds since the Unix epoch by the database's clock.

use lightbox_changefeed::{Backend, Db};
use sqlx::{AnyConnection, Row};

use crate::job_rows::{JobRow, job_row};

/// Waiting for a worker (from `run_after_ms`).
pub(crate) const QUEUED: &str = "queued";
/// Leased by a worker.
pub(crate) const RUNNING: &str = "running";
/// Done: the photo's processing is `DONE`.
pub(crate) const DONE: &str = "done";
/// The dead letter.
pub(crate) const DISCARDED: &str = "discarded";

macro_rules! postgres_now_ms {
    () => {
        "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT"
    };
}
macro_rules! sqlite_now_ms {
    () => {
        "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
    };
}
/// One statement for each backend, with the database's clock in place of
/// every `now` (given as separate pieces: `concat!` takes literals only,
/// and statements stay `&'static str`).
macro_rules! per_backend {
    ($backend:expr, $($piece:tt),+ $(,)?) => {
        match $backend {
            Backend::Postgres => concat!($(per_backend!(@postgres $piece)),+),
            Backend::Sqlite => concat!($(per_backend!(@sqlite $piece)),+),
        }
    };
    (@postgres now) => { postgres_now_ms!() };
    (@postgres $text:literal) => { $text };
    (@sqlite now) => { sqlite_now_ms!() };
    (@sqlite $text:literal) => { $text };
}

/// A job as an attempt holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The photo.
    pub photo_id: String,
    /// Its owner.
    pub user_id: String,
    /// This attempt's number: the fencing token.
    pub attempt: i64,
    /// The last attempt allowed.
    pub max_attempt: i64,
}

/// Records the job of a new photo, due at once, with its image, on the
/// connection of the transaction writing the photo (the outbox).
pub(crate) async fn enqueue(
    conn: &mut AnyConnection,
    backend: Backend,
    claim: &Claim,
    image: &[u8],
) -> Result<(), sqlx::Error> {
    let insert = per_backend!(
        backend,
        "INSERT INTO photo_jobs (photo_id, user_id, state, attempt, max_attempt, run_after_ms, create_time_ms, \
         update_time_ms) VALUES ($1, $2, 'queued', 0, $3, ",
        now,
        ", ",
        now,
        ", ",
        now,
        ")"
    );
    sqlx::query(insert)
        .bind(claim.photo_id.as_str())
        .bind(claim.user_id.as_str())
        .bind(claim.max_attempt)
        .execute(&mut *conn)
        .await?;
    sqlx::query("INSERT INTO photo_uploads (photo_id, data) VALUES ($1, $2)")
        .bind(claim.photo_id.as_str())
        .bind(image.to_vec())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Claims the oldest due queued job for `worker`, for `lease_ms`: its next
/// attempt starts now. `None` when nothing is due.
pub(crate) async fn claim(db: &Db, worker: &str, lease_ms: i64) -> Result<Option<Claim>, sqlx::Error> {
    let sql = match db.backend() {
        Backend::Postgres => concat!(
            "UPDATE photo_jobs SET state = 'running', attempt = attempt + 1, worker = $1, lease_until_ms = ",
            postgres_now_ms!(),
            " + $2, update_time_ms = ",
            postgres_now_ms!(),
            " WHERE photo_id = (SELECT photo_id FROM photo_jobs WHERE state = 'queued' AND run_after_ms <= ",
            postgres_now_ms!(),
            " ORDER BY run_after_ms, photo_id LIMIT 1 FOR UPDATE SKIP LOCKED) AND state = 'queued' \
             RETURNING photo_id, user_id, attempt, max_attempt"
        ),
        Backend::Sqlite => concat!(
            "UPDATE photo_jobs SET state = 'running', attempt = attempt + 1, worker = $1, lease_until_ms = ",
            sqlite_now_ms!(),
            " + $2, update_time_ms = ",
            sqlite_now_ms!(),
            " WHERE photo_id = (SELECT photo_id FROM photo_jobs WHERE state = 'queued' AND run_after_ms <= ",
            sqlite_now_ms!(),
            " ORDER BY run_after_ms, photo_id LIMIT 1) AND state = 'queued' \
             RETURNING photo_id, user_id, attempt, max_attempt"
        ),
    };
    let row = sqlx::query(sql)
        .bind(worker)
        .bind(lease_ms)
        .fetch_optional(db.pool())
        .await?;
    row.map(|row| {
        Ok(Claim {
            photo_id: row.try_get(0)?,
            user_id: row.try_get(1)?,
            attempt: row.try_get(2)?,
            max_attempt: row.try_get(3)?,
        })
    })
    .transpose()
}

/// The image of a job (`None` once the job is done, or the photo gone).
pub(crate) async fn upload(db: &Db, photo_id: &str) -> Result<Option<Vec<u8>>, sqlx::Error> {
    sqlx::query_scalar("SELECT data FROM photo_uploads WHERE photo_id = $1")
        .bind(photo_id)
        .fetch_optional(db.pool())
        .await
}

/// Extends the lease of `claim` by `lease_ms` from now; false when the
/// attempt no longer holds the job (rescued, discarded, or the photo gone).
pub(crate) async fn renew(db: &Db, claim: &Claim, lease_ms: i64) -> Result<bool, sqlx::Error> {
    let sql = per_backend!(
        db.backend(),
        "UPDATE photo_jobs SET lease_until_ms = ",
        now,
        " + $3 WHERE photo_id = $1 AND attempt = $2 AND state = 'running'"
    );
    let done = sqlx::query(sql)
        .bind(claim.photo_id.as_str())
        .bind(claim.attempt)
        .bind(lease_ms)
        .execute(db.pool())
        .await?;
    Ok(done.rows_affected() == 1)
}

/// The running attempts whose lease has lapsed (their worker died or
/// stalled), at most `limit`.
pub(crate) async fn expired(db: &Db, limit: i64) -> Result<Vec<Claim>, sqlx::Error> {
    let sql = per_backend!(
        db.backend(),
        "SELECT photo_id, user_id, attempt, max_attempt FROM photo_jobs WHERE state = 'running' AND lease_until_ms < ",
        now,
        " ORDER BY lease_until_ms LIMIT $1"
    );
    let rows = sqlx::query(sql).bind(limit).fetch_all(db.pool()).await?;
    rows.iter()
        .map(|row| {
            Ok(Claim {
                photo_id: row.try_get(0)?,
                user_id: row.try_get(1)?,
                attempt: row.try_get(2)?,
                max_attempt: row.try_get(3)?,
            })
        })
        .collect()
}

/// Ends `claim`'s attempt in `state` (fenced; for `queued`, due `delay_ms`
/// from now), on the connection of the transaction that records its
/// outcome; with `lapsed`, only if its lease has lapsed (a rescue must not
/// take a job back from a worker that renewed it meanwhile). False when
/// nothing was written.
pub(crate) async fn end_attempt(
    conn: &mut AnyConnection,
    backend: Backend,
    claim: &Claim,
    state: &str,
    delay_ms: i64,
    lapsed: bool,
) -> Result<bool, sqlx::Error> {
    let sql = match lapsed {
        false => per_backend!(
            backend,
            "UPDATE photo_jobs SET state = $3, lease_until_ms = 0, run_after_ms = ",
            now,
            " + $4, update_time_ms = ",
            now,
            " WHERE photo_id = $1 AND attempt = $2 AND state = 'running'"
        ),
        true => per_backend!(
            backend,
            "UPDATE photo_jobs SET state = $3, lease_until_ms = 0, run_after_ms = ",
            now,
            " + $4, update_time_ms = ",
            now,
            " WHERE photo_id = $1 AND attempt = $2 AND state = 'running' AND lease_until_ms < ",
            now
        ),
    };
    let done = sqlx::query(sql)
        .bind(claim.photo_id.as_str())
        .bind(claim.attempt)
        .bind(state)
        .bind(delay_ms)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Records the error of an attempt.
pub(crate) async fn record_error(
    conn: &mut AnyConnection,
    backend: Backend,
    photo_id: &str,
    attempt: i64,
    message: &str,
    permanent: bool,
) -> Result<(), sqlx::Error> {
    let sql = per_backend!(
        backend,
        "INSERT INTO photo_job_errors (photo_id, attempt, time_ms, message, permanent) VALUES ($1, $2, ",
        now,
        ", $3, $4)"
    );
    sqlx::query(sql)
        .bind(photo_id)
        .bind(attempt)
        .bind(message)
        .bind(i64::from(permanent))
        .execute(conn)
        .await?;
    Ok(())
}

/// Moves a job from one of `from` to `to` outside any attempt (an
/// operator's retry or discard), due now; for a retry, `allowance` more
/// attempts. Its row after the change, or `None` if it was in none of `from`.
pub(crate) async fn set_state(
    conn: &mut AnyConnection,
    backend: Backend,
    photo_id: &str,
    from: &[&str],
    to: &str,
    allowance: i64,
) -> Result<Option<JobRow>, sqlx::Error> {
    let sql = per_backend!(
        backend,
        "UPDATE photo_jobs SET state = $2, worker = CASE WHEN $2 = 'queued' THEN '' ELSE worker END, \
         lease_until_ms = 0, max_attempt = CASE WHEN $2 = 'queued' THEN attempt + $3 ELSE max_attempt END, \
         run_after_ms = ",
        now,
        ", update_time_ms = ",
        now,
        " WHERE photo_id = $1 AND state IN ($4, $5) RETURNING ",
        "photo_id, user_id, state, attempt, max_attempt, run_after_ms, lease_until_ms, worker, create_time_ms, \
         update_time_ms"
    );
    let (first, second) = (from.first().copied().unwrap_or(""), from.get(1).copied().unwrap_or(""));
    let row = sqlx::query(sql)
        .bind(photo_id)
        .bind(to)
        .bind(allowance)
        .bind(first)
        .bind(second)
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(job_row).transpose()
}

/// Forgets everything about a photo's processing (the photo is deleted),
/// on the connection of the transaction deleting it.
pub(crate) async fn forget(conn: &mut AnyConnection, photo_id: &str) -> Result<(), sqlx::Error> {
    for sql in [
        "DELETE FROM photo_jobs WHERE photo_id = $1",
        "DELETE FROM photo_job_errors WHERE photo_id = $1",
        "DELETE FROM photo_uploads WHERE photo_id = $1",
        "DELETE FROM photo_thumbnails WHERE photo_id = $1",
    ] {
        sqlx::query(sql).bind(photo_id).execute(&mut *conn).await?;
    }
    Ok(())
}
