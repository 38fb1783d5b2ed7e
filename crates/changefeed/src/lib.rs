//! The changefeed: how a service records every change to its entities, and
//! how any number of clients follow those changes (watch, push) or list them
//! (pull), without gaps, duplicates, relist storms or unbounded memory.
//!
//! # Layout
//!
//! - [`change`]: what travels through a feed: [`Entity`], [`Change`],
//!   [`Frame`], [`ChangePage`]. Depends on no other module.
//! - [`error`]: [`FeedError`], and [`is_transient`] (an outage, not a bug).
//! - [`db`]: [`Db`], one pool over SQLite or PostgreSQL, and migrations.
//! - `log` (private): the changelog's reads (changes and consolidated
//!   deltas after a revision, catch-up), by database and feed name, shared
//!   by the feed, its tail and its watches.
//! - `snapshot` (private): a watch's snapshot, the state at one revision
//!   read in pages in one transaction, a few at a time per feed.
//! - [`feed`]: [`Feed`], a named stream of entity changes in a database;
//!   [`WriteTx`], the transactional outbox (entity + changelog row in one
//!   transaction, revisions ordered by a per-feed counter row); reads,
//!   the pull listing.
//! - [`retention`]: [`Retention`], how much history a feed keeps; the
//!   periodic trim under a lease, and the compaction.
//! - [`lease`]: [`Lease`], leases in the database with a fencing [`Term`],
//!   for singleton work across replicas (a feed's retention runs under
//!   one).
//! - `ring` (private): the bounded ring a feed's watchers read, in groups
//!   the tail wakes one after the other, so that a fan-out to thousands of
//!   streams never holds up what else became ready.
//! - `hub` (private): the one tail per feed and process that fans changes
//!   out to every watcher through the ring, taking this process's commits
//!   as they hand them over and reading the changelog for the rest.
//!
//! Modules depend one way: `change`, `error` ← `log`, `ring` ← `hub`,
//! `retention`, `snapshot` ← `feed` ← `watch`, `messages`, `view`.
//! - [`memory`]: [`Snapshot`], entities in memory at one revision (a
//!   persistent map, so each batch makes a new one cheaply), and
//!   [`Published`], the lock-free cell readers load it from.
//! - [`view`]: [`View`], a feed's own state in memory, kept current by a
//!   watch of it: reads that touch no database.
//! - [`messages`]: conversions to and from the API's watch and listing
//!   messages, through the one shape they share
//!   ([`lightbox_api::watch`]); a watch's change is encoded once, and the
//!   same bytes go to every stream.
//! - [`watch`]: the watch stream: snapshot then live, resume (then progress
//!   at once: the client is current), from now (no snapshot, no replay),
//!   consolidated deltas for compacted history, reset, progress,
//!   slow-consumer handling and filters ([`WatchFilter`]: ids and/or a
//!   scope).
//!
//! # Guarantees
//!
//! Revisions are strictly increasing in commit order, with no gaps: every
//! writer updates its feed's counter row first thing in its transaction, so
//! writers serialise on that row's lock (SQLite: on the database write lock)
//! and a reader tailing `revision > cursor` can never see revision N+1
//! before N is committed. The tests in `tests/changefeed.rs` prove each
//! guarantee on both backends.
//!
//! # Scopes
//!
//! An entity may be written in a scope, its owner's id
//! ([`WriteTx::put_scoped`]); a watcher may follow one scope only
//! ([`WatchFilter::scope`]), snapshot, resume and live alike. A deletion
//! keeps the deleted entity's scope, so the scope's watchers see it. A
//! change is matched on the scope it was written in: when a write moves an
//! entity to another scope, the old scope's watchers are not told that it
//! left (they would need the previous scope on the change row, and on the
//! consolidated delta, which only knows the latest state).

pub mod change;
pub mod db;
pub mod error;
pub mod feed;
mod hub;
pub mod lease;
mod log;
pub mod memory;
pub mod messages;
pub mod retention;
mod ring;
mod snapshot;
pub mod view;
pub mod watch;
mod write;

pub use change::{Change, ChangePage, Entity, Frame};
pub use db::{Backend, Db, Migrations};
pub use error::{FeedError, is_transient};
pub use feed::{Feed, FeedOptions, FeedStats};
pub use lease::{Lease, LeaseState, Term};
pub use memory::{Published, Snapshot};
pub use retention::Retention;
pub use view::View;
pub use watch::WatchFilter;
pub use write::WriteTx;
