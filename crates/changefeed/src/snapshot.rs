//! A watch's snapshot: the state at one revision, read in pages.
//!
//! A snapshot is read in one read-only transaction (repeatable read on
//! PostgreSQL; a WAL read transaction on SQLite), so every page is of the
//! same revision, and it is handed to its stream a page at a time: a
//! snapshot holds at most three pages in memory (one being read, one
//! waiting, one being sent), never the whole state, however large the feed.
//!
//! Each snapshot holds a database connection while it streams, so a feed
//! reads at most [`crate::FeedOptions::max_snapshots`] at once; the next
//! waits for a turn, it is not refused. A stream that stops reading its
//! snapshot for [`crate::FeedOptions::snapshot_stall`] gives up its turn
//! and its transaction: its stream ends with `RESOURCE_EXHAUSTED`, to watch
//! again.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Semaphore, mpsc};

use crate::{
    change::{Change, Entity},
    db::Db,
    error::FeedError,
    log::{decode_row, read_state},
};

/// Entities per page.
pub(crate) const PAGE: usize = 512;

/// What a snapshot hands its stream, in this order: `Begin`, pages, `End`.
pub(crate) enum Part<T> {
    /// The snapshot is at `revision`.
    Begin { revision: i64 },
    /// The next entities, in id order.
    Page(Vec<Arc<Change<T>>>),
    /// Every entity was handed over.
    End,
}

/// Why a snapshot ended early.
pub(crate) enum Failed {
    /// The database failed.
    Storage(FeedError),
    /// The stream did not take the next page in time.
    Stalled(Duration),
}

/// What a snapshot reads: the feed, and the stream's filter.
pub(crate) struct Scan {
    pub db: Db,
    pub feed: &'static str,
    /// Only these entities (sorted), if set.
    pub ids: Option<Vec<String>>,
    /// Only this scope's entities, if set.
    pub scope: Option<String>,
}

/// The pages of one snapshot, read by their own task; dropping it ends the
/// task (after the page it is reading), which rolls its transaction back.
pub(crate) struct Pages<T> {
    parts: mpsc::Receiver<Result<Part<T>, Failed>>,
    stall: Duration,
}

impl<T: Entity> Pages<T> {
    /// Starts reading `scan` once one of `turns` is free, counted in
    /// `reading` meanwhile; a page not taken within `stall` ends it.
    pub(crate) fn start(scan: Scan, turns: Arc<Semaphore>, reading: Arc<AtomicI64>, stall: Duration) -> Pages<T> {
        // One page waits while the next is read: three in memory at most.
        let (sender, parts) = mpsc::channel(1);
        tokio::spawn(async move {
            // A stream gone while it waited needs no turn.
            let turn = tokio::select! {
                turn = turns.acquire_owned() => turn,
                () = sender.closed() => return,
            };
            let Ok(turn) = turn else {
                return; // the semaphore is never closed
            };
            reading.fetch_add(1, Ordering::Relaxed);
            let result = read(&scan, &sender, stall).await;
            // Done with the database: the next snapshot may start.
            reading.fetch_sub(1, Ordering::Relaxed);
            drop(turn);
            // A stream that stalled learns it when the channel closes
            // without an end; one that is reading is told how it ended.
            let last = match result {
                Ok(()) => Ok(Part::End),
                Err(Failed::Storage(err)) => Err(Failed::Storage(err)),
                Err(Failed::Stalled(_)) => return,
            };
            let _ = tokio::time::timeout(stall, sender.send(last)).await;
        });
        Pages { parts, stall }
    }

    /// The next part; a snapshot that ended without its `End` has stalled.
    pub(crate) async fn next(&mut self) -> Result<Part<T>, Failed> {
        match self.parts.recv().await {
            Some(part) => part,
            None => Err(Failed::Stalled(self.stall)),
        }
    }
}

/// Reads the snapshot into `sender`, a page at a time (all but its end).
async fn read<T: Entity>(
    scan: &Scan,
    sender: &mpsc::Sender<Result<Part<T>, Failed>>,
    stall: Duration,
) -> Result<(), Failed> {
    let send = |part: Part<T>| async move {
        match tokio::time::timeout(stall, sender.send(Ok(part))).await {
            Ok(Ok(())) => Ok(()),
            // The stream is gone: nobody to tell.
            Ok(Err(_)) => Err(Failed::Stalled(stall)),
            Err(_) => Err(Failed::Stalled(stall)),
        }
    };
    let storage = Failed::Storage;
    let mut tx = scan.db.begin_snapshot().await.map_err(|e| storage(e.into()))?;
    let state = read_state(&mut tx, scan.feed).await.map_err(storage)?;
    send(Part::Begin {
        revision: state.revision,
    })
    .await?;
    match &scan.ids {
        Some(ids) => {
            for chunk in ids.chunks(PAGE) {
                let mut page = Vec::with_capacity(chunk.len());
                for id in chunk {
                    let row = sqlx::query(
                        "SELECT entity_id, revision, payload, scope FROM feed_entities \
                         WHERE feed = $1 AND entity_id = $2 AND deleted = 0",
                    )
                    .bind(scan.feed)
                    .bind(id.as_str())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(|e| storage(e.into()))?;
                    if let Some(row) = row {
                        let change = decode_row(&row).map_err(storage)?;
                        if scan.scope.as_ref().is_none_or(|scope| change.scope == *scope) {
                            page.push(Arc::new(change));
                        }
                    }
                }
                if !page.is_empty() {
                    send(Part::Page(page)).await?;
                }
            }
        }
        None => {
            let mut after = String::new();
            loop {
                let query = match &scan.scope {
                    None => sqlx::query(
                        "SELECT entity_id, revision, payload, scope FROM feed_entities \
                         WHERE feed = $1 AND deleted = 0 AND entity_id > $2 ORDER BY entity_id LIMIT $3",
                    )
                    .bind(scan.feed)
                    .bind(after.as_str())
                    .bind(PAGE as i64),
                    Some(scope) => sqlx::query(
                        "SELECT entity_id, revision, payload, scope FROM feed_entities \
                         WHERE feed = $1 AND scope = $4 AND deleted = 0 AND entity_id > $2 \
                         ORDER BY entity_id LIMIT $3",
                    )
                    .bind(scan.feed)
                    .bind(after.as_str())
                    .bind(PAGE as i64)
                    .bind(scope.as_str()),
                };
                let rows = query.fetch_all(&mut *tx).await.map_err(|e| storage(e.into()))?;
                let full = rows.len() == PAGE;
                let page = rows
                    .iter()
                    .map(|row| decode_row(row).map(Arc::new))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(storage)?;
                drop(rows);
                if let Some(last) = page.last() {
                    after.clone_from(&last.entity_id);
                    send(Part::Page(page)).await?;
                }
                if !full {
                    break;
                }
            }
        }
    }
    tx.commit().await.map_err(|e| storage(e.into()))?;
    Ok(())
}
