//! Test support: throwaway databases on both backends, the services on
//! 127.0.0.1:0, and waiting for a condition with a deadline (never sleeping
//! and hoping).
//!
//! # Layout
//!
//! - `db`: [`TestDb`], a fresh SQLite file or PostgreSQL database, dropped
//!   after; [`conformance!`] runs one async test body against every
//!   backend.
//! - `stack`: [`Stack`], contracts, users and photos on port 0 over a
//!   [`TestDb`] each, to stop and start again at will; [`customer`] makes a
//!   user with a contract in it.
//! - here: [`eventually`], which polls a condition until it holds or a
//!   deadline passes, and small helpers (feeds, channels).
//! - [`sse`]: a client of the gateway's Server-Sent Events stream.
//!
//! PostgreSQL tests run when `LIGHTBOX_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) answers. When it does not,
//! they are skipped with a notice on stderr, unless
//! `LIGHTBOX_REQUIRE_POSTGRES=1` (set by CI) makes that a failure.

mod db;
pub mod sse;
mod stack;

use std::{future::Future, net::SocketAddr, time::Duration};

pub use db::TestDb;
use lightbox_api::users::User;
pub use stack::{Stack, TEST_JWT_SECRET, bind_any, customer, photo_quota};
use tonic::transport::Channel;

/// How long anything that should happen "soon" may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `check` until it returns `Some`, or panics with `what` after
/// [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {DEADLINE:?} waiting for {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Sends the servers' warnings and errors (such as the cause of an
/// `INTERNAL`, which the client never sees) to the test's captured output,
/// so a failing test shows them. `RUST_LOG` overrides the level.
pub fn capture_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Only the first call in a test binary installs it; later ones find it set.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Writes the user `id` named `name` straight into `feed`, as the users
/// service would; answers its revision.
pub async fn put_user(feed: &lightbox_changefeed::Feed<User>, id: &str, name: &str) -> i64 {
    let mut tx = feed.begin().await.unwrap_or_else(|err| panic!("{err}"));
    let user = User {
        id: id.into(),
        display_name: name.into(),
        revision: tx.next_revision(),
        ..User::default()
    };
    let revision = tx.put(id, &user).await.unwrap_or_else(|err| panic!("{err}"));
    tx.commit().await.unwrap_or_else(|err| panic!("{err}"));
    revision
}

/// Deletes the entity `id` straight from `feed`.
pub async fn delete_entity<T: lightbox_changefeed::feed::Entity>(feed: &lightbox_changefeed::Feed<T>, id: &str) {
    let mut tx = feed.begin().await.unwrap_or_else(|err| panic!("{err}"));
    tx.delete(id).await.unwrap_or_else(|err| panic!("{err}"));
    tx.commit().await.unwrap_or_else(|err| panic!("{err}"));
}

/// A balanced client channel to `addr`, as the services use between
/// themselves (connected lazily).
pub fn upstream(addr: SocketAddr) -> lightbox_client::Balanced {
    lightbox_client::channel(&format!("http://{addr}"), Duration::from_secs(5))
        .unwrap_or_else(|err| panic!("bad address {addr}: {err}"))
}

/// A channel to `addr` (connected lazily).
pub async fn channel(addr: SocketAddr) -> Channel {
    match tonic::transport::Endpoint::from_shared(format!("http://{addr}")) {
        Ok(endpoint) => endpoint.connect_lazy(),
        Err(err) => panic!("bad address {addr}: {err}"),
    }
}
