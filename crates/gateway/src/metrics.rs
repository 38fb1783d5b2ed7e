//! The gateway's metrics: HTTP requests by route and status, and the event
//! streams open, in the process's registry.

use std::sync::Arc;

use axum::{
    extract::{MatchedPath, Request, State},
    middleware::Next,
    response::Response,
};
use lightbox_metrics::{
    GaugeFn, Metrics,
    prometheus_client::metrics::{counter::Counter, family::Family},
};
use tokio::sync::Semaphore;

/// The labels of a request: its route template (never the raw path, so
/// the series stay few), method and status code.
type RequestLabels = [(&'static str, String); 3];

/// The route a response came from, set by the dispatcher once a route
/// matched (the table's routes are all behind one fallback).
#[derive(Debug, Clone)]
pub(crate) struct RouteLabel(pub(crate) String);

/// What the middleware counts into.
#[derive(Debug, Clone)]
pub(crate) struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
}

impl HttpMetrics {
    /// Registers the gateway's metrics in `metrics`; `streams` is the event
    /// streams' semaphore of `max` permits (those taken are open streams).
    pub(crate) fn register(metrics: &Metrics, streams: Arc<Semaphore>, max: usize) -> HttpMetrics {
        let requests = Family::<RequestLabels, Counter>::default();
        metrics.register(
            "lightbox_gateway_http_requests",
            "HTTP requests the gateway answered, by route template, method and status",
            requests.clone(),
        );
        metrics.register_collector(GaugeFn::new(
            "lightbox_gateway_event_streams",
            "Server-Sent Event streams open",
            move || {
                let open = max.saturating_sub(streams.available_permits());
                vec![([("gateway", "events".to_owned())], open as f64)]
            },
        ));
        HttpMetrics { requests }
    }
}

/// Counts every response by route, method and status.
pub(crate) async fn count(State(metrics): State<Arc<HttpMetrics>>, request: Request, next: Next) -> Response {
    let matched = request.extensions().get::<MatchedPath>().map(|m| m.as_str().to_owned());
    let method = match request.method().as_str() {
        known @ ("GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS") => known.to_owned(),
        // A client may send any token as a method: they share one series.
        _ => "other".to_owned(),
    };
    let response = next.run(request).await;
    let route = response
        .extensions()
        .get::<RouteLabel>()
        .map(|label| label.0.clone())
        .or(matched)
        .unwrap_or_else(|| "unmatched".to_owned());
    let status = response.status().as_u16().to_string();
    metrics
        .requests
        .get_or_create(&[("route", route), ("method", method), ("status", status)])
        .inc();
    response
}
