//! Pull mode: [`Cache::poll`] follows an upstream by polling its
//! `List…Changes` listing instead of watching it.
//!
//! The pages are turned into the frames a watch would send, and fed to the
//! one loop that consumes watch streams, so both modes share every rule of
//! the copy: batches in one transaction each, the guard rail, the cursor,
//! the reported state, reconnection with backoff and jitter.
//!
//! | the listing answers | frames |
//! |---|---|
//! | the state from 0, page after page (`next_page_token`) | `SnapshotBegin`, a `Change` per entity, …, `SnapshotEnd{R}` on the last page (`next_since_revision` R) |
//! | changes after N (`since_revision` N > 0) | a `Change` each (one batch); a short page then `Progress{next_since_revision}`: the head the page was read at |
//! | `reset` (N older than the deletions kept, or ahead of the server) | `Reset`, then the state listing from 0 as above |
//! | an error, or no answer within [`PollOptions::timeout`] | the stream's error: the follower reconnects with backoff |
//!
//! A short page proves the copy current up to the head it was read at: only
//! then does the copy's age reset (the `Progress` frame), so a copy paging
//! through a backlog ages like a watcher replaying one. A full page is
//! followed by the next poll at once, not after the interval.

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::Stream;
use lightbox_changefeed::{ChangePage, Frame, feed::Entity, watch::WatchStream};
use tonic::Status;

use crate::{Cache, Source};

/// The most changes a `List…Changes` page holds (the services' limit: a
/// larger `page_size` is served as this many).
pub const MAX_PAGE_SIZE: i32 = 1000;

/// One page of a pull listing, on its way.
pub type Listing<T> = Pin<Box<dyn Future<Output = Result<ChangePage<T>, Status>> + Send>>;

/// Where a pull listing comes from: a service's `List…Changes` (see
/// [`crate::sources`]), or a feed in the same process.
pub trait PullSource<T>: Send + Sync + 'static {
    /// The page of changes after `since_revision` (0: the current state,
    /// continued by `page_token`), at most `page_size` of them.
    fn list_changes(&self, since_revision: i64, page_size: i32, page_token: String) -> Listing<T>;
}

impl<T, S: PullSource<T> + ?Sized> PullSource<T> for Arc<S> {
    fn list_changes(&self, since_revision: i64, page_size: i32, page_token: String) -> Listing<T> {
        S::list_changes(self, since_revision, page_size, page_token)
    }
}

/// How a copy polls its upstream in pull mode.
#[derive(Debug, Clone, PartialEq)]
pub struct PollOptions {
    /// The pause after a poll that reached the upstream's head, before the
    /// next one (each pause drawn within ±10% of it, so a fleet of copies
    /// does not poll in step). Polls that bring a full page, and the pages
    /// of a state listing, follow each other at once.
    pub interval: Duration,
    /// The most changes asked for per poll (1 to [`MAX_PAGE_SIZE`]): the
    /// most a poll holds in memory.
    pub page_size: i32,
    /// A poll not answered within this is a failure: the follower
    /// reconnects with backoff.
    pub timeout: Duration,
}

impl Default for PollOptions {
    fn default() -> Self {
        PollOptions {
            interval: Duration::from_secs(1),
            page_size: 500,
            timeout: Duration::from_secs(10),
        }
    }
}

/// How a copy follows its upstream ([`crate::CacheOptions::follow`], used
/// by [`Cache::follow_upstream`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub enum FollowMode {
    /// Push: the upstream's watch stream (`Watch…`).
    #[default]
    Watch,
    /// Pull: its change listing (`List…Changes`), polled.
    Poll(PollOptions),
}

impl FollowMode {
    /// Pull mode polling every `interval`, with the default page size and
    /// timeout.
    pub fn poll(interval: Duration) -> FollowMode {
        FollowMode::Poll(PollOptions {
            interval,
            ..PollOptions::default()
        })
    }
}

impl<T: Entity> Cache<T> {
    /// Follows `source` into the copy by polling its change listing, until
    /// the future is dropped: the pull counterpart of [`Cache::follow`],
    /// with the same cursor, batches, guard rail and reconnection. Run it
    /// in its own task.
    ///
    /// While polling, the copy reports itself connected from the first
    /// poll answered until one fails; its age is the time since the last
    /// poll that reached the upstream's head; [`crate::CacheState::polls`]
    /// counts the listings asked for.
    pub async fn poll(&self, source: impl PullSource<T>, options: PollOptions) {
        let options = PollOptions {
            page_size: options.page_size.clamp(1, MAX_PAGE_SIZE),
            ..options
        };
        // A poll yields a frame or fails within a pause and its timeout: no
        // silence longer than that is a healthy one.
        let idle = (options.interval.saturating_add(options.interval / 10))
            .saturating_add(options.timeout)
            .saturating_add(Duration::from_secs(1))
            .max(self.inner.options.idle_timeout);
        let polling = Polling {
            source: Arc::new(source),
            cache: self.clone(),
            options,
        };
        self.follow_with(&polling, idle).await;
    }

    /// Follows `source` the way [`crate::CacheOptions::follow`] says: its
    /// watch ([`Cache::follow`]) or its change listing ([`Cache::poll`]).
    pub async fn follow_upstream<S: Source<T> + PullSource<T>>(&self, source: S) {
        match self.inner.options.follow.clone() {
            FollowMode::Watch => self.follow(source).await,
            FollowMode::Poll(options) => self.poll(source, options).await,
        }
    }

    fn count_poll(&self, empty: bool) {
        self.inner.state.send_modify(|state| {
            state.polls += 1;
            state.empty_polls += u64::from(empty);
        });
    }
}

/// A pull source seen as a watch source: each "watch" is a [`Poller`].
struct Polling<T> {
    source: Arc<dyn PullSource<T>>,
    /// Where polls are counted.
    cache: Cache<T>,
    options: PollOptions,
}

impl<T: Entity> Source<T> for Polling<T> {
    fn watch(&self, since_revision: i64) -> Pin<Box<dyn Future<Output = Result<WatchStream<T>, Status>> + Send>> {
        let mut poller = Poller {
            source: Arc::clone(&self.source),
            cache: self.cache.clone(),
            options: self.options.clone(),
            since: since_revision.max(0),
            token: String::new(),
            listing: false,
            after_reset: false,
            ready: VecDeque::new(),
            at_once: true,
            fetching: None,
            done: false,
        };
        Box::pin(async move {
            // "Connected" once the upstream has answered a poll.
            let page = poller.fetch().await?;
            poller.absorb(page)?;
            Ok(Box::pin(poller) as WatchStream<T>)
        })
    }
}

/// One run of polls as a stream of watch frames, from a cursor until a
/// poll fails. Holds at most one page.
struct Poller<T> {
    source: Arc<dyn PullSource<T>>,
    cache: Cache<T>,
    options: PollOptions,
    /// The revision the next poll lists from (0: the state).
    since: i64,
    /// While listing the state: the next page's token.
    token: String,
    /// Whether a state listing is under way (its `SnapshotBegin` sent).
    listing: bool,
    /// Whether the state listing to come follows a reset (then it is sent
    /// as a snapshot even if it is empty at revision 0).
    after_reset: bool,
    /// Frames of the last page not yet taken.
    ready: VecDeque<Frame<T>>,
    /// Whether the next poll follows at once (a page of a listing, a full
    /// page of changes) rather than after the interval.
    at_once: bool,
    fetching: Option<Listing<T>>,
    /// A poll failed: the stream has ended.
    done: bool,
}

impl<T: Entity> Poller<T> {
    /// The next poll: after the interval if the last one reached the head,
    /// with its timeout.
    fn fetch(&self) -> Listing<T> {
        let pause = (!self.at_once).then(|| {
            let factor = 0.9 + fastrand::f64() * 0.2;
            Duration::try_from_secs_f64(self.options.interval.as_secs_f64() * factor).unwrap_or(Duration::MAX)
        });
        let (source, cache) = (Arc::clone(&self.source), self.cache.clone());
        let (since, size, token) = (self.since, self.options.page_size, self.token.clone());
        let timeout = self.options.timeout;
        Box::pin(async move {
            if let Some(pause) = pause {
                tokio::time::sleep(pause).await;
            }
            let answer = tokio::time::timeout(timeout, source.list_changes(since, size, token)).await;
            let page = answer.unwrap_or_else(|_| {
                Err(Status::deadline_exceeded(format!(
                    "the change listing did not answer within {timeout:?}"
                )))
            });
            if let Ok(page) = &page {
                cache.count_poll(page.changes.is_empty() && page.reset.is_none());
            }
            page
        })
    }

    /// Turns a page into frames, and moves the position on.
    fn absorb(&mut self, page: ChangePage<T>) -> Result<(), Status> {
        if let Some(reason) = page.reset {
            // The copy is replaced by the state listed from 0.
            self.ready.push_back(Frame::Reset { revision: 0, reason });
            (self.since, self.token, self.listing) = (0, String::new(), false);
            (self.after_reset, self.at_once) = (true, true);
            return Ok(());
        }
        let next = page.next_since_revision;
        if self.since == 0 {
            let complete = page.next_page_token.is_empty();
            if !self.listing && complete && page.changes.is_empty() && next == 0 && !self.after_reset {
                // An upstream with no revision yet, and a copy at 0 (empty):
                // nothing to replace; current as of now.
                self.ready.push_back(Frame::Progress { revision: 0 });
                self.at_once = false;
                return Ok(());
            }
            if !self.listing {
                // The listing's revision is known on its last page only.
                self.ready.push_back(Frame::SnapshotBegin { revision: 0 });
                self.listing = true;
            }
            self.ready.extend(page.changes.into_iter().map(Frame::Change));
            if complete {
                if next < 0 {
                    return Err(Status::internal(format!("a state listing ended at revision {next}")));
                }
                self.ready.push_back(Frame::SnapshotEnd { revision: next });
                (self.since, self.listing, self.after_reset) = (next, false, false);
                self.token.clear();
                // The changes after the listing, at once: they piled up meanwhile.
                self.at_once = next > 0;
            } else {
                self.token = page.next_page_token;
                self.at_once = true;
            }
            return Ok(());
        }
        let last = page.changes.last().map_or(self.since, |change| change.revision);
        if next < last || last < self.since {
            return Err(Status::internal(format!(
                "the change listing after revision {} answered changes up to {last} and continues from {next}",
                self.since
            )));
        }
        let full = page.changes.len() >= usize::try_from(self.options.page_size).unwrap_or(usize::MAX);
        self.ready.extend(page.changes.into_iter().map(Frame::Change));
        if !full {
            // A short page holds every change up to the head it was read at.
            self.ready.push_back(Frame::Progress { revision: next });
        }
        self.since = next;
        self.at_once = full;
        Ok(())
    }
}

impl<T: Entity> Stream for Poller<T> {
    type Item = Result<Frame<T>, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(frame) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(frame)));
            }
            if this.done {
                return Poll::Ready(None);
            }
            let mut fetching = match this.fetching.take() {
                Some(fetching) => fetching,
                None => this.fetch(),
            };
            let Poll::Ready(answer) = fetching.as_mut().poll(cx) else {
                this.fetching = Some(fetching);
                return Poll::Pending;
            };
            if let Err(status) = answer.and_then(|page| this.absorb(page)) {
                this.done = true;
                return Poll::Ready(Some(Err(status)));
            }
        }
    }

    /// At least the frames of the last page; one more if the next poll
    /// follows at once: how the follower knows that a batch ending a full
    /// page is not the upstream's head.
    fn size_hint(&self) -> (usize, Option<usize>) {
        let more = !self.done && self.at_once;
        (self.ready.len() + usize::from(more), None)
    }
}
