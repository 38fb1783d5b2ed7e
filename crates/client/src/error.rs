//! The one error type of this crate: what was wrong with a target or the
//! options, and what to write instead.
//!
//! Nothing here is about an unreachable replica: [`crate::connect`] never
//! fails on one. Calls on the channel fail with gRPC statuses instead
//! (`UNAVAILABLE` naming the replicas and why each was ejected).

/// Why a target could not be parsed or a channel not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The target names no address at all.
    #[error(
        "no address given: expected one or more comma-separated addresses, \
         e.g. http://users-1:50051,http://users-2:50051 or users:50051"
    )]
    Empty,
    /// One item of a comma-separated list is empty.
    #[error("address {position} of {spec:?} is empty: remove the extra comma")]
    EmptyItem {
        /// The whole target as given.
        spec: String,
        /// Which item (from 1).
        position: usize,
    },
    /// An address is not a URL (or `HOST:PORT`) this crate understands.
    #[error("{address:?} is not a valid address ({reason}); write http://HOST:PORT, https://HOST:PORT or HOST:PORT")]
    InvalidAddress {
        /// The address as given.
        address: String,
        /// What was wrong with it.
        reason: String,
    },
    /// An address's scheme is neither `http` nor `https`.
    #[error("{address:?} uses the scheme {scheme:?}: only http:// and https:// are supported")]
    UnsupportedScheme {
        /// The address as given.
        address: String,
        /// Its scheme.
        scheme: String,
    },
    /// An `https://` address, but no TLS configuration was given.
    #[error(
        "{address} is https:// but no TLS was configured: set ConnectOptions::tls \
         (a lightbox_tls::ClientTls), or write http:// for plaintext"
    )]
    TlsRequired {
        /// The address.
        address: String,
    },
    /// The user agent cannot be sent as an HTTP header.
    #[error("the user agent {user_agent:?} is not a valid HTTP header value: use visible ASCII")]
    InvalidUserAgent {
        /// The user agent as given.
        user_agent: String,
    },
    /// An option is out of range.
    #[error("ConnectOptions::{option} {reason}")]
    InvalidOption {
        /// The field of [`crate::ConnectOptions`].
        option: &'static str,
        /// What it must be.
        reason: &'static str,
    },
    /// [`crate::connect`] was called outside a tokio runtime.
    #[error(
        "connect must be called inside a tokio runtime: it starts background tasks \
         (health watches, DNS refresh); call it from async code or inside Runtime::enter"
    )]
    NoRuntime,
}

/// An error and its causes in one line, saying each thing once: causes
/// often repeat their own cause in their message, so a cause that is
/// already there is skipped and one that continues the line's tail is
/// joined to it ("h2 protocol error: error reading a body from connection:
/// stream closed because of a broken pipe").
pub(crate) fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        extend(&mut line, &cause.to_string());
        source = cause.source();
    }
    line
}

/// Appends `text` to `line` as [`describe`] joins a cause.
pub(crate) fn extend(line: &mut String, text: &str) {
    if text.is_empty() || line.contains(text) {
        return;
    }
    if text.contains(line.as_str()) {
        *line = text.to_owned();
        return;
    }
    // The line's last ": "-separated tail that the cause starts with.
    let overlap = line
        .match_indices(": ")
        .map(|(i, sep)| i + sep.len())
        .find(|&i| text.starts_with(&line[i..]));
    match overlap {
        Some(i) => line.replace_range(i.., text),
        None => {
            line.push_str(": ");
            line.push_str(text);
        }
    }
}
