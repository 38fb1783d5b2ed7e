//! The server and client layers around a real health server on
//! 127.0.0.1:0, called by a real generated client, read back from the
//! encoded text.

mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use common::sample;
use lightbox_metrics::{GrpcClientLayer, GrpcClientService, GrpcServerLayer, GrpcTypes, Metrics};
use tokio::net::TcpListener;
use tonic::{
    Code,
    service::Routes,
    transport::{Channel, Endpoint, Server, server::TcpIncoming},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tower::{ServiceBuilder, ServiceExt as _};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const HEALTH: &str = "grpc.health.v1.Health";

/// A task aborted when the test ends, pass or fail.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn types() -> GrpcTypes {
    GrpcTypes::from_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET).expect("health's descriptor set decodes")
}

/// Serves health (and `GET /metrics`, as a server would) through the server
/// layer on a port bound before this returns.
async fn serve(metrics: &Metrics) -> Result<(SocketAddr, AbortOnDrop), BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    // The reporter starts with "" SERVING; the service keeps the statuses.
    let (_reporter, health) = tonic_health::server::health_reporter();
    let scrape = metrics.clone();
    let router = Routes::new(health).into_axum_router().route(
        "/metrics",
        axum::routing::get(move || {
            let text = scrape.encode();
            async move { ([(http::header::CONTENT_TYPE, lightbox_metrics::CONTENT_TYPE)], text) }
        }),
    );
    let server = Server::builder()
        .layer(GrpcServerLayer::new(metrics, &types()))
        .add_routes(Routes::from(router))
        .serve_with_incoming(TcpIncoming::from(listener));
    let task = tokio::spawn(async move {
        if let Err(error) = server.await {
            panic!("the test server failed: {error}");
        }
    });
    Ok((addr, AbortOnDrop(task)))
}

fn channel(addr: SocketAddr) -> Result<Channel, BoxError> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?.connect_lazy())
}

/// A generated client over the client layer: the type says it is usable.
fn client(metrics: &Metrics, addr: SocketAddr) -> Result<HealthClient<GrpcClientService<Channel>>, BoxError> {
    let transport = ServiceBuilder::new()
        .layer(GrpcClientLayer::new(metrics, &types()))
        .service(channel(addr)?);
    Ok(HealthClient::new(transport))
}

fn request(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.to_owned(),
    }
}

/// The labels of one health method.
fn labels<'a>(grpc_type: &'a str, method: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("grpc_type", grpc_type),
        ("grpc_service", HEALTH),
        ("grpc_method", method),
    ]
}

/// The same and a code.
fn with_code<'a>(grpc_type: &'a str, method: &'a str, code: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut labels = labels(grpc_type, method);
    labels.push(("grpc_code", code));
    labels
}

/// Scrapes until `done` holds, failing after a deadline with the last text.
async fn wait_for(metrics: &Metrics, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics.encode();
        if done(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}:\n{text}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_unary_call_moves_each_metric_by_one_on_both_sides() -> Result<(), BoxError> {
    let metrics = Metrics::new();
    let (addr, _server) = serve(&metrics).await?;
    let mut client = client(&metrics, addr)?;

    let before = metrics.encode();
    let answer = client.check(request("")).await?.into_inner();
    assert_eq!(
        answer.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    let after = metrics.encode();

    let method = labels("unary", "Check");
    let ok = with_code("unary", "Check", "OK");
    for side in ["server", "client"] {
        let moved = |name: &str, labels: &[(&str, &str)]| {
            let name = format!("grpc_{side}_{name}");
            sample(&after, &name, labels) - sample(&before, &name, labels)
        };
        assert_eq!(moved("started_total", &method), 1.0, "{side}:\n{after}");
        assert_eq!(moved("handled_total", &ok), 1.0, "{side}:\n{after}");
        assert_eq!(moved("handled_total", &method), 1.0, "{side}: only OK moved:\n{after}");
        assert_eq!(moved("handling_seconds_count", &method), 1.0, "{side}:\n{after}");
        assert_eq!(moved("msg_received_total", &method), 1.0, "{side}:\n{after}");
        assert_eq!(moved("msg_sent_total", &method), 1.0, "{side}:\n{after}");
        // Loopback and an in-memory answer: well inside the top bucket.
        let in_ten_seconds = [method.as_slice(), &[("le", "10.0")]].concat();
        assert_eq!(
            moved("handling_seconds_bucket", &in_ten_seconds),
            1.0,
            "{side}:\n{after}"
        );
        // The finest bucket is 100 µs, so that calls answered from memory
        // do not all land in the first one.
        let finest = format!("grpc_{side}_handling_seconds_bucket{{");
        assert!(
            after
                .lines()
                .any(|line| line.starts_with(&finest) && line.contains("le=\"0.0001\"")),
            "{side}: no 100 µs bucket:\n{after}"
        );
    }
    assert!(
        after.contains("# TYPE grpc_server_handling_seconds histogram\n"),
        "{after}"
    );
    assert!(after.contains("# TYPE grpc_client_started counter\n"), "{after}");
    Ok(())
}

#[tokio::test]
async fn not_found_counts_as_not_found_on_both_sides() -> Result<(), BoxError> {
    let metrics = Metrics::new();
    let (addr, _server) = serve(&metrics).await?;
    let mut client = client(&metrics, addr)?;

    let status = client
        .check(request("no.such.v1.Service"))
        .await
        .expect_err("not registered");
    assert_eq!(status.code(), Code::NotFound);

    let text = metrics.encode();
    let method = labels("unary", "Check");
    for side in ["server", "client"] {
        let handled = format!("grpc_{side}_handled_total");
        assert_eq!(
            sample(&text, &handled, &with_code("unary", "Check", "NotFound")),
            1.0,
            "{side}:\n{text}"
        );
        assert_eq!(sample(&text, &handled, &method), 1.0, "{side}:\n{text}");
        assert_eq!(
            sample(&text, &format!("grpc_{side}_handling_seconds_count"), &method),
            1.0
        );
    }
    // The request went out and in; no answer came back.
    assert_eq!(sample(&text, "grpc_server_msg_received_total", &method), 1.0, "{text}");
    assert_eq!(sample(&text, "grpc_server_msg_sent_total", &method), 0.0, "{text}");
    assert_eq!(sample(&text, "grpc_client_msg_sent_total", &method), 1.0, "{text}");
    assert_eq!(sample(&text, "grpc_client_msg_received_total", &method), 0.0, "{text}");
    Ok(())
}

#[tokio::test]
async fn a_stream_the_client_drops_counts_as_canceled() -> Result<(), BoxError> {
    let metrics = Metrics::new();
    let (addr, _server) = serve(&metrics).await?;
    let mut client = client(&metrics, addr)?;

    let mut stream = client.watch(request("")).await?.into_inner();
    let first = stream.message().await?.expect("the current status comes first");
    assert_eq!(
        first.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    // Still open: started, not handled.
    let method = labels("server_stream", "Watch");
    let text = metrics.encode();
    assert_eq!(sample(&text, "grpc_server_started_total", &method), 1.0, "{text}");
    assert_eq!(sample(&text, "grpc_server_handled_total", &method), 0.0, "{text}");
    drop(stream);

    // The server hears of it when the reset arrives.
    let canceled = with_code("server_stream", "Watch", "Canceled");
    let text = wait_for(&metrics, "the server to count the call canceled", |text| {
        sample(text, "grpc_server_handled_total", &canceled) >= 1.0
    })
    .await;
    assert_eq!(sample(&text, "grpc_server_handled_total", &canceled), 1.0, "{text}");
    assert_eq!(sample(&text, "grpc_server_handled_total", &method), 1.0, "{text}");
    assert!(sample(&text, "grpc_server_msg_sent_total", &method) >= 1.0, "{text}");
    assert_eq!(sample(&text, "grpc_server_msg_received_total", &method), 1.0, "{text}");
    assert_eq!(
        sample(&text, "grpc_server_handling_seconds_count", &method),
        1.0,
        "{text}"
    );
    // The client dropped its end itself: counted at once.
    assert_eq!(sample(&text, "grpc_client_handled_total", &canceled), 1.0, "{text}");
    assert!(
        sample(&text, "grpc_client_msg_received_total", &method) >= 1.0,
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn a_stream_dropped_past_its_deadline_counts_as_deadline_exceeded() -> Result<(), BoxError> {
    let metrics = Metrics::new();
    let (addr, _server) = serve(&metrics).await?;
    let mut client = client(&metrics, addr)?;

    // Sent as `grpc-timeout`; both ends start their clocks before this
    // returns, so both deadlines have passed by `past_deadline`.
    let timeout = Duration::from_millis(200);
    let mut watch = tonic::Request::new(request(""));
    watch.set_timeout(timeout);
    let mut stream = client.watch(watch).await?.into_inner();
    let past_deadline = tokio::time::Instant::now() + timeout;
    stream.message().await?.expect("the current status comes first");
    tokio::time::sleep_until(past_deadline).await;
    // A caller gives up at its deadline.
    drop(stream);

    let late = with_code("server_stream", "Watch", "DeadlineExceeded");
    let text = wait_for(&metrics, "the server to count the call past its deadline", |text| {
        sample(text, "grpc_server_handled_total", &late) >= 1.0
    })
    .await;
    let method = labels("server_stream", "Watch");
    assert_eq!(sample(&text, "grpc_server_handled_total", &method), 1.0, "{text}");
    assert_eq!(sample(&text, "grpc_client_handled_total", &late), 1.0, "{text}");
    assert_eq!(sample(&text, "grpc_client_handled_total", &method), 1.0, "{text}");
    Ok(())
}

#[tokio::test]
async fn an_unreachable_server_counts_as_unavailable_on_the_client() -> Result<(), BoxError> {
    let metrics = Metrics::new();
    // Bound, then closed: nothing listens there.
    let addr = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let mut client = client(&metrics, addr)?;

    let status = client.check(request("")).await.expect_err("nothing listens");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    let text = metrics.encode();
    let method = labels("unary", "Check");
    assert_eq!(sample(&text, "grpc_client_started_total", &method), 1.0, "{text}");
    assert_eq!(
        sample(
            &text,
            "grpc_client_handled_total",
            &with_code("unary", "Check", "Unavailable")
        ),
        1.0,
        "{text}"
    );
    assert_eq!(sample(&text, "grpc_client_handled_total", &method), 1.0, "{text}");
    assert_eq!(
        sample(&text, "grpc_client_handling_seconds_count", &method),
        1.0,
        "{text}"
    );
    assert_eq!(sample(&text, "grpc_client_msg_received_total", &method), 0.0, "{text}");
    Ok(())
}

#[tokio::test]
async fn a_request_that_is_not_grpc_passes_through_unmeasured() -> Result<(), BoxError> {
    let metrics = Metrics::new();
    let (addr, _server) = serve(&metrics).await?;
    client(&metrics, addr)?.check(request("")).await?;

    // `GET /metrics` over HTTP/2, through the client layer too.
    let transport = ServiceBuilder::new()
        .layer(GrpcClientLayer::new(&metrics, &types()))
        .service(channel(addr)?);
    let get = http::Request::get("/metrics").body(tonic::body::Body::empty())?;
    let response = transport.oneshot(get).await?;
    assert_eq!(response.status(), http::StatusCode::OK);
    assert_eq!(
        response.headers().get(http::header::CONTENT_TYPE).map(|v| v.as_bytes()),
        Some(lightbox_metrics::CONTENT_TYPE.as_bytes())
    );
    let scraped = String::from_utf8(read_body(response.into_body()).await?)?;
    assert!(scraped.ends_with("# EOF\n"), "{scraped}");
    assert_eq!(
        sample(&scraped, "grpc_server_started_total", &labels("unary", "Check")),
        1.0
    );

    // Only the health call counts, on either side.
    let text = metrics.encode();
    for name in [
        "grpc_server_started_total",
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_count",
        "grpc_client_started_total",
        "grpc_client_handled_total",
        "grpc_client_handling_seconds_count",
    ] {
        assert_eq!(sample(&text, name, &[]), 1.0, "{name}:\n{text}");
    }
    assert!(!text.contains(r#"grpc_method="unknown""#), "{text}");
    Ok(())
}

/// Every data frame of a body, in order.
async fn read_body<B>(body: B) -> Result<Vec<u8>, BoxError>
where
    B: http_body::Body<Data = tonic::codegen::Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = std::pin::pin!(body);
    let mut bytes = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        if let Ok(data) = frame.map_err(Into::into)?.into_data() {
            bytes.extend_from_slice(&data);
        }
    }
    Ok(bytes)
}
