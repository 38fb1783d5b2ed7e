//! [`Watcher`]: one task per endpoint that decides whether calls go there.
//!
//! It keeps a `grpc.health.v1.Health/Watch` open on a channel of its own.
//! `SERVING` admits the endpoint (with a fresh data channel); any other
//! status ejects it at once; so does the stream failing or ending (its
//! connection broke: the replica died, or HTTP/2 keepalive gave up), and
//! so does a call that saw its connection fail (passive ejection). After a
//! failure the watch is reopened after a capped, jittered backoff; the
//! endpoint is re-admitted when it says `SERVING` again.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::Notify;
use tonic::{Code, Status, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::{
    ConnectOptions, HealthCheck,
    dial::Dialer,
    error::{describe, extend},
    registry::{Cause, Key, Member, Registry},
    target::Address,
};

/// The health watch of one endpoint. Runs until aborted: the discovery
/// task aborts it when DNS drops the endpoint or the channel is dropped.
pub(crate) struct Watcher {
    pub(crate) registry: Arc<Registry>,
    pub(crate) key: Key,
    pub(crate) label: Arc<str>,
    pub(crate) address: Address,
    pub(crate) dialer: Arc<Dialer>,
    pub(crate) options: Arc<ConnectOptions>,
}

/// How a session (one open watch, or one run of polls) ended.
struct End {
    /// Why the endpoint is out, and the error behind it; `None` when a
    /// call ejected it already (saying why better than we could).
    reason: Option<(String, Option<Cause>)>,
    /// The server ended the session on purpose (a stopping server ends its
    /// health streams cleanly; a crash breaks them).
    announced: bool,
}

impl End {
    fn failed(reason: String) -> End {
        End {
            reason: Some((reason, None)),
            announced: false,
        }
    }

    /// The server ended the health stream cleanly.
    fn ended() -> End {
        End {
            reason: Some(("its health stream ended".to_owned(), None)),
            announced: true,
        }
    }

    /// A health call failed with `status`.
    fn status(what: &str, status: Status) -> End {
        let reason = format!("{what}: {}", status_line(&status));
        End {
            reason: Some((reason, Some(Arc::new(status)))),
            announced: false,
        }
    }

    fn suspected() -> End {
        End {
            reason: None,
            announced: false,
        }
    }
}

impl Watcher {
    pub(crate) async fn run(self) {
        let health = match self.dialer.channel(&self.address, self.key.addr) {
            Ok(channel) => HealthClient::new(channel),
            Err(reason) => {
                // Only an impossible address gets here; it stays out.
                self.registry.eject(self.key, &reason, None);
                return;
            }
        };
        let suspect = Arc::new(Notify::new());
        let backoff = self.options.backoff;
        let mut attempt: u32 = 0;
        loop {
            let mut session = Session {
                watcher: &self,
                health: health.clone(),
                suspect: &suspect,
                admitted: None,
            };
            let end = match &self.options.health {
                HealthCheck::Watch { service } => session.watch(service).await,
                HealthCheck::Off => session.off().await,
            };
            let stable = session
                .admitted
                .is_some_and(|(_, since)| since.elapsed() >= backoff.max);
            let suspected = end.reason.is_none();
            match end.reason {
                Some((reason, _)) if end.announced => self.registry.step_out(self.key, &reason),
                Some((reason, cause)) => self.registry.eject(self.key, &reason, cause),
                None => {}
            }
            // An endpoint that was fine for a while starts over; one that
            // keeps failing waits longer each time, up to `backoff.max`.
            attempt = if stable { 1 } else { attempt.saturating_add(1) };
            let delay = match (suspected, attempt, &self.options.health) {
                // One broken connection: look again at once (a fresh
                // connection may well work, and the watch will tell).
                (true, 1, HealthCheck::Watch { .. }) => Duration::ZERO,
                // Without health checks nothing tells: wait the backoff.
                _ => backoff.delay(attempt),
            };
            tokio::time::sleep(delay).await;
        }
    }
}

/// One session of a watcher: admits and ejects as the answers say.
struct Session<'a> {
    watcher: &'a Watcher,
    health: HealthClient<Channel>,
    /// Shared with every member of the endpoint: a call that saw the
    /// connection fail wakes this session.
    suspect: &'a Arc<Notify>,
    /// What this session put in the balancer, and when.
    admitted: Option<(Arc<Member>, Instant)>,
}

impl Session<'_> {
    /// `Health/Watch`: every status change arrives as it happens.
    async fn watch(&mut self, service: &str) -> End {
        let timeout = self.watcher.options.probe_timeout;
        let request = HealthCheckRequest {
            service: service.to_owned(),
        };
        let mut health = self.health.clone();
        let opened = tokio::time::timeout(timeout, async move {
            let mut stream = health.watch(request).await?.into_inner();
            let first = stream.message().await?;
            Ok::<_, Status>((stream, first))
        })
        .await;
        let (mut stream, mut next) = match opened {
            Err(_) => return End::failed(format!("no health answer within {timeout:?}")),
            Ok(Err(status)) if status.code() == Code::Unimplemented => return self.poll(service).await,
            Ok(Err(status)) => return End::status("health watch failed", status),
            Ok(Ok(opened)) => opened,
        };
        loop {
            match next {
                Some(answer) => self.verdict(answer.status),
                None => return End::ended(),
            }
            next = tokio::select! {
                message = stream.message() => match message {
                    Ok(message) => message,
                    Err(status) => return End::status("its health stream broke", status),
                },
                () = self.ejected_by_a_call() => return End::suspected(),
            };
        }
    }

    /// For a server without `Health/Watch`: `Health/Check` every
    /// `health_poll_interval`; if that is unimplemented too, any answer
    /// means the server is there (and taken as serving).
    async fn poll(&mut self, service: &str) -> End {
        let timeout = self.watcher.options.probe_timeout;
        loop {
            let request = HealthCheckRequest {
                service: service.to_owned(),
            };
            match tokio::time::timeout(timeout, self.health.check(request)).await {
                Err(_) => return End::failed(format!("no health answer within {timeout:?}")),
                Ok(Ok(answer)) => self.verdict(answer.into_inner().status),
                Ok(Err(status)) if status.code() == Code::Unimplemented => self.verdict(ServingStatus::Serving.into()),
                Ok(Err(status)) => return End::status("health check failed", status),
            }
            tokio::select! {
                () = tokio::time::sleep(self.watcher.options.health_poll_interval) => {}
                () = self.ejected_by_a_call() => return End::suspected(),
            }
        }
    }

    /// No health checks: in, until a call says the connection failed.
    async fn off(&mut self) -> End {
        self.admit();
        self.ejected_by_a_call().await;
        End::suspected()
    }

    /// Returns once a call has ejected what this session admitted. A
    /// wake-up about an older member (a permit left over from the session
    /// before) is ignored.
    async fn ejected_by_a_call(&self) {
        loop {
            self.suspect.notified().await;
            if let Some((member, _)) = &self.admitted
                && !self.watcher.registry.is_current(member)
            {
                return;
            }
        }
    }

    fn verdict(&mut self, status: i32) {
        match ServingStatus::try_from(status) {
            Ok(ServingStatus::Serving) => self.admit(),
            // Said on purpose: the replica is draining or not ready yet.
            Ok(ServingStatus::NotServing) => {
                self.admitted = None;
                let reason = "health says NOT_SERVING";
                self.watcher.registry.step_out(self.watcher.key, reason);
            }
            // SERVICE_UNKNOWN (a health service name nobody serves: a
            // configuration mistake), UNKNOWN, or no status at all.
            other => {
                let name = other.map_or_else(|_| format!("status {status}"), |s| s.as_str_name().to_owned());
                self.admitted = None;
                let reason = format!("health says {name}");
                self.watcher.registry.eject(self.watcher.key, &reason, None);
            }
        }
    }

    /// Admits the endpoint with a new data channel, unless it is in.
    fn admit(&mut self) {
        if self.admitted.is_some() {
            return;
        }
        let watcher = self.watcher;
        match watcher.dialer.channel(&watcher.address, watcher.key.addr) {
            Ok(channel) => {
                let member = Member::new(watcher.key, watcher.label.clone(), channel, self.suspect.clone());
                watcher.registry.admit(member.clone());
                self.admitted = Some((member, Instant::now()));
            }
            Err(reason) => watcher.registry.eject(watcher.key, &reason, None),
        }
    }
}

/// A failed health call in words: the transport's error when it failed
/// below gRPC, else the status the server answered.
pub(crate) fn status_line(status: &Status) -> String {
    match std::error::Error::source(status) {
        Some(source) => {
            let mut line = status.message().to_owned();
            extend(&mut line, &describe(source));
            line
        }
        None => format!("the server answered {:?}: {}", status.code(), status.message()),
    }
}
