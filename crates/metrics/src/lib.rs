//! Prometheus metrics for Lightbox: one OpenMetrics registry per process,
//! and tower layers that measure gRPC servers and clients under the names
//! and labels of go-grpc-middleware's Prometheus provider, so existing
//! dashboards and alerts work unchanged.
//!
//! # Layout
//!
//! - `registry`: [`Metrics`], the process's registry (cheap to clone), its
//!   OpenMetrics text and [`CONTENT_TYPE`]; [`GaugeFn`], gauges computed at
//!   scrape time from a closure.
//! - `types`: [`GrpcTypes`], each method's [`GrpcType`] (`unary`,
//!   `server_stream`, …) read from a descriptor set, since a request's path
//!   does not say whether the method streams.
//! - `layer`: [`GrpcServerLayer`] and [`GrpcClientLayer`], and the services
//!   and future they make.
//! - `body`: [`MeteredBody`], which counts the gRPC messages in a body and
//!   sees the status go by in the trailers (or the body dropped unfinished:
//!   `Canceled`, or `DeadlineExceeded` past the call's `grpc-timeout`).
//! - `families`: the metric families, each method's handles into them
//!   (looked up on first use, then kept), and one call's record.
//! - `trace`: traces across hops: [`GrpcTraceLayer`] (a server's span per
//!   call, child of the caller's W3C trace context), [`call_span`] and
//!   [`inject`] for clients, [`SpanBody`] to keep a stream's span open.
//!
//! # The metrics
//!
//! Each with labels `grpc_type`, `grpc_service`, `grpc_method`, and
//! `grpc_code` (as go prints it: `OK`, `Canceled`, `NotFound`, …) on
//! `handled`:
//!
//! | server | client | counts |
//! |---|---|---|
//! | `grpc_server_started_total` | `grpc_client_started_total` | calls begun |
//! | `grpc_server_handled_total` | `grpc_client_handled_total` | calls ended, by code |
//! | `grpc_server_handling_seconds` | `grpc_client_handling_seconds` | request start to the end of the response body (histogram) |
//! | `grpc_server_msg_received_total` | `grpc_client_msg_received_total` | messages received |
//! | `grpc_server_msg_sent_total` | `grpc_client_msg_sent_total` | messages sent |
//!
//! The histograms have go's default buckets (`0.005` to `10`) and five
//! finer ones below them (`0.0001`, `0.00025`, `0.0005`, `0.001`,
//! `0.0025`), so that calls answered from memory spread over buckets. Series appear on
//! first use. Methods missing from the [`GrpcTypes`] table are counted as
//! `unary`, each under its own name up to a bound (the path comes from the
//! peer), past which under `unknown`.
//!
//! # Wiring
//!
//! ```no_run
//! use lightbox_metrics::{CONTENT_TYPE, GrpcClientLayer, GrpcServerLayer, GrpcTypes, Metrics};
//! use tonic::{
//!     service::Routes,
//!     transport::{Channel, Server, server::TcpIncoming},
//! };
//!
//! # async fn run(listener: tokio::net::TcpListener) -> Result<(), Box<dyn std::error::Error>> {
//! // One per process; clones share it.
//! let metrics = Metrics::new();
//! // Every descriptor set the process serves or calls.
//! let types = GrpcTypes::from_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)?;
//!
//! // A server, with `GET /metrics` on the same port (not measured: it is
//! // not gRPC).
//! let (_health, health_service) = tonic_health::server::health_reporter();
//! let scrape = metrics.clone();
//! let router = Routes::new(health_service).into_axum_router().route(
//!     "/metrics",
//!     axum::routing::get(move || {
//!         let text = scrape.encode();
//!         async move { ([(http::header::CONTENT_TYPE, CONTENT_TYPE)], text) }
//!     }),
//! );
//! let server = Server::builder()
//!     .layer(GrpcServerLayer::new(&metrics, &types))
//!     .add_routes(Routes::from(router))
//!     .serve_with_incoming(TcpIncoming::from(listener));
//!
//! // A client: the layer around a channel is the generated client's
//! // transport (here `HealthClient<GrpcClientService<Channel>>`).
//! let channel = Channel::from_static("http://127.0.0.1:50051").connect_lazy();
//! let transport = tower::ServiceBuilder::new()
//!     .layer(GrpcClientLayer::new(&metrics, &types))
//!     .service(channel);
//! let client = tonic_health::pb::health_client::HealthClient::new(transport);
//!
//! // Anything else the process measures goes in the same registry.
//! let copies = lightbox_metrics::prometheus_client::metrics::counter::Counter::<u64>::default();
//! metrics.register("lightbox_copy_applied_batches", "Batches applied to the copies", copies.clone());
//! # drop((server, client)); Ok(()) }
//! ```

mod body;
mod families;
mod layer;
mod registry;
mod trace;
mod types;

pub use body::MeteredBody;
pub use layer::{GrpcClientLayer, GrpcClientService, GrpcServerLayer, GrpcServerService, ResponseFuture};
/// The metrics library, re-exported so that callers register metrics of
/// the version this registry takes.
pub use prometheus_client;
pub use registry::{CONTENT_TYPE, CounterFn, GaugeFn, Metrics};
pub use trace::{GrpcTrace, GrpcTraceLayer, SpanBody, WithSpan, call_span, continue_trace, inject};
pub use types::{DescriptorSetError, GrpcType, GrpcTypes};
