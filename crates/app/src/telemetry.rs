//! Logs and traces: `tracing` to stderr, human-readable or JSON, filtered
//! by `RUST_LOG`; and, for the servers, the same spans as OpenTelemetry
//! spans, so that the W3C trace context goes on to every hop, exported over
//! OTLP when the standard `OTEL_*` variables say where.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_subscriber::{EnvFilter, Layer as _, fmt, layer::SubscriberExt as _, util::SubscriberInitExt as _};

use crate::config::LogFormat;

/// What must outlive the process's work: the tracer provider, flushed by
/// [`Telemetry::shutdown`].
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans still buffered and stops the exporter (at the end of
    /// a graceful shutdown).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(err) = provider.shutdown()
        {
            tracing::warn!(%err, "cannot flush the traces");
        }
    }
}

/// Whether the `OTEL_*` variables ask for traces to be exported over OTLP:
/// an endpoint is named, and neither `OTEL_SDK_DISABLED=true` nor
/// `OTEL_TRACES_EXPORTER=none` says otherwise.
fn export_requested() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let is = |name: &str, value: &str| std::env::var(name).is_ok_and(|v| v.trim().eq_ignore_ascii_case(value));
    (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        && !is("OTEL_SDK_DISABLED", "true")
        && !is("OTEL_TRACES_EXPORTER", "none")
}

/// Installs the global subscriber. Quiet about the libraries' internals
/// unless `RUST_LOG` asks for them; a command-line tool (`server` false)
/// logs only errors by default, as its own output says what happened.
///
/// A server whose `OTEL_*` variables ask for export ([`export_requested`])
/// also gets the OpenTelemetry layer: spans with their trace context,
/// propagated to every hop and exported over OTLP. Call it inside the tokio
/// runtime: the batch exporter runs on it.
pub fn init(format: LogFormat, server: bool) -> Telemetry {
    let default = match server {
        true => "info,sqlx=warn,h2=warn,hyper=warn,tower=warn",
        false => "error",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // Colour only for a person at a terminal: a log redirected to a file or
    // collected by a supervisor gets plain text (NO_COLOR is honoured too).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let logs = fmt::layer().with_writer(std::io::stderr).with_ansi(colour);
    let logs = match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().boxed(),
    };
    // Without an exporter there is nothing to propagate for: the layer (an
    // OpenTelemetry span per call) would cost the hot path for nothing.
    let (provider, failed) = match server && export_requested() {
        true => match tracer_provider() {
            Ok(provider) => (Some(provider), None),
            Err(err) => (None, Some(err)),
        },
        false => (None, None),
    };
    let traces = provider.as_ref().map(|provider| {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("lightbox"))
            .with_filter(trace_filter())
    });
    // The filter applies to the logs only: spans below the log level still
    // carry the trace.
    let registry = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(traces);
    // Fails only if a subscriber is already set (tests): keep that one.
    let _ = registry.try_init();
    if let Some(err) = failed {
        tracing::warn!(%err, "cannot export traces over OTLP; going on without");
    }
    Telemetry { provider }
}

/// The spans that become OpenTelemetry spans: Lightbox's own (the calls,
/// the gateway's requests, at `info`), never the libraries' internals
/// (h2's and hyper's spans at `trace` would cost more than the calls).
pub fn trace_filter() -> tracing_subscriber::filter::Targets {
    use tracing_subscriber::filter::LevelFilter;
    tracing_subscriber::filter::Targets::new()
        .with_default(LevelFilter::INFO)
        .with_target("h2", LevelFilter::OFF)
        .with_target("hyper", LevelFilter::OFF)
        .with_target("hyper_util", LevelFilter::OFF)
        .with_target("tonic", LevelFilter::OFF)
        .with_target("tower", LevelFilter::OFF)
        .with_target("sqlx", LevelFilter::OFF)
        .with_target("opentelemetry", LevelFilter::OFF)
        .with_target("opentelemetry_sdk", LevelFilter::OFF)
        // The calls' spans are at debug, so that logs at info never pay for them.
        .with_target("lightbox_metrics", LevelFilter::DEBUG)
}

/// The tracer provider with the OTLP exporter (endpoint, headers, timeout
/// and service name from the `OTEL_*` variables).
fn tracer_provider() -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let builder = SdkTracerProvider::builder();
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
    Ok(builder.with_batch_exporter(exporter).build())
}
