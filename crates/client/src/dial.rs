//! [`Dialer`]: one tonic `Channel` per endpoint (one resolved IP), with
//! the keepalives and timeouts of the options, `:authority` saying the
//! address's host name, and TLS (when `https://`) checking that name.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderValue, Uri};
use hyper_util::rt::TokioIo;
use lightbox_tls::ClientTls;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint};

use crate::{ClientError, ConnectOptions, target::Address};

/// Makes the channels of endpoints; built once per [`crate::connect`].
pub(crate) struct Dialer {
    connect_timeout: Duration,
    tcp_keepalive: Option<Duration>,
    http2_keepalive_interval: Duration,
    http2_keepalive_timeout: Duration,
    user_agent: Option<HeaderValue>,
    tls: Option<ClientTls>,
}

impl Dialer {
    pub(crate) fn new(options: &ConnectOptions) -> Result<Dialer, ClientError> {
        let user_agent = match &options.user_agent {
            Some(agent) => Some(
                HeaderValue::try_from(agent.as_str()).map_err(|_| ClientError::InvalidUserAgent {
                    user_agent: agent.clone(),
                })?,
            ),
            None => None,
        };
        Ok(Dialer {
            connect_timeout: options.connect_timeout,
            tcp_keepalive: options.tcp_keepalive,
            http2_keepalive_interval: options.http2_keepalive_interval,
            http2_keepalive_timeout: options.http2_keepalive_timeout,
            user_agent,
            tls: options.tls.clone(),
        })
    }

    /// A lazily connecting channel to `addr`, one endpoint of `address`: a
    /// connection of its own, reconnected by tonic on the next call after
    /// it breaks.
    pub(crate) fn channel(&self, address: &Address, addr: SocketAddr) -> Result<Channel, String> {
        // tonic dials the URI; the origin is what requests say
        // (`:scheme`, `:authority`): the host name, not the IP. The URI's
        // scheme is always http: it only matters to tonic's own TLS (not
        // used here; an https URI would fail if a tonic `tls-*` feature got
        // enabled somewhere), and our TLS connector dials `addr` itself.
        let uri = format!("http://{addr}");
        let origin = format!("{}://{}", address.scheme(), address.authority());
        let origin: Uri = origin.parse().map_err(|err| format!("{origin} is not a URI: {err}"))?;
        let mut endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|err| format!("{uri} is not a URI: {err}"))?
            .origin(origin)
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .tcp_keepalive(self.tcp_keepalive)
            .http2_keep_alive_interval(self.http2_keepalive_interval)
            .keep_alive_timeout(self.http2_keepalive_timeout)
            // A dead peer is noticed on an idle connection too: a replica's
            // health watch is idle between status changes.
            .keep_alive_while_idle(true);
        if let Some(agent) = &self.user_agent {
            endpoint = endpoint
                .user_agent(agent.clone())
                .map_err(|err| format!("invalid user agent: {err}"))?;
        }
        match (address.is_https(), &self.tls) {
            (false, _) => Ok(endpoint.connect_lazy()),
            (true, Some(tls)) => {
                let host = address.host();
                let server_name = ServerName::try_from(host.clone())
                    .map_err(|err| format!("{host} cannot be a TLS server name: {err}"))?;
                let connector = PinnedTls {
                    tls: tls.clone(),
                    addr,
                    server_name,
                    tcp_keepalive: self.tcp_keepalive,
                };
                // tonic bounds the whole connector call (TCP and handshake)
                // by `connect_timeout`.
                Ok(endpoint.connect_with_connector_lazy(connector))
            }
            // `connect` refuses https:// without TLS before anything runs.
            (true, None) => Err(format!("{address} is https:// but no TLS was configured")),
        }
    }
}

/// TCP to one IP, then rustls checking the certificate against the
/// address's host name. `lightbox_tls::TlsConnector` takes both from the
/// URI, which here holds the resolved IP, hence this one.
#[derive(Clone)]
struct PinnedTls {
    tls: ClientTls,
    addr: SocketAddr,
    server_name: ServerName<'static>,
    tcp_keepalive: Option<Duration>,
}

type Connecting = Pin<Box<dyn Future<Output = io::Result<TokioIo<TlsStream<TcpStream>>>> + Send>>;

impl tower::Service<Uri> for PinnedTls {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Connecting {
        // The certificates (and CA) current at this connection, so a
        // reload applies to the next connection; gRPC speaks only h2.
        let mut config = (*self.tls.client_config()).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let (addr, server_name, keepalive) = (self.addr, self.server_name.clone(), self.tcp_keepalive);
        Box::pin(async move {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|err| io::Error::new(err.kind(), format!("cannot connect to {addr}: {err}")))?;
            // gRPC sends small frames and waits for answers: no Nagle delay.
            tcp.set_nodelay(true)?;
            if let Some(idle) = keepalive {
                let keepalive = socket2::TcpKeepalive::new().with_time(idle);
                socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive)?;
            }
            let name = server_name.to_str().into_owned();
            let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(server_name, tcp)
                .await
                .map_err(|err| {
                    io::Error::new(err.kind(), format!("TLS handshake with {name} at {addr} failed: {err}"))
                })?;
            Ok(TokioIo::new(stream))
        })
    }
}
