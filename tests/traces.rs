//! Traces across every hop: one phone request through the gateway makes
//! one trace holding the spans of every service it touched — the gateway,
//! Photos, Users and Contracts, each call seen from both ends — named
//! `package.Service/Method` with the OpenTelemetry RPC attributes. The spans
//! go to an in-process exporter instead of OTLP.
//!
//! Its own test binary: it installs the process's global subscriber and
//! propagator.

use std::time::Duration;

use lightbox_changefeed::FeedOptions;
use lightbox_testkit::{Stack, TestDb, customer};
use opentelemetry::trace::{SpanKind, TracerProvider as _};
use opentelemetry_sdk::{
    propagation::TraceContextPropagator,
    trace::{InMemorySpanExporter, SdkTracerProvider, SpanData},
};
use tracing_subscriber::{Layer as _, layer::SubscriberExt as _, util::SubscriberInitExt as _};

/// The spans named `name` of `kind` in `spans`.
fn named<'a>(spans: &'a [SpanData], name: &str, kind: SpanKind) -> Vec<&'a SpanData> {
    spans.iter().filter(|s| s.name == name && s.span_kind == kind).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gateway_request_is_one_trace_through_every_service() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // As the servers do (see the app's telemetry): Lightbox's spans, not
    // the libraries' internals.
    tracing_subscriber::registry()
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("test"))
                .with_filter(lightbox_app::trace_filter()),
        )
        .try_init()
        .unwrap_or_else(|e| panic!("the subscriber of this test binary: {e}"));

    let feed = FeedOptions {
        progress_interval: Duration::from_millis(200),
        poll_interval: Duration::from_millis(200),
        ..FeedOptions::default()
    };
    let stack = Stack::start(TestDb::sqlite(), feed).await;
    let (user, _) = customer(&stack, "traces@example.com", "10").await;
    let before = exporter.get_finished_spans().unwrap_or_else(|e| panic!("{e}")).len();

    // A FRESH read: gateway → Photos → Users → Contracts.
    let answer = reqwest::Client::new()
        .get(format!(
            "{}/v1/users/me/photos?consistency=CONSISTENCY_FRESH",
            stack.gateway_url()
        ))
        .bearer_auth(stack.token(&user.id))
        .send()
        .await
        .unwrap_or_else(|e| panic!("the gateway: {e}"));
    assert_eq!(answer.status(), reqwest::StatusCode::OK);
    let _ = answer.text().await;
    provider.force_flush().unwrap_or_else(|e| panic!("{e}"));

    let spans = exporter.get_finished_spans().unwrap_or_else(|e| panic!("{e}"));
    let spans = &spans[before.min(spans.len())..];
    let gateway = spans
        .iter()
        .find(|s| s.name == "GET /v1/users/{user_id}/photos" && s.span_kind == SpanKind::Server)
        .unwrap_or_else(|| {
            let names: Vec<(&str, &SpanKind)> = spans.iter().map(|s| (&*s.name, &s.span_kind)).collect();
            panic!("no span of the gateway's route: {names:#?}")
        });
    let trace = gateway.span_context.trace_id();
    let in_trace: Vec<SpanData> = spans
        .iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .cloned()
        .collect();
    let names: Vec<(&str, SpanKind)> = in_trace.iter().map(|s| (&*s.name, s.span_kind.clone())).collect();
    for method in [
        "lightbox.photos.v1.PhotosService/ListPhotos",
        "lightbox.users.v1.UsersService/GetUser",
        "lightbox.contracts.v1.ContractsService/GetContract",
    ] {
        let client = named(&in_trace, method, SpanKind::Client);
        let server = named(&in_trace, method, SpanKind::Server);
        assert!(
            !client.is_empty() && !server.is_empty(),
            "{method} from both ends in {names:#?}"
        );
        // Each server span is the child of the client span that called it.
        assert!(
            server
                .iter()
                .all(|s| client.iter().any(|c| c.span_context.span_id() == s.parent_span_id)),
            "{method}: {names:#?}"
        );
        let attributes: Vec<String> = server[0]
            .attributes
            .iter()
            .map(|kv| format!("{}={}", kv.key, kv.value))
            .collect();
        for wanted in ["rpc.system=grpc", "rpc.grpc.status_code=0"] {
            assert!(attributes.iter().any(|a| a == wanted), "{method}: {attributes:?}");
        }
    }
    stack.stop().await;
}
