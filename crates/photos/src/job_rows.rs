//! The photo jobs as operators read them (the admin service): one job, a
//! page of them, each with every failed attempt's error.

use lightbox_changefeed::Db;
use sqlx::{Row, any::AnyRow};

/// A job as stored (for the admin service).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JobRow {
    pub photo_id: String,
    pub user_id: String,
    pub state: String,
    pub attempt: i64,
    pub max_attempt: i64,
    pub run_after_ms: i64,
    pub lease_until_ms: i64,
    pub worker: String,
    pub create_time_ms: i64,
    pub update_time_ms: i64,
}

/// One failed attempt, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ErrorRow {
    pub photo_id: String,
    pub attempt: i64,
    pub time_ms: i64,
    pub message: String,
    pub permanent: bool,
}

const JOB_COLUMNS: &str = "photo_id, user_id, state, attempt, max_attempt, run_after_ms, lease_until_ms, worker, \
                           create_time_ms, update_time_ms";

pub(crate) fn job_row(row: &AnyRow) -> Result<JobRow, sqlx::Error> {
    Ok(JobRow {
        photo_id: row.try_get(0)?,
        user_id: row.try_get(1)?,
        state: row.try_get(2)?,
        attempt: row.try_get(3)?,
        max_attempt: row.try_get(4)?,
        run_after_ms: row.try_get(5)?,
        lease_until_ms: row.try_get(6)?,
        worker: row.try_get(7)?,
        create_time_ms: row.try_get(8)?,
        update_time_ms: row.try_get(9)?,
    })
}

/// One job, with its errors.
pub(crate) async fn get(db: &Db, photo_id: &str) -> Result<Option<(JobRow, Vec<ErrorRow>)>, sqlx::Error> {
    let sql = sqlx::AssertSqlSafe(format!("SELECT {JOB_COLUMNS} FROM photo_jobs WHERE photo_id = $1"));
    let Some(row) = sqlx::query(sql).bind(photo_id).fetch_optional(db.pool()).await? else {
        return Ok(None);
    };
    let job = job_row(&row)?;
    let errors = errors_between(db, photo_id, photo_id).await?;
    Ok(Some((job, errors)))
}

/// Up to `limit` jobs after `after` (photo id order), in `state` or any
/// (`""`), each with its errors.
pub(crate) async fn list(
    db: &Db,
    state: &str,
    after: &str,
    limit: i64,
) -> Result<Vec<(JobRow, Vec<ErrorRow>)>, sqlx::Error> {
    let sql = sqlx::AssertSqlSafe(format!(
        "SELECT {JOB_COLUMNS} FROM photo_jobs WHERE ($1 = '' OR state = $1) AND photo_id > $2 \
         ORDER BY photo_id LIMIT $3"
    ));
    let rows = sqlx::query(sql)
        .bind(state)
        .bind(after)
        .bind(limit)
        .fetch_all(db.pool())
        .await?;
    let jobs = rows.iter().map(job_row).collect::<Result<Vec<_>, _>>()?;
    let (Some(first), Some(last)) = (jobs.first(), jobs.last()) else {
        return Ok(Vec::new());
    };
    // The errors of the whole page in one query: those of its id range.
    let mut errors = errors_between(db, &first.photo_id, &last.photo_id).await?;
    Ok(jobs
        .into_iter()
        .map(|job| {
            let (mine, rest): (Vec<_>, Vec<_>) = errors.drain(..).partition(|e| e.photo_id == job.photo_id);
            errors = rest;
            (job, mine)
        })
        .collect())
}

async fn errors_between(db: &Db, first: &str, last: &str) -> Result<Vec<ErrorRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT photo_id, attempt, time_ms, message, permanent FROM photo_job_errors \
         WHERE photo_id >= $1 AND photo_id <= $2 ORDER BY photo_id, attempt, time_ms",
    )
    .bind(first)
    .bind(last)
    .fetch_all(db.pool())
    .await?;
    rows.iter()
        .map(|row| {
            Ok(ErrorRow {
                photo_id: row.try_get(0)?,
                attempt: row.try_get(1)?,
                time_ms: row.try_get(2)?,
                message: row.try_get(3)?,
                permanent: row.try_get::<i64, _>(4)? != 0,
            })
        })
        .collect()
}
