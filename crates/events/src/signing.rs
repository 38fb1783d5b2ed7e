//! Standard Webhooks signatures: `webhook-id`, `webhook-timestamp` (Unix
//! seconds) and `webhook-signature` (`v1,<base64 HMAC-SHA256>` per secret,
//! space-separated), over `{id}.{timestamp}.{body}`, with `whsec_` secrets.
//!
//! A subscription has one secret, or two during a rotation: every request
//! is signed with each, so a function that knows either accepts it. The
//! [`Verifier`] is what a function (the example, the tests) runs: it checks
//! the timestamp's age and compares signatures in constant time (`hmac`'s
//! `verify_slice`).

use std::time::{Duration, SystemTime};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use hmac::{KeyInit, Mac};
use http::HeaderMap;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The prefix of a Standard Webhooks secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// The header names.
pub const WEBHOOK_ID: &str = "webhook-id";
/// The Unix time of signing, in seconds.
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
/// The signatures.
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";

/// A signing secret: `whsec_` and the base64 of 24 to 64 bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    text: String,
    key: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hint())
    }
}

/// Why a secret or a signed request is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SigningError {
    /// The secret is not `whsec_` and base64 of 24 to 64 bytes.
    #[error("a secret is `whsec_` followed by the base64 of 24 to 64 random bytes: {0}")]
    BadSecret(String),
    /// A header is missing or malformed.
    #[error("{0}")]
    BadHeaders(String),
    /// The timestamp is too old or too far in the future (a replay?).
    #[error("webhook-timestamp {0} is outside the tolerance")]
    Stale(i64),
    /// No signature matches any secret.
    #[error("no signature matches")]
    NoMatch,
    /// The operating system gave no random bytes.
    #[error("no random bytes for a new secret: {0}")]
    Random(String),
}

impl Secret {
    /// Reads `whsec_…`.
    pub fn parse(text: &str) -> Result<Secret, SigningError> {
        let encoded = text
            .strip_prefix(SECRET_PREFIX)
            .ok_or_else(|| SigningError::BadSecret("it does not start with whsec_".into()))?;
        let key = STANDARD
            .decode(encoded)
            .map_err(|e| SigningError::BadSecret(format!("not base64 ({e})")))?;
        if !(24..=64).contains(&key.len()) {
            return Err(SigningError::BadSecret(format!("it holds {} bytes", key.len())));
        }
        Ok(Secret {
            text: text.to_owned(),
            key,
        })
    }

    /// A new secret of 32 bytes from the operating system's random source.
    pub fn generate() -> Result<Secret, SigningError> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| SigningError::Random(e.to_string()))?;
        Ok(Secret {
            text: format!("{SECRET_PREFIX}{}", STANDARD.encode(key)),
            key: key.to_vec(),
        })
    }

    /// The secret, as given (to store it).
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// The secret masked, for listings: `whsec_…` and its last 4 characters.
    pub fn hint(&self) -> String {
        let tail: String = self
            .text
            .chars()
            .rev()
            .take(4)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("{SECRET_PREFIX}…{tail}")
    }

    fn mac(&self, id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
        // HMAC takes keys of any length: this cannot fail.
        let mut mac = match HmacSha256::new_from_slice(&self.key) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC accepts any key length"),
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// `v1,<base64>` for this secret.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = self.mac(id, timestamp, body).finalize().into_bytes();
        format!("v1,{}", STANDARD.encode(tag))
    }
}

/// The `webhook-signature` value: one `v1,…` per secret, space-separated.
pub fn signature_header(secrets: &[Secret], id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .map(|secret| secret.sign(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Unix seconds of `time` (0 before the epoch).
pub fn unix_seconds(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Checks signed requests the way a receiving function does.
#[derive(Debug, Clone)]
pub struct Verifier {
    secrets: Vec<Secret>,
    tolerance: Duration,
}

impl Verifier {
    /// A verifier accepting any of `secrets`, with Standard Webhooks' default
    /// tolerance of five minutes on the timestamp.
    pub fn new(secrets: Vec<Secret>) -> Verifier {
        Verifier {
            secrets,
            tolerance: Duration::from_secs(300),
        }
    }

    /// Checks `headers` and `body` at `now`; on success, the `webhook-id`.
    pub fn verify(&self, headers: &HeaderMap, body: &[u8], now: SystemTime) -> Result<String, SigningError> {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| SigningError::BadHeaders(format!("{name} is missing")))
        };
        let id = header(WEBHOOK_ID)?;
        let timestamp: i64 = header(WEBHOOK_TIMESTAMP)?
            .trim()
            .parse()
            .map_err(|_| SigningError::BadHeaders("webhook-timestamp is not a whole number".into()))?;
        let tolerance = i64::try_from(self.tolerance.as_secs()).unwrap_or(i64::MAX);
        if (unix_seconds(now) - timestamp).abs() > tolerance {
            return Err(SigningError::Stale(timestamp));
        }
        for candidate in header(WEBHOOK_SIGNATURE)?.split(' ') {
            let Some(encoded) = candidate.strip_prefix("v1,") else {
                continue; // another scheme (v1a: asymmetric) or noise
            };
            let Ok(tag) = STANDARD.decode(encoded) else { continue };
            for secret in &self.secrets {
                // Constant time: `verify_slice` compares with `subtle`.
                if secret.mac(id, timestamp, body).verify_slice(&tag).is_ok() {
                    return Ok(id.to_owned());
                }
            }
        }
        Err(SigningError::NoMatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standard_webhooks_example_signs_as_published() {
        // The example in the Standard Webhooks specification.
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("the example secret parses");
        let body = br#"{"test": 2432232314}"#;
        let signature = secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn a_verifier_accepts_either_secret_and_refuses_tampering() {
        let old = Secret::generate().expect("random");
        let new = Secret::generate().expect("random");
        let now = SystemTime::now();
        let ts = unix_seconds(now);
        let mut headers = HeaderMap::new();
        headers.insert(WEBHOOK_ID, http::HeaderValue::from_static("contracts:7"));
        headers.insert(WEBHOOK_TIMESTAMP, ts.to_string().parse().expect("digits"));
        let value = signature_header(&[new.clone(), old.clone()], "contracts:7", ts, b"{}");
        headers.insert(WEBHOOK_SIGNATURE, value.parse().expect("ascii"));
        assert!(Verifier::new(vec![old.clone()]).verify(&headers, b"{}", now).is_ok());
        assert!(Verifier::new(vec![new]).verify(&headers, b"{}", now).is_ok());
        assert_eq!(
            Verifier::new(vec![old.clone()]).verify(&headers, b"{ }", now),
            Err(SigningError::NoMatch)
        );
        let later = now + Duration::from_secs(301);
        assert_eq!(
            Verifier::new(vec![old]).verify(&headers, b"{}", later),
            Err(SigningError::Stale(ts))
        );
    }

    #[test]
    fn secrets_are_checked_and_masked() {
        assert!(Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(Secret::parse("whsec_c2hvcnQ=").is_err());
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("parses");
        assert_eq!(secret.hint(), "whsec_…LaSw");
        assert_eq!(format!("{secret:?}"), "whsec_…LaSw");
    }
}
