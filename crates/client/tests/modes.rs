//! Health checking without `Health/Watch`, without health at all, and
//! turned off; and the causes failed calls carry (what the CLI reads).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Api, Replica, call, eventually, healthy, options, state_of, target};
use lightbox_client::{Balanced, ConnectOptions, HealthCheck, ReplicaState, Target, connect};
use tonic::{Code, Status};
use tonic_health::ServingStatus;

fn ejected(channel: &Balanced, replica: &Replica) -> bool {
    matches!(state_of(channel, replica.addr), Some(ReplicaState::Ejected { .. }))
}

/// Whether `status` has a `tonic::ConnectError` among its causes.
fn is_connect_error(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        if err.is::<tonic::ConnectError>() {
            return true;
        }
        source = err.source();
    }
    false
}

#[tokio::test]
async fn a_server_without_watch_is_polled_with_check() {
    let replicas = [Replica::start_with(Api::CheckOnly), Replica::start()];
    let channel = connect(&Target::parse(&target(&replicas.each_ref())).unwrap(), options()).unwrap();
    eventually("both healthy", || healthy(&channel) == 2).await;
    replicas[0].set(ServingStatus::NotServing).await;
    eventually("the NOT_SERVING one ejected by a poll", || {
        ejected(&channel, &replicas[0])
    })
    .await;
    replicas[0].set(ServingStatus::Serving).await;
    eventually("re-admitted by a poll", || healthy(&channel) == 2).await;
}

#[tokio::test]
async fn a_server_without_health_counts_as_serving_while_it_answers() {
    let mut replica = Replica::start_with(Api::NoHealth);
    let channel = connect(&Target::parse(&replica.url()).unwrap(), options()).unwrap();
    call(&channel).await.unwrap();
    assert_eq!(state_of(&channel, replica.addr), Some(ReplicaState::Healthy));
    replica.kill();
    eventually("ejected once it stops answering", || ejected(&channel, &replica)).await;
    let status = call(&channel).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test]
async fn with_health_off_not_serving_is_ignored_but_a_broken_connection_ejects() {
    let mut replicas = [Replica::start(), Replica::start()];
    let off = ConnectOptions {
        health: HealthCheck::Off,
        ..options()
    };
    let channel = connect(&Target::parse(&target(&replicas.each_ref())).unwrap(), off).unwrap();
    replicas[0].set(ServingStatus::NotServing).await;
    for _ in 0..40 {
        call(&channel).await.unwrap();
    }
    assert!(
        replicas[0].served() > 0,
        "a NOT_SERVING replica is still called with health off"
    );

    replicas[0].kill();
    // Until a call finds the dead one, calls may fail; after that none do
    // (re-admission after the backoff costs one failed call each time).
    let (mut failed, started) = (0, Instant::now());
    for _ in 0..200 {
        if let Err(status) = call(&channel).await {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            failed += 1;
        }
    }
    let rate = f64::from(failed) / 200.0;
    eprintln!("health off: {failed} of 200 calls failed in {:?}", started.elapsed());
    assert!(failed >= 1 && rate < 0.5, "{failed} failures");
}

#[tokio::test]
async fn failed_calls_keep_the_connect_error_among_their_causes() {
    // A port nothing listens on.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let spec = format!("http://{closed}");
    for health in [HealthCheck::Off, HealthCheck::Watch { service: String::new() }] {
        let channel = connect(
            &Target::parse(&spec).unwrap(),
            ConnectOptions {
                health: health.clone(),
                ..options()
            },
        )
        .unwrap();
        let started = Instant::now();
        let status = call(&channel).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{health:?}: {status:?}");
        assert!(is_connect_error(&status), "{health:?}: {status:?}");
        assert!(status.message().contains(&closed.to_string()), "{status:?}");
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    }
}
