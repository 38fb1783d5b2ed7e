//! What the TLS tests share: development certificates in a temporary
//! directory, a real gRPC server (`grpc.health.v1.Health`) over
//! `ServerTls::incoming` that records who called, and a client call.

#![allow(dead_code, clippy::unwrap_used)]

use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use lightbox_tls::{ClientTls, ClientTlsFiles, PeerIdentity, ServerTls, ServerTlsFiles, generate_dev_certs};
use tempfile::TempDir;
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Endpoint, Server},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// How often the tests' reloaders poll.
pub const POLL: Duration = Duration::from_millis(50);

/// How long a test waits for a reload to show before failing.
pub const DEADLINE: Duration = Duration::from_secs(5);

/// A development CA and certificates for `names`, in their own directory.
pub struct Certs {
    dir: TempDir,
}

impl Certs {
    pub fn new(names: &[&str]) -> Certs {
        let dir = tempfile::tempdir().expect("a temporary directory");
        generate_dev_certs(dir.path(), names, &[], false).expect("development certificates");
        Certs { dir }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.pem"))
    }

    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.key"))
    }

    /// Server files for `name`, with or without a client CA (this one's).
    pub fn server_files(&self, name: &str, mtls: bool) -> ServerTlsFiles {
        ServerTlsFiles {
            cert: self.cert(name),
            key: self.key(name),
            client_ca: mtls.then(|| self.ca()),
        }
    }

    /// Client files trusting this CA, presenting `name`'s certificate if given.
    pub fn client_files(&self, name: Option<&str>) -> ClientTlsFiles {
        ClientTlsFiles {
            ca: self.ca(),
            cert: name.map(|name| self.cert(name)),
            key: name.map(|name| self.key(name)),
        }
    }

    pub fn client(&self, name: Option<&str>) -> ClientTls {
        ClientTls::load(self.client_files(name)).expect("client TLS")
    }
}

/// Copies a certificate and key into `dir` as `live.pem` / `live.key` (the
/// files a reloading server or client is pointed at); returns their paths.
pub fn live_pair(dir: &Path, cert: &Path, key: &Path) -> (PathBuf, PathBuf) {
    let (live_cert, live_key) = (dir.join("live.pem"), dir.join("live.key"));
    replace(&live_cert, cert);
    replace(&live_key, key);
    (live_cert, live_key)
}

/// Replaces `dst` with the contents of `src` atomically (write a temporary
/// file, rename it over), as a careful rotation does.
pub fn replace(dst: &Path, src: &Path) {
    let contents = std::fs::read(src).expect("read the source file");
    replace_with(dst, &contents);
}

pub fn replace_with(dst: &Path, contents: &[u8]) {
    let tmp = dst.with_extension("tmp");
    std::fs::write(&tmp, contents).expect("write the temporary file");
    std::fs::rename(&tmp, dst).expect("rename over the live file");
}

/// A health server over TLS on 127.0.0.1:0, recording the SPIFFE ID the
/// server saw on each call (`None` for a call without one). Stops when
/// dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Option<String>>>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl TestServer {
    pub async fn start(tls: &ServerTls) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (_, health) = tonic_health::server::health_reporter();
        let record = {
            let seen = seen.clone();
            move |request: tonic::Request<()>| {
                let id = PeerIdentity::from_request(&request).and_then(|peer| peer.spiffe_id.clone());
                seen.lock().unwrap().push(id);
                Ok(request)
            }
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = Server::builder()
            .add_service(InterceptedService::new(health, record))
            .serve_with_incoming_shutdown(tls.incoming(listener), async {
                let _ = stopped.await;
            });
        tokio::spawn(server);
        TestServer {
            addr,
            seen,
            _stop: stop,
        }
    }

    /// The SPIFFE ID seen on the last call.
    pub fn last_caller(&self) -> Option<String> {
        self.seen.lock().unwrap().last().cloned().flatten()
    }

    /// How many calls reached the handler.
    pub fn seen_count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// `https://127.0.0.1:PORT`.
    pub fn uri(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }
}

/// One `Check` call on a new connection (a new channel) to `uri`.
pub async fn check(client: &ClientTls, uri: &str) -> Result<(), tonic::Status> {
    let endpoint = Endpoint::from_shared(uri.to_owned())
        .expect("a valid URI")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2));
    let mut health = HealthClient::new(client.channel(endpoint));
    health
        .check(HealthCheckRequest { service: String::new() })
        .await
        .map(|_| ())
}

/// Waits until `condition` holds, polling, failing the test after `DEADLINE`.
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if condition().await {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "not within {DEADLINE:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
