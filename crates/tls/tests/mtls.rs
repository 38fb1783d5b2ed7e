//! TLS and mutual TLS end to end: a real tonic server over
//! `ServerTls::incoming`, a real tonic client over `ClientTls::connector`,
//! and axum over the same listener type.

mod common;

use std::{future::IntoFuture as _, net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, extract::ConnectInfo, routing::get, serve::ListenerExt as _};
use common::{Certs, TestServer, check};
use lightbox_tls::{ClientTls, ClientTlsFiles, ServerTls, TlsConnectInfo, TlsError};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

#[tokio::test]
async fn mutual_tls_works_and_the_handler_sees_the_callers_spiffe_id() {
    let certs = Certs::new(&["users", "gateway"]);
    let tls = ServerTls::load(certs.server_files("users", true)).expect("server TLS");
    let server = TestServer::start(&tls).await;
    let client = certs.client(Some("gateway"));

    check(&client, &server.uri()).await.expect("a call over mutual TLS");
    assert_eq!(server.last_caller().as_deref(), Some("spiffe://lightbox.local/gateway"));

    // A DNS name as server name works too (the certificate names localhost).
    let by_name = format!("https://localhost:{}", server.addr.port());
    check(&client, &by_name).await.expect("a call to localhost");
}

#[tokio::test]
async fn without_a_client_ca_no_client_certificate_is_asked_for() {
    let certs = Certs::new(&["users"]);
    let tls = ServerTls::load(certs.server_files("users", false)).expect("server TLS");
    let server = TestServer::start(&tls).await;

    check(&certs.client(None), &server.uri())
        .await
        .expect("a call over TLS");
    assert_eq!(server.last_caller(), None);
}

#[tokio::test]
async fn with_a_client_ca_clients_without_a_good_certificate_are_refused() {
    let certs = Certs::new(&["users", "gateway"]);
    let other = Certs::new(&["gateway"]);
    let tls = ServerTls::load(certs.server_files("users", true)).expect("server TLS");
    let server = TestServer::start(&tls).await;

    let anonymous = certs.client(None);
    assert!(
        check(&anonymous, &server.uri()).await.is_err(),
        "a client without a certificate got through"
    );

    // Trusts the right server, but its certificate comes from another CA.
    let stranger = ClientTls::load(ClientTlsFiles {
        ca: certs.ca(),
        cert: Some(other.cert("gateway")),
        key: Some(other.key("gateway")),
    })
    .expect("client TLS");
    assert!(
        check(&stranger, &server.uri()).await.is_err(),
        "a client certificate from another CA got through"
    );

    // The control: the same server takes a client with a good certificate.
    check(&certs.client(Some("gateway")), &server.uri())
        .await
        .expect("a call with a good certificate");
    assert_eq!(server.seen_count(), 1, "only the good client reached the handler");
}

#[tokio::test]
async fn a_client_trusts_only_its_ca() {
    let certs = Certs::new(&["users"]);
    let other = Certs::new(&["users"]);
    let tls = ServerTls::load(certs.server_files("users", false)).expect("server TLS");
    let server = TestServer::start(&tls).await;

    assert!(check(&other.client(None), &server.uri()).await.is_err());
}

#[tokio::test]
async fn a_silent_client_does_not_hold_up_others_and_is_cut_at_the_handshake_timeout() {
    let certs = Certs::new(&["users"]);
    let tls = ServerTls::load(certs.server_files("users", false))
        .expect("server TLS")
        .with_handshake_timeout(Duration::from_millis(300));
    let server = TestServer::start(&tls).await;

    // Connects and never says hello.
    let mut silent = TcpStream::connect(server.addr).await.expect("connect");
    check(&certs.client(None), &server.uri())
        .await
        .expect("a call while another client is silent");

    // The server gives up on it: its socket closes.
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(common::DEADLINE, silent.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the silent connection stayed open"
    );
}

#[tokio::test]
async fn load_names_the_file_that_is_wrong() {
    let certs = Certs::new(&["users", "gateway"]);
    let mismatched = lightbox_tls::ServerTlsFiles {
        cert: certs.cert("users"),
        key: certs.key("gateway"),
        client_ca: None,
    };
    match ServerTls::load(mismatched) {
        Err(TlsError::KeyMismatch { cert, key }) => {
            assert_eq!((cert, key), (certs.cert("users"), certs.key("gateway")));
        }
        other => panic!("expected KeyMismatch, got {other:?}"),
    }

    let missing = certs.server_files("nobody", false);
    let err = ServerTls::load(missing).expect_err("a missing file");
    assert!(matches!(err, TlsError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("nobody.pem"), "{err}");

    let not_a_key = lightbox_tls::ServerTlsFiles {
        cert: certs.cert("users"),
        key: certs.cert("users"),
        client_ca: None,
    };
    let err = ServerTls::load(not_a_key).expect_err("a certificate as key");
    assert!(matches!(err, TlsError::NoKey { .. }), "{err:?}");

    let half = ClientTlsFiles {
        ca: certs.ca(),
        cert: Some(certs.cert("users")),
        key: None,
    };
    let err = ClientTls::load(half).expect_err("a certificate without its key");
    assert!(matches!(err, TlsError::HalfClientPair { .. }), "{err:?}");
}

/// One HTTP/1.1 GET over TLS (ALPN `http/1.1`), answering the whole response.
async fn http1_get(client: &ClientTls, addr: SocketAddr, path: &str) -> String {
    let mut config = (*client.client_config()).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("a server name");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("a TLS handshake");
    let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.expect("send the request");
    let mut response = Vec::new();
    // A peer that closes without close_notify ends the read with an error
    // after the data; the data is what counts.
    let _ = tls.read_to_end(&mut response).await;
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn axum_serves_over_tls_incoming_with_the_peer_identity() {
    let certs = Certs::new(&["gateway", "admin"]);
    let tls = ServerTls::load(certs.server_files("gateway", true)).expect("server TLS");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    let router = Router::new().route(
        "/whoami",
        get(|ConnectInfo(info): ConnectInfo<TlsConnectInfo>| async move {
            let id = info.peer().and_then(|peer| peer.spiffe_id.clone());
            format!("{} from {}", id.unwrap_or_default(), info.remote_addr().ip())
        }),
    );
    let serve = axum::serve(
        tls.incoming(listener),
        router.into_make_service_with_connect_info::<TlsConnectInfo>(),
    );
    tokio::spawn(serve.into_future());

    let response = http1_get(&certs.client(Some("admin")), addr, "/whoami").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.ends_with("spiffe://lightbox.local/admin from 127.0.0.1"),
        "{response}"
    );
}

#[tokio::test]
async fn axum_keeps_connect_info_socket_addr_through_tap_io() {
    let certs = Certs::new(&["gateway"]);
    let tls = ServerTls::load(certs.server_files("gateway", false)).expect("server TLS");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    let router = Router::new().route(
        "/addr",
        get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.ip().to_string() }),
    );
    let serve = axum::serve(
        tls.incoming(listener).tap_io(|_| {}),
        router.into_make_service_with_connect_info::<SocketAddr>(),
    );
    tokio::spawn(serve.into_future());

    let response = http1_get(&certs.client(None), addr, "/addr").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("127.0.0.1"), "{response}");
}
