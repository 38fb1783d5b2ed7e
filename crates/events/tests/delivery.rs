//! The delivery component end to end, on SQLite and PostgreSQL: a contracts
//! feed, the component, and a test function on 127.0.0.1 that records what
//! it receives and answers as told.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::*;
use lightbox_api::events::{
    ContentMode, CreateSubscriptionRequest, EntityType, GetSubscriptionRequest, ListDeadLettersRequest,
    RedeliverDeadLettersRequest, ReplaySubscriptionRequest, Subscription as ApiSubscription,
    subscriptions_service_client::SubscriptionsServiceClient, subscriptions_service_server::SubscriptionsService as _,
};
use lightbox_events::{EventsOptions, EventsService, Secret, Sources};
use lightbox_testkit::{TestDb, capture_logs, eventually};
use tokio::sync::oneshot;
use tonic::Request;

lightbox_testkit::conformance!(
    every_event_arrives_in_order_through_an_outage_and_a_restart,
    a_rejected_event_is_dead_lettered_then_redelivered_and_replayed,
);

/// The component running in a task until its `stop` is sent.
struct Running {
    service: EventsService,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn run(db: &lightbox_changefeed::Db, options: EventsOptions, sources: Sources) -> Running {
    let service = EventsService::open(db.clone(), options, sources)
        .await
        .unwrap_or_else(|e| panic!("open the events service: {e}"));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(service.clone().run(async {
        let _ = stopped.await;
    }));
    Running { service, stop, task }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .unwrap_or_else(|_| panic!("the delivery component did not stop within 10 s"))
            .unwrap_or_else(|e| panic!("the delivery component panicked: {e}"));
    }
}

fn contracts_subscription(endpoint: String, mode: ContentMode) -> ApiSubscription {
    ApiSubscription {
        endpoint,
        entity_types: vec![EntityType::Contract as i32],
        content_mode: mode as i32,
        ..ApiSubscription::default()
    }
}

async fn get(service: &EventsService, name: &str) -> ApiSubscription {
    service
        .get_subscription(Request::new(GetSubscriptionRequest { name: name.to_owned() }))
        .await
        .map(|r| r.into_inner().subscription.unwrap_or_default())
        .unwrap_or_else(|status| panic!("get {name}: {status:?}"))
}

async fn every_event_arrives_in_order_through_an_outage_and_a_restart(test_db: TestDb) {
    capture_logs();
    let db = test_db.connect().await;
    let feed = contracts_feed(&db).await;
    let function = Function::default();
    let url = function.start().await;
    let sources = || Sources::new().with(feed.clone());
    let running = run(&db, options(), sources()).await;
    let created = running
        .service
        .create_subscription(Request::new(CreateSubscriptionRequest {
            subscription: Some(contracts_subscription(url, ContentMode::Binary)),
            subscription_id: "outage".into(),
            ..CreateSubscriptionRequest::default()
        }))
        .await
        .unwrap_or_else(|status| panic!("create: {status:?}"))
        .into_inner();
    let secret = Secret::parse(&created.secret).unwrap_or_else(|e| panic!("the made secret: {e}"));
    let name = created.subscription.unwrap_or_default().name;
    assert_eq!(name, "subscriptions/outage");
    // "From now" is where the first connection finds the feed.
    let service = &running.service;
    eventually("the subscription to connect", || async move {
        let sub = get(service, "subscriptions/outage").await;
        sub.cursors.first().is_some_and(|c| c.read_revision >= 0).then_some(())
    })
    .await;

    // The function is down (503, Retry-After: 1) while changes come in.
    function.plan(|p| p.outage = true);
    let holder = new_id();
    let ids: Vec<String> = (0..4).map(|_| new_id()).collect();
    let mut expected: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for version in 1..=3 {
        for id in &ids {
            let revision = write(&feed, id, &holder, version).await;
            expected.entry(id.clone()).or_default().push(revision);
        }
    }
    let f = &function;
    eventually("the function to refuse four deliveries", || async move {
        (f.received().iter().filter(|r| r.status == 503).count() >= 4).then_some(())
    })
    .await;
    function.plan(|p| p.outage = false);
    eventually("a few deliveries after the outage", || async move {
        (f.delivered().len() >= 3).then_some(())
    })
    .await;

    // A restart of the delivery component, with changes made meanwhile.
    running.stop().await;
    for id in &ids[..2] {
        let revision = write(&feed, id, &holder, 4).await;
        expected.entry(id.clone()).or_default().push(revision);
    }
    let revision = delete(&feed, &ids[3]).await;
    expected.entry(ids[3].clone()).or_default().push(revision);
    let running = run(&db, options(), sources()).await;

    let e = &expected;
    eventually("every event, in order per entity", || async move {
        (delivered_by_entity(f) == *e).then_some(())
    })
    .await;

    // Retry-After was honoured: each refused event came back a second later.
    let received = function.received();
    for (i, refused) in received.iter().enumerate().filter(|(_, r)| r.status == 503) {
        if let Some(next) = received[i + 1..]
            .iter()
            .find(|r| r.webhook_id() == refused.webhook_id())
        {
            let gap = next.at - refused.at;
            assert!(
                gap >= Duration::from_millis(900),
                "retried {gap:?} after a 503 with Retry-After: 1"
            );
        }
    }
    // Every request is signed, as both verifiers agree.
    verify_signatures(&received, &[secret]);
    // The events say what they are.
    for request in function.delivered() {
        let event = request.event();
        let subject = event.subject.clone().unwrap_or_default();
        let sequence: i64 = event.extensions["sequence"].parse().unwrap_or(-1);
        assert_eq!(event.id, format!("contracts:{sequence}"));
        assert_eq!(request.webhook_id(), event.id);
        assert_eq!(event.source, "/lightbox/contracts");
        assert_eq!(event.datacontenttype.as_deref(), Some("application/json"));
        assert!(
            event.time.as_deref().is_some_and(|t| t.ends_with('Z')),
            "{:?}",
            event.time
        );
        let traceparent = header(&request.headers, "traceparent");
        assert_eq!(event.extensions.get("traceparent"), Some(&traceparent));
        assert_eq!(traceparent.len(), 55, "{traceparent}");
        let data: serde_json::Value = serde_json::from_slice(event.data.as_deref().unwrap_or_default())
            .unwrap_or_else(|e| panic!("the data is not JSON: {e}"));
        assert_eq!(data["id"], subject.as_str());
        let position = expected[&subject].iter().position(|r| *r == sequence);
        let expected_type = match position {
            Some(0) => "dev.lightbox.contract.created",
            _ if subject == ids[3] && Some(sequence) == expected[&subject].last().copied() => {
                assert_eq!(data["holderUserId"], holder.as_str());
                "dev.lightbox.contract.deleted"
            }
            _ => "dev.lightbox.contract.updated",
        };
        assert_eq!(event.event_type, expected_type);
        if expected_type != "dev.lightbox.contract.deleted" {
            assert_eq!(data["holderUserId"], holder.as_str());
            assert_eq!(data["plan"], "PLAN_STANDARD");
        }
    }
    // Nothing left behind, and the cursors say so.
    let last = feed.committed_revision().await.unwrap_or_else(|e| panic!("{e}"));
    let service = &running.service;
    let sub = eventually("the queue to empty", || async move {
        let sub = get(service, "subscriptions/outage").await;
        (sub.pending_count == 0).then_some(sub)
    })
    .await;
    assert_eq!(sub.dead_letter_count, 0);
    assert_eq!(sub.cursors[0].read_revision, last);
    assert_eq!(sub.cursors[0].delivered_revision, last);
    running.stop().await;
}

async fn a_rejected_event_is_dead_lettered_then_redelivered_and_replayed(test_db: TestDb) {
    capture_logs();
    let db = test_db.connect().await;
    let feed = contracts_feed(&db).await;
    let function = Function::default();
    let url = function.start().await;
    let options = EventsOptions {
        api_token: Some("operator-token".into()),
        ..options()
    };
    let running = run(&db, options, Sources::new().with(feed.clone())).await;
    // Over gRPC, behind the API token.
    let listener = lightbox_testkit::bind_any().await;
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let server = running.service.clone().into_server(1024 * 1024);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = lightbox_testkit::channel(addr).await;
    let mut anonymous = SubscriptionsServiceClient::new(channel.clone());
    let mut client = SubscriptionsServiceClient::with_interceptor(channel, |mut request: Request<()>| {
        let value = "Bearer operator-token"
            .parse()
            .map_err(|_| tonic::Status::internal("header"))?;
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    });
    let old = Secret::generate().unwrap_or_else(|e| panic!("{e}"));
    let new = Secret::generate().unwrap_or_else(|e| panic!("{e}"));
    let request = CreateSubscriptionRequest {
        subscription: Some(contracts_subscription(url, ContentMode::Structured)),
        subscription_id: "rejects".into(),
        secrets: vec![new.expose().to_owned(), old.expose().to_owned()],
        start_revision: None,
    };
    let refused = anonymous.create_subscription(request.clone()).await;
    assert_eq!(refused.err().map(|s| s.code()), Some(tonic::Code::Unauthenticated));
    let created = client
        .create_subscription(request)
        .await
        .unwrap_or_else(|status| panic!("create: {status:?}"))
        .into_inner();
    assert!(created.secret.is_empty(), "a secret was given: none is made");
    let c = &client;
    eventually("the subscription to connect", || async move {
        let sub = c
            .clone()
            .get_subscription(GetSubscriptionRequest {
                name: "subscriptions/rejects".into(),
            })
            .await
            .ok()?
            .into_inner()
            .subscription?;
        sub.cursors.first().is_some_and(|c| c.read_revision >= 0).then_some(())
    })
    .await;

    let holder = new_id();
    let (good, bad) = (new_id(), new_id());
    function.plan(|p| {
        p.reject.insert(bad.clone());
    });
    write(&feed, &good, &holder, 1).await;
    let bad_revision = write(&feed, &bad, &holder, 1).await;
    let after = write(&feed, &good, &holder, 2).await;
    let name = "subscriptions/rejects".to_owned();
    let n = &name;
    eventually("the rejected event in the dead letters", || async move {
        let sub = c
            .clone()
            .get_subscription(GetSubscriptionRequest { name: n.clone() })
            .await
            .ok()?
            .into_inner()
            .subscription?;
        (sub.dead_letter_count == 1 && sub.pending_count == 0).then_some(())
    })
    .await;
    let letters = client
        .list_dead_letters(ListDeadLettersRequest {
            parent: name.clone(),
            ..ListDeadLettersRequest::default()
        })
        .await
        .unwrap_or_else(|status| panic!("list dead letters: {status:?}"))
        .into_inner()
        .dead_letters;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.entity_id, bad);
    assert_eq!(letter.revision, bad_revision);
    assert_eq!(letter.event_id, format!("contracts:{bad_revision}"));
    assert_eq!(letter.name, format!("{name}/deadLetters/contract-{bad_revision}"));
    // A 400 is not retried: one attempt, its status kept.
    assert_eq!(letter.attempts.len(), 1);
    assert_eq!(letter.attempts[0].http_status, 400);
    // The other entity went on meanwhile.
    assert_eq!(
        delivered_by_entity(&function).get(&good).cloned(),
        Some(vec![after - 2, after])
    );

    // Redelivered once the function accepts it.
    function.plan(|p| p.reject.clear());
    let moved = client
        .redeliver_dead_letters(RedeliverDeadLettersRequest {
            parent: name.clone(),
            names: vec![letter.name.clone()],
        })
        .await
        .unwrap_or_else(|status| panic!("redeliver: {status:?}"))
        .into_inner();
    assert_eq!(moved.redelivered_count, 1);
    let f = &function;
    let b = &bad;
    let g = &good;
    eventually("the redelivered event", || async move {
        (delivered_by_entity(f).get(b).map(Vec::len) == Some(1)).then_some(())
    })
    .await;

    // A replay from before it delivers it, and what followed, again.
    client
        .replay_subscription(ReplaySubscriptionRequest {
            name: name.clone(),
            entity_type: EntityType::Contract as i32,
            since_revision: bad_revision - 1,
        })
        .await
        .unwrap_or_else(|status| panic!("replay: {status:?}"));
    eventually("the replayed events", || async move {
        let count = |id: &str, revision: i64| {
            f.delivered()
                .iter()
                .filter(|r| {
                    r.event().subject.as_deref() == Some(id) && r.webhook_id() == format!("contracts:{revision}")
                })
                .count()
        };
        (count(b, bad_revision) == 2 && count(g, after) == 2).then_some(())
    })
    .await;

    // Structured mode: the whole event in the body, signed by both secrets.
    let received = function.received();
    for request in &received {
        assert!(header(&request.headers, "content-type").starts_with("application/cloudevents+json"));
        let json: serde_json::Value = serde_json::from_slice(&request.body).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(json["specversion"], "1.0");
        assert!(json["data"].is_object(), "{json}");
    }
    verify_signatures(&received, &[old]);
    verify_signatures(&received, &[new]);
    running.stop().await;
}
