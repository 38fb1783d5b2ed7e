//! The client side: trust one CA, present a client certificate when given,
//! reload both from their files, and connect tonic channels over it.

use std::{
    future::Future,
    io,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use arc_swap::ArcSwap;
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use tokio::{net::TcpStream, task::JoinHandle};
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint};

use crate::{
    TlsError,
    reload::{self, CurrentKey, Reload, Reloadable, lock},
    server::DEFAULT_HANDSHAKE_TIMEOUT,
};

/// Where a client's trusted CA and (for mutual TLS) its own certificate live.
#[derive(Debug, Clone)]
pub struct ClientTlsFiles {
    /// The CA certificates (PEM) that servers' certificates must chain to.
    /// Only these are trusted: no system or webpki roots.
    pub ca: PathBuf,
    /// The client's certificate chain (PEM, leaf first), presented when a
    /// server asks for one. Give both `cert` and `key`, or neither.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub key: Option<PathBuf>,
}

/// A client's TLS trust and identity, reloadable from its files.
///
/// Cheap to clone; clones share the certificates. See the [crate docs](crate)
/// for a tonic `Channel` over it.
#[derive(Clone)]
pub struct ClientTls {
    shared: Arc<Shared>,
}

struct Shared {
    files: ClientTlsFiles,
    /// The client certificate every handshake presents; swapped on reload.
    key: Option<Arc<CurrentKey>>,
    /// Replaced on every reload: a new CA applies to the next connection, and
    /// no TLS session from before a rotation resumes after it (a resumed
    /// session would carry the old client certificate's identity).
    configs: ArcSwap<Configs>,
    /// Serialises reloads; the file contents (CA, cert, key) last tried and
    /// last loaded.
    state: Mutex<State>,
}

struct State {
    tried: [Vec<u8>; 3],
    loaded: [Vec<u8>; 3],
    roots: Arc<RootCertStore>,
}

/// One configuration per ALPN list.
struct Configs {
    /// `h2` only: gRPC.
    grpc: Arc<ClientConfig>,
    /// `h2`, `http/1.1`: any other HTTP client.
    http: Arc<ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("files", &self.shared.files)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Loads the CA and the client certificate, failing on the first file
    /// that is missing or wrong.
    pub fn load(files: ClientTlsFiles) -> Result<ClientTls, TlsError> {
        let contents = read_files(&files)?;
        let roots = reload::root_store(&files.ca, &contents[0])?;
        let key = match (&files.cert, &files.key) {
            (Some(cert), Some(key)) => Some(CurrentKey::new(reload::certified_key(
                cert,
                &contents[1],
                key,
                &contents[2],
            )?)),
            _ => None,
        };
        let configs = configs(&roots, key.as_ref())?;
        let shared = Shared {
            files,
            key,
            configs: ArcSwap::from_pointee(configs),
            state: Mutex::new(State {
                tried: contents.clone(),
                loaded: contents,
                roots,
            }),
        };
        Ok(ClientTls {
            shared: Arc::new(shared),
        })
    }

    /// The files this was loaded from.
    pub fn files(&self) -> &ClientTlsFiles {
        &self.shared.files
    }

    /// A rustls configuration (ALPN `h2`, `http/1.1`) for another HTTP
    /// client, as it is now: it presents reloaded client certificates, but a
    /// new CA needs a fresh call.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.shared.configs.load().http.clone()
    }

    /// Reads the files once and, if they changed since the last load or the
    /// last failed try, loads them; on error nothing changes. As
    /// [`crate::ServerTls::reload`] (it blocks on file reads).
    pub fn reload(&self) -> Result<Reload, TlsError> {
        self.shared.reload()
    }

    /// Polls the files every `every` and loads them when they change, as
    /// [`crate::ServerTls::spawn_reloader`]: new connections use the new
    /// certificates, a bad pair is logged at warn and the old one stays. The
    /// task ends once every clone (and every [`TlsConnector`]) is dropped.
    pub fn spawn_reloader(&self, every: Duration) -> JoinHandle<()> {
        reload::spawn(Arc::downgrade(&self.shared), every)
    }

    /// A connector for [`Endpoint::connect_with_connector_lazy`]: TCP, then
    /// TLS with ALPN `h2`, checking the server's certificate against the
    /// URI's host (`https://users:50051` → `users`, `https://127.0.0.1:…` →
    /// the IP address). Each connection uses the certificates current then.
    pub fn connector(&self) -> TlsConnector {
        TlsConnector { tls: self.clone() }
    }

    /// A lazily connecting channel to `endpoint` over [`ClientTls::connector`];
    /// reconnects pick up reloaded certificates.
    ///
    /// tonic's own TLS must stay off for this endpoint (no
    /// `tls_config`, and no tonic `tls-*` feature in the build, or an
    /// `https://` URI would be wrapped twice and fail).
    pub fn channel(&self, endpoint: Endpoint) -> Channel {
        endpoint.connect_with_connector_lazy(self.connector())
    }
}

impl Shared {
    fn reload(&self) -> Result<Reload, TlsError> {
        let files = &self.files;
        let contents = read_files(files)?;
        let mut state = lock(&self.state);
        if contents == state.tried || contents == state.loaded {
            state.tried = contents;
            return Ok(Reload::Unchanged);
        }
        state.tried = contents.clone();
        // Everything is built before anything is swapped.
        let roots = if contents[0] == state.loaded[0] {
            state.roots.clone()
        } else {
            reload::root_store(&files.ca, &contents[0])?
        };
        let new_key = match (&files.cert, &files.key) {
            (Some(cert), Some(key)) => Some(reload::certified_key(cert, &contents[1], key, &contents[2])?),
            _ => None,
        };
        let configs = configs(&roots, self.key.as_ref())?;
        if let (Some(current), Some(new_key)) = (&self.key, new_key) {
            current.store(new_key);
        }
        self.configs.store(Arc::new(configs));
        state.roots = roots;
        state.loaded = contents;
        Ok(Reload::Reloaded)
    }
}

impl Reloadable for Shared {
    fn reload(&self) -> Result<Reload, TlsError> {
        Shared::reload(self)
    }

    fn describe(&self) -> String {
        match &self.files.cert {
            Some(cert) => format!("client certificate {}", cert.display()),
            None => format!("client CA {}", self.files.ca.display()),
        }
    }
}

/// The contents of the CA, certificate and key files (empty for a file not
/// given); one of certificate and key without the other is an error.
fn read_files(files: &ClientTlsFiles) -> Result<[Vec<u8>; 3], TlsError> {
    let (cert, key) = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => (reload::read(cert)?, reload::read(key)?),
        (None, None) => (Vec::new(), Vec::new()),
        (Some(given), None) | (None, Some(given)) => return Err(TlsError::HalfClientPair { given: given.clone() }),
    };
    Ok([reload::read(&files.ca)?, cert, key])
}

fn configs(roots: &Arc<RootCertStore>, key: Option<&Arc<CurrentKey>>) -> Result<Configs, TlsError> {
    let config = |alpn: &[&[u8]]| -> Result<Arc<ClientConfig>, TlsError> {
        let builder = ClientConfig::builder_with_provider(reload::provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_root_certificates(roots.clone());
        let mut config = match key {
            Some(key) => builder.with_client_cert_resolver(key.clone()),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    };
    Ok(Configs {
        grpc: config(&[b"h2"])?,
        http: config(&[b"h2", b"http/1.1"])?,
    })
}

/// Connects TLS for tonic: a `tower::Service<http::Uri>` made by
/// [`ClientTls::connector`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct TlsConnector {
    tls: ClientTls,
}

/// What [`TlsConnector`] connects: a TLS stream as hyper I/O.
pub type TlsIo = TokioIo<TlsStream<TcpStream>>;

impl tower::Service<http::Uri> for TlsConnector {
    type Response = TlsIo;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TlsIo>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        // The configuration current at this connection, not at channel creation.
        let config = self.tls.shared.configs.load().grpc.clone();
        Box::pin(async move {
            let (host, port) = host_and_port(&uri)?;
            let server_name = ServerName::try_from(host.clone()).map_err(|err| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{host:?} (from {uri}) is not a DNS name or IP address: {err}"),
                )
            })?;
            let tcp = TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|err| io::Error::new(err.kind(), format!("cannot connect to {host}:{port}: {err}")))?;
            // gRPC sends small frames and waits for answers: no Nagle delay.
            tcp.set_nodelay(true)?;
            let handshake = tokio_rustls::TlsConnector::from(config).connect(server_name, tcp);
            let stream = match tokio::time::timeout(DEFAULT_HANDSHAKE_TIMEOUT, handshake).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => {
                    return Err(io::Error::new(
                        err.kind(),
                        format!("TLS handshake with {host}:{port} failed: {err}"),
                    ));
                }
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("TLS handshake with {host}:{port} not finished within {DEFAULT_HANDSHAKE_TIMEOUT:?}"),
                    ));
                }
            };
            Ok(TokioIo::new(stream))
        })
    }
}

/// The host (IPv6 brackets removed) and port of `uri`; the port defaults to
/// 443 for `https` and 80 for `http`.
fn host_and_port(uri: &http::Uri) -> io::Result<(String, u16)> {
    let host = uri
        .host()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri} has no host to connect to")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("http") { 80 } else { 443 });
    Ok((host, port))
}
