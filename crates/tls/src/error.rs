//! The one error type of this crate: what was wrong, with which file, and
//! what to do about it.

use std::{io, path::PathBuf};

/// Why certificates could not be loaded, reloaded or generated.
///
/// A reload that fails with any of these keeps the certificates in use; the
/// reloader logs the error (once per change of the files) and tries again
/// when the files change.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read (missing, unreadable, a dangling symlink).
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A file is not well-formed PEM.
    #[error("{} is not valid PEM ({detail}); expected `-----BEGIN …-----` blocks", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What the PEM parser said.
        detail: String,
    },
    /// A certificate file holds no certificate.
    #[error("{} holds no certificate: expected one or more `-----BEGIN CERTIFICATE-----` blocks, leaf first", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A key file holds no private key.
    #[error(
        "{} holds no private key: expected a `-----BEGIN PRIVATE KEY-----` (PKCS#8), \
         `RSA PRIVATE KEY` or `EC PRIVATE KEY` block",
        path.display()
    )]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// A private key parsed as PEM but cannot sign.
    #[error(
        "the private key in {} cannot be used ({source}); ECDSA P-256/P-384, Ed25519 and RSA keys work",
        path.display()
    )]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// A leaf certificate is not a usable X.509 certificate.
    #[error("the certificate in {} cannot be used ({source})", path.display())]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// The key does not belong to the certificate. Also what a reload sees
    /// halfway through a rotation that writes one file, then the other: the
    /// next poll after the second write loads the pair.
    #[error(
        "the private key in {} does not belong to the certificate in {}: write both files of one pair",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// CA certificates that cannot be trusted as roots.
    #[error("the CA certificates in {} cannot be used: {detail}", path.display())]
    BadCa {
        /// The file.
        path: PathBuf,
        /// What was wrong with them.
        detail: String,
    },
    /// A client certificate was given without its key, or the other way round.
    #[error("a client certificate needs both a certificate and a key file; only {} was given", given.display())]
    HalfClientPair {
        /// The one file that was given.
        given: PathBuf,
    },
    /// rustls refused the configuration (not expected with the ring provider's defaults).
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    /// `generate_dev_certs` would overwrite a file.
    #[error("{} already exists; pass force to overwrite it (the CA and every key are then replaced)", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// A name or host given to `generate_dev_certs` cannot go into a certificate.
    #[error("cannot make a certificate for {name:?}: {reason}")]
    InvalidName {
        /// The name or host as given.
        name: String,
        /// Why not.
        reason: String,
    },
    /// rcgen failed to generate a key or a certificate.
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A generated file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}
