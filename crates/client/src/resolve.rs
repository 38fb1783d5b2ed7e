//! [`Resolve`]: how a DNS name becomes socket addresses, and the system's
//! resolver behind it by default.

use std::{future::Future, io, net::SocketAddr, pin::Pin};

/// What a [`Resolve`] returns: the socket addresses of a name, or why not.
pub type Resolving = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>>;

/// Turns a DNS name and port into socket addresses; each becomes one
/// endpoint. Asked again every `dns_refresh`.
///
/// The default is [`SystemResolver`]; implement this to take endpoints
/// from elsewhere (a service registry), or to script DNS in tests. An
/// answer may carry other ports than `port` (as SRV records would).
pub trait Resolve: Send + Sync + 'static {
    /// The addresses `host` has now. An error, or an empty answer, keeps
    /// the endpoints of the last good answer.
    fn resolve(&self, host: &str, port: u16) -> Resolving;
}

/// The system's resolver (`getaddrinfo` on a blocking thread, through
/// `tokio::net::lookup_host`): `/etc/hosts`, then DNS, as the machine is
/// configured. A Kubernetes headless service answers with every ready pod.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> Resolving {
        let host = host.to_owned();
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host.as_str(), port)).await?;
            Ok(addrs.collect())
        })
    }
}
