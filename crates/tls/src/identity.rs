//! Who is on the other end: the peer's address and, under mutual TLS, the
//! names in its verified certificate, as request extensions.

use std::{io, net::SocketAddr, sync::Arc};

use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

/// The names in a peer's leaf certificate (its subject alternative names).
///
/// Only a certificate the handshake verified against the client CA gets
/// here, so these names can be used for authorisation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The DNS names (e.g. `users`, `localhost`).
    pub dns_names: Vec<String>,
    /// The URIs, SPIFFE ID included.
    pub uris: Vec<String>,
    /// The SPIFFE ID (e.g. `spiffe://lightbox.local/users`): the one
    /// `spiffe://` URI, or `None` when there is none or more than one (the
    /// SPIFFE X.509-SVID spec allows exactly one, and an ambiguous identity
    /// must not authorise anything).
    pub spiffe_id: Option<String>,
}

impl PeerIdentity {
    /// Reads the names from a DER certificate; `None` if it does not parse
    /// as X.509 (a certificate that passed verification always does).
    pub fn from_certificate(cert: &CertificateDer<'_>) -> Option<PeerIdentity> {
        let (_, cert) = X509Certificate::from_der(cert.as_ref()).ok()?;
        let mut identity = PeerIdentity::default();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => identity.dns_names.push((*dns).to_owned()),
                    GeneralName::URI(uri) => identity.uris.push((*uri).to_owned()),
                    _ => {}
                }
            }
        }
        let mut spiffe = identity.uris.iter().filter(|uri| uri.starts_with("spiffe://"));
        identity.spiffe_id = match (spiffe.next(), spiffe.next()) {
            (Some(id), None) => Some(id.clone()),
            _ => None,
        };
        Some(identity)
    }

    /// The verified client's identity in a tonic handler: `None` without
    /// mutual TLS, or if the server was not served over [`crate::TlsIncoming`].
    ///
    /// ```
    /// use lightbox_tls::PeerIdentity;
    ///
    /// fn caller<T>(request: &tonic::Request<T>) -> Result<&str, tonic::Status> {
    ///     PeerIdentity::from_request(request)
    ///         .and_then(|peer| peer.spiffe_id.as_deref())
    ///         .ok_or_else(|| tonic::Status::unauthenticated("a client certificate is required"))
    /// }
    /// ```
    pub fn from_request<T>(request: &tonic::Request<T>) -> Option<&PeerIdentity> {
        PeerIdentity::from_extensions(request.extensions())
    }

    /// The same from an `http::Request`'s extensions, for a tower layer in
    /// front of tonic services or an axum handler or middleware.
    pub fn from_extensions(extensions: &http::Extensions) -> Option<&PeerIdentity> {
        TlsConnectInfo::from_extensions(extensions)?.peer()
    }
}

/// What a server knows of a TLS connection: the peer's address and, if it
/// presented a certificate, its identity. Cheap to clone (tonic clones it
/// into every request).
///
/// This crate's type, not tonic's `TlsConnectInfo` (which exists only under
/// tonic's own TLS features, and carries raw certificates).
#[derive(Debug, Clone)]
pub struct TlsConnectInfo {
    remote_addr: SocketAddr,
    local_addr: Option<SocketAddr>,
    peer: Option<Arc<PeerIdentity>>,
    peer_certificates: Option<Arc<[CertificateDer<'static>]>>,
}

impl TlsConnectInfo {
    /// Reads what matters of a finished handshake once, so that requests
    /// only clone `Arc`s.
    pub(crate) fn from_stream(stream: &TlsStream<TcpStream>) -> io::Result<TlsConnectInfo> {
        let (tcp, session) = stream.get_ref();
        let peer_certificates: Option<Arc<[CertificateDer<'static>]>> = session
            .peer_certificates()
            .filter(|certs| !certs.is_empty())
            .map(|certs| certs.iter().map(|cert| cert.clone().into_owned()).collect());
        let peer = peer_certificates
            .as_ref()
            .and_then(|certs| certs.first())
            .and_then(PeerIdentity::from_certificate)
            .map(Arc::new);
        Ok(TlsConnectInfo {
            remote_addr: tcp.peer_addr()?,
            local_addr: tcp.local_addr().ok(),
            peer,
            peer_certificates,
        })
    }

    /// The peer's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote_addr
    }

    /// The address the connection came in on.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// The verified client's identity; `None` without mutual TLS.
    pub fn peer(&self) -> Option<&PeerIdentity> {
        self.peer.as_deref()
    }

    /// The client's verified certificate chain, leaf first; `None` without
    /// mutual TLS.
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.peer_certificates.as_deref()
    }

    /// The connection's info in a tonic handler.
    pub fn from_request<T>(request: &tonic::Request<T>) -> Option<&TlsConnectInfo> {
        TlsConnectInfo::from_extensions(request.extensions())
    }

    /// The connection's info from an `http::Request`'s extensions: where
    /// tonic puts it, or where axum's `into_make_service_with_connect_info`
    /// does (wrapped in `axum::extract::ConnectInfo`).
    pub fn from_extensions(extensions: &http::Extensions) -> Option<&TlsConnectInfo> {
        extensions.get::<TlsConnectInfo>().or_else(|| {
            extensions
                .get::<axum::extract::ConnectInfo<TlsConnectInfo>>()
                .map(|info| &info.0)
        })
    }
}
