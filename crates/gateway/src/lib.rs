//! The mobile gateway: HTTP/JSON in front of the gRPC services.
//!
//! # How a request is served
//!
//! The routes are not written here: they are read at start from the
//! `google.api.http` annotations in the protos ([`routes`]), the same
//! annotations grpc-gateway and Envoy's transcoder read. For each request
//! the gateway:
//!
//! 1. takes a slot under the concurrency limit (503 when full);
//! 2. checks the bearer JWT ([`auth`]; 401);
//! 3. matches a route (404, or 405 with `Allow`);
//! 4. checks that the route's user (`/v1/users/{user_id}/…`, where `me`
//!    stands for the signed-in user) is the token's subject (403);
//! 5. reads the body within the size limit and builds the request message
//!    from body, path and query (`transcode`; 400 naming the field);
//! 6. calls the method over gRPC with a deadline, passing on the request id
//!    and the W3C trace context;
//! 7. answers the response in the proto3 JSON mapping ([`json`]), or the
//!    error as grpc-gateway maps it ([`error`]).
//!
//! `GET /v1/users/{user_id}/events` streams live updates as Server-Sent
//! Events ([`events`]); `GET /openapi.json` describes every route
//! ([`openapi`]), generated from the same table.
//!
//! # How the events streams are fed
//!
//! The gateway follows each upstream (users, contracts, photos) once, with
//! one unfiltered watch opened with the first events stream, and fans each
//! change out to the phones of the user it concerns through an index by
//! user id (`fanout`): a change costs work in proportion to the phones it
//! concerns, its JSON written once for all of them. A new phone catches up
//! on its own watch filtered to its user (`join`), then joins the shared
//! stream without loss or duplicate and holds no upstream stream at all. A
//! phone that stops reading is ended (an `end` event, then it resumes with
//! `Last-Event-ID`) rather than slowing the others.
//!
//! # Layout
//!
//! - `unary`: the request path above, a function per step; [`auth`],
//!   [`routes`], `transcode`, [`json`], `codec`, [`error`]: what its steps
//!   use;
//! - [`events`]: the SSE route; `join`, `fanout`, `phone`, `upstream`: what
//!   feeds it;
//! - [`openapi`]: the document.

pub mod auth;
mod body;
mod codec;
pub mod error;
pub mod events;
mod fanout;
mod join;
pub mod json;
mod metrics;
pub mod openapi;
mod phone;
pub mod routes;
mod transcode;
mod unary;
mod unique;
mod upstream;

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{Request, State},
    response::{IntoResponse, Response},
    routing::get,
};
use lightbox_client::Balanced;
use lightbox_server::Shutdown;
use prost_reflect::{DescriptorPool, MethodDescriptor};
use tokio::{net::TcpListener, sync::Semaphore};
use tonic::Code;
use tower_http::{
    classify::ServerErrorsFailureClass,
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    trace::TraceLayer,
};

pub use auth::AuthConfig;
pub use error::HttpError;

use crate::routes::Route;

/// Limits and auth of the gateway.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// How tokens are checked.
    pub auth: AuthConfig,
    /// The deadline of one upstream call, and for a request body to start
    /// (408 past it, or if it then comes slower than 32 KiB/s).
    pub request_timeout: Duration,
    /// The largest request body accepted, in bytes (but for uploads).
    pub max_body_bytes: usize,
    /// The largest body of a route that carries raw bytes (an image in
    /// `CreatePhoto`, base64 in JSON), in bytes.
    pub max_upload_bytes: usize,
    /// Uploads read at once (each holds up to `max_upload_bytes` in
    /// memory); more get 503 at once.
    pub max_concurrent_uploads: usize,
    /// Requests served at once; more get 503 at once rather than queueing.
    pub max_concurrent_requests: usize,
    /// Event streams open at once; more get 503.
    pub max_event_streams: usize,
    /// Event streams one user may hold open at once (one per device); more
    /// get 429. At least 1.
    pub max_event_streams_per_user: usize,
    /// The heartbeat comment interval of idle event streams.
    pub heartbeat: Duration,
    /// Updates queued for one event stream: a stream this far behind (the
    /// phone stopped reading) is ended, and the phone resumes with
    /// `Last-Event-ID`. At least 1.
    pub phone_queue: usize,
    /// How long one of the gateway's upstream watches (shared, or a phone's
    /// catch-up) may take to open, or stay silent once open, before it is
    /// taken for dead and reopened from where it was: a few of the
    /// upstreams' progress intervals.
    pub upstream_idle_timeout: Duration,
    /// The process's metrics, where the gateway counts its requests
    /// (`lightbox_gateway_*`). Default: a registry of its own.
    pub metrics: lightbox_metrics::Metrics,
}

impl GatewayOptions {
    /// Defaults suited to a phone client, with `auth`.
    pub fn new(auth: AuthConfig) -> GatewayOptions {
        GatewayOptions {
            auth,
            request_timeout: Duration::from_secs(10),
            max_body_bytes: 1024 * 1024,
            // The photos service's 10 MiB image, in base64 (4/3), with room
            // for the rest of the JSON.
            max_upload_bytes: 14 * 1024 * 1024,
            max_concurrent_uploads: 16,
            max_concurrent_requests: 1024,
            max_event_streams: 10_000,
            max_event_streams_per_user: 8,
            heartbeat: Duration::from_secs(15),
            phone_queue: 256,
            upstream_idle_timeout: Duration::from_secs(30),
            metrics: lightbox_metrics::Metrics::new(),
        }
    }
}

/// The gRPC services the gateway calls.
#[derive(Debug, Clone)]
pub struct Upstreams {
    /// The users service.
    pub users: Balanced,
    /// The contracts service.
    pub contracts: Balanced,
    /// The photos service.
    pub photos: Balanced,
}

/// The gateway's state, shared by every request.
pub struct Gateway {
    options: GatewayOptions,
    routes: Vec<Route>,
    channels: HashMap<String, Balanced>,
    requests: Arc<Semaphore>,
    uploads: Arc<Semaphore>,
    streams: Arc<Semaphore>,
    streams_per_user: Arc<events::PerUser>,
    /// The shared upstream watches and their phones; its followers stop at
    /// `shutdown`, or when the gateway is dropped.
    fanout: fanout::Fanout,
    openapi: serde_json::Value,
    shutdown: Shutdown,
}

impl Gateway {
    /// Reads the routes from the descriptors and checks that each has an
    /// upstream. Fails on an annotation the gateway cannot serve.
    pub fn new(options: GatewayOptions, upstreams: Upstreams, shutdown: Shutdown) -> Result<Gateway, String> {
        let pool = descriptors()?;
        let routes = routes::routes(&pool)?;
        let channels = HashMap::from([
            ("lightbox.users.v1.UsersService".to_owned(), upstreams.users),
            ("lightbox.contracts.v1.ContractsService".to_owned(), upstreams.contracts),
            ("lightbox.photos.v1.PhotosService".to_owned(), upstreams.photos),
        ]);
        for route in &routes {
            let service = route.method.parent_service();
            if !channels.contains_key(service.full_name()) {
                return Err(format!(
                    "{} {}: no upstream for {}",
                    route.verb,
                    route.template,
                    service.full_name()
                ));
            }
        }
        let openapi = openapi::document(&routes);
        if options.phone_queue == 0 {
            return Err("the event streams' queue (phone_queue) must hold at least 1 update".into());
        }
        if options.max_event_streams_per_user == 0 {
            return Err("max_event_streams_per_user must be at least 1".into());
        }
        let watch = |source: upstream::Source| {
            let method =
                find_method(&pool, source.method()).ok_or_else(|| format!("{} is not described", source.method()))?;
            let channel = channels
                .get(method.parent_service().full_name())
                .cloned()
                .ok_or_else(|| format!("no upstream for {}", source.method()))?;
            upstream::Upstream::new(source, method, channel, options.upstream_idle_timeout)
        };
        let [users, contracts, photos] = upstream::Source::ALL;
        let upstreams = [watch(users)?, watch(contracts)?, watch(photos)?];
        let fanout = fanout::Fanout::new(upstreams, shutdown.clone());
        Ok(Gateway {
            requests: Arc::new(Semaphore::new(options.max_concurrent_requests)),
            uploads: Arc::new(Semaphore::new(options.max_concurrent_uploads)),
            streams: Arc::new(Semaphore::new(options.max_event_streams)),
            streams_per_user: Arc::new(events::PerUser::new(options.max_event_streams_per_user)),
            fanout,
            options,
            routes,
            channels,
            openapi,
            shutdown,
        })
    }

    /// The axum router of the gateway, with request ids and tracing.
    pub fn router(self) -> Router {
        let metrics = Arc::new(metrics::HttpMetrics::register(
            &self.options.metrics,
            Arc::clone(&self.streams),
            self.options.max_event_streams,
        ));
        let state = Arc::new(self);
        let names = Arc::clone(&state);
        Router::new()
            .route("/openapi.json", get(serve_openapi))
            .route("/healthz", get(|| async { "ok\n" }))
            .route(events::PATH, get(events::handler))
            .fallback(unary::dispatch)
            .with_state(state)
            .layer(axum::middleware::from_fn_with_state(metrics, metrics::count))
            .layer(PropagateRequestIdLayer::x_request_id())
            .layer(
                TraceLayer::new_for_http()
                    .make_span_with(move |request: &Request| {
                        let id = request
                            .headers()
                            .get("x-request-id")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default();
                        let span = tracing::info_span!(
                            "http",
                            method = %request.method(),
                            path = %request.uri().path(),
                            request_id = %id,
                            otel.name = %names.span_name(request.method(), request.uri().path()),
                            otel.kind = "server",
                        );
                        // A phone's trace context is continued (W3C).
                        lightbox_metrics::continue_trace(&span, request.headers());
                        span
                    })
                    // An error status was logged once already, at its level,
                    // where the error was answered (`HttpError`); the
                    // default would log every 5xx again, as ERROR, even an
                    // upstream's expected 503. Only a failure no answer
                    // says (a response body that broke off) is logged here.
                    .on_failure(
                        |failure: ServerErrorsFailureClass, latency: Duration, _: &tracing::Span| {
                            if let ServerErrorsFailureClass::Error(error) = failure {
                                tracing::warn!(%error, ?latency, "response failed");
                            }
                        },
                    ),
            )
            .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
    }

    /// The name of a request's span: its method and route template
    /// (`GET /v1/users/{user_id}/photos`), few and stable as OpenTelemetry
    /// asks; the path itself only for the gateway's fixed routes.
    fn span_name(&self, method: &http::Method, path: &str) -> String {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let route = self
            .routes
            .iter()
            .find(|route| route.verb == method && route.matches(&segments).is_some());
        match route {
            Some(route) => format!("{method} {}", route.template),
            None if path == "/openapi.json" || path == "/healthz" => format!("{method} {path}"),
            None if path.starts_with("/v1/users/") && path.ends_with("/events") => format!("{method} {}", events::PATH),
            None => format!("{method} unmatched"),
        }
    }

    fn channel(&self, method: &MethodDescriptor) -> Option<Balanced> {
        self.channels.get(method.parent_service().full_name()).cloned()
    }
}

/// The method `package.Service.Method` of `pool`.
fn find_method(pool: &DescriptorPool, full_name: &str) -> Option<MethodDescriptor> {
    let (service, method) = full_name.rsplit_once('.')?;
    pool.get_service_by_name(service)?
        .methods()
        .find(|m| m.name() == method)
}

/// The descriptors of every Lightbox proto, with the HTTP annotations.
pub fn descriptors() -> Result<DescriptorPool, String> {
    DescriptorPool::decode(lightbox_api::FILE_DESCRIPTOR_SET).map_err(|e| format!("the descriptors do not decode: {e}"))
}

/// Serves `router` on `listener` until `shutdown`; then, after `delay`
/// (while the process's health says it is draining and load balancers move
/// away, every request still succeeds), stops accepting and lets requests
/// in progress finish for at most `drain` (open event streams end at once:
/// clients resume them elsewhere with `Last-Event-ID`). With `tls`, serves
/// HTTPS (HTTP/1.1 and h2 by ALPN), certificates reloaded as they change.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: Shutdown,
    delay: Duration,
    drain: Duration,
    tls: Option<lightbox_tls::ServerTls>,
) -> std::io::Result<()> {
    drop_dead_connections(&listener);
    let deadline = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.wait().await;
            tokio::time::sleep(delay + drain).await;
        }
    };
    let stop = async move {
        shutdown.wait().await;
        tokio::time::sleep(delay).await;
    };
    let app = router.into_make_service_with_connect_info::<SocketAddr>();
    let server: std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>> = match tls {
        Some(tls) => {
            use axum::serve::ListenerExt as _;
            // `tap_io` gives the connections axum's `SocketAddr` connect info.
            let incoming = tls.incoming(listener).tap_io(|_| {});
            Box::pin(axum::serve(incoming, app).with_graceful_shutdown(stop).into_future())
        }
        None => Box::pin(axum::serve(listener, app).with_graceful_shutdown(stop).into_future()),
    };
    tokio::select! {
        served = server => served,
        () = deadline => {
            tracing::warn!(?drain, "requests still in progress after the drain deadline; closing them");
            Ok(())
        }
    }
}

/// How long data the gateway sent may stay unacknowledged before the
/// kernel drops the connection. A phone that vanished (it changed network,
/// went into a tunnel) acknowledges nothing: its events stream, whose
/// heartbeats keep data in flight, then ends within about this plus one
/// heartbeat, giving back its slots (the gateway's and its user's), instead
/// of after the kernel's retransmissions give up (about 15 minutes).
pub const UNACKED_TIMEOUT: Duration = Duration::from_secs(30);

/// Sets [`UNACKED_TIMEOUT`] (`TCP_USER_TIMEOUT`) on `listener`: the
/// connections it accepts inherit it. Where the system has no such option,
/// dead connections last until its retransmissions give up.
fn drop_dead_connections(listener: &TcpListener) {
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
    if let Err(err) = socket2::SockRef::from(listener).set_tcp_user_timeout(Some(UNACKED_TIMEOUT)) {
        tracing::warn!(%err, "cannot set TCP_USER_TIMEOUT: a vanished phone's connection lasts until TCP gives up");
    }
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "fuchsia")))]
    let _ = listener;
}

async fn serve_openapi(State(gateway): State<Arc<Gateway>>) -> Response {
    Json(gateway.openapi.clone()).into_response()
}

/// The user a route acts for: `me` is the signed-in user; anyone else is
/// refused.
pub(crate) fn authorize(subject: &str, user_id: &str) -> Result<String, HttpError> {
    if user_id == "me" || user_id == subject {
        Ok(subject.to_owned())
    } else {
        Err(HttpError::new(
            Code::PermissionDenied,
            "a user may only read and write their own profile and photos",
        ))
    }
}

/// The OpenAPI document of the gateway's routes (what `/openapi.json`
/// serves).
pub fn openapi_document() -> Result<serde_json::Value, String> {
    Ok(openapi::document(&routes::routes(&descriptors()?)?))
}

/// A client on `channel`, once it is ready to take a call; `UNAVAILABLE`
/// naming `upstream` if it cannot be reached.
pub(crate) async fn ready(channel: Balanced, upstream: &str) -> Result<tonic::client::Grpc<Balanced>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{upstream} is unreachable: {e}")))?;
    Ok(grpc)
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;

    #[tokio::test]
    #[cfg(target_os = "linux")]
    async fn accepted_connections_inherit_the_unacked_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        drop_dead_connections(&listener);
        let addr = listener.local_addr().expect("a bound address");
        let _phone = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let timeout = socket2::SockRef::from(&accepted)
            .tcp_user_timeout()
            .expect("read the option");
        assert_eq!(timeout, Some(UNACKED_TIMEOUT));
    }

    #[test]
    fn me_is_the_subject_and_others_are_refused() {
        assert_eq!(authorize("u1", "me").expect("me"), "u1");
        assert_eq!(authorize("u1", "u1").expect("self"), "u1");
        assert_eq!(
            authorize("u1", "u2").expect_err("other").status(),
            StatusCode::FORBIDDEN
        );
    }
}
