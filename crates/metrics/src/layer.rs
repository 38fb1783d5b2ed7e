//! The tower layers: one for servers, one for clients.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use http::{Request, Response};
use tonic::codegen::Bytes;
use tower::{Layer, Service};

use crate::{
    Metrics,
    body::{self, Messages, MeteredBody},
    families::{Call, Methods, Side},
    types::GrpcTypes,
};

/// A boxed error, as tonic's bounds spell it.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Measures the gRPC calls a server answers, under go-grpc-middleware's
/// names: `grpc_server_started_total`, `grpc_server_handled_total`,
/// `grpc_server_handling_seconds`, `grpc_server_msg_received_total`,
/// `grpc_server_msg_sent_total`.
///
/// For [`tonic::transport::Server::layer`]. Requests that are not gRPC
/// (no `application/grpc` content type, such as `GET /metrics` on the same
/// router) pass through unmeasured.
#[derive(Clone)]
pub struct GrpcServerLayer {
    methods: Arc<Methods>,
}

impl GrpcServerLayer {
    /// A layer recording into `metrics`, labelling each method's
    /// `grpc_type` from `types` (unlisted methods are `unary`).
    ///
    /// Every server layer of one `Metrics` shares its families, so a process
    /// may serve several ports, each with its own layer.
    pub fn new(metrics: &Metrics, types: &GrpcTypes) -> Self {
        let families = metrics.grpc_families(Side::Server);
        GrpcServerLayer {
            methods: Arc::new(Methods::new(families, types)),
        }
    }
}

impl std::fmt::Debug for GrpcServerLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcServerLayer").finish_non_exhaustive()
    }
}

impl<S> Layer<S> for GrpcServerLayer {
    type Service = GrpcServerService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcServerService {
            inner,
            methods: self.methods.clone(),
        }
    }
}

/// The service [`GrpcServerLayer`] wraps around a server's routes.
///
/// Hands its inner service the request with a [`MeteredBody`] (counting
/// the messages received) and returns the response with one (counting
/// those sent, and finishing the call).
#[derive(Clone)]
pub struct GrpcServerService<S> {
    inner: S,
    methods: Arc<Methods>,
}

impl<S> std::fmt::Debug for GrpcServerService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcServerService").finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for GrpcServerService<S>
where
    S: Service<Request<MeteredBody<ReqBody>>, Response = Response<ResBody>>,
    S::Error: 'static,
{
    type Response = Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        if !body::is_grpc(request.headers()) {
            let request = request.map(MeteredBody::unmeasured);
            return ResponseFuture::unmeasured(self.inner.call(request));
        }
        let method = self.methods.get(request.uri().path());
        let messages = Messages::new(method.request_messages());
        let call = Call::start(method, request.headers());
        let request = request.map(|body| MeteredBody::new(body, messages, None));
        ResponseFuture::measured(self.inner.call(request), call)
    }
}

/// Measures the gRPC calls a client makes, under go-grpc-middleware's
/// names: `grpc_client_started_total`, `grpc_client_handled_total`,
/// `grpc_client_handling_seconds`, `grpc_client_msg_received_total`,
/// `grpc_client_msg_sent_total`.
///
/// Wraps a [`tonic::transport::Channel`]; the result is a transport a
/// generated client takes:
///
/// ```
/// use lightbox_metrics::{GrpcClientLayer, GrpcClientService, GrpcTypes, Metrics};
/// use tonic::transport::Channel;
/// use tonic_health::pb::health_client::HealthClient;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let metrics = Metrics::new();
/// let types = GrpcTypes::from_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)?;
/// let channel = Channel::from_static("http://127.0.0.1:50051").connect_lazy();
/// let transport = tower::ServiceBuilder::new()
///     .layer(GrpcClientLayer::new(&metrics, &types))
///     .service(channel);
/// let client: HealthClient<GrpcClientService<Channel>> = HealthClient::new(transport);
/// # drop(client); Ok(()) }
/// ```
///
/// A call whose channel fails with no response (the server cannot be
/// reached) counts as `Unavailable`.
#[derive(Clone)]
pub struct GrpcClientLayer {
    methods: Arc<Methods>,
}

impl GrpcClientLayer {
    /// A layer recording into `metrics`, labelling each method's
    /// `grpc_type` from `types` (unlisted methods are `unary`).
    ///
    /// Every client layer of one `Metrics` shares its families.
    pub fn new(metrics: &Metrics, types: &GrpcTypes) -> Self {
        let families = metrics.grpc_families(Side::Client);
        GrpcClientLayer {
            methods: Arc::new(Methods::new(families, types)),
        }
    }
}

impl std::fmt::Debug for GrpcClientLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcClientLayer").finish_non_exhaustive()
    }
}

impl<S> Layer<S> for GrpcClientLayer {
    type Service = GrpcClientService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcClientService {
            inner,
            methods: self.methods.clone(),
        }
    }
}

/// The service [`GrpcClientLayer`] wraps around a channel.
///
/// A `Channel` takes only [`tonic::body::Body`], so the counting request
/// body is boxed into one: one allocation per call, which the server side
/// avoids.
#[derive(Clone)]
pub struct GrpcClientService<S> {
    inner: S,
    methods: Arc<Methods>,
}

impl<S> std::fmt::Debug for GrpcClientService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcClientService").finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for GrpcClientService<S>
where
    S: Service<Request<tonic::body::Body>, Response = Response<ResBody>>,
    S::Error: 'static,
    ReqBody: http_body::Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError> + 'static,
{
    type Response = Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        if !body::is_grpc(request.headers()) {
            let request = request.map(tonic::body::Body::new);
            return ResponseFuture::unmeasured(self.inner.call(request));
        }
        let method = self.methods.get(request.uri().path());
        let messages = Messages::new(method.request_messages());
        let call = Call::start(method, request.headers());
        let request = request.map(|body| tonic::body::Body::new(MeteredBody::new(body, messages, None)));
        ResponseFuture::measured(self.inner.call(request), call)
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`GrpcServerService`] and
    /// [`GrpcClientService`]. Dropped before the response, the call counts
    /// as `Canceled` (`DeadlineExceeded` once its `grpc-timeout` has
    /// passed).
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        call: Option<Call>,
    }
}

impl<F> ResponseFuture<F> {
    fn unmeasured(inner: F) -> Self {
        ResponseFuture { inner, call: None }
    }

    fn measured(inner: F, call: Call) -> Self {
        ResponseFuture {
            inner,
            call: Some(call),
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("measured", &self.call.is_some())
            .finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: 'static,
{
    type Output = Result<Response<MeteredBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let Some(call) = this.call.take() else {
            return Poll::Ready(result.map(|response| response.map(MeteredBody::unmeasured)));
        };
        Poll::Ready(match result {
            // A Trailers-Only response (an error before any message) is
            // finished here; otherwise its body finishes the call.
            Ok(response) => match body::status_at_headers(&response) {
                Some(code) => {
                    call.finish(code);
                    Ok(response.map(MeteredBody::unmeasured))
                }
                None => {
                    let messages = Messages::new(call.method().response_messages());
                    Ok(response.map(|body| MeteredBody::new(body, messages, Some(call))))
                }
            },
            Err(error) => {
                let side = call.method().side();
                call.finish(body::error_code(&error, side));
                Err(error)
            }
        })
    }
}
