//! A process's admin listener: its health for probes, its metrics, and,
//! when turned on, fault injection behind a credential.
//!
//! Nothing here is on the service ports: a client that can reach a
//! service cannot change how it behaves. What the admin listener serves:
//!
//! - `grpc.health.v1.Health` over the [`ProcessHealth`] (no credential:
//!   probes send none, and it changes nothing);
//! - `GET /metrics`, Prometheus text, when given (no credential either:
//!   read-only; keep the listener off public networks);
//! - `lightbox.admin.v1.FaultService`, only when [`AdminOptions::faults`]
//!   is on, and then only to callers with the [`AdminCredential`];
//! - the [`AdminService`]s the components add ([`serve_admin_with`]), such
//!   as Photos' jobs: only to callers with the [`AdminCredential`] too;
//! - reflection, listing what is served.

use std::{net::SocketAddr, sync::Arc};

use lightbox_api::admin::fault_service_server::FaultServiceServer;
use tokio::net::TcpListener;
use tonic::{
    Request, Status,
    service::{Interceptor, Routes},
    transport::{Server, server::TcpIncoming},
};

use crate::{FaultServiceImpl, Faults, ProcessHealth, ServeError, Shutdown, server::not_served};

/// The services the admin listener always serves.
const ADMIN_SERVICES: &[&str] = &[
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// The fault service's full name.
const FAULT_SERVICE: &str = "lightbox.admin.v1.FaultService";

/// The content type of [`AdminOptions::metrics`]' text.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The shortest admin token accepted: a guessable token is no lock.
pub const MIN_TOKEN_LEN: usize = 16;

/// Who may call the admin RPCs.
#[derive(Clone)]
pub enum AdminCredential {
    /// Anyone who reaches the listener: only for `lightbox dev`, on
    /// loopback.
    Open,
    /// Callers sending `authorization: Bearer <token>` with this token.
    Bearer(Arc<str>),
}

impl std::fmt::Debug for AdminCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminCredential::Open => f.write_str("Open"),
            // Never the token itself: this ends up in logs.
            AdminCredential::Bearer(_) => f.write_str("Bearer(…)"),
        }
    }
}

impl AdminCredential {
    /// A bearer token credential; refuses a token shorter than
    /// [`MIN_TOKEN_LEN`], saying so.
    pub fn bearer(token: &str) -> Result<AdminCredential, String> {
        let token = token.trim();
        if token.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "the admin token must be at least {MIN_TOKEN_LEN} characters long (got {}); \
                 make one with e.g. `openssl rand -hex 32`",
                token.len()
            ));
        }
        Ok(AdminCredential::Bearer(Arc::from(token)))
    }
}

/// A gRPC service a component adds to its process's admin listener (an
/// operator's controls, such as Photos' jobs), served only to callers with
/// the [`AdminCredential`], like fault injection.
#[derive(Clone)]
pub struct AdminService {
    name: &'static str,
    /// Adds the service, behind the given credential check, to the routes.
    add: Arc<dyn Fn(Routes, RequireCredential) -> Routes + Send + Sync>,
}

impl AdminService {
    /// `service` (a generated tonic server), to serve on the admin listener.
    pub fn new<S>(service: S) -> AdminService
    where
        S: tonic::codegen::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        AdminService {
            name: S::NAME,
            add: Arc::new(move |routes, credential| {
                routes.add_service(tonic::service::interceptor::InterceptedService::new(
                    service.clone(),
                    credential,
                ))
            }),
        }
    }

    /// The service's full name (`lightbox.photos.v1.PhotoJobsService`).
    pub fn name(&self) -> &'static str {
        self.name
    }
}

impl std::fmt::Debug for AdminService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("AdminService").field(&self.name).finish()
    }
}

/// Text for `GET /metrics`, made at each scrape.
pub type MetricsText = Arc<dyn Fn() -> String + Send + Sync>;

/// What the admin listener serves.
#[derive(Clone)]
pub struct AdminOptions {
    /// Serve `lightbox.admin.v1.FaultService` (fault injection). Off: a call
    /// to it is refused with `UNIMPLEMENTED`, saying how to turn it on.
    pub faults: bool,
    /// Who may call the admin RPCs.
    pub credential: AdminCredential,
    /// The metrics to serve at `GET /metrics`; `None`: not served.
    pub metrics: Option<MetricsText>,
    /// The largest message accepted or sent, in bytes.
    pub max_message_bytes: usize,
    /// Serve the admin listener over TLS; with a client CA (mutual TLS), a
    /// client certificate from it is the admin credential, the token
    /// then not needed. `None`: plaintext (what Kubernetes' gRPC probes
    /// speak).
    pub tls: Option<lightbox_tls::ServerTls>,
}

impl std::fmt::Debug for AdminOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminOptions")
            .field("faults", &self.faults)
            .field("credential", &self.credential)
            .field("metrics", &self.metrics.is_some())
            .field("max_message_bytes", &self.max_message_bytes)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Checks the admin credential of every call it sees.
#[derive(Debug, Clone)]
struct RequireCredential {
    credential: AdminCredential,
    /// The listener verifies client certificates (mutual TLS): a caller
    /// that presented one is an operator.
    client_certificates: bool,
}

impl Interceptor for RequireCredential {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let certified = self.client_certificates
            && lightbox_tls::TlsConnectInfo::from_extensions(request.extensions())
                .is_some_and(|info| info.peer().is_some());
        if certified {
            return Ok(request);
        }
        let AdminCredential::Bearer(token) = &self.credential else {
            return Ok(request);
        };
        let Some(value) = request.metadata().get("authorization") else {
            return Err(Status::unauthenticated(
                "the admin service needs a credential: send `authorization: Bearer TOKEN` with the \
                 server's --admin-token (LIGHTBOX_ADMIN_TOKEN); `lightbox fault` sends its --token",
            ));
        };
        let given = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        match given {
            Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => Ok(request),
            Some(_) => Err(Status::unauthenticated(
                "the admin token is not the one this server was given (--admin-token); nothing was changed",
            )),
            None => Err(Status::unauthenticated(
                "the authorization header must be `Bearer TOKEN`; nothing was changed",
            )),
        }
    }
}

/// Compares secrets in time that depends on their lengths only, not on
/// where they first differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves the admin listener of a process until `shutdown`: the
/// [`ProcessHealth`], the metrics, and (when [`AdminOptions::faults`] is
/// on) the faults of `components`, each a short name ("users") and the
/// [`Faults`] its server applies.
///
/// Stop it last: while the components drain, probes must still read their
/// `NOT_SERVING`.
pub async fn serve_admin(
    listener: TcpListener,
    health: ProcessHealth,
    components: Vec<(String, Faults)>,
    options: AdminOptions,
    shutdown: Shutdown,
) -> Result<(), ServeError> {
    serve_admin_with(listener, health, components, Vec::new(), options, shutdown).await
}

/// [`serve_admin`], with the `services` the components add, each served
/// behind the admin credential.
pub async fn serve_admin_with(
    listener: TcpListener,
    health: ProcessHealth,
    components: Vec<(String, Faults)>,
    services: Vec<AdminService>,
    options: AdminOptions,
    shutdown: Shutdown,
) -> Result<(), ServeError> {
    let addr: SocketAddr = listener.local_addr().map_err(ServeError::LocalAddr)?;
    let limit = options.max_message_bytes;
    let mut served: Vec<String> = ADMIN_SERVICES.iter().map(|s| (*s).to_owned()).collect();
    if options.faults {
        served.push(FAULT_SERVICE.to_owned());
    }
    served.extend(services.iter().map(|service| service.name.to_owned()));
    let credential = RequireCredential {
        credential: options.credential.clone(),
        client_certificates: options.tls.as_ref().is_some_and(|tls| tls.files().client_ca.is_some()),
    };
    let reflection = || {
        served.iter().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(lightbox_api::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
            |builder, name| builder.with_service_name(name),
        )
    };
    let mut routes = health
        .routes()
        .add_service(reflection().build_v1()?.max_decoding_message_size(limit))
        .add_service(reflection().build_v1alpha()?.max_decoding_message_size(limit));
    if options.faults {
        let faults = FaultServiceServer::new(FaultServiceImpl::new(components))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        routes = routes.add_service(tonic::service::interceptor::InterceptedService::new(
            faults,
            credential.clone(),
        ));
    }
    for service in &services {
        routes = (service.add)(routes, credential.clone());
    }
    let hint = match options.faults {
        true => "",
        false => "; fault injection is off: start the server with --faults (and --admin-token) to turn it on",
    };
    let mut router = routes.into_axum_router().fallback(not_served(&served, hint));
    if let Some(metrics) = options.metrics.clone() {
        router = router.route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = Arc::clone(&metrics);
                async move { ([(http::header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], metrics()) }
            }),
        );
    }
    tracing::info!(%addr, faults = options.faults, tls = options.tls.is_some(), "serving admin (health, metrics{})", match options.faults {
        true => ", faults",
        false => "",
    });
    // Prometheus scrapes `/metrics` over HTTP/1.1.
    let server = Server::builder().accept_http1(true).add_routes(Routes::from(router));
    let stop = async move { shutdown.wait().await };
    match options.tls {
        Some(tls) => {
            server
                .serve_with_incoming_shutdown(tls.incoming(listener), stop)
                .await?
        }
        None => {
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            server.serve_with_incoming_shutdown(incoming, stop).await?;
        }
    }
    tracing::info!(%addr, "admin stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_whole_secrets() {
        assert!(constant_time_eq(b"abcdef", b"abcdef"));
        assert!(!constant_time_eq(b"abcdef", b"abcdeg"));
        assert!(!constant_time_eq(b"abc", b"abcdef"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn short_tokens_are_refused_and_never_printed() {
        let err = AdminCredential::bearer("short").expect_err("too short");
        assert!(err.contains("at least 16"), "{err}");
        let credential = AdminCredential::bearer("0123456789abcdef0123").expect("long enough");
        assert_eq!(format!("{credential:?}"), "Bearer(…)");
    }
}
