//! `lightbox subscriptions` as an operator uses it against `lightbox dev`
//! (which delivers to loopback endpoints): a function, an HTTP receiver in
//! the test, is subscribed to users; a user changed through `lightbox
//! users` reaches it as a signed CloudEvent; then the subscription is
//! listed, paused, resumed, its secret rotated, replayed from a snapshot,
//! its (empty) dead letters listed and redelivered, and deleted. Failures
//! exit with their kind: a bad endpoint 4, a deleted subscription 3,
//! nothing listening 7, bad usage 2.

#[path = "support/dev.rs"]
mod dev;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use dev::{free_port, start_dev_with, tool};
use lightbox_events::{Secret, Verifier};
use lightbox_testkit::eventually;

const ADA: &str = "00000000-0000-7000-8000-000000000001";
const GRACE: &str = "00000000-0000-7000-8000-000000000002";

/// The requests the function received, in order.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(HeaderMap, Bytes)>>>);

impl Received {
    fn all(&self) -> Vec<(HeaderMap, Bytes)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The first request whose `ce-type` is `event_type` and whose
    /// `ce-subject` is `subject`.
    fn find(&self, event_type: &str, subject: &str) -> Option<(HeaderMap, Bytes)> {
        self.all()
            .into_iter()
            .find(|(headers, _)| header(headers, "ce-type") == event_type && header(headers, "ce-subject") == subject)
    }

    /// How many requests were about `subject`.
    fn about(&self, subject: &str) -> usize {
        self.all()
            .iter()
            .filter(|(headers, _)| header(headers, "ce-subject") == subject)
            .count()
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
}

/// A function on 127.0.0.1:0 that takes every request to `/hook` (204)
/// and keeps it.
async fn function() -> (SocketAddr, Received) {
    async fn receive(State(received): State<Received>, headers: HeaderMap, body: Bytes) -> StatusCode {
        received
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((headers, body));
        StatusCode::NO_CONTENT
    }
    let received = Received::default();
    let app = Router::new().route("/hook", post(receive)).with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let addr = listener.local_addr().unwrap_or_else(|err| panic!("{err}"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, received)
}

/// `lightbox subscriptions ARGS --addr ADMIN`.
async fn subscriptions(admin: &str, args: &[&str]) -> (Option<i32>, String, String) {
    tool(&[&["subscriptions"][..], args, &["--addr", admin]].concat()).await
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|err| panic!("{err}: {out}"))
}

/// An int64 of the proto3 JSON mapping (a string).
fn int64(value: &serde_json::Value) -> i64 {
    value
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an int64: {value}"))
}

fn secret(text: &str) -> Secret {
    Secret::parse(text).unwrap_or_else(|err| panic!("{err}: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_delivers_signed_events_and_is_managed_end_to_end() {
    let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
    // Progress frames often, so a subscription made "from now" starts
    // reading (its cursor leaves -1) soon after it is made.
    let dev = start_dev_with(dir.path(), &["--progress-interval", "200ms"]).await;
    let (admin, users) = (dev.admin.to_string(), dev.users.to_string());
    let (function, received) = function().await;
    let hook = format!("http://{function}/hook");

    // Created from now, with a secret made by the server and shown once.
    let (code, out, err) = subscriptions(&admin, &["create", "--endpoint", &hook, "--types", "users", "--json"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.lines().count(), 1, "one line of JSON: {out}");
    let created = json(&out);
    let first = created["secret"].as_str().unwrap_or_default().to_owned();
    assert!(first.starts_with("whsec_"), "{out}");
    assert!(err.contains("shown only once"), "{err}");
    let name = created["subscription"]["name"].as_str().unwrap_or_default().to_owned();
    let id = name
        .strip_prefix("subscriptions/")
        .unwrap_or_else(|| panic!("a resource name: {out}"))
        .to_owned();
    assert_eq!(
        created["subscription"]["entityTypes"],
        serde_json::json!(["ENTITY_TYPE_USER"])
    );
    assert_eq!(created["subscription"]["state"], "SUBSCRIPTION_STATE_ACTIVE");

    // A change made before the reader connects is before "now": wait until
    // its cursor says it reads (the bare id is taken as the name).
    eventually("the subscription to start reading users", || {
        let (admin, id) = (admin.clone(), id.clone());
        async move {
            let (code, out, _) = subscriptions(&admin, &["get", &id, "--json"]).await;
            let got = (code == Some(0)).then(|| json(&out))?;
            (int64(&got["subscription"]["cursors"][0]["readRevision"]) >= 0).then_some(())
        }
    })
    .await;

    // A user changed through the CLI reaches the function as a CloudEvent
    // in binary mode, signed with the subscription's secret.
    let (code, _, err) = tool(&["users", "update", ADA, "--name", "Ada King", "--addr", &users]).await;
    assert_eq!(code, Some(0), "{err}");
    let (headers, body) = eventually("Ada's change at the function", || {
        let received = received.clone();
        async move { received.find("dev.lightbox.user.updated", ADA) }
    })
    .await;
    let verified = Verifier::new(vec![secret(&first)])
        .verify(&headers, &body, SystemTime::now())
        .unwrap_or_else(|err| panic!("the signature does not verify: {err}"));
    assert_eq!(verified, header(&headers, "ce-id"), "webhook-id is the event's id");
    let user = json(&String::from_utf8_lossy(&body));
    assert_eq!(user["displayName"], "Ada King", "the entity's JSON: {user}");
    let mut forged = body.to_vec();
    forged.extend(b" ");
    assert!(
        Verifier::new(vec![secret(&first)])
            .verify(&headers, &forged, SystemTime::now())
            .is_err(),
        "a changed body does not verify"
    );

    // Listed, as a table and as JSON.
    let (code, out, err) = subscriptions(&admin, &["list"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("NAME") && out.contains("CURSORS"), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with(&name))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("active") && line.contains(&hook) && line.contains("users:"),
        "{out}"
    );
    let (_, out, _) = subscriptions(&admin, &["list", "--json"]).await;
    assert_eq!(json(&out)["subscriptions"].as_array().map(Vec::len), Some(1), "{out}");

    // Paused, then resumed.
    let (code, out, err) = subscriptions(&admin, &["pause", &id]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("paused"), "{out}");
    let (code, out, err) = subscriptions(&admin, &["get", &name]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.lines().nth(1).is_some_and(|row| row.contains("paused")), "{out}");
    let (_, out, _) = subscriptions(&admin, &["get", &name, "--json"]).await;
    assert_eq!(
        json(&out)["subscription"]["state"],
        "SUBSCRIPTION_STATE_PAUSED",
        "{out}"
    );
    let (code, _, err) = subscriptions(&admin, &["resume", &id]).await;
    assert_eq!(code, Some(0), "{err}");
    let (_, out, _) = subscriptions(&admin, &["get", &id, "--json"]).await;
    assert_eq!(
        json(&out)["subscription"]["state"],
        "SUBSCRIPTION_STATE_ACTIVE",
        "{out}"
    );

    // A rotation: the new secret is shown once, and both sign.
    let (code, out, err) = subscriptions(&admin, &["rotate-secret", &id, "--json"]).await;
    assert_eq!(code, Some(0), "{err}");
    let rotated = json(&out);
    let second = rotated["secret"].as_str().unwrap_or_default().to_owned();
    assert!(second.starts_with("whsec_") && second != first, "{out}");
    assert_eq!(
        rotated["subscription"]["secretHints"].as_array().map(Vec::len),
        Some(2),
        "{out}"
    );

    // A replay from 0: a snapshot of every user, Grace included (not
    // changed since the subscription was made), signed with both secrets.
    let before = received.about(ADA);
    let (code, _, err) = subscriptions(&admin, &["replay", &id, "--since", "0"]).await;
    assert_eq!(code, Some(0), "{err}");
    let grace = eventually("Grace from the replay's snapshot", || {
        let received = received.clone();
        async move {
            received
                .all()
                .into_iter()
                .find(|(headers, _)| header(headers, "ce-subject") == GRACE)
        }
    })
    .await;
    // Entities are delivered side by side (in order per entity only), so
    // Ada's copy may land after Grace's.
    eventually("Ada again from the snapshot", || {
        let received = received.clone();
        async move { (received.about(ADA) > before).then_some(()) }
    })
    .await;
    for one in [&first, &second] {
        let verified = Verifier::new(vec![secret(one)]).verify(&grace.0, &grace.1, SystemTime::now());
        assert!(verified.is_ok(), "each secret verifies during a rotation: {verified:?}");
    }

    // No dead letters: an empty listing, nothing to redeliver.
    let (code, out, err) = subscriptions(&admin, &["dead-letters", &id]).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.lines().count(), 1, "the header alone: {out}");
    let (_, out, _) = subscriptions(&admin, &["dead-letters", &id, "--json"]).await;
    assert_eq!(json(&out)["deadLetters"], serde_json::json!([]), "{out}");
    let (code, out, err) = subscriptions(&admin, &["redeliver", &id, "--json"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(int64(&json(&out)["redeliveredCount"]), 0, "{out}");

    // Deleted: gone (exit 3), in one line saying how to find the others.
    let (code, out, err) = subscriptions(&admin, &["delete", &id]).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), format!("deleted {name}"));
    let (code, _, err) = subscriptions(&admin, &["get", &id]).await;
    assert_eq!(code, Some(3), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("NOT_FOUND") && err.contains("`lightbox subscriptions list`"),
        "{err}"
    );

    // An endpoint that is not http:// is an invalid argument (4) saying so;
    // nothing is created.
    let (code, _, err) = subscriptions(&admin, &["create", "--endpoint", "ftp://x", "--types", "users"]).await;
    assert_eq!(code, Some(4), "{err}");
    assert!(
        err.contains("INVALID_ARGUMENT") && err.contains("ftp://x") && err.contains("http"),
        "{err}"
    );
    assert!(err.contains("see `lightbox subscriptions --help`"), "{err}");
    let (_, out, _) = subscriptions(&admin, &["list", "--json"]).await;
    assert_eq!(json(&out)["subscriptions"], serde_json::json!([]), "{out}");
    assert!(dev.terminate().await.success());
}

#[tokio::test]
async fn with_nothing_listening_it_exits_7_and_bad_usage_exits_2() {
    let addr = format!("127.0.0.1:{}", free_port());
    let unreachable: [&[&str]; 3] = [
        &["list"],
        &["get", "sub-1"],
        &["create", "--endpoint", "http://x/", "--types", "users"],
    ];
    for args in unreachable {
        let (code, out, err) = subscriptions(&addr, args).await;
        assert_eq!(code, Some(7), "{args:?}: {err}");
        assert_eq!(out, "", "{args:?}");
        assert_eq!(
            err,
            format!(
                "error: cannot reach the admin listener at http://{addr} (connection refused); \
                 is the process running? Pass --addr with its admin address (its --admin-addr)\n"
            ),
            "{args:?}"
        );
    }
    let usage: [&[&str]; 5] = [
        &["subscriptions", "create", "--endpoint", "http://x/"],
        &[
            "subscriptions",
            "create",
            "--endpoint",
            "http://x/",
            "--types",
            "everything",
        ],
        &[
            "subscriptions",
            "create",
            "--endpoint",
            "http://x/",
            "--types",
            "users",
            "--from-now",
            "--since",
            "0",
        ],
        &["subscriptions", "replay", "sub-1"],
        &["subscriptions", "list", "--addr", "not an address"],
    ];
    for args in usage {
        let (code, _, err) = tool(args).await;
        assert_eq!(code, Some(2), "{args:?}: {err}");
    }
    // The subscriptions are no service to watch or inject faults into.
    for args in [["watch", "subscriptions"], ["fault", "events"]] {
        let (code, _, err) = tool(&args).await;
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains("[possible values: users, contracts, photos]"), "{err}");
    }
}
