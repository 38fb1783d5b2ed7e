//! What server and client reload share: reading and parsing the PEM files,
//! the swappable certificate every handshake asks for, and the polling task.
//!
//! Change detection compares the files' *contents*, read through their paths
//! on every poll. That follows symlinks, so a Kubernetes secret volume (whose
//! files are symlinks into a directory swapped atomically) is seen the moment
//! the swap happens, and it cannot be fooled by a coarse mtime or an
//! unchanged length. The files are a few kilobytes: reading them every second
//! costs nothing worth measuring.

use std::{
    path::Path,
    sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak},
    time::Duration,
};

use arc_swap::ArcSwap;
use rustls::{
    RootCertStore, SignatureScheme,
    client::ResolvesClientCert,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::task::JoinHandle;

use crate::TlsError;

/// What one reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// The files hold what was last loaded or last tried: nothing to do.
    Unchanged,
    /// New certificates are in use from the next handshake on.
    Reloaded,
}

/// The one crypto provider: ring, chosen here rather than installed as the
/// process default, so nothing depends on who calls `install_default` first.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Locks `mutex`, even if a thread panicked while holding it: the state it
/// guards is replaced whole, never left half-written.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The whole contents of `path`.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Every certificate in a PEM file, in order (leaf first for a chain).
pub(crate) fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| TlsError::Pem {
            path: path.to_owned(),
            detail: err.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_owned() });
    }
    Ok(certs)
}

/// The first private key in a PEM file.
fn parse_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|err| match err {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey { path: path.to_owned() },
        err => TlsError::Pem {
            path: path.to_owned(),
            detail: err.to_string(),
        },
    })
}

/// A certificate chain and its key, checked to belong together.
pub(crate) fn certified_key(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = parse_certs(cert_path, cert_pem)?;
    let key = parse_key(key_path, key_pem)?;
    CertifiedKey::from_der(chain, key, &provider())
        .map(Arc::new)
        .map_err(|err| match err {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            },
            rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => TlsError::BadCertificate {
                path: cert_path.to_owned(),
                source: err,
            },
            err => TlsError::BadKey {
                path: key_path.to_owned(),
                source: err,
            },
        })
}

/// The CA certificates in a PEM file, as the only roots to trust.
pub(crate) fn root_store(path: &Path, pem: &[u8]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(path, pem)? {
        roots.add(cert).map_err(|err| TlsError::BadCa {
            path: path.to_owned(),
            detail: err.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

/// The certificate every handshake presents, swapped whole on reload.
/// Configurations hold it by `Arc`, so even a configuration someone kept
/// from before a reload presents the new certificate.
#[derive(Debug)]
pub(crate) struct CurrentKey(ArcSwap<CertifiedKey>);

impl CurrentKey {
    pub(crate) fn new(key: Arc<CertifiedKey>) -> Arc<CurrentKey> {
        Arc::new(CurrentKey(ArcSwap::new(key)))
    }

    pub(crate) fn store(&self, key: Arc<CertifiedKey>) {
        self.0.store(key);
    }
}

impl ResolvesServerCert for CurrentKey {
    // One certificate whatever the client asked for (SNI): a service has one
    // identity, with all its names in the SANs.
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

impl ResolvesClientCert for CurrentKey {
    fn resolve(&self, _root_hint_subjects: &[&[u8]], _sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Something whose files can be polled: [`crate::ServerTls`] and [`crate::ClientTls`].
pub(crate) trait Reloadable: Send + Sync + 'static {
    /// Reads the files and, if they changed, loads them.
    fn reload(&self) -> Result<Reload, TlsError>;
    /// What to call it in logs (e.g. "server certificate /etc/tls/tls.crt").
    fn describe(&self) -> String;
}

/// Polls `target` every `every` until the last strong reference to it is gone.
///
/// The task holds only a `Weak`: it keeps nothing alive, and ends by itself
/// within one period after the server or client it reloads is dropped.
pub(crate) fn spawn<R: Reloadable>(target: Weak<R>, every: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate, and the files were just loaded.
        ticks.tick().await;
        // The last error logged: a file that stays broken (or missing) is
        // reported once, not once per poll.
        let mut last_error: Option<String> = None;
        loop {
            ticks.tick().await;
            let Some(target) = target.upgrade() else { return };
            let what = target.describe();
            // Reading files and parsing keys blocks: off the async workers.
            match tokio::task::spawn_blocking(move || target.reload()).await {
                Ok(Ok(Reload::Unchanged)) => last_error = None,
                Ok(Ok(Reload::Reloaded)) => {
                    last_error = None;
                    tracing::info!(%what, "reloaded TLS certificates: new connections use them");
                }
                Ok(Err(err)) => {
                    let message = err.to_string();
                    if last_error.as_deref() != Some(message.as_str()) {
                        tracing::warn!(%what, error = %message, "not reloading TLS certificates; keeping the ones in use");
                        last_error = Some(message);
                    }
                }
                Err(err) => {
                    tracing::warn!(%what, error = %err, "TLS reload task failed; trying again at the next poll")
                }
            }
        }
    })
}
