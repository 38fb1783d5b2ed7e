//! Events to functions: subscriptions that push changes to users,
//! contracts and photos to HTTP endpoints as CloudEvents 1.0, the way
//! Knative Eventing, OpenFaaS and cloud event routers invoke functions:
//! at least once, in order per entity, from a cursor kept in the database,
//! signed per Standard Webhooks, with Knative's rules for answers, retries
//! and dead letters.
//!
//! # Layout
//!
//! - [`EventsService`] (this file): opening, the gRPC server
//!   ([`EventsService::into_server`]) and the delivery loop
//!   ([`EventsService::run`]); [`EventsOptions`], [`EventsError`].
//! - [`source`]: where changes come from ([`Source`], [`Sources`]: a feed
//!   in this process, or the services' watch RPCs) and what each becomes
//!   ([`Occurrence`]: type, time, the entity's proto3 JSON).
//! - [`cloudevent`]: [`CloudEvent`] and the HTTP binding, binary and
//!   structured, percent-encoding included (to send, and to read back).
//! - [`signing`]: Standard Webhooks signatures, [`Secret`]s, [`Verifier`].
//! - [`policy`]: what an answer means (Knative), backoff, `Retry-After`,
//!   the rate limit.
//! - [`ssrf`]: which addresses deliveries may reach.
//! - [`send`]: one attempt, over a client that follows no redirect.
//! - [`store`], [`queue`]: subscriptions and cursors; the delivery queue
//!   and the dead letters.
//! - `delivery` (private): a subscription's delivery task and its
//!   dispatcher; `reader` (private): the reader of one feed into the
//!   queue; `supervisor` (private): which tasks run, under a lease.
//! - `service` (private): the `lightbox.events.v1.SubscriptionsService`;
//!   `manage` (private): the checks and conversions behind it.
//!
//! # Guarantees, and how
//!
//! A subscription follows each feed it names from its own cursor. The
//! reader of a feed puts every matching change into the delivery queue
//! and moves the cursor *in the same transaction*, so a crash or restart
//! resumes reading from the cursor with nothing lost and nothing queued
//! twice; the resume, the consolidated delta of compacted history and the
//! reset past the tombstones are the changefeed's own answers. Deliveries
//! take the oldest queued event of each entity; the next event of that
//! entity waits until it is delivered or dead-lettered, other entities do
//! not. An event is deleted from the queue once delivered: a crash between
//! the answer and the delete delivers it again, with the same `id` and
//! `webhook-id`, which is how functions drop duplicates (at least once).
//!
//! # Wiring (`lightbox dev` / `serve --target events`)
//!
//! ```no_run
//! # async fn wire(db: lightbox_changefeed::Db, users: lightbox_client::Balanced,
//! #     contracts: lightbox_client::Balanced, photos: lightbox_client::Balanced,
//! #     shutdown: impl std::future::Future<Output = ()> + Send + 'static)
//! #     -> Result<(), lightbox_events::EventsError> {
//! use lightbox_events::{EventsOptions, EventsService, Sources};
//! let events = EventsService::open(db, EventsOptions::default(), Sources::grpc(users, contracts, photos)).await?;
//! let server = events.clone().into_server(4 * 1024 * 1024); // add to the tonic routes
//! tokio::spawn(events.run(shutdown)); // delivers until shutdown, then drains
//! # let _ = server; Ok(()) }
//! ```
//!
//! # Limits
//!
//! Endpoints are `http://` only: the workspace's reqwest has no TLS. With
//! reqwest's `rustls-no-provider` feature and a ring `ClientConfig` handed to
//! `tls_backend_preconfigured`, https works without aws-lc's C build.

mod delivery;
mod manage;
mod reader;
mod service;
mod supervisor;

pub mod cloudevent;
pub mod policy;
pub mod queue;
pub mod send;
pub mod signing;
pub mod source;
pub mod ssrf;
pub mod store;

use std::{future::Future, sync::Arc, time::Duration};

use lightbox_changefeed::{Db, FeedError, Migrations};
use tokio::sync::Notify;

pub use cloudevent::{CloudEvent, Mode};
pub use service::RequireToken;
pub use signing::{Secret, Verifier};
pub use source::{ContractsSource, EntityKind, Occurrence, PhotosSource, Source, Sources, UsersSource, Watched};
pub use ssrf::{AddressPolicy, Cidr};

/// The delivery component's tables (versions 5000 to 5999).
pub static MIGRATIONS: Migrations = Migrations {
    sqlite: &sqlx::migrate!("migrations/sqlite"),
    postgres: &sqlx::migrate!("migrations/postgres"),
};

/// Tuning and defaults of the delivery component.
#[derive(Debug, Clone)]
pub struct EventsOptions {
    /// The prefix of every event's `source`: `<prefix>/<feed>`.
    pub source_prefix: String,
    /// Networks deliveries may reach although they are not public
    /// (`10.0.0.0/8` for in-cluster functions; `127.0.0.1` in tests).
    pub allowed_networks: Vec<Cidr>,
    /// Pauses between attempts, and the cap on `Retry-After`.
    pub backoff: policy::Backoff,
    /// Attempts per event when a subscription sets none.
    pub max_attempts: u32,
    /// The time one delivery may take when a subscription sets none.
    pub timeout: Duration,
    /// Deliveries per second per subscription when it sets none (0: none).
    pub rate_limit: f64,
    /// Entities in flight at once, per subscription.
    pub max_in_flight: usize,
    /// Events queued per subscription before its readers pause.
    pub max_queued: i64,
    /// Changes queued in one transaction.
    pub batch_max: usize,
    /// A watch silent this long (no change, no progress) is reconnected.
    pub idle_timeout: Duration,
    /// First pause before reopening a watch (doubles, with jitter).
    pub reconnect_min: Duration,
    /// Longest pause before reopening a watch.
    pub reconnect_max: Duration,
    /// The delivery queue is read at least this often (retries due, dead
    /// letters redelivered through another replica).
    pub poll_interval: Duration,
    /// How often the supervisor renews the lease and reads the
    /// subscriptions (the lease lasts three times this).
    pub scan_interval: Duration,
    /// The time to connect to an endpoint, and to the services whose
    /// changes it reads.
    pub connect_timeout: Duration,
    /// The most subscriptions.
    pub max_subscriptions: i64,
    /// If set, every `SubscriptionsService` call needs
    /// `authorization: Bearer <token>` (see [`EventsService::into_server`]).
    pub api_token: Option<String>,
}

impl Default for EventsOptions {
    fn default() -> Self {
        EventsOptions {
            source_prefix: "/lightbox".into(),
            allowed_networks: Vec::new(),
            backoff: policy::Backoff {
                base: Duration::from_millis(200),
                max: Duration::from_secs(60),
                retry_after_max: Duration::from_secs(120),
            },
            max_attempts: 10,
            timeout: Duration::from_secs(10),
            rate_limit: 50.0,
            max_in_flight: 16,
            max_queued: 10_000,
            batch_max: 256,
            idle_timeout: Duration::from_secs(15),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(10),
            poll_interval: Duration::from_secs(1),
            scan_interval: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(5),
            max_subscriptions: 1000,
            api_token: None,
        }
    }
}

/// A failure of the delivery component.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// The changefeed's storage failed (migrations, leases).
    #[error(transparent)]
    Feed(#[from] FeedError),
    /// Bad options or arguments.
    #[error("{0}")]
    Invalid(String),
    /// A stored row does not read back: a bug or a corrupted database.
    #[error("stored data does not read back: {0}")]
    Corrupt(String),
}

impl From<EventsError> for lightbox_api::ApiError {
    fn from(err: EventsError) -> Self {
        match err {
            EventsError::Invalid(message) => lightbox_api::ApiError::InvalidArgument(message),
            EventsError::Db(err) => FeedError::Db(err).into(),
            EventsError::Feed(err) => err.into(),
            other => lightbox_api::ApiError::internal(other),
        }
    }
}

/// The delivery component: subscriptions in a database, and the tasks
/// that deliver for them. Cheap to clone.
#[derive(Clone)]
pub struct EventsService {
    pub(crate) engine: Arc<delivery::Engine>,
}

impl EventsService {
    /// Opens the component over `db` (migrating it), reading changes from
    /// `sources`. Nothing is delivered until [`EventsService::run`].
    pub async fn open(db: Db, options: EventsOptions, sources: Sources) -> Result<EventsService, EventsError> {
        if options.max_in_flight == 0 || options.batch_max == 0 || options.max_queued < 1 {
            return Err(EventsError::Invalid(
                "max_in_flight, batch_max and max_queued must be at least 1".into(),
            ));
        }
        if options.poll_interval.is_zero() || options.scan_interval.is_zero() || options.idle_timeout.is_zero() {
            return Err(EventsError::Invalid(
                "the poll, scan and idle intervals must be longer than zero".into(),
            ));
        }
        db.migrate(&[&MIGRATIONS]).await?;
        let policy = AddressPolicy::new(options.allowed_networks.clone());
        let sender = send::Sender::new(policy, &options.source_prefix, options.connect_timeout)?;
        Ok(EventsService {
            engine: Arc::new(delivery::Engine {
                db,
                options,
                sources,
                sender,
                poke: Notify::new(),
            }),
        })
    }

    /// Delivers until `shutdown` resolves, then lets deliveries in flight
    /// finish (each within its timeout) and returns. Run it in its own task,
    /// once per process: replicas share the work through a lease.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        supervisor::supervise(self.engine, shutdown).await;
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.engine.db
    }
}
