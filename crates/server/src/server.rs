//! Binding, and serving a service's routes with everything every Lightbox
//! server shares.

mod abortable;
mod coalesce;

use std::{future::Future, io, net::SocketAddr, pin::Pin, time::Duration};

use lightbox_metrics::{GrpcServerLayer, GrpcTraceLayer, GrpcTypes, Metrics};
use lightbox_tls::ServerTls;
use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;
use tonic::{
    service::Routes,
    transport::{Server, server::TcpIncoming},
};
use tonic_health::ServingStatus;

use self::{abortable::Abortable, coalesce::Coalescing};
use crate::{
    ProcessHealth,
    fault::{FaultLayer, Faults},
    shutdown::Shutdown,
};

/// A task stopped when this is dropped (when `serve` returns, or its
/// future is dropped).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The services every server serves besides its own.
const SHARED_SERVICES: &[&str] = &[
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// The answer to a call of a service this port does not serve:
/// `UNIMPLEMENTED`, naming what it does serve (tonic's own says nothing).
/// A call of the fault service gets `fault_hint` too: where it is.
pub(crate) fn not_served(
    served: &[String],
    fault_hint: &'static str,
) -> impl Fn(http::Uri) -> std::future::Ready<http::Response<tonic::body::Body>> + Clone + Send + Sync + 'static {
    let served = served.join(", ");
    move |uri: http::Uri| {
        let path = uri.path().trim_start_matches('/');
        let service = path.split_once('/').map_or(path, |(service, _)| service);
        let hint = match service == "lightbox.admin.v1.FaultService" {
            true => fault_hint,
            false => "",
        };
        let status = tonic::Status::unimplemented(format!(
            "{service} is not served on this port, which serves {served}{hint}; \
             each Lightbox service has its own port (see `grpcurl -plaintext HOST:PORT list`)"
        ));
        std::future::ready(status.into_http())
    }
}

/// Where a caller of the fault service on a service port is sent.
const FAULTS_ARE_ON_ADMIN: &str = "; fault injection is served on the process's admin listener \
     (--admin-addr, 127.0.0.1:50050 by default) when turned on with --faults";

/// One server's health: its port's reporter, and the process's it copies
/// every service status into.
#[derive(Clone)]
struct Health {
    reporter: tonic_health::server::HealthReporter,
    process: Option<ProcessHealth>,
    /// The services this port serves (full proto names); "" is the port.
    services: Vec<String>,
}

impl Health {
    /// Sets "" and every service to `status`, here and in the process.
    async fn publish(&self, status: ServingStatus) {
        self.reporter.set_service_status("", status).await;
        for service in &self.services {
            self.reporter.set_service_status(service, status).await;
            if let Some(process) = &self.process {
                process.set(service, status).await;
            }
        }
    }
}

/// How long `serve` waits, after cutting the connections left at the drain
/// deadline, for their tasks to notice. Cutting is immediate (their next
/// read fails); this only bounds the bookkeeping.
const ABORT_GRACE: Duration = Duration::from_secs(1);

/// Settings of one server.
///
/// `max_message_bytes` applies to the services [`serve`] adds itself. A
/// generated server does not read it: set it on each one you put in the
/// routes, or tonic's 4 MiB decoding default applies to it:
///
/// ```ignore
/// UsersServiceServer::new(users)
///     .max_decoding_message_size(options.max_message_bytes)
///     .max_encoding_message_size(options.max_message_bytes)
/// ```
///
/// (The generated servers share no trait for this, so no generic helper.)
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The largest message accepted or sent, in bytes. Default 4 MiB.
    pub max_message_bytes: usize,
    /// How long calls in progress may run on after the shutdown signal
    /// before their connections are cut and `serve` returns. Default 10 s.
    pub drain_timeout: Duration,
    /// The server's short name (e.g. "users"), used in logs and in the
    /// "`<name>` is down (fault injection)" message.
    pub service_name: String,
    /// How long health says `NOT_SERVING` after the shutdown signal before
    /// the listener closes, so load balancers and DNS move callers away
    /// while every call still succeeds. Default 0.
    pub drain_delay: Duration,
    /// The process's health (its admin listener's), which this server's
    /// service statuses are copied into; `None`: this port's only.
    pub process_health: Option<ProcessHealth>,
    /// The process's metrics, where this server counts its calls
    /// (`grpc_server_*`). Default: a registry of its own, never scraped.
    pub metrics: Metrics,
    /// Serve TLS (mutual TLS if it has a client CA) with these
    /// certificates, reloaded as they change; `None`: plaintext.
    pub tls: Option<ServerTls>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_message_bytes: 4 * 1024 * 1024,
            drain_timeout: Duration::from_secs(10),
            service_name: "lightbox".to_owned(),
            drain_delay: Duration::ZERO,
            process_health: None,
            metrics: Metrics::new(),
            tls: None,
        }
    }
}

/// The HTTP/2 limits of every gRPC server, set here rather than left to
/// the libraries' defaults, so that what a client can make a server hold
/// is written down (README, "HTTP/2 limits").
pub mod http2 {
    use std::time::Duration;

    /// Streams one connection may have open at once (a client multiplexing
    /// watches: 100 per connection in the benchmarks). Beyond it, the
    /// client waits for a stream to end.
    pub const MAX_CONCURRENT_STREAMS: u32 = 1024;
    /// Flow-control window of each stream: how much a stream may have in
    /// flight unread by the client. 1 MiB: a page of a snapshot is far
    /// less.
    pub const STREAM_WINDOW: u32 = 1024 * 1024;
    /// Flow-control window of each connection, shared by its streams: what
    /// a client that stops reading can have in flight on one connection,
    /// whatever the number of its streams.
    pub const CONNECTION_WINDOW: u32 = 2 * 1024 * 1024;
    /// The largest frame (HTTP/2's minimum, 16 KiB): small frames of many
    /// streams interleave, none waits behind another's large one.
    pub const MAX_FRAME_SIZE: u32 = 16 * 1024;
    /// Streams a client may open and reset before the server has answered
    /// them (the "rapid reset" bound).
    pub const MAX_PENDING_RESETS: usize = 20;
    /// How often the server pings an idle connection, and how long it waits
    /// for the answer before closing it: a dead peer's streams are freed.
    pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
    /// See [`KEEPALIVE_INTERVAL`].
    pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
}

/// Why a server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {}", describe_bind_error(.cause))]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The operating system's error.
        cause: io::Error,
    },
    /// The listener's own address could not be read.
    #[error("cannot read the listening address")]
    LocalAddr(#[source] io::Error),
    /// A descriptor set given to reflection did not decode.
    #[error("cannot build the reflection service")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// A descriptor set given to the metrics did not decode.
    #[error("cannot read the methods' types for the metrics")]
    Descriptors(#[source] lightbox_metrics::DescriptorSetError),
    /// The server failed while running.
    #[error("the gRPC server failed")]
    Transport(#[from] tonic::transport::Error),
}

/// The usual bind failures in words, the rest as the OS says them.
fn describe_bind_error(err: &io::Error) -> String {
    match err.kind() {
        io::ErrorKind::AddrInUse => "address in use".to_owned(),
        io::ErrorKind::AddrNotAvailable => "address not available on this host".to_owned(),
        io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        _ => err.to_string(),
    }
}

/// Binds `addr` (port 0 picks a free port: read it back with
/// `local_addr`). Bind before spawning [`serve`] so that a port clash fails
/// the caller at once instead of killing a background task unnoticed.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|cause| ServeError::Bind { addr, cause })
}

/// Serves `routes` on `listener` until `shutdown`, with what every Lightbox
/// server shares:
///
/// - `grpc.health.v1.Health`, reporting `SERVING` for "" (the whole server)
///   and for each of `health_services` (full proto names, e.g.
///   "lightbox.users.v1.UsersService");
/// - server reflection, both `grpc.reflection.v1` and `v1alpha` (grpcurl
///   1.8.6 speaks only the latter), describing every Lightbox proto and the
///   health service;
/// - a [`FaultLayer`] applying `faults` to every other call. The service
///   that changes them is not here: it is on the process's admin listener
///   ([`serve_admin`](crate::serve_admin)), behind a credential.
///
/// `routes` must not contain those services itself (duplicate routes
/// panic when the router is built). Health statuses are copied into
/// [`ServerOptions::process_health`] when given.
///
/// On shutdown, in this order: health turns `NOT_SERVING` for every name
/// (watchers are told, so load balancers move away); `drain_delay` later
/// the listener closes; calls in progress run on; when the last one ends,
/// `serve` returns. If some are still running `drain_timeout` after that
/// (a watch stream never ends by itself), their connections are cut, so
/// their clients see `UNAVAILABLE` and reconnect elsewhere, and `serve`
/// returns anyway. Dropping the `serve` future cuts every connection
/// likewise.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    health_services: &[&str],
    faults: Faults,
    shutdown: Shutdown,
    options: ServerOptions,
) -> Result<(), ServeError> {
    let addr = listener.local_addr().map_err(ServeError::LocalAddr)?;
    let limit = options.max_message_bytes;
    let name = options.service_name.as_str();

    // The reporter is shared by the health service (which reads it), the
    // fault follower and the shutdown future below (which flip it): clones
    // share one map.
    // Its watches end when the port closes (`closed`, fired by `signal`).
    let (closed_trigger, closed) = Shutdown::new();
    let reporter = tonic_health::server::HealthReporter::new();
    let health_service = crate::health::ClosingHealth::server(reporter.clone(), closed);
    let health = Health {
        reporter,
        process: options.process_health.clone(),
        services: health_services.iter().map(|s| (*s).to_owned()).collect(),
    };
    health.publish(ServingStatus::Serving).await;

    // What this port serves, and only that, is what reflection lists (every
    // schema stays resolvable: a message may come from any file).
    let served: Vec<String> = health_services
        .iter()
        .map(|s| (*s).to_owned())
        .chain(SHARED_SERVICES.iter().map(|s| (*s).to_owned()))
        .collect();
    let reflection = || {
        served.iter().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(lightbox_api::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
            |builder, name| builder.with_service_name(name),
        )
    };
    let reflection_v1 = reflection()
        .build_v1()?
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let reflection_v1alpha = reflection()
        .build_v1alpha()?
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let health_service = health_service
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);

    // Health follows the faults: a server made "down" is NOT_SERVING, so a
    // load balancer or a probe sees what its callers see. One task, for the
    // life of the server, until the shutdown below takes over health.
    let follow_faults = {
        let (health, mut changes) = (health.clone(), faults.subscribe());
        tokio::spawn(async move {
            loop {
                let status = if changes.borrow_and_update().down {
                    ServingStatus::NotServing
                } else {
                    ServingStatus::Serving
                };
                health.publish(status).await;
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
    };
    let follow_faults = AbortOnDrop(follow_faults);

    // Fires at the drain deadline. Every accepted connection holds an
    // observer; the trigger lives in this function, so dropping the `serve`
    // future also cuts the connections (a dropped trigger counts as fired).
    let (abort_trigger, abort) = Shutdown::new();

    // tonic stops accepting once this completes, then waits for every
    // connection to finish; health goes NOT_SERVING before that, so that
    // watchers hear it while their connection is still open, and callers
    // have `drain_delay` to move away while every call still succeeds.
    let drain_delay = options.drain_delay;
    let signal = {
        let shutdown = shutdown.clone();
        let health = health.clone();
        let name = name.to_owned();
        let follow_faults = follow_faults.0.abort_handle();
        async move {
            shutdown.wait().await;
            // From here health says NOT_SERVING whatever the faults say.
            follow_faults.abort();
            tracing::info!(service = %name, %addr, ?drain_delay, "shutting down: NOT_SERVING");
            health.publish(ServingStatus::NotServing).await;
            tokio::time::sleep(drain_delay).await;
            tracing::info!(service = %name, %addr, "no longer accepting; draining calls in progress");
            closed_trigger.trigger();
        }
    };

    let routes = routes
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let routes = Routes::from(
        routes
            .into_axum_router()
            .fallback(not_served(&served, FAULTS_ARE_ON_ADMIN)),
    );
    // Metrics outside the faults: calls are counted as their callers see
    // them, injected failures included.
    let types = GrpcTypes::from_descriptor_set(lightbox_api::FILE_DESCRIPTOR_SET)
        .and_then(|types| types.with_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET))
        .and_then(|types| types.with_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET))
        .and_then(|types| types.with_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET))
        .map_err(ServeError::Descriptors)?;
    let layers = tower::ServiceBuilder::new()
        .layer(GrpcTraceLayer::server())
        .layer(GrpcServerLayer::new(&options.metrics, &types))
        .layer(FaultLayer::new(faults).with_service_name(name))
        .into_inner();
    // Explicit HTTP/2 limits (see `http2`); TCP_NODELAY on every connection
    // (below): a watch's small frames go out at once, and frames ready
    // together on one connection go out in one write (h2 buffers a
    // connection's frames until its task flushes).
    let mut builder = Server::builder()
        .max_concurrent_streams(http2::MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(http2::STREAM_WINDOW)
        .initial_connection_window_size(http2::CONNECTION_WINDOW)
        .max_frame_size(http2::MAX_FRAME_SIZE)
        .http2_max_pending_accept_reset_streams(Some(http2::MAX_PENDING_RESETS))
        .http2_keepalive_interval(Some(http2::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(http2::KEEPALIVE_TIMEOUT))
        .http2_adaptive_window(Some(false))
        .tcp_nodelay(true)
        .layer(layers);
    let router = builder.add_routes(routes);
    let mut server: Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> = match &options.tls {
        Some(tls) => {
            let incoming = tls
                .incoming(listener)
                .map(move |conn| conn.map(|io| Coalescing::new(Abortable::new(io, abort.clone()))));
            Box::pin(router.serve_with_incoming_shutdown(incoming, signal))
        }
        None => {
            let incoming = TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .map(move |conn| conn.map(|io| Coalescing::new(Abortable::new(io, abort.clone()))));
            Box::pin(router.serve_with_incoming_shutdown(incoming, signal))
        }
    };

    let security = match &options.tls {
        Some(tls) if tls.files().client_ca.is_some() => "mutual TLS",
        Some(_) => "TLS",
        None => "plaintext",
    };
    tracing::info!(service = %name, %addr, security, "serving gRPC");

    let drain_deadline = async {
        shutdown.wait().await;
        tokio::time::sleep(drain_delay + options.drain_timeout).await;
    };
    tokio::select! {
        result = &mut server => {
            result?;
            tracing::info!(service = %name, %addr, "stopped");
            return Ok(());
        }
        () = drain_deadline => {}
    }

    let waited_secs = options.drain_timeout.as_secs_f64();
    tracing::warn!(
        service = %name,
        %addr,
        waited_secs,
        "calls still in progress {waited_secs} s after shutdown; closing their connections"
    );
    abort_trigger.trigger();
    match tokio::time::timeout(ABORT_GRACE, &mut server).await {
        Ok(result) => result?,
        Err(_) => tracing::warn!(service = %name, "connections still closing; returning anyway"),
    }
    tracing::info!(service = %name, %addr, "stopped");
    Ok(())
}
