//! Balancing over real replicas: spread, a replica dying under load, one
//! turning NOT_SERVING and back (news, not a warning), all of them down and
//! one back, and a watch stream resuming on another replica.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Replica, call, eventually, healthy, options, state_of, target, test_request, until_ok};
use lightbox_client::{ReplicaState, Target, connect};
use tonic::Code;
use tonic_health::{ServingStatus, pb::health_client::HealthClient};

#[tokio::test]
async fn calls_spread_over_every_replica() {
    let replicas = [Replica::start(), Replica::start(), Replica::start()];
    let channel = connect(&Target::parse(&target(&replicas.each_ref())).unwrap(), options()).unwrap();
    // The first call waits for the first health answers instead of failing.
    call(&channel).await.unwrap();
    eventually("three healthy replicas", || healthy(&channel) == 3).await;
    for _ in 0..300 {
        call(&channel).await.unwrap();
    }
    let served: Vec<usize> = replicas.iter().map(Replica::served).collect();
    assert_eq!(served.iter().sum::<usize>(), 301);
    // Even would be 100 each; two random choices on idle replicas is uniform.
    assert!(served.iter().all(|n| *n >= 50), "uneven spread: {served:?}");
}

#[tokio::test]
async fn a_replica_that_dies_is_ejected_and_only_calls_before_that_fail() {
    let mut replicas = [Replica::start(), Replica::start(), Replica::start()];
    let channel = connect(&Target::parse(&target(&replicas.each_ref())).unwrap(), options()).unwrap();
    eventually("three healthy replicas", || healthy(&channel) == 3).await;

    // Four callers in a loop; each call records when it started and how it ended.
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let (channel, outcomes, stop) = (channel.clone(), outcomes.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    let result = call(&channel).await;
                    outcomes.lock().unwrap().push((started, result.err()));
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let dead = replicas[1].addr;
    let killed = Instant::now();
    replicas[1].kill();
    eventually("the dead replica ejected", || {
        matches!(state_of(&channel, dead), Some(ReplicaState::Ejected { .. }))
    })
    .await;
    let ejected = Instant::now();
    // Calls go on for a while after the ejection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    for caller in callers {
        caller.await.unwrap();
    }

    let outcomes = outcomes.lock().unwrap();
    let failures: Vec<_> = outcomes
        .iter()
        .filter_map(|(at, e)| e.as_ref().map(|e| (*at, e)))
        .collect();
    let after = outcomes.iter().filter(|(at, _)| *at > ejected).count();
    eprintln!(
        "ejection window: {:?} from kill to ejection; {} of {} calls failed, the last started {:?} after the kill; \
         {after} calls after the ejection",
        ejected - killed,
        failures.len(),
        outcomes.len(),
        failures
            .iter()
            .map(|(at, _)| at.saturating_duration_since(killed))
            .max(),
    );
    if let Some((_, status)) = failures.first() {
        eprintln!("a failed call: {}", status.message());
    }
    for (at, status) in &failures {
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(*at <= ejected, "a call started after the ejection failed: {status:?}");
    }
    assert!(after > 100, "too few calls after the ejection to say anything: {after}");
    assert!(
        ejected - killed < Duration::from_secs(1),
        "ejection took {:?}",
        ejected - killed
    );
}

/// Log lines written while it is the thread's subscriber (a test runtime's
/// one thread: the balancer's tasks run there too).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

#[tokio::test]
async fn a_replica_that_says_it_drains_is_news_and_one_that_dies_or_is_unknown_a_warning() {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);

    let mut replicas = [Replica::start(), Replica::start(), Replica::start()];
    let channel = connect(&Target::parse(&target(&replicas.each_ref())).unwrap(), options()).unwrap();
    eventually("three healthy replicas", || healthy(&channel) == 3).await;
    let (draining, dying) = (replicas[2].addr, replicas[1].addr);
    replicas[2].set(ServingStatus::NotServing).await;
    eventually("the NOT_SERVING replica out", || {
        matches!(state_of(&channel, draining), Some(ReplicaState::Ejected { .. }))
    })
    .await;
    replicas[1].kill();
    eventually("the dead replica out", || {
        matches!(state_of(&channel, dying), Some(ReplicaState::Ejected { .. }))
    })
    .await;
    // Any status but NOT_SERVING (UNKNOWN here; SERVICE_UNKNOWN from a
    // server asked for a name it does not serve) is no drain.
    let unknown = replicas[0].addr;
    replicas[0].set(ServingStatus::Unknown).await;
    eventually("the UNKNOWN replica out", || {
        matches!(state_of(&channel, unknown), Some(ReplicaState::Ejected { .. }))
    })
    .await;

    let lines = logs.lines();
    let about = |addr: std::net::SocketAddr| {
        let endpoint = format!("endpoint={addr}");
        lines
            .iter()
            .filter(move |line| line.contains(&endpoint))
            .collect::<Vec<_>>()
    };
    let drained = about(draining);
    assert!(
        drained
            .iter()
            .any(|l| l.contains(" INFO ") && l.contains("replica stepped out") && l.contains("NOT_SERVING")),
        "{lines:#?}"
    );
    assert!(
        !drained.iter().any(|l| l.contains(" WARN ")),
        "a drain logged as a warning: {lines:#?}"
    );
    assert!(
        about(dying)
            .iter()
            .any(|l| l.contains(" WARN ") && l.contains("replica ejected")),
        "{lines:#?}"
    );
    assert!(
        about(unknown)
            .iter()
            .any(|l| l.contains(" WARN ") && l.contains("replica ejected") && l.contains("health says UNKNOWN")),
        "{lines:#?}"
    );
}

#[tokio::test]
async fn a_not_serving_replica_is_ejected_and_readmitted_when_serving() {
    let replicas = [Replica::start(), Replica::start(), Replica::start()];
    let channel = connect(&Target::parse(&target(&replicas.each_ref())).unwrap(), options()).unwrap();
    eventually("three healthy replicas", || healthy(&channel) == 3).await;

    let draining = &replicas[2];
    draining.set(ServingStatus::NotServing).await;
    eventually("the NOT_SERVING replica ejected", || {
        matches!(state_of(&channel, draining.addr), Some(ReplicaState::Ejected { reason }) if reason.contains("NOT_SERVING"))
    })
    .await;
    let before = draining.served();
    for _ in 0..100 {
        call(&channel).await.unwrap();
    }
    assert_eq!(draining.served(), before, "calls went to a NOT_SERVING replica");

    draining.set(ServingStatus::Serving).await;
    eventually("the replica admitted again", || {
        state_of(&channel, draining.addr) == Some(ReplicaState::Healthy)
    })
    .await;
    until_ok("a call on the re-admitted replica", || {
        let channel = channel.clone();
        async move {
            call(&channel).await?;
            match draining.served() > before {
                true => Ok(()),
                false => Err(tonic::Status::unknown("not there yet")),
            }
        }
    })
    .await;
}

#[tokio::test]
async fn with_every_replica_down_calls_fail_fast_and_recover_when_one_returns() {
    let mut replicas = [Replica::start(), Replica::start()];
    let channel = connect(&Target::parse(&target(&replicas.each_ref())).unwrap(), options()).unwrap();
    eventually("two healthy replicas", || healthy(&channel) == 2).await;

    for replica in &mut replicas {
        replica.kill();
    }
    // Right away (maybe before the ejections): UNAVAILABLE, and quickly.
    let started = Instant::now();
    let status = call(&channel).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );

    eventually("both ejected", || healthy(&channel) == 0).await;
    let started = Instant::now();
    let status = call(&channel).await.unwrap_err();
    let fast = started.elapsed();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("no replica of"), "{status:?}");
    assert!(fast < Duration::from_millis(100), "failing took {fast:?}");

    let back = Instant::now();
    replicas[0].restart().await;
    let ((), failures) = until_ok("a call after a replica came back", || call(&channel)).await;
    eprintln!(
        "all down: a call failed in {fast:?} ({}); {:?} from restart to the first success, {} failures meanwhile",
        status.message(),
        back.elapsed(),
        failures.len()
    );
    if let Some(status) = failures.first() {
        eprintln!("while it came back: {}", status.message());
    }
    assert!(failures.iter().all(|s| s.code() == Code::Unavailable), "{failures:?}");
    assert!(
        back.elapsed() < Duration::from_secs(2),
        "recovery took {:?}",
        back.elapsed()
    );
}

#[tokio::test]
async fn a_watch_stream_resumes_on_another_replica() {
    let mut replicas = [Replica::start(), Replica::start(), Replica::start()];
    let channel = connect(&Target::parse(&target(&replicas.each_ref())).unwrap(), options()).unwrap();
    eventually("three healthy replicas", || healthy(&channel) == 3).await;

    let mut client = HealthClient::new(channel.clone());
    let mut stream = client.watch(test_request()).await.unwrap().into_inner();
    assert_eq!(
        stream.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving.into()
    );
    let watched = replicas.iter().position(|r| r.served() == 1).unwrap();
    let killed = Instant::now();
    replicas[watched].kill();

    // The stream breaks as UNAVAILABLE, what a resuming caller retries on.
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let served_before: Vec<usize> = replicas.iter().map(Replica::served).collect();
    let (mut resumed, failures) = until_ok("the watch reopened", || {
        let mut client = client.clone();
        async move { Ok(client.watch(test_request()).await?.into_inner()) }
    })
    .await;
    assert_eq!(
        resumed.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving.into()
    );
    eprintln!(
        "watch resumed {:?} after the kill, {} failed reopenings",
        killed.elapsed(),
        failures.len()
    );
    assert!(failures.iter().all(|s| s.code() == Code::Unavailable), "{failures:?}");
    let moved_to = (0..3).find(|i| replicas[*i].served() > served_before[*i]).unwrap();
    assert_ne!(moved_to, watched);
}
