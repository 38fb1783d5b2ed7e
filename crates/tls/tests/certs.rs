//! `generate_dev_certs`: what it writes, what the certificates say, and
//! that it overwrites nothing unless told to.

use lightbox_tls::{PeerIdentity, TlsError, generate_dev_certs};
use rustls::pki_types::{CertificateDer, pem::PemObject as _};

#[test]
fn writes_a_ca_and_a_pair_per_name_with_the_expected_names() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let extra = vec!["users.lightbox.svc".to_owned(), "10.1.2.3".to_owned()];
    let files = generate_dev_certs(dir.path(), &["users", "gateway"], &extra, false).expect("certificates");
    let names: Vec<String> = files
        .iter()
        .map(|path| path.file_name().expect("a file name").to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "ca.pem",
            "ca.key",
            "users.pem",
            "users.key",
            "gateway.pem",
            "gateway.key"
        ]
    );

    let cert = CertificateDer::from_pem_file(dir.path().join("users.pem")).expect("a PEM certificate");
    let identity = PeerIdentity::from_certificate(&cert).expect("an X.509 certificate");
    assert_eq!(identity.dns_names, ["users", "localhost", "users.lightbox.svc"]);
    assert_eq!(identity.uris, ["spiffe://lightbox.local/users"]);
    assert_eq!(identity.spiffe_id.as_deref(), Some("spiffe://lightbox.local/users"));

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        for key in ["ca.key", "users.key", "gateway.key"] {
            let mode = std::fs::metadata(dir.path().join(key))
                .expect("metadata")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key} is readable by others");
        }
    }
}

#[test]
fn refuses_to_overwrite_unless_forced() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    generate_dev_certs(dir.path(), &["users"], &[], false).expect("certificates");
    let before = std::fs::read(dir.path().join("ca.pem")).expect("the CA");

    // A new name in the same directory would still replace the CA: refused.
    let err = generate_dev_certs(dir.path(), &["photos", "users"], &[], false).expect_err("existing files");
    assert!(matches!(err, TlsError::Exists { .. }), "{err:?}");
    assert!(!dir.path().join("photos.pem").exists(), "refusing wrote nothing");
    assert_eq!(std::fs::read(dir.path().join("ca.pem")).expect("the CA"), before);

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let key = dir.path().join("users.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        generate_dev_certs(dir.path(), &["users"], &[], true).expect("forced");
        let mode = std::fs::metadata(&key).expect("metadata").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "a replaced key is private again");
    }
    #[cfg(not(unix))]
    generate_dev_certs(dir.path(), &["users"], &[], true).expect("forced");
    assert_ne!(std::fs::read(dir.path().join("ca.pem")).expect("the CA"), before);
}

#[test]
fn rejects_names_that_are_not_one_dns_label() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    for bad in ["../etc", "Users", "", "ca", "-x", "a b"] {
        let err = generate_dev_certs(dir.path(), &[bad], &[], false).expect_err(bad);
        assert!(matches!(err, TlsError::InvalidName { .. }), "{bad:?}: {err:?}");
    }
    let err = generate_dev_certs(dir.path(), &["users", "users"], &[], false).expect_err("a name twice");
    assert!(matches!(err, TlsError::InvalidName { .. }), "{err:?}");
    let err = generate_dev_certs(dir.path(), &["users"], &["bad host!".to_owned()], false).expect_err("a bad host");
    assert!(matches!(err, TlsError::InvalidName { .. }), "{err:?}");
    assert_eq!(std::fs::read_dir(dir.path()).expect("the directory").count(), 0);
}
