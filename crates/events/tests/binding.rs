//! The CloudEvents HTTP binding against the specification's examples, a
//! non-ASCII attribute through a real delivery in binary mode, and the
//! rules on endpoints (addresses, redirects, timeouts, rate limits), on
//! SQLite and PostgreSQL.

mod common;

use std::time::Duration;

use common::*;
use http::{HeaderMap, HeaderValue};
use lightbox_api::events::{
    ContentMode, CreateSubscriptionRequest, EntityType, ListDeadLettersRequest, Subscription as ApiSubscription,
    subscriptions_service_server::SubscriptionsService as _,
};
use lightbox_events::{CloudEvent, EventsOptions, EventsService, Mode, Sources, cloudevent::percent_encode};
use lightbox_testkit::{TestDb, capture_logs, eventually};
use tonic::Request;

lightbox_testkit::conformance!(
    binary_headers_round_trip_a_non_ascii_attribute,
    endpoints_are_checked_redirects_refused_timeouts_retried_and_rates_limited,
);

fn spec_event() -> CloudEvent {
    CloudEvent {
        id: "1234-1234-1234".into(),
        source: "/mycontext/subcontext".into(),
        event_type: "com.example.someevent".into(),
        subject: None,
        time: Some("2018-04-05T03:56:24Z".into()),
        datacontenttype: Some("application/json; charset=utf-8".into()),
        extensions: Default::default(),
        data: Some(br#"{"hello":"world"}"#.to_vec()),
    }
}

#[test]
fn binary_mode_matches_the_binding_example() {
    // HTTP protocol binding 1.0.2, section 3.1.4.
    let (headers, body) = spec_event().to_http(Mode::Binary).unwrap_or_else(|e| panic!("{e}"));
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
    assert_eq!(get("ce-specversion"), "1.0");
    assert_eq!(get("ce-type"), "com.example.someevent");
    assert_eq!(get("ce-time"), "2018-04-05T03:56:24Z");
    assert_eq!(get("ce-id"), "1234-1234-1234");
    assert_eq!(get("ce-source"), "/mycontext/subcontext");
    assert_eq!(get("content-type"), "application/json; charset=utf-8");
    // datacontenttype travels as Content-Type only.
    assert!(headers.get("ce-datacontenttype").is_none());
    assert_eq!(body, br#"{"hello":"world"}"#);
    assert_eq!(CloudEvent::from_http(&headers, &body), Ok(spec_event()));
}

#[test]
fn structured_mode_matches_the_json_format() {
    let (headers, body) = spec_event().to_http(Mode::Structured).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/cloudevents+json; charset=utf-8")
    );
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(json["specversion"], "1.0");
    assert_eq!(json["type"], "com.example.someevent");
    assert_eq!(json["data"]["hello"], "world");
    let back = CloudEvent::from_http(&headers, &body).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(back.id, "1234-1234-1234");
    assert_eq!(back.data.as_deref(), Some(br#"{"hello":"world"}"#.as_slice()));
}

#[test]
fn decoding_reads_quoted_legacy_headers_and_refuses_overlong_utf8() {
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "1"),
        ("ce-source", "\"/with space\""),
        ("ce-type", "Euro%20%e2%82%ac"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    let event = CloudEvent::from_http(&headers, b"").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(event.source, "/with space");
    assert_eq!(event.event_type, "Euro €");
    headers.insert("ce-subject", HeaderValue::from_static("%C0%A0"));
    assert!(CloudEvent::from_http(&headers, b"").is_err());
}

fn subscription(endpoint: String) -> ApiSubscription {
    ApiSubscription {
        endpoint,
        entity_types: vec![EntityType::Contract as i32],
        content_mode: ContentMode::Binary as i32,
        ..ApiSubscription::default()
    }
}

async fn create(service: &EventsService, id: &str, sub: ApiSubscription) -> Result<(), tonic::Status> {
    service
        .create_subscription(Request::new(CreateSubscriptionRequest {
            subscription: Some(sub),
            subscription_id: id.into(),
            start_revision: Some(0),
            ..CreateSubscriptionRequest::default()
        }))
        .await
        .map(|_| ())
}

async fn binary_headers_round_trip_a_non_ascii_attribute(test_db: TestDb) {
    capture_logs();
    let db = test_db.connect().await;
    let feed = contracts_feed(&db).await;
    let function = Function::default();
    let url = function.start().await;
    let prefix = "/lightbox/café ☕ \"quoted\" 100%";
    let options = EventsOptions {
        source_prefix: prefix.into(),
        ..options()
    };
    let service = EventsService::open(db.clone(), options, Sources::new().with(feed.clone()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    create(&service, "unicode", subscription(url))
        .await
        .unwrap_or_else(|s| panic!("create: {s:?}"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(service.clone().run(async {
        let _ = stopped.await;
    }));
    let revision = write(&feed, &new_id(), &new_id(), 1).await;
    let f = &function;
    let received = eventually("the delivery", || async move { f.delivered().into_iter().next() }).await;
    let raw = header(&received.headers, "ce-source");
    let source = format!("{prefix}/contracts");
    assert_eq!(raw, percent_encode(&source));
    assert_eq!(raw, "/lightbox/caf%C3%A9%20%E2%98%95%20%22quoted%22%20100%25/contracts");
    let event = received.event();
    assert_eq!(event.source, source);
    assert_eq!(event.id, format!("contracts:{revision}"));
    let _ = stop.send(());
    let _ = task.await;
}

async fn endpoints_are_checked_redirects_refused_timeouts_retried_and_rates_limited(test_db: TestDb) {
    capture_logs();
    let db = test_db.connect().await;
    let feed = contracts_feed(&db).await;
    let function = Function::default();
    let url = function.start().await;
    let port = url.trim_end_matches('/').rsplit(':').next().unwrap_or("80").to_owned();

    // Without an allow-list, loopback is refused, by name too; private and
    // metadata addresses always are (no request is ever sent to them).
    let strict = EventsService::open(db.clone(), EventsOptions::default(), Sources::new().with(feed.clone()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for endpoint in [
        format!("http://localhost:{port}/"),
        format!("http://127.0.0.1:{port}/"),
        "http://10.0.0.1/".to_owned(),
        "http://169.254.169.254/latest/meta-data".to_owned(),
        "http://[::1]/".to_owned(),
    ] {
        let refused = create(&strict, "refused", subscription(endpoint.clone())).await;
        let status = refused.err().unwrap_or_else(|| panic!("{endpoint} was accepted"));
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{endpoint}: {status:?}");
        assert!(status.message().contains("non-public"), "{}", status.message());
    }
    let https = create(&strict, "tls", subscription("https://example.com/".into())).await;
    assert!(https.err().is_some_and(|s| s.message().contains("https")));

    let service = EventsService::open(db.clone(), options(), Sources::new().with(feed.clone()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(service.clone().run(async {
        let _ = stopped.await;
    }));

    // A redirect is an answer, not followed: to the dead letters at once.
    function.plan(|p| p.redirect = true);
    create(&service, "redirected", subscription(url.clone()))
        .await
        .unwrap_or_else(|s| panic!("create: {s:?}"));
    write(&feed, &new_id(), &new_id(), 1).await;
    let letter = dead_letter(&service, "redirected").await;
    assert_eq!(letter.attempts.len(), 1);
    assert_eq!(letter.attempts[0].http_status, 307);
    assert!(
        letter.attempts[0].error.contains("not followed"),
        "{:?}",
        letter.attempts[0]
    );
    function.plan(|p| p.redirect = false);
    delete_subscription(&service, "redirected").await;

    // A function slower than the timeout: retried, then given up on.
    function.plan(|p| p.stall = Some(Duration::from_millis(800)));
    let slow = ApiSubscription {
        timeout: Some(pbjson_types::Duration {
            seconds: 0,
            nanos: 200_000_000,
        }),
        max_attempts: 2,
        ..subscription(url.clone())
    };
    create(&service, "slow", slow)
        .await
        .unwrap_or_else(|s| panic!("create: {s:?}"));
    let letter = dead_letter(&service, "slow").await;
    assert_eq!(letter.attempts.len(), 2);
    assert!(
        letter
            .attempts
            .iter()
            .all(|a| a.http_status == 0 && a.error.contains("no answer within 200 ms"))
    );
    function.plan(|p| p.stall = None);
    delete_subscription(&service, "slow").await;

    // Four deliveries a second: the fifth and later wait their turn.
    let limited = ApiSubscription {
        rate_limit: 4.0,
        ..subscription(url.clone())
    };
    let start_revision = feed.committed_revision().await.unwrap_or_else(|e| panic!("{e}"));
    service
        .create_subscription(Request::new(CreateSubscriptionRequest {
            subscription: Some(limited),
            subscription_id: "limited".into(),
            start_revision: Some(start_revision),
            ..CreateSubscriptionRequest::default()
        }))
        .await
        .unwrap_or_else(|s| panic!("create: {s:?}"));
    let holder = new_id();
    let mut ids = std::collections::HashSet::new();
    for _ in 0..8 {
        let id = new_id();
        write(&feed, &id, &holder, 1).await;
        ids.insert(id);
    }
    let f = &function;
    let ids = &ids;
    let times = eventually("eight deliveries", || async move {
        let times: Vec<_> = f
            .delivered()
            .iter()
            .filter(|r| r.event().subject.is_some_and(|s| ids.contains(&s)))
            .map(|r| r.at)
            .collect();
        (times.len() >= 8).then_some(times)
    })
    .await;
    let spread = times[times.len() - 1] - times[0];
    assert!(
        spread >= Duration::from_millis(900),
        "8 deliveries at 4/s took only {spread:?}"
    );
    let _ = stop.send(());
    let _ = task.await;
}

async fn dead_letter(service: &EventsService, id: &str) -> lightbox_api::events::DeadLetter {
    let parent = format!("subscriptions/{id}");
    let p = &parent;
    eventually("a dead letter", || async move {
        let letters = service
            .list_dead_letters(Request::new(ListDeadLettersRequest {
                parent: p.clone(),
                ..ListDeadLettersRequest::default()
            }))
            .await
            .ok()?
            .into_inner()
            .dead_letters;
        letters.into_iter().next()
    })
    .await
}

async fn delete_subscription(service: &EventsService, id: &str) {
    service
        .delete_subscription(Request::new(lightbox_api::events::DeleteSubscriptionRequest {
            name: format!("subscriptions/{id}"),
        }))
        .await
        .unwrap_or_else(|s| panic!("delete: {s:?}"));
}
