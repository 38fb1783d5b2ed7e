//! The whole stack with mutual TLS between its services: a phone's FRESH
//! read goes gateway → Photos → Users → Contracts over TLS, each hop
//! presenting a certificate from the development CA (`lightbox certs`'s);
//! a client with no certificate, or one from another CA, is refused; a
//! server certificate rotated on disk is served without a restart.

use std::{path::Path, time::Duration};

use lightbox_api::users::{ListUsersRequest, users_service_client::UsersServiceClient};
use lightbox_app::Target;
use lightbox_changefeed::FeedOptions;
use lightbox_testkit::{Stack, TestDb, customer, eventually};
use lightbox_tls::{ClientTls, ClientTlsFiles, ServerTls, ServerTlsFiles, generate_dev_certs};
use reqwest::StatusCode;
use tonic::transport::Endpoint;

const NAMES: &[&str] = &["users", "contracts", "photos", "gateway", "operator"];

/// A development CA and its certificates in `dir`.
fn certs(dir: &Path) {
    generate_dev_certs(dir, NAMES, &[], false).unwrap_or_else(|e| panic!("certificates: {e}"));
}

/// A client of `addr` over TLS trusting `ca`, presenting `identity` (a
/// certificate and key) if given.
fn client(
    addr: std::net::SocketAddr,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> UsersServiceClient<tonic::transport::Channel> {
    let tls = ClientTls::load(ClientTlsFiles {
        ca: ca.to_owned(),
        cert: identity.map(|(cert, _)| cert.to_owned()),
        key: identity.map(|(_, key)| key.to_owned()),
    })
    .unwrap_or_else(|e| panic!("client TLS: {e}"));
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap_or_else(|e| panic!("{e}"))
        .connect_timeout(Duration::from_secs(2));
    UsersServiceClient::new(tls.channel(endpoint))
}

async fn lists_users(client: &mut UsersServiceClient<tonic::transport::Channel>) -> Result<(), tonic::Status> {
    client.list_users(ListUsersRequest::default()).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stack_runs_with_mutual_tls_refuses_strangers_and_picks_up_a_rotated_certificate() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (ca1, other, rotated, live) = (
        dir.path().join("ca1"),
        dir.path().join("other"),
        dir.path().join("rotated"),
        dir.path().join("live"),
    );
    certs(&ca1);
    certs(&other);
    certs(&rotated);
    // What the servers serve, read from files a rotation replaces.
    std::fs::create_dir_all(&live).unwrap_or_else(|e| panic!("{e}"));
    let (live_cert, live_key) = (live.join("server.pem"), live.join("server.key"));
    std::fs::copy(ca1.join("users.pem"), &live_cert).unwrap_or_else(|e| panic!("{e}"));
    std::fs::copy(ca1.join("users.key"), &live_key).unwrap_or_else(|e| panic!("{e}"));

    let grpc = ServerTls::load(ServerTlsFiles {
        cert: live_cert.clone(),
        key: live_key.clone(),
        client_ca: Some(ca1.join("ca.pem")),
    })
    .and_then(|tls| tls.with_alpn(&[b"h2"]))
    .unwrap_or_else(|e| panic!("server TLS: {e}"));
    let clients = ClientTls::load(ClientTlsFiles {
        ca: ca1.join("ca.pem"),
        cert: Some(ca1.join("photos.pem")),
        key: Some(ca1.join("photos.key")),
    })
    .unwrap_or_else(|e| panic!("client TLS: {e}"));
    let _reloader = grpc.spawn_reloader(Duration::from_millis(50));
    let feed = FeedOptions {
        progress_interval: Duration::from_millis(200),
        poll_interval: Duration::from_millis(200),
        ..FeedOptions::default()
    };
    let stack = Stack::start_with(TestDb::sqlite(), feed, |settings| {
        settings.server.tls = Some(grpc.clone());
        settings.client_tls = Some(clients.clone());
    })
    .await;

    // Every hop over mutual TLS: the customer is made through Users and
    // Contracts, then read through the gateway, Photos' synchronous chain.
    let (user, _) = customer(&stack, "tls@example.com", "10").await;
    let http = reqwest::Client::new();
    let answer = http
        .get(format!(
            "{}/v1/users/me/photos?consistency=CONSISTENCY_FRESH",
            stack.gateway_url()
        ))
        .bearer_auth(stack.token(&user.id))
        .send()
        .await
        .unwrap_or_else(|e| panic!("the gateway: {e}"));
    let status = answer.status();
    let body = answer.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains(&user.id), "{body}");
    assert!(
        body.contains("SOURCE_UPSTREAM"),
        "a FRESH read goes through the chain: {body}"
    );

    // A client with the operator's certificate is served; one with none, or
    // with a certificate of another CA, is refused; plaintext too.
    let users = stack.addr(Target::Users);
    let ca = ca1.join("ca.pem");
    let operator = (ca1.join("operator.pem"), ca1.join("operator.key"));
    let mut trusted = client(users, &ca, Some((&operator.0, &operator.1)));
    lists_users(&mut trusted)
        .await
        .unwrap_or_else(|s| panic!("the operator: {s:?}"));
    let mut anonymous = client(users, &ca, None);
    // Refused in the handshake: the client sees its connection fail.
    assert!(lists_users(&mut anonymous).await.is_err(), "no client certificate");
    let stranger = (other.join("operator.pem"), other.join("operator.key"));
    let mut stranger = client(users, &ca, Some((&stranger.0, &stranger.1)));
    assert!(lists_users(&mut stranger).await.is_err(), "a certificate of another CA");
    let mut plaintext = UsersServiceClient::new(lightbox_testkit::channel(users).await);
    assert!(lists_users(&mut plaintext).await.is_err(), "plaintext to a TLS port");

    // Rotation: a client that trusts only the new CA cannot verify the
    // server until its new certificate is on disk; then it can, with no
    // restart. (It presents the old CA's certificate, which the servers
    // still require.)
    let rotated_ca = rotated.join("ca.pem");
    let mut after = client(users, &rotated_ca, Some((&operator.0, &operator.1)));
    assert!(lists_users(&mut after).await.is_err(), "the old certificate is served");
    std::fs::copy(rotated.join("users.key"), &live_key).unwrap_or_else(|e| panic!("{e}"));
    std::fs::copy(rotated.join("users.pem"), &live_cert).unwrap_or_else(|e| panic!("{e}"));
    eventually("the rotated certificate to be served", || {
        let mut after = client(users, &rotated_ca, Some((&operator.0, &operator.1)));
        async move { lists_users(&mut after).await.ok() }
    })
    .await;
    stack.stop().await;
}

/// Under mutual TLS, a client certificate from the admin listener's CA is
/// an admin credential: faults can be set with it and no token; without a
/// certificate nothing connects at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_an_admin_credential_under_mutual_tls() {
    use lightbox_api::admin::{GetFaultRequest, fault_service_client::FaultServiceClient};
    use lightbox_server::{AdminCredential, AdminOptions, Faults, ProcessHealth, Shutdown, serve_admin};

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    certs(dir.path());
    let tls = ServerTls::load(ServerTlsFiles {
        cert: dir.path().join("users.pem"),
        key: dir.path().join("users.key"),
        client_ca: Some(dir.path().join("ca.pem")),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let listener = lightbox_server::bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let (_stop, shutdown) = Shutdown::new();
    let options = AdminOptions {
        faults: true,
        credential: AdminCredential::bearer("a-token-nobody-here-sends").unwrap_or_else(|e| panic!("{e}")),
        metrics: None,
        max_message_bytes: 1 << 20,
        tls: Some(tls),
    };
    tokio::spawn(serve_admin(
        listener,
        ProcessHealth::new(),
        vec![("users".to_owned(), Faults::new())],
        options,
        shutdown,
    ));
    let ca = dir.path().join("ca.pem");
    let operator = (dir.path().join("operator.pem"), dir.path().join("operator.key"));
    let channel = |identity: Option<(&Path, &Path)>| {
        let tls = ClientTls::load(ClientTlsFiles {
            ca: ca.clone(),
            cert: identity.map(|(cert, _)| cert.to_owned()),
            key: identity.map(|(_, key)| key.to_owned()),
        })
        .unwrap_or_else(|e| panic!("{e}"));
        tls.channel(Endpoint::from_shared(format!("https://{addr}")).unwrap_or_else(|e| panic!("{e}")))
    };
    let answer = FaultServiceClient::new(channel(Some((&operator.0, &operator.1))))
        .get_fault(GetFaultRequest {
            component: "users".to_owned(),
        })
        .await
        .unwrap_or_else(|s| panic!("the operator's certificate is a credential: {s:?}"));
    assert_eq!(answer.into_inner().component, "users");
    let refused = FaultServiceClient::new(channel(None))
        .get_fault(GetFaultRequest::default())
        .await;
    assert!(refused.is_err(), "no certificate, no admin");
}
