//! The server side: certificates from files, optional mutual TLS, reloaded
//! without a restart, and the handshake of one accepted socket.

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
use rustls::{
    ServerConfig,
    server::{WebPkiClientVerifier, danger::ClientCertVerifier},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    task::JoinHandle,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use crate::{
    TlsConnectInfo, TlsError,
    reload::{self, CurrentKey, Reload, Reloadable, lock},
};

/// How long a client may take over its handshake before it is dropped: a
/// client that connects and sends nothing must not hold a slot for ever.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a server's certificate, key and (for mutual TLS) client CA live.
#[derive(Debug, Clone)]
pub struct ServerTlsFiles {
    /// The server's certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// The server certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// With a path: every client must present a certificate issued by one of
    /// the CAs in this PEM file, or its handshake fails (mutual TLS).
    /// Without: clients are not asked for a certificate.
    pub client_ca: Option<PathBuf>,
}

/// A server's TLS identity and policy, reloadable from its files.
///
/// Cheap to clone: clones share the certificates, so one reload serves them
/// all. See the [crate docs](crate) for serving tonic and axum with it.
#[derive(Clone)]
pub struct ServerTls {
    shared: Arc<Shared>,
    handshake_timeout: Duration,
}

/// What every clone shares.
struct Shared {
    files: ServerTlsFiles,
    /// The certificate every handshake is given; swapped on reload.
    key: Arc<CurrentKey>,
    /// What each accept starts from. Replaced on every reload (so no TLS
    /// session from before a rotation resumes after it, and a new client CA
    /// applies at once) and when the ALPN list changes; connections already
    /// open keep the one they started with.
    config: ArcSwap<ServerConfig>,
    /// Serialises reloads (the reloader's and any manual one) and keeps what
    /// the next configuration is built from.
    state: Mutex<State>,
}

struct State {
    /// The file contents (cert, key, client CA) last tried, good or bad: a
    /// bad pair is reported once, not at every poll.
    tried: [Vec<u8>; 3],
    /// The file contents in use.
    loaded: [Vec<u8>; 3],
    verifier: Arc<dyn ClientCertVerifier>,
    alpn: Vec<Vec<u8>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.shared.files)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the certificate, key and client CA, failing on the first file
    /// that is missing or wrong (a server should not start without them).
    ///
    /// ALPN offers `h2` and `http/1.1`; see [`ServerTls::with_alpn`].
    pub fn load(files: ServerTlsFiles) -> Result<ServerTls, TlsError> {
        let contents = read_files(&files)?;
        let key = reload::certified_key(&files.cert, &contents[0], &files.key, &contents[1])?;
        let verifier = client_verifier(&files, &contents[2])?;
        let alpn = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let key = CurrentKey::new(key);
        let config = server_config(&verifier, &key, &alpn)?;
        let shared = Shared {
            files,
            key,
            config: ArcSwap::from_pointee(config),
            state: Mutex::new(State {
                tried: contents.clone(),
                loaded: contents,
                verifier,
                alpn,
            }),
        };
        Ok(ServerTls {
            shared: Arc::new(shared),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        })
    }

    /// Sets the ALPN protocols offered, most preferred first. A gRPC-only
    /// server passes `&[b"h2"]`; the default `h2`, `http/1.1` suits a server
    /// speaking both (like the gateway). Applies to every clone.
    pub fn with_alpn(self, protocols: &[&[u8]]) -> Result<ServerTls, TlsError> {
        {
            let mut state = lock(&self.shared.state);
            state.alpn = protocols.iter().map(|p| p.to_vec()).collect();
            let config = server_config(&state.verifier, &self.shared.key, &state.alpn)?;
            self.shared.config.store(Arc::new(config));
        }
        Ok(self)
    }

    /// Sets how long a handshake may take (default
    /// [`DEFAULT_HANDSHAKE_TIMEOUT`]), for this handle and clones made from it.
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> ServerTls {
        self.handshake_timeout = timeout;
        self
    }

    /// The files this was loaded from.
    pub fn files(&self) -> &ServerTlsFiles {
        &self.shared.files
    }

    /// The configuration new connections get now, for a server that runs
    /// rustls itself. It presents reloaded certificates, but a new client CA
    /// needs a fresh call: prefer [`ServerTls::accept`].
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.shared.config.load_full()
    }

    /// Reads the files once and, if they changed since the last load or the
    /// last failed try, loads them. On error nothing changes and the error
    /// names the file and what is wrong with it; the same broken contents are
    /// not tried (nor reported) twice.
    ///
    /// Blocks on file reads: from async code, call it in `spawn_blocking`,
    /// or let [`ServerTls::spawn_reloader`] do it.
    pub fn reload(&self) -> Result<Reload, TlsError> {
        self.shared.reload()
    }

    /// Polls the files every `every` (a second or two is plenty) and loads
    /// them when they change: a valid new pair is used from the next
    /// handshake on and logged at info; a bad one is logged at warn, naming
    /// the file and why, and the certificates in use stay.
    ///
    /// The task ends by itself once every clone of this `ServerTls` (and
    /// every stream from [`ServerTls::incoming`]) is dropped; abort the
    /// handle to stop it sooner. Needs a tokio runtime.
    pub fn spawn_reloader(&self, every: Duration) -> JoinHandle<()> {
        reload::spawn(Arc::downgrade(&self.shared), every)
    }

    /// Runs the TLS handshake on an accepted socket with the configuration
    /// current now, failing with `TimedOut` after the handshake timeout.
    /// With a client CA, a client without a valid certificate fails here.
    pub fn accept(&self, tcp: TcpStream) -> impl Future<Output = io::Result<TlsStream<TcpStream>>> + Send + 'static {
        let acceptor = TlsAcceptor::from(self.shared.config.load_full());
        let timeout = self.handshake_timeout;
        async move {
            match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(result) => result,
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("TLS handshake not finished within {} ms", timeout.as_millis()),
                )),
            }
        }
    }

    /// [`ServerTls::accept`], with what a server needs to know of the
    /// connection taken once, after the handshake.
    pub(crate) fn accept_conn(&self, tcp: TcpStream) -> impl Future<Output = io::Result<TlsConn>> + Send + 'static {
        let handshake = self.accept(tcp);
        async move {
            let stream = handshake.await?;
            let info = TlsConnectInfo::from_stream(&stream)?;
            Ok(TlsConn { stream, info })
        }
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
        // Everything is built before anything is swapped: a reload applies
        // whole or not at all.
        let key = reload::certified_key(&files.cert, &contents[0], &files.key, &contents[1])?;
        let verifier = if contents[2] == state.loaded[2] {
            state.verifier.clone()
        } else {
            client_verifier(files, &contents[2])?
        };
        let config = server_config(&verifier, &self.key, &state.alpn)?;
        self.key.store(key);
        self.config.store(Arc::new(config));
        state.verifier = verifier;
        state.loaded = contents;
        Ok(Reload::Reloaded)
    }
}

impl Reloadable for Shared {
    fn reload(&self) -> Result<Reload, TlsError> {
        Shared::reload(self)
    }

    fn describe(&self) -> String {
        format!("server certificate {}", self.files.cert.display())
    }
}

/// The contents of the certificate, key and client CA files (empty when
/// there is no client CA).
fn read_files(files: &ServerTlsFiles) -> Result<[Vec<u8>; 3], TlsError> {
    let ca = match &files.client_ca {
        Some(path) => reload::read(path)?,
        None => Vec::new(),
    };
    Ok([reload::read(&files.cert)?, reload::read(&files.key)?, ca])
}

/// Who may connect: anyone, or (with a client CA) only holders of a
/// certificate it issued.
fn client_verifier(files: &ServerTlsFiles, ca_pem: &[u8]) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let Some(path) = &files.client_ca else {
        return Ok(WebPkiClientVerifier::no_client_auth());
    };
    let roots = reload::root_store(path, ca_pem)?;
    WebPkiClientVerifier::builder_with_provider(roots, reload::provider())
        .build()
        .map_err(|err| TlsError::BadCa {
            path: path.clone(),
            detail: err.to_string(),
        })
}

fn server_config(
    verifier: &Arc<dyn ClientCertVerifier>,
    key: &Arc<CurrentKey>,
    alpn: &[Vec<u8>],
) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(reload::provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier.clone())
        .with_cert_resolver(key.clone());
    config.alpn_protocols = alpn.to_vec();
    Ok(config)
}

/// An accepted TLS connection, with its [`TlsConnectInfo`] (peer address and
/// identity) read once after the handshake.
///
/// tonic puts the `TlsConnectInfo` into every request's extensions (through
/// [`tonic::transport::server::Connected`]); axum does when served with
/// `into_make_service_with_connect_info::<TlsConnectInfo>()`.
#[derive(Debug)]
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    info: TlsConnectInfo,
}

impl TlsConn {
    /// The peer's address and identity.
    pub fn connect_info(&self) -> &TlsConnectInfo {
        &self.info
    }

    /// The TLS stream, e.g. to read the negotiated ALPN protocol.
    pub fn get_ref(&self) -> &TlsStream<TcpStream> {
        &self.stream
    }

    /// The TLS stream.
    pub fn into_inner(self) -> TlsStream<TcpStream> {
        self.stream
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = TlsConnectInfo;

    fn connect_info(&self) -> TlsConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
