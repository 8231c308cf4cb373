//! Access tokens: compact JWTs (HS256) carrying the client and the environment they act in.
//!
//! The SDK treats a token as opaque on the client-credentials path, but parses it on the web-identity path
//! (three base64url parts, a JSON payload with `environment_id` and `exp`), so tokens are real JWTs.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use compute_store::SigningKey;

/// Issuer written into every token.
pub const ISSUER: &str = "compute";

/// The claims of an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer, always [`ISSUER`].
    pub iss: String,
    /// The client id.
    pub sub: String,
    /// The environment the token acts in (read by the SDK on the web-identity path).
    pub environment_id: String,
    /// Issued at, seconds since the epoch.
    pub iat: i64,
    /// Expiry, seconds since the epoch (read by the SDK to size its cache).
    pub exp: i64,
    /// Unique token id.
    pub jti: String,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    typ: String,
    kid: String,
}

/// Why a token was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not three base64url parts with JSON header and payload.
    #[error("not a well-formed token (expected a JWT issued by this server)")]
    Malformed,
    /// Signed with an algorithm we do not issue.
    #[error("unsupported signing algorithm {0:?}")]
    Algorithm(String),
    /// Signed by a key this server does not have (never had, or retired).
    #[error("signed by an unknown or retired key")]
    UnknownKey,
    /// The signature does not match.
    #[error("bad signature")]
    BadSignature,
    /// Past its `exp`.
    #[error("expired; request a new token with AuthService/GetToken")]
    Expired,
    /// Issued by another issuer.
    #[error("issued by {0:?}, not by this server")]
    Issuer(String),
}

/// Signs `claims` with `key`.
pub fn sign(claims: &Claims, key: &SigningKey) -> String {
    let header = Header { alg: "HS256".into(), typ: "JWT".into(), kid: key.kid.clone() };
    let mut out = String::with_capacity(256);
    out.push_str(&URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).expect("header serializes")));
    out.push('.');
    out.push_str(&URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialize")));
    let sig = mac(&key.secret, out.as_bytes()).finalize().into_bytes();
    out.push('.');
    out.push_str(&URL_SAFE_NO_PAD.encode(sig));
    out
}

/// The key id a token claims to be signed with, before any verification.
pub fn key_id(token: &str) -> Result<String, TokenError> {
    let header = token.split('.').next().ok_or(TokenError::Malformed)?;
    let header: Header = decode_json(header)?;
    Ok(header.kid)
}

/// Verifies `token` against `key` (the key its `kid` names) at time `now` (seconds since the epoch).
pub fn verify(token: &str, key: &SigningKey, now: i64) -> Result<Claims, TokenError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(TokenError::Malformed);
    };
    let header: Header = decode_json(h)?;
    if header.alg != "HS256" {
        return Err(TokenError::Algorithm(header.alg));
    }
    if header.kid != key.kid {
        return Err(TokenError::UnknownKey);
    }
    let sig = URL_SAFE_NO_PAD.decode(s).map_err(|_| TokenError::Malformed)?;
    let signed_len = h.len() + 1 + p.len();
    mac(&key.secret, &token.as_bytes()[..signed_len]).verify_slice(&sig).map_err(|_| TokenError::BadSignature)?;
    let claims: Claims = decode_json(p)?;
    if claims.iss != ISSUER {
        return Err(TokenError::Issuer(claims.iss));
    }
    if claims.exp <= now {
        return Err(TokenError::Expired);
    }
    Ok(claims)
}

fn mac(secret: &[u8], data: &[u8]) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    m.update(data);
    m
}

fn decode_json<T: for<'de> Deserialize<'de>>(part: &str) -> Result<T, TokenError> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kid: &str, secret: &[u8]) -> SigningKey {
        SigningKey { kid: kid.into(), secret: secret.to_vec(), created_at: 0, retired_at: None }
    }

    fn claims(exp: i64) -> Claims {
        Claims {
            iss: ISSUER.into(),
            sub: "client-a".into(),
            environment_id: "env-1".into(),
            iat: 100,
            exp,
            jti: "j1".into(),
        }
    }

    #[test]
    fn sign_then_verify() {
        let k = key("k1", b"0123456789abcdef0123456789abcdef");
        let t = sign(&claims(1000), &k);
        assert_eq!(t.split('.').count(), 3);
        assert_eq!(key_id(&t).unwrap(), "k1");
        assert_eq!(verify(&t, &k, 999).unwrap(), claims(1000));
    }

    #[test]
    fn payload_is_what_the_sdk_parses() {
        let t = sign(&claims(1000), &key("k1", b"s"));
        let payload = t.split('.').nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert_eq!(v["environment_id"], "env-1");
        assert_eq!(v["exp"], 1000);
    }

    #[test]
    fn expiry_is_enforced() {
        let k = key("k1", b"s");
        let t = sign(&claims(1000), &k);
        assert_eq!(verify(&t, &k, 1000), Err(TokenError::Expired));
        assert_eq!(verify(&t, &k, 5000), Err(TokenError::Expired));
    }

    #[test]
    fn tampering_and_wrong_keys_are_rejected() {
        let k = key("k1", b"secret-one");
        let t = sign(&claims(1000), &k);
        assert_eq!(verify(&t, &key("k1", b"secret-two"), 0), Err(TokenError::BadSignature));
        assert_eq!(verify(&t, &key("k2", b"secret-one"), 0), Err(TokenError::UnknownKey));
        // Swap in a payload for another environment, keeping the signature.
        let mut forged = claims(1000);
        forged.environment_id = "env-2".into();
        let other = sign(&forged, &key("k1", b"attacker"));
        let parts: Vec<&str> = t.split('.').collect();
        let oparts: Vec<&str> = other.split('.').collect();
        let spliced = format!("{}.{}.{}", parts[0], oparts[1], parts[2]);
        assert_eq!(verify(&spliced, &k, 0), Err(TokenError::BadSignature));
    }

    #[test]
    fn malformed_tokens() {
        let k = key("k1", b"s");
        for bad in ["", "a", "a.b", "a.b.c.d", "!!.!!.!!", "e30.e30.e30"] {
            assert!(verify(bad, &k, 0).is_err(), "{bad}");
        }
        let none_alg = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(1000)).unwrap())
        );
        assert_eq!(verify(&none_alg, &k, 0), Err(TokenError::Algorithm("none".into())));
    }
}
