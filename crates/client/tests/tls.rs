//! TLS over `lightbox_tls`: the certificate is checked against the
//! address's host name, not the IP the endpoint resolved to.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::{Replica, call, eventually, options, state_of};
use lightbox_client::{ConnectOptions, ReplicaState, Target, connect};
use lightbox_tls::{ClientTls, ClientTlsFiles, ServerTls, ServerTlsFiles};
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tonic::Code;

/// A CA and a server certificate naming only `localhost` (no IP address),
/// written into `dir`.
fn localhost_only_certs(dir: &Path) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
}

fn setup() -> (tempfile::TempDir, Replica, ConnectOptions) {
    let dir = tempfile::tempdir().unwrap();
    localhost_only_certs(dir.path());
    let server = ServerTls::load(ServerTlsFiles {
        cert: dir.path().join("server.pem"),
        key: dir.path().join("server.key"),
        client_ca: None,
    })
    .unwrap()
    .with_alpn(&[b"h2"])
    .unwrap();
    let client = ClientTls::load(ClientTlsFiles {
        ca: dir.path().join("ca.pem"),
        cert: None,
        key: None,
    })
    .unwrap();
    let options = ConnectOptions {
        tls: Some(client),
        ..options()
    };
    (dir, Replica::start_tls(server), options)
}

#[tokio::test]
async fn https_checks_the_host_name_of_the_address() {
    let (_dir, replica, options) = setup();
    let by_name = Target::parse(&format!("https://localhost:{}", replica.addr.port())).unwrap();
    let channel = connect(&by_name, options).unwrap();
    call(&channel).await.unwrap();
    assert_eq!(replica.served(), 1);
}

#[tokio::test]
async fn a_certificate_not_naming_the_address_ejects_the_replica() {
    let (_dir, replica, options) = setup();
    // The certificate names localhost, not 127.0.0.1.
    let by_ip = Target::parse(&format!("https://{}", replica.addr)).unwrap();
    let channel = connect(&by_ip, options).unwrap();
    let status = call(&channel).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("no replica of"), "{status:?}");
    eventually("the replica ejected", || {
        matches!(state_of(&channel, replica.addr), Some(ReplicaState::Ejected { reason }) if reason.contains("certificate"))
    })
    .await;
    assert_eq!(replica.served(), 0);
}
