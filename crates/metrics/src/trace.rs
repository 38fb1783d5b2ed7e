//! Traces across hops: the W3C trace context read from a call's headers
//! (server) or written into them (client), around one span per call named
//! `package.Service/Method` with the OpenTelemetry RPC attributes.
//!
//! The spans are `tracing` spans; an OpenTelemetry layer on the subscriber
//! (`tracing-opentelemetry`) makes them OpenTelemetry spans and exports
//! them. The span lives as long as the call: for a stream, until its body
//! ends or is dropped, so a watch stream's span covers the whole watch.
//! Without that layer, nothing is exported and no context is propagated.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use opentelemetry::propagation::{Extractor, Injector};
use tonic::codegen::Bytes;
use tower::{Layer, Service};
use tracing::{Instrument as _, Span, instrument::Instrumented};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::body::{is_grpc, status_in_headers};

/// The span of one call, a child of the trace context its headers carry:
/// `tracing::Span`s named `grpc.server` whose OpenTelemetry name is the
/// method. Put it on a tonic server:
/// `Server::builder().layer(GrpcTraceLayer::server())`.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcTraceLayer;

impl GrpcTraceLayer {
    /// The server side: reads `traceparent`/`tracestate` from each call.
    pub fn server() -> GrpcTraceLayer {
        GrpcTraceLayer
    }
}

impl<S> Layer<S> for GrpcTraceLayer {
    type Service = GrpcTrace<S>;

    fn layer(&self, inner: S) -> GrpcTrace<S> {
        GrpcTrace { inner }
    }
}

/// The service [`GrpcTraceLayer`] wraps.
#[derive(Debug, Clone)]
pub struct GrpcTrace<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for GrpcTrace<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<SpanBody<ResBody>>;
    type Error = S::Error;
    type Future = WithSpan<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let span = match is_grpc(request.headers()) {
            true => {
                let span = call_span(request.uri().path(), "server");
                continue_trace(&span, request.headers());
                span
            }
            false => Span::none(),
        };
        WithSpan {
            inner: self.inner.call(request).instrument(span.clone()),
            span: Some(span),
        }
    }
}

/// A call's span, named as OpenTelemetry's RPC conventions say: the method
/// (`package.Service/Method`), with `rpc.system`, `rpc.service` and
/// `rpc.method`; `rpc.grpc.status_code` is recorded at the end. At `debug`
/// level: disabled, so nearly free, unless a subscriber asks for it (the
/// OpenTelemetry layer does, when traces are exported).
pub fn call_span(path: &str, kind: &'static str) -> Span {
    let name = path.trim_start_matches('/');
    let (service, method) = name.split_once('/').unwrap_or((name, ""));
    match kind {
        "client" => tracing::debug_span!(
            "grpc.client",
            otel.name = %name,
            otel.kind = "client",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
        ),
        _ => tracing::debug_span!(
            "grpc.server",
            otel.name = %name,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
        ),
    }
}

/// Makes `span` a child of the trace context `headers` carry
/// (`traceparent`, `tracestate`), if they carry one: a call continues its
/// caller's trace.
pub fn continue_trace(span: &Span, headers: &HeaderMap) {
    let parent =
        opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&HeaderExtractor(headers)));
    // An error only says the span is disabled (no subscriber wants it).
    let _ = span.set_parent(parent);
}

/// Writes the trace context of `span` into `headers` (`traceparent`,
/// `tracestate`), for the next hop; leaves them as they are when the span
/// has no valid context (no OpenTelemetry layer installed).
pub fn inject(span: &Span, headers: &mut HeaderMap) {
    let context = span.context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut HeaderInjector(headers));
    });
}

pin_project_lite::pin_project! {
    /// The future of a traced call: runs inside the span, then hands it to
    /// the response body.
    #[derive(Debug)]
    pub struct WithSpan<F> {
        #[pin]
        inner: Instrumented<F>,
        span: Option<Span>,
    }
}

impl<F, B, E> std::future::Future for WithSpan<F>
where
    F: std::future::Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<SpanBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let span = this.span.take().unwrap_or_else(Span::none);
        Poll::Ready(result.map(|response| {
            if let Some(code) = status_in_headers(response.headers()) {
                record(&span, code as i32);
            }
            response.map(|body| SpanBody { inner: body, span })
        }))
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its call's span open until it ends, and
    /// records the status its trailers carry.
    #[derive(Debug)]
    pub struct SpanBody<B> {
        #[pin]
        inner: B,
        span: Span,
    }
}

impl<B> SpanBody<B> {
    /// `inner`, keeping `span` open until it ends.
    pub fn new(inner: B, span: Span) -> SpanBody<B> {
        SpanBody { inner, span }
    }
}

impl<B: Body<Data = Bytes>> Body for SpanBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(code) = frame.trailers_ref().and_then(status_in_headers)
        {
            record(this.span, code as i32);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn record(span: &Span, code: i32) {
    span.record("rpc.grpc.status_code", code);
}

/// The headers of a call, as the propagator reads them.
struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// The headers of a call, as the propagator writes them.
struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(key), HeaderValue::try_from(value)) {
            self.0.insert(name, value);
        }
    }
}
