//! Bearer JWT authentication: the token's signature, issuer, audience and
//! expiry are checked, and its subject is the signed-in user's id.
//!
//! Keys come from configuration: an HS256 shared secret (development), and
//! RS256 or ES256 public keys in PEM (production, where only the identity
//! provider holds the private key). The token's `alg` picks the key; an
//! algorithm without a configured key is refused, so a token cannot
//! downgrade itself to one.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::HttpError;

/// The development signing key: what `lightbox dev` and `lightbox token`
/// use unless told otherwise. Anyone can mint tokens with it, so a
/// production gateway is configured with its own keys.
pub const DEVELOPMENT_SECRET: &str = "lightbox-development-key: anyone can sign with this; never use it in production";

/// The issuer tokens are checked against, by default.
pub const DEFAULT_ISSUER: &str = "lightbox-dev";

/// The audience tokens are checked against, by default.
pub const DEFAULT_AUDIENCE: &str = "lightbox-gateway";

/// The claims the gateway reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user's id.
    pub sub: String,
    /// Who issued the token.
    pub iss: String,
    /// Who the token is for.
    pub aud: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
}

/// How tokens are checked.
#[derive(Clone)]
pub struct AuthConfig {
    issuer: String,
    audience: String,
    keys: Vec<(Algorithm, DecodingKey)>,
    leeway: Duration,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let algorithms: Vec<_> = self.keys.iter().map(|(a, _)| a).collect();
        f.debug_struct("AuthConfig")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("algorithms", &algorithms)
            .field("leeway", &self.leeway)
            .finish()
    }
}

impl AuthConfig {
    /// Checks tokens from `issuer` for `audience`; add keys with the
    /// `with_*` methods.
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> AuthConfig {
        AuthConfig {
            issuer: issuer.into(),
            audience: audience.into(),
            keys: Vec::new(),
            leeway: Duration::from_secs(30),
        }
    }

    /// Accepts HS256 tokens signed with `secret`.
    pub fn with_hs256_secret(mut self, secret: &[u8]) -> AuthConfig {
        self.keys.push((Algorithm::HS256, DecodingKey::from_secret(secret)));
        self
    }

    /// Accepts RS256 or ES256 tokens signed by the private half of `pem`
    /// (an RSA or P-256 public key in PEM).
    pub fn with_public_key_pem(mut self, pem: &[u8]) -> Result<AuthConfig, String> {
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            self.keys.push((Algorithm::RS256, key));
        } else if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            self.keys.push((Algorithm::ES256, key));
        } else {
            return Err("not an RSA or EC public key in PEM".into());
        }
        Ok(self)
    }

    /// Whether any key is configured.
    pub fn has_keys(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The algorithms with a key.
    pub fn algorithms(&self) -> Vec<Algorithm> {
        self.keys.iter().map(|(a, _)| *a).collect()
    }

    /// Checks the bearer token of `headers` and returns its subject.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<String, HttpError> {
        let value = headers
            .get(http::header::AUTHORIZATION)
            .ok_or_else(|| HttpError::unauthenticated("missing bearer token (Authorization: Bearer <JWT>)"))?;
        let value = value
            .to_str()
            .map_err(|_| HttpError::unauthenticated("the Authorization header is not text"))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| HttpError::unauthenticated("the Authorization header is not a bearer token"))?;
        self.verify(token.trim())
    }

    /// Checks `token` and returns its subject.
    pub fn verify(&self, token: &str) -> Result<String, HttpError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| HttpError::unauthenticated(format!("the token is not a JWT: {e}")))?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.leeway = self.leeway.as_secs();
        // Every key of the token's algorithm is tried (several during a key
        // rotation, or a secret beside the development key): the signature
        // is checked first, so only a key that signed the token gets as far
        // as the claims, whose errors then decide.
        let mut candidates = self.keys.iter().filter(|(a, _)| *a == header.alg).peekable();
        if candidates.peek().is_none() {
            return Err(HttpError::unauthenticated(format!(
                "tokens signed with {:?} are not accepted",
                header.alg
            )));
        }
        let mut outcome = None;
        for (_, key) in candidates {
            let decoded = jsonwebtoken::decode::<Claims>(token, key, &validation);
            let wrong_key = matches!(&decoded, Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature));
            outcome = Some(decoded);
            if !wrong_key {
                break;
            }
        }
        let Some(outcome) = outcome else {
            return Err(HttpError::unauthenticated("no key to check the token with"));
        };
        let data = outcome.map_err(|e| {
            HttpError::unauthenticated(match e.kind() {
                ErrorKind::ExpiredSignature => "the token has expired".to_owned(),
                ErrorKind::InvalidAudience => format!("the token is not for this audience ({})", self.audience),
                ErrorKind::InvalidIssuer => format!("the token is not from the expected issuer ({})", self.issuer),
                ErrorKind::InvalidSignature => "the token's signature does not verify".to_owned(),
                ErrorKind::MissingRequiredClaim(claim) => format!("the token has no `{claim}` claim"),
                _ => format!("the token is not valid: {e}"),
            })
        })?;
        if data.claims.sub.trim().is_empty() {
            return Err(HttpError::unauthenticated("the token's subject is empty"));
        }
        Ok(data.claims.sub)
    }
}

/// Mints an HS256 token for `subject`, valid for `ttl` (for development and
/// tests; production tokens come from an identity provider).
pub fn hs256_token(
    secret: &[u8],
    issuer: &str,
    audience: &str,
    subject: &str,
    ttl: Duration,
) -> Result<String, String> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| format!("the clock is before 1970: {e}"))?;
    let claims = Claims {
        sub: subject.to_owned(),
        iss: issuer.to_owned(),
        aud: audience.to_owned(),
        iat: now.as_secs(),
        exp: now.as_secs().saturating_add(ttl.as_secs()),
    };
    sign(
        &claims,
        &Header::new(Algorithm::HS256),
        &EncodingKey::from_secret(secret),
    )
}

/// Signs arbitrary `claims` (tests use it for expired or foreign tokens).
pub fn sign(claims: &Claims, header: &Header, key: &EncodingKey) -> Result<String, String> {
    jsonwebtoken::encode(header, claims, key).map_err(|e| format!("could not sign the token: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AuthConfig {
        AuthConfig::new(DEFAULT_ISSUER, DEFAULT_AUDIENCE).with_hs256_secret(b"secret")
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().expect("a header value"),
        );
        headers
    }

    #[test]
    fn a_good_token_gives_its_subject() {
        let token = hs256_token(
            b"secret",
            DEFAULT_ISSUER,
            DEFAULT_AUDIENCE,
            "u1",
            Duration::from_secs(60),
        )
        .expect("signs");
        assert_eq!(config().authenticate(&bearer(&token)).expect("accepted"), "u1");
    }

    #[test]
    fn bad_tokens_are_refused_with_the_reason() {
        let cases = [
            (
                hs256_token(
                    b"other",
                    DEFAULT_ISSUER,
                    DEFAULT_AUDIENCE,
                    "u1",
                    Duration::from_secs(60),
                ),
                "signature",
            ),
            (
                hs256_token(b"secret", DEFAULT_ISSUER, "someone-else", "u1", Duration::from_secs(60)),
                "audience",
            ),
            (
                hs256_token(b"secret", "mallory", DEFAULT_AUDIENCE, "u1", Duration::from_secs(60)),
                "issuer",
            ),
        ];
        for (token, reason) in cases {
            let err = config()
                .authenticate(&bearer(&token.expect("signs")))
                .expect_err("refused");
            assert_eq!(err.code, tonic::Code::Unauthenticated);
            assert!(err.message.contains(reason), "{} should mention {reason}", err.message);
        }
        let err = config().authenticate(&HeaderMap::new()).expect_err("no token");
        assert!(err.message.contains("missing"), "{}", err.message);
        let err = config().authenticate(&bearer("not.a.jwt")).expect_err("garbage");
        assert_eq!(err.code, tonic::Code::Unauthenticated);
    }

    #[test]
    fn with_a_secret_and_the_development_key_both_sign_accepted_tokens() {
        let both = config().with_hs256_secret(DEVELOPMENT_SECRET.as_bytes());
        for secret in [&b"secret"[..], DEVELOPMENT_SECRET.as_bytes()] {
            let token =
                hs256_token(secret, DEFAULT_ISSUER, DEFAULT_AUDIENCE, "u1", Duration::from_secs(60)).expect("signs");
            assert_eq!(both.authenticate(&bearer(&token)).expect("accepted"), "u1");
        }
    }

    #[test]
    fn an_algorithm_without_a_key_is_refused() {
        let claims = Claims {
            sub: "u1".into(),
            iss: DEFAULT_ISSUER.into(),
            aud: DEFAULT_AUDIENCE.into(),
            exp: u64::MAX / 2,
            iat: 0,
        };
        let token = sign(
            &claims,
            &Header::new(Algorithm::HS384),
            &EncodingKey::from_secret(b"secret"),
        )
        .expect("signs");
        let err = config().authenticate(&bearer(&token)).expect_err("HS384 has no key");
        assert!(err.message.contains("HS384"), "{}", err.message);
    }
}
