//! How a Lightbox client reaches a service that runs as several replicas:
//! a list of addresses or a DNS name (re-resolved), calls balanced over the
//! healthy replicas, a replica ejected as soon as it fails, and a watch
//! stream that broke resumed (by its caller, from its cursor) on another.
//!
//! # Layout
//!
//! - `target`: [`Target`] and [`Address`]: `http://a:50051,http://b:50051`,
//!   `https://users:50051`, `users:50051`.
//! - `options`: [`ConnectOptions`], [`HealthCheck`], [`Backoff`].
//! - `resolve`: [`Resolve`], [`SystemResolver`]: names to socket addresses.
//! - `discover`: the background task of a channel: endpoints from the
//!   target, one health watcher per endpoint, DNS refresh.
//! - `health`: the watcher: `grpc.health.v1.Health/Watch` on a connection
//!   of its own; admits on `SERVING`, ejects on anything else.
//! - `registry`: the endpoint set and the snapshot of healthy endpoints
//!   calls pick from; [`Replica`] for diagnostics.
//! - `balanced`: [`Balanced`], the `tower::Service` generated clients call.
//! - `dial`: one tonic `Channel` per endpoint, keepalives, TLS by host name.
//! - `error`: [`ClientError`].
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use lightbox_client::{ConnectOptions, Target, connect};
//! use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // Two replicas by address, and whatever `users.lightbox.svc` resolves to.
//! let target = Target::parse("http://10.0.0.7:50051,http://10.0.0.8:50051,users.lightbox.svc:50051")?;
//! let channel = connect(&target, ConnectOptions {
//!     label: Some("users".into()),
//!     ..ConnectOptions::with_connect_timeout(Duration::from_secs(2))
//! })?;
//! // Any generated client takes it: `UsersServiceClient::new(channel.clone())`.
//! let mut health = HealthClient::new(channel.clone());
//! let answer = health.check(HealthCheckRequest { service: String::new() }).await?;
//! println!("{:?} ({:?})", answer.into_inner().status(), channel.replicas());
//! # Ok(()) }
//! ```
//!
//! # What callers see when a replica dies
//!
//! The *ejection window* is how long after a replica dies calls may still
//! be sent to it:
//!
//! - **Process gone, host up** (crash, kill, rolling restart): its
//!   connections are reset, so its health stream breaks and it is ejected
//!   at once: 3–6 ms on loopback (`tests/replicas.rs` measures and prints
//!   it; 0–2 of ~1,300 calls from four busy callers failed, all started
//!   within 3 ms of the kill). Calls in flight on it fail with
//!   `UNAVAILABLE`; a call picked in the same instant fails with
//!   `UNAVAILABLE` (connection refused) and ejects it itself (passive
//!   ejection).
//! - **Draining** (a Lightbox server's shutdown): health turns
//!   `NOT_SERVING` before the server stops accepting, so it is ejected
//!   with no failed call at all; open streams end and resume elsewhere.
//! - **Host or network gone silently** (no reset): the HTTP/2 keepalive
//!   notices, at most `http2_keepalive_interval + http2_keepalive_timeout`
//!   (15 s by default) later; until then calls sent there hang, bounded by
//!   their own deadlines. Lower both options for a shorter window.
//!
//! In every case a failed call is `UNAVAILABLE` (naming the replica and
//! the cause) and is retried by the caller, a watch resumed from its
//! cursor: the next pick lands on a healthy replica. When no replica is
//! healthy, calls fail at once with `UNAVAILABLE`, "no replica of users is
//! healthy (…why each is out…)", instead of waiting for a deadline; an
//! ejected replica is probed again after a capped, jittered backoff
//! ([`Backoff`]) and back in as soon as it says `SERVING`.
//!
//! # In place of a `Channel`
//!
//! [`channel`]`(spec, connect_timeout)` is the drop-in for
//! `Channel::from_shared(url)?.connect_timeout(t).connect_lazy()`: `spec`
//! may be that one URL, or a list, or a name. For messages, prefer
//! [`connect`] with `ConnectOptions::label` ("users"). A tool that must
//! reach a server whatever its health says (`lightbox health`) sets
//! `health: HealthCheck::Off`.
//!
//! # Limits
//!
//! [`Balanced`] is not a `tonic::transport::Channel`: tonic's
//! `Channel::balance_channel` connects with its own connector only (so
//! not over `lightbox_tls`), and with no endpoint it waits instead of
//! failing. Clients are generic over the service, so
//! `UsersServiceClient<Balanced>` works as `UsersServiceClient<Channel>`
//! did; code naming `Channel` changes to `Balanced`.

mod balanced;
mod dial;
mod discover;
mod error;
mod health;
mod options;
mod registry;
mod resolve;
mod target;

use std::{sync::Arc, time::Duration};

use tokio::sync::oneshot;

pub use self::{
    balanced::{Balanced, BoxError, ResponseFuture},
    error::ClientError,
    options::{Backoff, ConnectOptions, HealthCheck},
    registry::{Replica, ReplicaState},
    resolve::{Resolve, Resolving, SystemResolver},
    target::{Address, Target},
};

/// A channel over every replica of `target`, connected lazily: it never
/// fails on an unreachable replica (its calls do, with `UNAVAILABLE`).
///
/// Starts the background tasks (on the current tokio runtime) that keep
/// the endpoint set: DNS refresh, one health watch per endpoint. They end
/// when the last clone of the channel is dropped.
///
/// Fails on options out of range, an `https://` address without
/// `options.tls`, or outside a tokio runtime.
pub fn connect(target: &Target, options: ConnectOptions) -> Result<Balanced, ClientError> {
    options.check()?;
    if options.tls.is_none()
        && let Some(address) = target.addresses().iter().find(|a| a.is_https())
    {
        return Err(ClientError::TlsRequired {
            address: address.to_string(),
        });
    }
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| ClientError::NoRuntime)?;
    let dialer = Arc::new(dial::Dialer::new(&options)?);
    let label = options.label.clone().unwrap_or_else(|| target.to_string());
    let (registry, snapshot) = registry::Registry::new(&label);
    let (stop, stopped) = oneshot::channel();
    let first_verdict = options.probe_timeout.saturating_add(options.connect_timeout);
    let passive = options.passive_ejection;
    let metrics = options.metrics.clone();
    let discovery = discover::Discovery {
        target: target.clone(),
        registry: registry.clone(),
        dialer,
        options: Arc::new(options),
    };
    runtime.spawn(discovery.run(stopped));
    Ok(Balanced::new(registry, snapshot, passive, first_verdict, stop, metrics))
}

/// [`connect`] with the default options and `connect_timeout`, from a
/// target written as [`Target::parse`] reads it: the drop-in for a
/// `Channel::from_shared(url)?.connect_timeout(t).connect_lazy()`.
pub fn channel(spec: &str, connect_timeout: Duration) -> Result<Balanced, ClientError> {
    connect(
        &Target::parse(spec)?,
        ConnectOptions::with_connect_timeout(connect_timeout),
    )
}
