//! Certificates rotated on disk reach new connections without a restart;
//! bad ones never replace good ones.

mod common;

use common::{Certs, POLL, TestServer, check, eventually, live_pair, replace, replace_with};
use lightbox_tls::{ClientTls, ClientTlsFiles, Reload, ServerTls, ServerTlsFiles, TlsError};

#[tokio::test]
async fn a_server_certificate_rotated_on_disk_serves_new_connections() {
    let old = Certs::new(&["users", "gateway"]);
    let new = Certs::new(&["users"]);
    let live = tempfile::tempdir().expect("a temporary directory");
    let (cert, key) = live_pair(live.path(), &old.cert("users"), &old.key("users"));
    let tls = ServerTls::load(ServerTlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: Some(old.ca()),
    })
    .expect("server TLS");
    let _reloader = tls.spawn_reloader(POLL);
    let server = TestServer::start(&tls).await;

    // Both present the (old-CA) gateway certificate; they differ in the CA
    // they trust the server's certificate to come from.
    let trusts_old = old.client(Some("gateway"));
    let trusts_new = ClientTls::load(ClientTlsFiles {
        ca: new.ca(),
        cert: Some(old.cert("gateway")),
        key: Some(old.key("gateway")),
    })
    .expect("client TLS");
    check(&trusts_old, &server.uri())
        .await
        .expect("the old certificate is served");
    assert!(check(&trusts_new, &server.uri()).await.is_err());

    replace(&cert, &new.cert("users"));
    replace(&key, &new.key("users"));

    eventually("a new connection gets the new certificate", || async {
        check(&trusts_new, &server.uri()).await.is_ok()
    })
    .await;
    // And the old one is gone (no resumed session from before the rotation).
    assert!(check(&trusts_old, &server.uri()).await.is_err());
}

#[tokio::test]
async fn a_bad_pair_on_disk_keeps_the_certificate_in_use() {
    let old = Certs::new(&["users"]);
    let new = Certs::new(&["users"]);
    let live = tempfile::tempdir().expect("a temporary directory");
    let (cert, key) = live_pair(live.path(), &old.cert("users"), &old.key("users"));
    let tls = ServerTls::load(ServerTlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: None,
    })
    .expect("server TLS");
    let server = TestServer::start(&tls).await;
    let trusts_old = old.client(None);

    // Half a rotation: the new certificate with the old key.
    replace(&cert, &new.cert("users"));
    let err = tls.reload().expect_err("a certificate with another's key");
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
    assert!(
        err.to_string().contains("live.key"),
        "the error names the key file: {err}"
    );
    check(&trusts_old, &server.uri())
        .await
        .expect("the old pair still serves");
    // The same broken files are not tried (nor reported) again.
    assert_eq!(tls.reload().expect("nothing new to try"), Reload::Unchanged);

    // A key file that holds no key.
    replace_with(&key, b"-----BEGIN NONSENSE-----\n-----END NONSENSE-----\n");
    let err = tls.reload().expect_err("a key file without a key");
    assert!(matches!(err, TlsError::NoKey { .. }), "{err:?}");
    check(&trusts_old, &server.uri())
        .await
        .expect("the old pair still serves");

    // The rotation completes: the new pair serves.
    replace(&key, &new.key("users"));
    assert_eq!(tls.reload().expect("a good pair"), Reload::Reloaded);
    check(&new.client(None), &server.uri())
        .await
        .expect("the new pair serves");
}

#[tokio::test]
async fn the_reloader_keeps_serving_through_a_bad_pair_and_loads_the_good_one() {
    let old = Certs::new(&["users"]);
    let new = Certs::new(&["users"]);
    let live = tempfile::tempdir().expect("a temporary directory");
    let (cert, key) = live_pair(live.path(), &old.cert("users"), &old.key("users"));
    let tls = ServerTls::load(ServerTlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: None,
    })
    .expect("server TLS");
    let _reloader = tls.spawn_reloader(POLL);
    let server = TestServer::start(&tls).await;

    replace_with(&cert, b"not PEM at all");
    // Whether or not the reloader has looked yet, the old pair serves.
    for _ in 0..3 {
        check(&old.client(None), &server.uri())
            .await
            .expect("the old pair serves");
    }
    replace(&cert, &new.cert("users"));
    replace(&key, &new.key("users"));
    eventually("the good pair after a bad one is loaded", || async {
        check(&new.client(None), &server.uri()).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn a_client_ca_rotated_on_disk_applies_to_new_connections() {
    let old = Certs::new(&["users", "gateway"]);
    let new = Certs::new(&["gateway"]);
    let live = tempfile::tempdir().expect("a temporary directory");
    let client_ca = live.path().join("client-ca.pem");
    replace(&client_ca, &old.ca());
    let tls = ServerTls::load(ServerTlsFiles {
        cert: old.cert("users"),
        key: old.key("users"),
        client_ca: Some(client_ca.clone()),
    })
    .expect("server TLS");
    let _reloader = tls.spawn_reloader(POLL);
    let server = TestServer::start(&tls).await;
    let old_client = old.client(Some("gateway"));
    let new_client = ClientTls::load(ClientTlsFiles {
        ca: old.ca(),
        cert: Some(new.cert("gateway")),
        key: Some(new.key("gateway")),
    })
    .expect("client TLS");
    check(&old_client, &server.uri()).await.expect("the old CA's client");

    replace(&client_ca, &new.ca());
    eventually("a client of the new CA is let in", || async {
        check(&new_client, &server.uri()).await.is_ok()
    })
    .await;
    assert!(check(&old_client, &server.uri()).await.is_err());
}

#[tokio::test]
async fn a_client_certificate_rotated_on_disk_is_used_by_new_connections() {
    let certs = Certs::new(&["users", "admin", "operator"]);
    let live = tempfile::tempdir().expect("a temporary directory");
    let (cert, key) = live_pair(live.path(), &certs.cert("admin"), &certs.key("admin"));
    let client = ClientTls::load(ClientTlsFiles {
        ca: certs.ca(),
        cert: Some(cert.clone()),
        key: Some(key.clone()),
    })
    .expect("client TLS");
    let _reloader = client.spawn_reloader(POLL);
    let tls = ServerTls::load(certs.server_files("users", true)).expect("server TLS");
    let server = TestServer::start(&tls).await;

    check(&client, &server.uri()).await.expect("a call as admin");
    assert_eq!(server.last_caller().as_deref(), Some("spiffe://lightbox.local/admin"));

    replace(&cert, &certs.cert("operator"));
    replace(&key, &certs.key("operator"));
    eventually("a new connection presents the rotated certificate", || async {
        check(&client, &server.uri()).await.is_ok()
            && server.last_caller().as_deref() == Some("spiffe://lightbox.local/operator")
    })
    .await;
}

#[tokio::test]
async fn a_client_ca_rotated_on_disk_trusts_the_new_server() {
    let old = Certs::new(&["users"]);
    let new = Certs::new(&["users"]);
    let live = tempfile::tempdir().expect("a temporary directory");
    let ca = live.path().join("ca.pem");
    replace(&ca, &old.ca());
    let client = ClientTls::load(ClientTlsFiles {
        ca: ca.clone(),
        cert: None,
        key: None,
    })
    .expect("client TLS");
    let _reloader = client.spawn_reloader(POLL);
    let tls = ServerTls::load(new.server_files("users", false)).expect("server TLS");
    let server = TestServer::start(&tls).await;
    assert!(check(&client, &server.uri()).await.is_err());

    replace(&ca, &new.ca());
    eventually("the client trusts the new CA", || async {
        check(&client, &server.uri()).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn the_reloader_ends_when_the_last_handle_is_dropped() {
    let certs = Certs::new(&["users"]);
    let tls = ServerTls::load(certs.server_files("users", false)).expect("server TLS");
    let reloader = tls.spawn_reloader(POLL);
    drop(tls);
    tokio::time::timeout(common::DEADLINE, reloader)
        .await
        .expect("the reloader ended")
        .expect("the reloader did not panic");
}
