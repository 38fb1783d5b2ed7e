//! The metrics, scraped as Prometheus would: every metric the README's
//! table lists is exposed, and each behaviour moves its metric — a failed
//! call its `grpc_code`, a slow watcher the counter of watchers ended, a
//! fault its gauge, a phone's request its route and status.

use std::time::Duration;

use lightbox_api::users::{
    CreateUserRequest, GetUserRequest, User, WatchUsersRequest, users_service_client::UsersServiceClient,
};
use lightbox_app::Target;
use lightbox_changefeed::FeedOptions;
use lightbox_server::FaultSpec;
use lightbox_testkit::{DEADLINE, Stack, TestDb, customer, eventually, sse::EventStream};
use tonic::Code;

/// The value of the sample `name` whose labels include every one of
/// `labels`, if the text has one. Summed when several match.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let (series, value) = match line.rsplit_once(' ') {
            Some(parts) => parts,
            None => continue,
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let has = |(key, value): &(&str, &str)| {
            series_labels
                .split(',')
                .any(|pair| pair == format!("{key}=\"{value}\""))
        };
        if labels.iter().all(has)
            && let Ok(value) = value.parse::<f64>()
        {
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

/// The metrics the README's table lists, as exposed (counters with
/// `_total`).
fn readme_metrics() -> Vec<String> {
    let readme = include_str!("../README.md");
    let section = readme
        .split_once("### Metrics")
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("the README has no Metrics section"));
    let names: Vec<String> = section
        .lines()
        .skip_while(|line| !line.starts_with("| metric"))
        .skip(2)
        .take_while(|line| line.starts_with("| `"))
        .filter_map(|line| line.split('`').nth(1).map(str::to_owned))
        .collect();
    assert!(names.len() > 20, "the README's metrics table is missing: {names:?}");
    names
}

/// Whether `text` exposes `metric` (its family, by the name its `# TYPE`
/// line carries: a counter's without `_total`).
fn exposes(text: &str, metric: &str) -> bool {
    let family = metric.strip_suffix("_total").unwrap_or(metric);
    text.lines().any(|line| {
        line.strip_prefix("# TYPE ")
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|name| name == family)
    })
}

async fn create_user(users: &mut UsersServiceClient<tonic::transport::Channel>, n: usize) -> User {
    users
        .create_user(CreateUserRequest {
            user: Some(User {
                display_name: format!("User {n}"),
                email: format!("metrics-{n}@example.com"),
                ..User::default()
            }),
        })
        .await
        .unwrap_or_else(|status| panic!("CreateUser: {status:?}"))
        .into_inner()
        .user
        .unwrap_or_else(|| panic!("CreateUser answered no user"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listed_metric_is_exposed_and_moves_with_its_behaviour() {
    let stack = Stack::start(
        TestDb::sqlite(),
        FeedOptions {
            progress_interval: Duration::from_millis(200),
            poll_interval: Duration::from_millis(200),
            // Small, so that a watcher that stops reading is soon too far behind.
            watcher_buffer: 16,
            ..FeedOptions::default()
        },
    )
    .await;
    let (user, _contract) = customer(&stack, "metrics@example.com", "10").await;

    // A call that fails moves its code on the server, and on the client that
    // made it (Photos' synchronous path to Users).
    let mut users = stack.users_client().await;
    let handled = |text: &str, code: &str| {
        sample(
            text,
            "grpc_server_handled_total",
            &[
                ("grpc_service", "lightbox.users.v1.UsersService"),
                ("grpc_method", "GetUser"),
                ("grpc_code", code),
                ("grpc_type", "unary"),
            ],
        )
        .unwrap_or(0.0)
    };
    let before = handled(&stack.metrics_text(), "NotFound");
    let missing = users
        .get_user(GetUserRequest {
            id: "00000000-0000-7000-8000-00000000dead".to_owned(),
            ..Default::default()
        })
        .await
        .expect_err("no such user");
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(handled(&stack.metrics_text(), "NotFound"), before + 1.0);

    // A FRESH read goes through Photos' clients of Users and Contracts.
    let mut photos = stack.photos_client().await;
    photos
        .list_photos(lightbox_api::photos::ListPhotosRequest {
            user_id: user.id.clone(),
            consistency: lightbox_api::photos::Consistency::Fresh as i32,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|status| panic!("FRESH ListPhotos: {status:?}"));
    let text = stack.metrics_text();
    let client_ok = sample(
        &text,
        "grpc_client_handled_total",
        &[("grpc_service", "lightbox.users.v1.UsersService"), ("grpc_code", "OK")],
    );
    assert!(client_ok.is_some_and(|n| n >= 1.0), "{text}");

    // A phone's request is counted by route template and status, and its
    // event stream while open.
    let http = reqwest::Client::new();
    let token = stack.token(&user.id);
    let answer = http
        .get(format!("{}/v1/users/me", stack.gateway_url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap_or_else(|err| panic!("GET /v1/users/me: {err}"));
    assert_eq!(answer.status(), reqwest::StatusCode::OK);
    let route = [("route", "/v1/users/{user_id}"), ("method", "GET"), ("status", "200")];
    let text = stack.metrics_text();
    assert_eq!(
        sample(&text, "lightbox_gateway_http_requests_total", &route),
        Some(1.0),
        "{text}"
    );
    let url = format!("{}/v1/users/me/events", stack.gateway_url());
    let events = EventStream::open(&http, &url, &token, None).await;
    eventually("the event stream to be counted", || async {
        let open = sample(&stack.metrics_text(), "lightbox_gateway_event_streams", &[]);
        open.is_some_and(|n| n >= 1.0).then_some(())
    })
    .await;
    drop(events);

    // A fault moves its gauges, and back.
    let faults = stack.faults(Target::Contracts);
    faults
        .set(FaultSpec {
            down: true,
            error_rate: 0.25,
            latency: Duration::from_millis(5),
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let text = stack.metrics_text();
    let contracts = [("component", "contracts")];
    assert_eq!(sample(&text, "lightbox_fault_down", &contracts), Some(1.0), "{text}");
    assert_eq!(sample(&text, "lightbox_fault_error_rate", &contracts), Some(0.25));
    assert_eq!(sample(&text, "lightbox_fault_latency_seconds", &contracts), Some(0.005));
    faults.clear();
    assert_eq!(
        sample(&stack.metrics_text(), "lightbox_fault_down", &contracts),
        Some(0.0)
    );

    // A watcher that stops reading while more changes than its buffer go by
    // is ended, and counted.
    let ended =
        |text: &str| sample(text, "lightbox_watch_slow_watchers_ended_total", &[("feed", "users")]).unwrap_or(0.0);
    let before = ended(&stack.metrics_text());
    // A tiny HTTP/2 window: the server can send only a few frames before it
    // must wait for this client to read, which it does not.
    let tight = tonic::transport::Endpoint::from_shared(format!("http://{}", stack.addr(Target::Users)))
        .unwrap_or_else(|e| panic!("{e}"))
        .initial_stream_window_size(Some(1024))
        .initial_connection_window_size(Some(1024))
        .connect_lazy();
    let mut stream = UsersServiceClient::new(tight)
        .watch_users(WatchUsersRequest {
            since_revision: -1,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|status| panic!("WatchUsers: {status:?}"))
        .into_inner();
    stream
        .message()
        .await
        .unwrap_or_else(|status| panic!("the first frame: {status:?}"));
    for n in 0..60 {
        create_user(&mut users, n).await;
    }
    let end = tokio::time::timeout(DEADLINE, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the slow watcher was never ended"));
    let status = end.expect_err("the slow watcher is ended with a status");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(ended(&stack.metrics_text()) >= before + 1.0);
    let text = stack.metrics_text();
    assert!(
        sample(&text, "lightbox_watch_events_sent_total", &[("feed", "users")]).is_some_and(|n| n >= 40.0),
        "{text}"
    );

    // Photos' copy of users reached the head: its revisions say so.
    let head = sample(&text, "lightbox_feed_head_revision", &[("feed", "users")]).unwrap_or(0.0);
    eventually("Photos' copy of users to apply the head", || async {
        let text = stack.metrics_text();
        let applied = sample(&text, "lightbox_copy_applied_revision", &[("copy", "photos.users")]);
        (applied == Some(head)).then_some(())
    })
    .await;

    // And every metric the README lists is there.
    let text = stack.metrics_text();
    let missing: Vec<String> = readme_metrics()
        .into_iter()
        .filter(|metric| !exposes(&text, metric))
        .collect();
    assert!(
        missing.is_empty(),
        "listed in the README but not exposed: {missing:?}\n{text}"
    );
    stack.stop().await;
}

#[test]
fn sample_finds_a_series_by_name_and_labels() {
    let text = "# TYPE a counter\na_total{x=\"1\",y=\"2\"} 3\na_total{x=\"1\",y=\"3\"} 4\nb 5\n# EOF\n";
    assert_eq!(sample(text, "a_total", &[("x", "1"), ("y", "2")]), Some(3.0));
    assert_eq!(sample(text, "a_total", &[("x", "1")]), Some(7.0));
    assert_eq!(sample(text, "a_total", &[("x", "2")]), None);
    assert_eq!(sample(text, "b", &[]), Some(5.0));
    assert!(exposes(text, "a_total"));
    assert!(!exposes(text, "b"));
}
