//! [`ProcessHealth`]: the health of a whole process, as its admin listener
//! reports it to probes and load balancers.
//!
//! Each service port reports its own health (`serve` keeps a reporter per
//! port). A process may run several components (monolithic mode), and an
//! orchestrator probes one port per process: the admin listener. There,
//! each component's service name has the status its own port reports, and
//! "" (the process) is `SERVING` only while every component is and the
//! process is not draining.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
};

use tonic::service::Routes;
use tonic_health::{ServingStatus, server::HealthReporter};

/// What the process's health is made of.
#[derive(Debug, Default)]
struct State {
    /// Each component's service (full proto name) and its status.
    services: BTreeMap<String, ServingStatus>,
    /// Shutdown has begun: "" stays `NOT_SERVING` whatever the services say.
    draining: bool,
}

impl State {
    /// The status of "" (the whole process).
    fn overall(&self) -> ServingStatus {
        let all_serving = self.services.values().all(|s| *s == ServingStatus::Serving);
        match !self.draining && all_serving {
            true => ServingStatus::Serving,
            false => ServingStatus::NotServing,
        }
    }
}

/// The health of one process: cheap to clone, clones share it. Give it to
/// every server of the process ([`ServerOptions::process_health`]) and serve
/// [`ProcessHealth::routes`] on the admin listener.
///
/// [`ServerOptions::process_health`]: crate::ServerOptions::process_health
#[derive(Clone)]
pub struct ProcessHealth {
    reporter: HealthReporter,
    /// The health service over `reporter` (its type cannot be named).
    routes: Routes,
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for ProcessHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("ProcessHealth")
            .field("services", &state.services)
            .field("draining", &state.draining)
            .finish()
    }
}

impl Default for ProcessHealth {
    fn default() -> Self {
        ProcessHealth::new()
    }
}

impl ProcessHealth {
    /// A process with no component yet: "" is `SERVING`.
    pub fn new() -> ProcessHealth {
        let (reporter, service) = tonic_health::server::health_reporter();
        // `health_reporter` starts "" as SERVING: nothing to publish yet.
        ProcessHealth {
            reporter,
            routes: Routes::new(service),
            state: Arc::default(),
        }
    }

    /// Routes serving `grpc.health.v1.Health` over this process's health;
    /// add the admin listener's other services to them.
    pub fn routes(&self) -> Routes {
        self.routes.clone()
    }

    /// Records the status of `service` (a component's full proto service
    /// name) and updates "" accordingly.
    pub async fn set(&self, service: &str, status: ServingStatus) {
        let overall = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.services.insert(service.to_owned(), status);
            state.overall()
        };
        self.reporter.set_service_status(service, status).await;
        self.reporter.set_service_status("", overall).await;
    }

    /// Shutdown has begun: "" is `NOT_SERVING` from now on, so probes take
    /// the process out of rotation while it drains.
    pub async fn drain(&self) {
        {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.draining = true;
        }
        self.reporter.set_service_status("", ServingStatus::NotServing).await;
    }

    /// The status of "" now (what a probe of the process would read).
    pub fn overall(&self) -> ServingStatus {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).overall()
    }
}

/// A port's `grpc.health.v1.Health`: tonic's, except that its `Watch`
/// streams end once the port closes. A watch never ends by itself, so a
/// client watching (every replica's balancer does) would otherwise hold the
/// graceful drain until its deadline; by then the watcher has heard
/// `NOT_SERVING`, and the end tells it the connection is going too.
pub(crate) struct ClosingHealth {
    inner: tonic_health::server::HealthService,
    closed: crate::Shutdown,
}

impl ClosingHealth {
    /// The health service of `reporter`, whose watches end at `closed`.
    pub(crate) fn server(
        reporter: HealthReporter,
        closed: crate::Shutdown,
    ) -> tonic_health::pb::health_server::HealthServer<ClosingHealth> {
        tonic_health::pb::health_server::HealthServer::new(ClosingHealth {
            inner: tonic_health::server::HealthService::from_health_reporter(reporter),
            closed,
        })
    }
}

type Watch = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<tonic_health::pb::HealthCheckResponse, tonic::Status>> + Send>,
>;

#[tonic::async_trait]
impl tonic_health::pb::health_server::Health for ClosingHealth {
    async fn check(
        &self,
        request: tonic::Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<tonic::Response<tonic_health::pb::HealthCheckResponse>, tonic::Status> {
        tonic_health::pb::health_server::Health::check(&self.inner, request).await
    }

    type WatchStream = Watch;

    async fn watch(
        &self,
        request: tonic::Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<tonic::Response<Watch>, tonic::Status> {
        let stream = tonic_health::pb::health_server::Health::watch(&self.inner, request)
            .await?
            .into_inner();
        let closed = self.closed.clone();
        let stream: Watch = Box::pin(Until {
            stream,
            end: Box::pin(async move { closed.wait().await }),
        });
        Ok(tonic::Response::new(stream))
    }
}

/// `stream` until `end` completes.
struct Until<S> {
    stream: S,
    end: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

impl<S: tokio_stream::Stream + Unpin> tokio_stream::Stream for Until<S> {
    type Item = S::Item;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        if self.end.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(None);
        }
        std::pin::Pin::new(&mut self.stream).poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_process_serves_only_while_every_component_does_and_not_while_draining() {
        let health = ProcessHealth::new();
        assert_eq!(health.overall(), ServingStatus::Serving);
        health.set("a.A", ServingStatus::Serving).await;
        health.set("b.B", ServingStatus::Serving).await;
        assert_eq!(health.overall(), ServingStatus::Serving);
        health.set("b.B", ServingStatus::NotServing).await;
        assert_eq!(health.overall(), ServingStatus::NotServing);
        health.set("b.B", ServingStatus::Serving).await;
        assert_eq!(health.overall(), ServingStatus::Serving);
        health.drain().await;
        assert_eq!(health.overall(), ServingStatus::NotServing);
        health.set("a.A", ServingStatus::Serving).await;
        assert_eq!(health.overall(), ServingStatus::NotServing);
    }
}
