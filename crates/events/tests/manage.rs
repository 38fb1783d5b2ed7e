//! Managing subscriptions: what is refused, listing, pause and resume
//! (nothing delivered while paused, everything after), secret rotation,
//! deletion; on SQLite and PostgreSQL.

mod common;

use common::*;
use lightbox_api::events::{
    ContentMode, CreateSubscriptionRequest, DeleteSubscriptionRequest, EntityType, GetSubscriptionRequest,
    ListSubscriptionsRequest, PauseSubscriptionRequest, ResumeSubscriptionRequest, RotateSubscriptionSecretRequest,
    Subscription as ApiSubscription, SubscriptionState, subscriptions_service_server::SubscriptionsService as _,
};
use lightbox_events::{EventsService, Secret, Sources};
use lightbox_testkit::{TestDb, capture_logs, eventually};
use tonic::{Code, Request};

lightbox_testkit::conformance!(subscriptions_are_checked_listed_paused_resumed_rotated_and_deleted);

fn request(endpoint: &str, id: &str) -> CreateSubscriptionRequest {
    CreateSubscriptionRequest {
        subscription: Some(ApiSubscription {
            endpoint: endpoint.to_owned(),
            entity_types: vec![EntityType::Contract as i32],
            content_mode: ContentMode::Structured as i32,
            ..ApiSubscription::default()
        }),
        subscription_id: id.to_owned(),
        ..CreateSubscriptionRequest::default()
    }
}

async fn refused(service: &EventsService, request: CreateSubscriptionRequest) -> Code {
    match service.create_subscription(Request::new(request)).await {
        Ok(_) => panic!("accepted"),
        Err(status) => status.code(),
    }
}

async fn subscriptions_are_checked_listed_paused_resumed_rotated_and_deleted(test_db: TestDb) {
    capture_logs();
    let db = test_db.connect().await;
    let feed = contracts_feed(&db).await;
    let function = Function::default();
    let url = function.start().await;
    let service = EventsService::open(db.clone(), options(), Sources::new().with(feed.clone()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // What is refused, and why.
    let mut bad = request(&url, "Bad_Id");
    assert_eq!(refused(&service, bad.clone()).await, Code::InvalidArgument);
    bad.subscription_id = "ok".into();
    bad.secrets = vec!["not-a-secret".into()];
    assert_eq!(refused(&service, bad.clone()).await, Code::InvalidArgument);
    bad.secrets = vec![];
    if let Some(sub) = bad.subscription.as_mut() {
        sub.entity_types = vec![EntityType::Photo as i32];
    }
    // This component reads contracts only.
    assert_eq!(refused(&service, bad.clone()).await, Code::FailedPrecondition);
    if let Some(sub) = bad.subscription.as_mut() {
        sub.entity_types = vec![EntityType::Contract as i32];
        sub.entity_ids = vec!["not-a-uuid".into()];
    }
    assert_eq!(refused(&service, bad.clone()).await, Code::InvalidArgument);
    // A rate limit too small to wait for (or no number at all).
    for rate in [1e-300, -1.0, f64::NAN] {
        if let Some(sub) = bad.subscription.as_mut() {
            sub.entity_ids = vec![];
            sub.rate_limit = rate;
        }
        assert_eq!(
            refused(&service, bad.clone()).await,
            Code::InvalidArgument,
            "rate {rate}"
        );
    }

    // Two subscriptions, listed in pages.
    for id in ["alpha", "beta"] {
        service
            .create_subscription(Request::new(request(&url, id)))
            .await
            .unwrap_or_else(|s| panic!("create {id}: {s:?}"));
    }
    assert_eq!(refused(&service, request(&url, "alpha")).await, Code::AlreadyExists);
    let first = service
        .list_subscriptions(Request::new(ListSubscriptionsRequest {
            page_size: 1,
            page_token: String::new(),
        }))
        .await
        .unwrap_or_else(|s| panic!("list: {s:?}"))
        .into_inner();
    assert_eq!(first.subscriptions.len(), 1);
    assert_eq!(first.subscriptions[0].name, "subscriptions/alpha");
    let second = service
        .list_subscriptions(Request::new(ListSubscriptionsRequest {
            page_size: 1,
            page_token: first.next_page_token,
        }))
        .await
        .unwrap_or_else(|s| panic!("list: {s:?}"))
        .into_inner();
    assert_eq!(second.subscriptions[0].name, "subscriptions/beta");
    service
        .delete_subscription(Request::new(DeleteSubscriptionRequest {
            name: "subscriptions/beta".into(),
        }))
        .await
        .unwrap_or_else(|s| panic!("delete: {s:?}"));
    let gone = service
        .get_subscription(Request::new(GetSubscriptionRequest {
            name: "subscriptions/beta".into(),
        }))
        .await;
    assert_eq!(gone.err().map(|s| s.code()), Some(Code::NotFound));

    // Paused: nothing goes out; resumed: everything does.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(service.clone().run(async {
        let _ = stopped.await;
    }));
    let name = "subscriptions/alpha".to_owned();
    let s = &service;
    let n = &name;
    eventually("alpha to connect", || async move {
        let sub = s
            .get_subscription(Request::new(GetSubscriptionRequest { name: n.clone() }))
            .await
            .ok()?
            .into_inner()
            .subscription?;
        sub.cursors.first().is_some_and(|c| c.read_revision >= 0).then_some(())
    })
    .await;
    let paused = service
        .pause_subscription(Request::new(PauseSubscriptionRequest { name: name.clone() }))
        .await
        .unwrap_or_else(|s| panic!("pause: {s:?}"))
        .into_inner()
        .subscription
        .unwrap_or_default();
    assert_eq!(paused.state, SubscriptionState::Paused as i32);
    let id = new_id();
    let revision = write(&feed, &id, &new_id(), 1).await;
    // The pause raised the generation, so the old task can no longer queue
    // anything (its writes are fenced by it). An absence can only be
    // watched for a while: as long as a delivery here takes, several times.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(function.received().is_empty(), "delivered while paused");
    service
        .resume_subscription(Request::new(ResumeSubscriptionRequest { name: name.clone() }))
        .await
        .unwrap_or_else(|s| panic!("resume: {s:?}"));
    let f = &function;
    let received = eventually("the delivery after resuming", || async move {
        f.delivered().into_iter().next()
    })
    .await;
    assert_eq!(received.webhook_id(), format!("contracts:{revision}"));

    // Rotation: the new secret signs beside the old one, then alone.
    let rotated = service
        .rotate_subscription_secret(Request::new(RotateSubscriptionSecretRequest {
            name: name.clone(),
            ..RotateSubscriptionSecretRequest::default()
        }))
        .await
        .unwrap_or_else(|s| panic!("rotate: {s:?}"))
        .into_inner();
    let new = Secret::parse(&rotated.secret).unwrap_or_else(|e| panic!("{e}"));
    let hints = rotated.subscription.unwrap_or_default().secret_hints;
    assert_eq!(hints.len(), 2);
    assert_eq!(hints[0], new.hint());
    let ended = service
        .rotate_subscription_secret(Request::new(RotateSubscriptionSecretRequest {
            name: name.clone(),
            secret: new.expose().to_owned(),
            drop_previous: true,
        }))
        .await
        .unwrap_or_else(|s| panic!("rotate: {s:?}"))
        .into_inner();
    assert_eq!(ended.subscription.unwrap_or_default().secret_hints, vec![new.hint()]);
    let second = write(&feed, &id, &new_id(), 2).await;
    let signed = eventually("a delivery signed with the new secret", || async move {
        f.delivered()
            .into_iter()
            .find(|r| r.webhook_id() == format!("contracts:{second}"))
    })
    .await;
    verify_signatures(&[signed], &[new]);
    let _ = stop.send(());
    let _ = task.await;
}
