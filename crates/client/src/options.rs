//! [`ConnectOptions`]: timeouts, keepalives, health checking, ejection
//! backoff, DNS refresh and TLS, with defaults for services in one cluster.

use std::{fmt, sync::Arc, time::Duration};

use lightbox_tls::ClientTls;

use crate::{ClientError, Resolve, SystemResolver};

/// How [`crate::connect`] reaches and watches the replicas.
///
/// Build it with struct update syntax:
/// `ConnectOptions { connect_timeout, ..ConnectOptions::default() }`.
#[derive(Clone)]
pub struct ConnectOptions {
    /// What the channel reaches, for messages ("no replica of *users* is
    /// healthy"); the target itself when `None`.
    pub label: Option<String>,
    /// How long one connection attempt (TCP, and the TLS handshake) may
    /// take. Also bounds each DNS lookup. Default 5 s.
    pub connect_timeout: Duration,
    /// TCP keepalive on every connection (`None`: the system's). Default
    /// 30 s. HTTP/2 keepalive below is what notices a dead peer quickly.
    pub tcp_keepalive: Option<Duration>,
    /// How often an HTTP/2 PING goes out on every connection, busy or idle.
    /// Default 10 s. tonic and hyper servers accept any rate; a grpc-go
    /// server enforces a minimum (5 min by default) unless told otherwise.
    pub http2_keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is taken
    /// for dead: its calls fail (`UNAVAILABLE`) and the replica's health
    /// watch ends, ejecting it. Default 5 s.
    pub http2_keepalive_timeout: Duration,
    /// How often DNS names are resolved again; endpoints follow the
    /// answers. Default 5 s. A failed lookup keeps the last answer.
    pub dns_refresh: Duration,
    /// How each endpoint's health is watched. Default
    /// `HealthCheck::Watch` of the service "" (the whole server).
    pub health: HealthCheck,
    /// How long a health watch may take to open and give its first status
    /// (connecting included) before the endpoint counts as unhealthy.
    /// Default 5 s. Calls made before any replica has answered wait for
    /// the first answer, at most this plus `connect_timeout`.
    pub probe_timeout: Duration,
    /// For servers without `Health/Watch`: how often `Health/Check` (or,
    /// if that is unimplemented too, any answer) confirms the replica is
    /// there. Default 2 s.
    pub health_poll_interval: Duration,
    /// The wait before an ejected endpoint is probed again.
    pub backoff: Backoff,
    /// Eject an endpoint at once when a call through it fails below gRPC
    /// (its connection broke or could not be made), then let its health
    /// check re-admit it. Default `true`.
    pub passive_ejection: bool,
    /// TLS for `https://` addresses: each connection runs rustls with the
    /// certificates current then, checking the server's certificate
    /// against the address's host name (not the resolved IP). Required if
    /// any address is `https://`; unused for `http://` ones.
    pub tls: Option<ClientTls>,
    /// Sent as `user-agent` (tonic appends its own). Default none.
    pub user_agent: Option<String>,
    /// What turns DNS names into socket addresses. Default
    /// [`SystemResolver`] (the system's resolver, `getaddrinfo`).
    pub resolver: Arc<dyn Resolve>,
    /// Counts every call (`grpc_client_*`) in the process's metrics,
    /// failures to find a replica included; `None`: not counted.
    pub metrics: Option<lightbox_metrics::GrpcClientLayer>,
}

/// How an endpoint's health is judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheck {
    /// `grpc.health.v1.Health/Watch` of `service` on a connection of its
    /// own: in the balancer only while it says `SERVING`. A server that
    /// does not implement health counts as serving while it answers.
    Watch {
        /// The service name to watch: "" is the whole server (what
        /// Lightbox servers turn `NOT_SERVING` while they drain).
        service: String,
    },
    /// No health checks: every endpoint is in the balancer, except for a
    /// `backoff` after a call through it failed (with `passive_ejection`).
    /// For tools that must reach a server whatever its health says (the
    /// CLI's `lightbox health`).
    Off,
}

/// Capped exponential backoff with jitter, for re-probing an endpoint
/// whose health watch failed again and again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first wait. Default 100 ms.
    pub initial: Duration,
    /// The longest wait; an endpoint that stayed healthy this long starts
    /// from `initial` again. Default 5 s.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The wait before try `attempt` (from 1): `initial × 2^(attempt-1)`,
    /// capped at `max`, then a random point in its upper half (so replicas
    /// that failed together are not probed in lockstep).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(20);
        let full = self.initial.saturating_mul(1 << exponent).min(self.max);
        let half = full / 2;
        let jitter_nanos = fastrand::u64(0..=u64::try_from(half.as_nanos()).unwrap_or(u64::MAX));
        half + Duration::from_nanos(jitter_nanos)
    }
}

impl Default for ConnectOptions {
    fn default() -> ConnectOptions {
        ConnectOptions {
            label: None,
            connect_timeout: Duration::from_secs(5),
            tcp_keepalive: Some(Duration::from_secs(30)),
            http2_keepalive_interval: Duration::from_secs(10),
            http2_keepalive_timeout: Duration::from_secs(5),
            dns_refresh: Duration::from_secs(5),
            health: HealthCheck::Watch { service: String::new() },
            probe_timeout: Duration::from_secs(5),
            health_poll_interval: Duration::from_secs(2),
            backoff: Backoff::default(),
            passive_ejection: true,
            tls: None,
            user_agent: None,
            resolver: Arc::new(SystemResolver),
            metrics: None,
        }
    }
}

impl ConnectOptions {
    /// The defaults with `connect_timeout`: what replaces a plain
    /// `connect_timeout(..).connect_lazy()` channel.
    pub fn with_connect_timeout(connect_timeout: Duration) -> ConnectOptions {
        ConnectOptions {
            connect_timeout,
            ..ConnectOptions::default()
        }
    }

    /// Refuses durations that would spin or never fire.
    pub(crate) fn check(&self) -> Result<(), ClientError> {
        let invalid = |option, reason| Err(ClientError::InvalidOption { option, reason });
        let positive = [
            ("connect_timeout", self.connect_timeout),
            ("http2_keepalive_interval", self.http2_keepalive_interval),
            ("http2_keepalive_timeout", self.http2_keepalive_timeout),
            ("dns_refresh", self.dns_refresh),
            ("probe_timeout", self.probe_timeout),
            ("health_poll_interval", self.health_poll_interval),
            ("backoff.initial", self.backoff.initial),
        ];
        if let Some((option, _)) = positive.iter().find(|(_, d)| d.is_zero()) {
            return invalid(option, "must be longer than zero");
        }
        if self.backoff.max < self.backoff.initial {
            return invalid("backoff.max", "must be at least backoff.initial");
        }
        Ok(())
    }
}

impl fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("label", &self.label)
            .field("connect_timeout", &self.connect_timeout)
            .field("tcp_keepalive", &self.tcp_keepalive)
            .field("http2_keepalive_interval", &self.http2_keepalive_interval)
            .field("http2_keepalive_timeout", &self.http2_keepalive_timeout)
            .field("dns_refresh", &self.dns_refresh)
            .field("health", &self.health)
            .field("probe_timeout", &self.probe_timeout)
            .field("health_poll_interval", &self.health_poll_interval)
            .field("backoff", &self.backoff)
            .field("passive_ejection", &self.passive_ejection)
            .field("tls", &self.tls)
            .field("user_agent", &self.user_agent)
            .finish_non_exhaustive()
    }
}
