//! Retention: how much history a feed keeps ([`Retention`]), the periodic
//! trim under a lease, and the compaction itself.

use std::time::Duration;

use sqlx::Row;

use crate::{
    db::Db,
    error::FeedError,
    lease::{Lease, Term},
};

/// How much history a feed keeps. Counted in revisions: the changelog keeps
/// the last `keep_changes` changes; tombstones of deleted entities are kept
/// for the last `keep_tombstones` revisions, which must be at least as many.
///
/// Replicas of a service on one database trim once between them: the
/// periodic retention runs on the replica holding the lease
/// `retention:<feed>` ([`crate::lease`]), each compaction fenced by its
/// term. A compaction is correct even if two run at once anyway (a paused
/// holder waking up, a manual [`crate::Feed::compact`]): see `compact`.
#[derive(Debug, Clone)]
pub struct Retention {
    /// Changes kept in the changelog.
    pub keep_changes: i64,
    /// Revisions for which deletions are remembered (tombstones).
    pub keep_tombstones: i64,
    /// How often the feed trims; `None`: only when [`crate::Feed::compact`] is called.
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

/// The periodic retention of a feed: every `every`, on the one replica that
/// holds the feed's retention lease (taken or renewed each time, for three
/// intervals: a replica that dies hands it over after at most that), a
/// compaction fenced by the lease's term.
pub(crate) async fn retain(db: Db, name: &'static str, retention: Retention, every: Duration) {
    let lease = crate::lease::retention_lease(name);
    let holder = crate::lease::holder_id();
    let ttl = every.saturating_mul(3);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if db.is_closed() {
            return;
        }
        let term = match Lease::try_acquire(&db, &lease, &holder, ttl).await {
            Ok(Some(term)) => term,
            // Another replica holds it.
            Ok(None) => continue,
            Err(err) => {
                tracing::warn!(feed = name, %err, "changefeed retention cannot take its lease; will retry");
                continue;
            }
        };
        match compact(&db, name, &retention, Some(term)).await {
            Ok(true) => {}
            Ok(false) => tracing::info!(
                feed = name,
                %term,
                "changefeed retention skipped: its lease changed hands meanwhile"
            ),
            Err(err) => tracing::warn!(feed = name, %err, "changefeed retention failed; will retry"),
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
pub(crate) async fn compact(
    db: &Db,
    name: &str,
    retention: &Retention,
    fence: Option<Term>,
) -> Result<bool, FeedError> {
    let mut tx = db.begin_write().await?;
    // First the fence (so a stale holder never waits on the writers' lock):
    // on PostgreSQL it locks the lease's row to commit, so the lease cannot
    // change hands while this compaction is under way.
    if let Some(term) = fence
        && !Lease::fence(&mut tx, &crate::lease::retention_lease(name), term).await?
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
    .bind(name)
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
        .bind(name)
        .bind(compact_to)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM feed_entities WHERE feed = $1 AND deleted = 1 AND revision <= $2")
        .bind(name)
        .bind(tombstones_to)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE feed_state SET compacted_revision = $2, tombstone_revision = $3 WHERE feed = $1")
        .bind(name)
        .bind(compact_to)
        .bind(tombstones_to)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::debug!(feed = name, compact_to, tombstones_to, "changefeed compacted");
    Ok(true)
}
