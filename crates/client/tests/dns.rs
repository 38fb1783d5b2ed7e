//! Names and lifecycle: `localhost`, a DNS name whose answers change (a
//! scripted resolver), lookups that fail, the system resolver, and the
//! background tasks ending with the channel.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    io,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use common::{Replica, call, eventually, healthy, options, state_of};
use lightbox_client::{ClientError, ConnectOptions, ReplicaState, Resolve, Resolving, SystemResolver, Target, connect};
use tonic::Code;

/// DNS as the test says: every lookup gets the current answer.
#[derive(Default)]
struct ScriptedDns {
    answer: Mutex<Option<Vec<SocketAddr>>>,
    lookups: AtomicUsize,
}

impl ScriptedDns {
    /// From now on, `addrs` (`None`: the lookup fails).
    fn answer(&self, addrs: Option<Vec<SocketAddr>>) {
        *self.answer.lock().unwrap() = addrs;
    }

    fn lookups(&self) -> usize {
        self.lookups.load(Ordering::SeqCst)
    }
}

impl Resolve for ScriptedDns {
    fn resolve(&self, host: &str, _port: u16) -> Resolving {
        assert_eq!(host, "replicas.test");
        self.lookups.fetch_add(1, Ordering::SeqCst);
        let answer = self.answer.lock().unwrap().clone();
        Box::pin(async move { answer.ok_or_else(|| io::Error::other("SERVFAIL")) })
    }
}

fn scripted(dns: &Arc<ScriptedDns>) -> ConnectOptions {
    ConnectOptions {
        label: Some("users".into()),
        resolver: dns.clone(),
        ..options()
    }
}

#[tokio::test]
async fn localhost_is_127_0_0_1_without_a_lookup() {
    let replica = Replica::start();
    let target = Target::parse(&format!("localhost:{}", replica.addr.port())).unwrap();
    assert!(!target.needs_resolution());
    let dns = Arc::new(ScriptedDns::default());
    let channel = connect(&target, scripted(&dns)).unwrap();
    call(&channel).await.unwrap();
    assert_eq!(replica.served(), 1);
    assert_eq!(state_of(&channel, replica.addr), Some(ReplicaState::Healthy));
    assert_eq!(dns.lookups(), 0);
}

#[tokio::test]
async fn endpoints_follow_the_dns_answers_and_survive_failed_lookups() {
    let replicas = [Replica::start(), Replica::start(), Replica::start()];
    let [a, b, c] = replicas.each_ref().map(|r| r.addr);
    let dns = Arc::new(ScriptedDns::default());
    dns.answer(Some(vec![a, b]));
    let channel = connect(&Target::parse("http://replicas.test:50051").unwrap(), scripted(&dns)).unwrap();
    eventually("a and b healthy", || healthy(&channel) == 2).await;
    // The endpoint names the host it came from (its :authority) and the IP.
    let mut names: Vec<String> = channel.replicas().into_iter().map(|r| r.endpoint).collect();
    let mut expected = [
        format!("replicas.test:50051 ({a})"),
        format!("replicas.test:50051 ({b})"),
    ];
    names.sort();
    expected.sort();
    assert_eq!(names, expected);
    for _ in 0..60 {
        call(&channel).await.unwrap();
    }
    assert!(replicas[0].served() > 0 && replicas[1].served() > 0);
    assert_eq!(replicas[2].served(), 0);

    dns.answer(Some(vec![b, c]));
    eventually("a gone, c healthy", || {
        state_of(&channel, a).is_none() && state_of(&channel, c) == Some(ReplicaState::Healthy)
    })
    .await;
    let a_served = replicas[0].served();
    for _ in 0..60 {
        call(&channel).await.unwrap();
    }
    assert_eq!(replicas[0].served(), a_served, "a call went to an endpoint DNS dropped");
    assert!(replicas[2].served() > 0);

    // Failed and empty lookups keep the last answer.
    for answer in [None, Some(Vec::new())] {
        dns.answer(answer);
        let seen = dns.lookups();
        eventually("two more lookups", || dns.lookups() >= seen + 2).await;
        assert_eq!(healthy(&channel), 2);
        call(&channel).await.unwrap();
    }
}

#[tokio::test]
async fn a_name_that_never_resolved_fails_fast_saying_so() {
    let dns = Arc::new(ScriptedDns::default());
    let channel = connect(&Target::parse("replicas.test:50051").unwrap(), scripted(&dns)).unwrap();
    let status = call(&channel).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("no replica of users")
            && status.message().contains("DNS lookup of replicas.test failed"),
        "{status:?}"
    );
}

#[tokio::test]
async fn the_system_resolver_resolves() {
    let addrs = SystemResolver.resolve("localhost", 50051).await.unwrap();
    assert!(
        addrs.contains(&SocketAddr::from((Ipv4Addr::LOCALHOST, 50051))) || addrs.iter().any(|a| a.ip().is_loopback()),
        "{addrs:?}"
    );
}

#[tokio::test]
async fn background_tasks_end_when_the_channel_is_dropped() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    let (up, mut down) = (Replica::start(), Replica::start());
    let dns = Arc::new(ScriptedDns::default());
    dns.answer(Some(vec![up.addr]));
    let spec = format!("{},{},http://replicas.test:1", up.url(), down.url());
    let channel = connect(&Target::parse(&spec).unwrap(), scripted(&dns)).unwrap();
    eventually("all healthy", || healthy(&channel) == 3).await;
    // One watcher in backoff, a DNS refresh loop, connections in use.
    down.kill();
    eventually("the dead one ejected", || healthy(&channel) == 2).await;
    for _ in 0..10 {
        call(&channel).await.unwrap();
    }
    let clone = channel.clone();
    assert!(metrics.num_alive_tasks() > before);
    drop(channel);
    call(&clone).await.unwrap();
    drop(clone);
    // The discovery task, the watchers, tonic's buffer workers and hyper's
    // connection tasks all end.
    eventually("every task of the channel ended", || {
        metrics.num_alive_tasks() == before
    })
    .await;
}

#[test]
fn the_channel_is_a_shareable_client_transport() {
    fn shareable<T: Clone + Send + Sync + std::fmt::Debug + 'static>() {}
    fn transport<T: tonic::client::GrpcService<tonic::body::Body>>() {}
    shareable::<lightbox_client::Balanced>();
    transport::<lightbox_client::Balanced>();
}

#[test]
fn connect_outside_a_runtime_says_so() {
    let target = Target::parse("127.0.0.1:1").unwrap();
    let err = connect(&target, ConnectOptions::default()).unwrap_err();
    assert!(matches!(err, ClientError::NoRuntime), "{err}");
}

#[tokio::test]
async fn https_without_tls_and_bad_options_are_refused() {
    let https = Target::parse("http://a:1,https://b:443").unwrap();
    let err = connect(&https, ConnectOptions::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "https://b:443 is https:// but no TLS was configured: set ConnectOptions::tls \
         (a lightbox_tls::ClientTls), or write http:// for plaintext"
    );
    let plain = Target::parse("a:1").unwrap();
    let zero = ConnectOptions {
        dns_refresh: std::time::Duration::ZERO,
        ..ConnectOptions::default()
    };
    let err = connect(&plain, zero).unwrap_err();
    assert_eq!(err.to_string(), "ConnectOptions::dns_refresh must be longer than zero");
}
