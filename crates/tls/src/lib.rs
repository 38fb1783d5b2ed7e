//! TLS for Lightbox servers and clients: certificates from PEM files,
//! mutual TLS with the peer's identity (its SPIFFE ID) in every request,
//! certificates reloaded from disk without a restart, and development
//! certificates for `lightbox certs`.
//!
//! tonic's own `ServerTlsConfig` is fixed at start, so this crate runs
//! rustls itself (ring provider only, chosen in code: no process-wide
//! default needed) and hands tonic and axum finished TLS connections.
//!
//! # Layout
//!
//! - `server`: [`ServerTls`] (load, reload, one handshake) and [`TlsConn`],
//!   an accepted connection carrying its [`TlsConnectInfo`].
//! - `incoming`: [`TlsIncoming`], a listener's connections with handshakes
//!   run concurrently: a `Stream` for tonic, an `axum::serve::Listener`.
//! - `client`: [`ClientTls`] and [`TlsConnector`], the connector for a tonic
//!   `Channel` whose new connections use reloaded certificates.
//! - `identity`: [`PeerIdentity`] (the SANs of the peer's certificate) and
//!   [`TlsConnectInfo`], read from request extensions.
//! - `reload`: what both sides share: PEM parsing, the swappable
//!   certificate, the polling task ([`Reload`]).
//! - `certs`: [`generate_dev_certs`].
//! - `error`: [`TlsError`].
//!
//! # Reload
//!
//! `spawn_reloader(every)` reads the files every `every` and compares their
//! contents (through symlinks, so a Kubernetes secret swap is seen). A good
//! new pair serves the next handshake; connections already open keep theirs.
//! A bad one (unparsable, key not matching the certificate, a half-written
//! rotation) is logged at warn naming the file, and the old pair stays.
//!
//! # Example
//!
//! A gRPC server requiring client certificates, and a client of it:
//!
//! ```no_run
//! use std::time::Duration;
//! use lightbox_tls::{ClientTls, ClientTlsFiles, PeerIdentity, ServerTls, ServerTlsFiles};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let tls = ServerTls::load(ServerTlsFiles {
//!     cert: "certs/users.pem".into(),
//!     key: "certs/users.key".into(),
//!     client_ca: Some("certs/ca.pem".into()),
//! })?
//! .with_alpn(&[b"h2"])?;
//! let _reloader = tls.spawn_reloader(Duration::from_secs(1));
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:50051").await?;
//! let (_, health) = tonic_health::server::health_reporter();
//! let server = tonic::transport::Server::builder()
//!     .add_service(health)
//!     .serve_with_incoming_shutdown(tls.incoming(listener), std::future::pending::<()>() /* your shutdown signal */);
//! tokio::spawn(server);
//!
//! // In a handler (or with `PeerIdentity::from_extensions` in a tower layer):
//! fn caller(request: &tonic::Request<()>) -> Option<&str> {
//!     PeerIdentity::from_request(request)?.spiffe_id.as_deref()
//! }
//!
//! let client = ClientTls::load(ClientTlsFiles {
//!     ca: "certs/ca.pem".into(),
//!     cert: Some("certs/gateway.pem".into()),
//!     key: Some("certs/gateway.key".into()),
//! })?;
//! let _client_reloader = client.spawn_reloader(Duration::from_secs(1));
//! // The certificate must name the URI's host: here `users`.
//! let channel = client.channel(tonic::transport::Endpoint::from_static("https://users:50051"));
//! # let _ = channel; Ok(()) }
//! ```
//!
//! For axum, [`TlsIncoming`] is a listener:
//! `axum::serve(tls.incoming(listener), router.into_make_service_with_connect_info::<TlsConnectInfo>())`,
//! and handlers take `ConnectInfo<TlsConnectInfo>`.

mod certs;
mod client;
mod error;
mod identity;
mod incoming;
mod reload;
mod server;

pub use self::{
    certs::{DEV_TRUST_DOMAIN, generate_dev_certs},
    client::{ClientTls, ClientTlsFiles, TlsConnector, TlsIo},
    error::TlsError,
    identity::{PeerIdentity, TlsConnectInfo},
    incoming::{DEFAULT_MAX_HANDSHAKES, TlsIncoming},
    reload::Reload,
    server::{DEFAULT_HANDSHAKE_TIMEOUT, ServerTls, ServerTlsFiles, TlsConn},
};
