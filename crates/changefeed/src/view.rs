//! A [`View`]: a feed's current state held in memory by the process that
//! owns the feed, kept current by a watch of that feed, for reads that touch
//! no database.
//!
//! The database stays the truth; the view is rebuilt from it at start (a
//! snapshot watch) and follows every change any replica commits (the
//! feed's tail: local commits wake it at once, other replicas through
//! PostgreSQL notifications). A writer that wants its own reads to see its
//! write waits for the view to reach the revision it committed
//! ([`View::wait_for`]): that is read-your-writes on this process.

use std::{sync::Arc, time::Duration};

use futures_util::{FutureExt, StreamExt};
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    change::{Entity, Frame},
    feed::Feed,
    memory::{Published, Snapshot},
    watch::WatchFilter,
};

/// The in-memory state of a feed. Cheap to clone; the task that keeps it
/// current stops when the last clone is dropped.
pub struct View<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for View<T> {
    fn clone(&self) -> Self {
        View {
            inner: Arc::clone(&self.inner),
        }
    }
}

struct Inner<T> {
    /// The feed followed, for what its watch streams have been sent.
    feed: Feed<T>,
    published: Arc<Published<T>>,
    /// The revision of the published snapshot, for [`View::wait_for`].
    revision: watch::Receiver<i64>,
    /// The follower. It holds a watch stream, which keeps the feed's tasks
    /// alive: aborting it here when the view goes is what lets them stop.
    task: JoinHandle<()>,
}

impl<T> Drop for Inner<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<T: Entity> View<T> {
    /// Loads `feed`'s state (one snapshot at one revision) and follows it;
    /// answers once the state is loaded. With `index_scopes`, each scope's
    /// entities can be listed ([`Snapshot::scope`]).
    pub async fn open(feed: &Feed<T>, index_scopes: bool) -> View<T> {
        let published = Arc::new(Published::new(Snapshot::new(0, index_scopes)));
        let (revision_tx, mut revision) = watch::channel(-1);
        let task = tokio::spawn(follow(feed.clone(), Arc::clone(&published), index_scopes, revision_tx));
        // Ready once the first snapshot is in (-1 until then). If the task
        // ended first, its sender is gone and the view stays empty.
        let _ = revision.wait_for(|revision| *revision >= 0).await;
        View {
            inner: Arc::new(Inner {
                feed: feed.clone(),
                published,
                revision,
                task,
            }),
        }
    }

    /// The state now, at one revision.
    pub fn snapshot(&self) -> Arc<Snapshot<T>> {
        self.inner.published.load()
    }

    /// The state once it holds every change this process's watch streams
    /// may have been given ([`Feed::sent_head`]; at once, nearly always),
    /// or as it is after `timeout`: a client that saw a change on a watch
    /// and then reads here sees it. The view follows the feed beside the
    /// streams, not before them, so [`View::snapshot`] alone can be behind
    /// what a watcher has just been sent.
    pub async fn seen(&self, timeout: Duration) -> Arc<Snapshot<T>> {
        let sent = self.inner.feed.sent_head();
        if !self.wait_for(sent, timeout).await {
            tracing::warn!(
                feed = self.inner.feed.name(),
                sent,
                "the view did not reach what the watch streams were sent in time; reading it as it is"
            );
        }
        self.snapshot()
    }

    /// Waits until the view holds every change up to `revision`, for at most
    /// `timeout`. Returns whether it does.
    pub async fn wait_for(&self, revision: i64, timeout: Duration) -> bool {
        let mut current = self.inner.revision.clone();
        let reached = current.wait_for(|now| *now >= revision);
        matches!(tokio::time::timeout(timeout, reached).await, Ok(Ok(_)))
    }
}

/// The one task that consumes the feed's watch into the view: a snapshot
/// first, then live changes a batch at a time (each batch published whole);
/// when the stream ends (a lagging view, the ring restarting), it resumes
/// from the view's revision, and replaces the view if the feed answers with
/// a reset.
async fn follow<T: Entity>(
    feed: Feed<T>,
    published: Arc<Published<T>>,
    index_scopes: bool,
    revision: watch::Sender<i64>,
) {
    let mut pause = Duration::from_millis(10);
    loop {
        let mut current = (*published.load()).clone();
        let since = if *revision.borrow() < 0 { 0 } else { current.revision() };
        let mut stream = feed.watch(since, WatchFilter::default());
        // Set between a snapshot's begin and end: the state being rebuilt.
        let mut rebuilding: Option<Snapshot<T>> = None;
        while let Some(Ok(frame)) = stream.next().await {
            match frame {
                Frame::Reset { .. } => {}
                Frame::SnapshotBegin { revision } => rebuilding = Some(Snapshot::new(revision, index_scopes)),
                Frame::Change(change) => match rebuilding.as_mut() {
                    Some(snapshot) => snapshot.apply(change),
                    None => {
                        current.apply(change);
                        // Take whatever else is ready: one publication per batch.
                        // (Only changes and progress follow live changes; a
                        // failure taken here ends the stream, seen next turn.)
                        loop {
                            match stream.next().now_or_never() {
                                Some(Some(Ok(Frame::Change(change)))) => current.apply(change),
                                Some(Some(Ok(Frame::Progress { revision: at }))) => {
                                    current.set_revision(at);
                                    break;
                                }
                                _ => break,
                            }
                        }
                        publish(&published, &revision, &current);
                    }
                },
                Frame::SnapshotEnd { revision: at } => {
                    if let Some(mut snapshot) = rebuilding.take() {
                        snapshot.set_revision(at);
                        current = snapshot;
                        publish(&published, &revision, &current);
                    }
                }
                Frame::Progress { revision: at } => {
                    if at > current.revision() {
                        current.set_revision(at);
                        publish(&published, &revision, &current);
                    }
                }
            }
            pause = Duration::from_millis(10);
        }
        if feed.is_closing() {
            // Shutting down: the view keeps its last state for the reads
            // still in flight.
            return;
        }
        tracing::debug!(feed = feed.name(), "the view's watch ended; resuming");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

fn publish<T: Entity>(published: &Published<T>, revision: &watch::Sender<i64>, snapshot: &Snapshot<T>) {
    published.publish(snapshot.clone());
    revision.send_replace(snapshot.revision());
}
