//! RS256 and ES256 tokens: accepted with the matching public key, refused
//! with another key, and an HS256 token can never pass by using a public key
//! as its secret (each algorithm has its own key).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use lightbox_gateway::{
    AuthConfig,
    auth::{self, Claims, DEFAULT_AUDIENCE, DEFAULT_ISSUER},
};

const RSA_PRIVATE: &[u8] = include_bytes!("keys/rsa-private.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("keys/rsa-public.pem");
const EC_PRIVATE: &[u8] = include_bytes!("keys/ec-private.pem");
const EC_PUBLIC: &[u8] = include_bytes!("keys/ec-public.pem");
const RSA2_PRIVATE: &[u8] = include_bytes!("keys/rsa2-private.pem");
const RSA2_PUBLIC: &[u8] = include_bytes!("keys/rsa2-public.pem");
const EC2_PRIVATE: &[u8] = include_bytes!("keys/ec2-private.pem");
const EC2_PUBLIC: &[u8] = include_bytes!("keys/ec2-public.pem");

fn claims() -> Claims {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    Claims {
        sub: "user-1".into(),
        iss: DEFAULT_ISSUER.into(),
        aud: DEFAULT_AUDIENCE.into(),
        exp: now + 600,
        iat: now,
    }
}

fn config(public: &[u8]) -> AuthConfig {
    AuthConfig::new(DEFAULT_ISSUER, DEFAULT_AUDIENCE)
        .with_public_key_pem(public)
        .unwrap_or_else(|e| panic!("the public key loads: {e}"))
}

/// Key rotation: with two keys of one algorithm configured, a token signed
/// by either is accepted (not only by the first), and one signed by
/// neither is refused for its signature.
#[test]
fn a_token_signed_with_the_second_of_two_keys_is_accepted() {
    let two = |first: &[u8], second: &[u8]| {
        AuthConfig::new(DEFAULT_ISSUER, DEFAULT_AUDIENCE)
            .with_public_key_pem(first)
            .and_then(|c| c.with_public_key_pem(second))
            .unwrap_or_else(|e| panic!("the public keys load: {e}"))
    };
    for (algorithm, private, other_private, keys) in [
        (
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(RSA2_PRIVATE),
            EncodingKey::from_rsa_pem(RSA_PRIVATE),
            two(RSA_PUBLIC, RSA2_PUBLIC),
        ),
        (
            Algorithm::ES256,
            EncodingKey::from_ec_pem(EC2_PRIVATE),
            EncodingKey::from_ec_pem(EC_PRIVATE),
            two(EC_PUBLIC, EC2_PUBLIC),
        ),
    ] {
        let (second, first) = (
            private.unwrap_or_else(|e| panic!("{e}")),
            other_private.unwrap_or_else(|e| panic!("{e}")),
        );
        for key in [&second, &first] {
            let token = auth::sign(&claims(), &Header::new(algorithm), key).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                keys.verify(&token).map_err(|e| e.message).as_deref(),
                Ok("user-1"),
                "{algorithm:?}"
            );
        }
        // Signed by the second key, checked by the first alone: refused.
        let token = auth::sign(&claims(), &Header::new(algorithm), &second).unwrap_or_else(|e| panic!("{e}"));
        let alone = if algorithm == Algorithm::RS256 {
            RSA_PUBLIC
        } else {
            EC_PUBLIC
        };
        let err = config(alone).verify(&token).expect_err("another key");
        assert!(err.message.contains("signature"), "{}", err.message);
    }
    // An expired token signed by the second key says it expired, not that
    // its signature is wrong.
    let mut expired = claims();
    expired.exp = expired.iat.saturating_sub(3600);
    let key = EncodingKey::from_rsa_pem(RSA2_PRIVATE).unwrap_or_else(|e| panic!("{e}"));
    let token = auth::sign(&expired, &Header::new(Algorithm::RS256), &key).unwrap_or_else(|e| panic!("{e}"));
    let err = two(RSA_PUBLIC, RSA2_PUBLIC).verify(&token).expect_err("expired");
    assert!(err.message.contains("expired"), "{}", err.message);
}

#[test]
fn rs256_and_es256_tokens_verify_with_their_public_keys() {
    let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap_or_else(|e| panic!("{e}"));
    let ec = EncodingKey::from_ec_pem(EC_PRIVATE).unwrap_or_else(|e| panic!("{e}"));
    let rs256 = auth::sign(&claims(), &Header::new(Algorithm::RS256), &rsa).unwrap_or_else(|e| panic!("{e}"));
    let es256 = auth::sign(&claims(), &Header::new(Algorithm::ES256), &ec).unwrap_or_else(|e| panic!("{e}"));

    assert_eq!(
        config(RSA_PUBLIC).verify(&rs256).map_err(|e| e.message).as_deref(),
        Ok("user-1")
    );
    assert_eq!(
        config(EC_PUBLIC).verify(&es256).map_err(|e| e.message).as_deref(),
        Ok("user-1")
    );
    assert_eq!(config(RSA_PUBLIC).algorithms(), vec![Algorithm::RS256]);
    assert_eq!(config(EC_PUBLIC).algorithms(), vec![Algorithm::ES256]);

    // Each token fails against the other kind of key.
    assert!(config(EC_PUBLIC).verify(&rs256).is_err());
    assert!(config(RSA_PUBLIC).verify(&es256).is_err());
}

#[test]
fn a_public_key_cannot_be_used_as_an_hs256_secret() {
    // The classic algorithm confusion: sign HS256 with the public key's
    // bytes, hoping the verifier uses the same bytes as a secret.
    let forged = auth::sign(
        &claims(),
        &Header::new(Algorithm::HS256),
        &EncodingKey::from_secret(RSA_PUBLIC),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let err = config(RSA_PUBLIC).verify(&forged).expect_err("refused");
    assert!(err.message.contains("HS256"), "{}", err.message);
}

#[test]
fn a_file_that_is_not_a_public_key_is_refused() {
    let err = AuthConfig::new(DEFAULT_ISSUER, DEFAULT_AUDIENCE)
        .with_public_key_pem(b"-----BEGIN NONSENSE-----\n-----END NONSENSE-----\n")
        .expect_err("refused");
    assert!(err.contains("PEM"), "{err}");
}
