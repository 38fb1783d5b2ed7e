//! What the client tests share: replicas (real tonic servers serving
//! `grpc.health.v1.Health`, each in a runtime of its own so that killing
//! one drops its sockets the way a dead process does), a counted call, and
//! waiting for a condition with a deadline.

#![allow(dead_code, clippy::unwrap_used)]

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use lightbox_client::{Backoff, Balanced, ConnectOptions, ReplicaState};
use lightbox_tls::ServerTls;
use tokio::runtime::Runtime;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Status, body::Body, metadata::MetadataValue, service::Routes, transport::Server};
use tonic_health::{
    ServingStatus,
    pb::{HealthCheckRequest, health_client::HealthClient},
    server::HealthReporter,
};

/// The header that marks the tests' own calls, so a replica counts them and
/// not the client's health watches.
pub const TEST_CALL: &str = "x-test-call";

/// How long a test waits for a condition before failing.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// What a replica's health service offers the client's health checks (the
/// tests' own calls always reach it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `Watch` and `Check`.
    Full,
    /// `Check` only: `Watch` is UNIMPLEMENTED.
    CheckOnly,
    /// No health service: both are UNIMPLEMENTED.
    NoHealth,
}

/// One replica: a gRPC server on 127.0.0.1, in its own runtime.
pub struct Replica {
    pub addr: SocketAddr,
    /// The test calls this replica answered.
    pub served: Arc<AtomicUsize>,
    reporter: HealthReporter,
    runtime: Option<Runtime>,
    tls: Option<ServerTls>,
    api: Api,
}

impl Replica {
    /// A replica on a free port.
    pub fn start() -> Replica {
        Replica::start_with(Api::Full)
    }

    /// A replica on a free port whose health offers `api`.
    pub fn start_with(api: Api) -> Replica {
        Replica::spawn(bind("127.0.0.1:0".parse().unwrap()), None, api)
    }

    /// A replica on a free port, speaking TLS.
    pub fn start_tls(tls: ServerTls) -> Replica {
        Replica::spawn(bind("127.0.0.1:0".parse().unwrap()), Some(tls), Api::Full)
    }

    fn spawn(listener: std::net::TcpListener, tls: Option<ServerTls>, api: Api) -> Replica {
        let addr = listener.local_addr().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (reporter, health) = tonic_health::server::health_reporter();
        let served = Arc::new(AtomicUsize::new(0));
        let counter = served.clone();
        let count = tower::util::MapRequestLayer::new(move |mut request: http::Request<Body>| {
            if request.headers().contains_key(TEST_CALL) {
                counter.fetch_add(1, Ordering::SeqCst);
                return request;
            }
            let hidden = match request.uri().path() {
                "/grpc.health.v1.Health/Watch" => api != Api::Full,
                "/grpc.health.v1.Health/Check" => api == Api::NoHealth,
                _ => false,
            };
            if hidden {
                // A method the health service does not have: UNIMPLEMENTED.
                *request.uri_mut() = http::Uri::from_static("/grpc.health.v1.Health/Hidden");
            }
            request
        });
        let server_tls = tls.clone();
        runtime.spawn(async move {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let router = Server::builder().layer(count).add_routes(Routes::new(health));
            let served = match server_tls {
                None => router.serve_with_incoming(TcpListenerStream::new(listener)).await,
                Some(tls) => router.serve_with_incoming(tls.incoming(listener)).await,
            };
            served.unwrap();
        });
        Replica {
            addr,
            served,
            reporter,
            runtime: Some(runtime),
            tls,
            api,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The test calls answered so far.
    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }

    /// Sets the health of "" (the whole server).
    pub async fn set(&self, status: ServingStatus) {
        self.reporter.set_service_status("", status).await;
    }

    /// Dies at once: the runtime and every task and socket in it are
    /// dropped, so peers see their connections reset and new connections
    /// refused.
    pub fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    /// Starts again on the same port (once the dead one's sockets are
    /// gone), with a new health reporter and call count.
    pub async fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + DEADLINE;
        let listener = loop {
            match std::net::TcpListener::bind(self.addr) {
                Ok(listener) => break listener,
                Err(err) => assert!(Instant::now() < deadline, "cannot bind {} again: {err}", self.addr),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        *self = Replica::spawn(listener, self.tls.clone(), self.api);
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

fn bind(addr: SocketAddr) -> std::net::TcpListener {
    std::net::TcpListener::bind(addr).unwrap()
}

/// `http://a,http://b,…` for `replicas`.
pub fn target(replicas: &[&Replica]) -> String {
    replicas.iter().map(|r| r.url()).collect::<Vec<_>>().join(",")
}

/// Options for tests: short timeouts and backoff.
pub fn options() -> ConnectOptions {
    ConnectOptions {
        connect_timeout: Duration::from_secs(1),
        probe_timeout: Duration::from_secs(1),
        dns_refresh: Duration::from_millis(50),
        health_poll_interval: Duration::from_millis(100),
        backoff: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
        },
        ..ConnectOptions::default()
    }
}

/// A test call (`Health/Check` of ""), counted by the replica answering it.
pub async fn call(channel: &Balanced) -> Result<(), Status> {
    let mut client = HealthClient::new(channel.clone());
    client.check(test_request()).await.map(|_| ())
}

/// A `HealthCheckRequest` for "" marked as a test call, with a deadline.
pub fn test_request() -> tonic::Request<HealthCheckRequest> {
    let mut request = tonic::Request::new(HealthCheckRequest { service: String::new() });
    request
        .metadata_mut()
        .insert(TEST_CALL, MetadataValue::from_static("1"));
    request.set_timeout(Duration::from_secs(5));
    request
}

/// The state `channel` has for the endpoint at `addr`.
pub fn state_of(channel: &Balanced, addr: SocketAddr) -> Option<ReplicaState> {
    let wanted = addr.to_string();
    channel
        .replicas()
        .into_iter()
        .find(|r| r.endpoint == wanted || r.endpoint.ends_with(&format!("({wanted})")))
        .map(|r| r.state)
}

/// How many endpoints of `channel` are healthy.
pub fn healthy(channel: &Balanced) -> usize {
    channel
        .replicas()
        .iter()
        .filter(|r| r.state == ReplicaState::Healthy)
        .count()
}

/// Waits until `condition` holds, failing the test after [`DEADLINE`].
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Retries `attempt` until it succeeds, failing the test after [`DEADLINE`];
/// returns the value and the failures seen on the way.
pub async fn until_ok<T, F, Fut>(what: &str, mut attempt: F) -> (T, Vec<Status>)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let deadline = Instant::now() + DEADLINE;
    let mut failures = Vec::new();
    loop {
        match attempt().await {
            Ok(value) => return (value, failures),
            Err(status) => failures.push(status),
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {failures:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
