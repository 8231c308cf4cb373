//! Signed blob URLs: the only credential the SDK's native client presents when it PUTs or GETs an object, so the
//! signature binds the operation, the environment, the object and the expiry. HMAC-SHA256 with a server secret.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::key::ObjectKey;

/// What a URL allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobOp {
    /// Upload the object (verified against its key before it becomes visible).
    Put,
    /// Read the object, with or without a Range.
    Get,
}

impl BlobOp {
    fn as_str(self) -> &'static str {
        match self {
            BlobOp::Put => "put",
            BlobOp::Get => "get",
        }
    }

    /// Parses `put` or `get`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "put" => Some(BlobOp::Put),
            "get" => Some(BlobOp::Get),
            _ => None,
        }
    }
}

/// Why a signed URL was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    /// The query lacks `op`, `exp` or `sig`, or one is malformed.
    #[error("the blob URL is not a signed URL this server issued (missing or malformed {0})")]
    Malformed(&'static str),
    /// The signature does not match.
    #[error("the blob URL's signature does not match: it was altered or issued by another server")]
    BadSignature,
    /// The URL's expiry has passed.
    #[error("the blob URL expired at {0} (unix seconds); request a new one")]
    Expired(u64),
    /// The URL was signed for the other operation.
    #[error("the blob URL was signed for {signed:?}, not {used:?}")]
    WrongOp {
        /// What the signature allows.
        signed: &'static str,
        /// What the request does.
        used: &'static str,
    },
}

/// Signs and verifies blob URLs.
#[derive(Clone)]
pub struct UrlSigner {
    secret: Vec<u8>,
}

impl UrlSigner {
    /// A signer with `secret`.
    pub fn new(secret: Vec<u8>) -> Self {
        Self { secret }
    }

    /// The path and query of a URL allowing `op` on `key` of `env` until `expires` (unix seconds).
    pub fn sign(&self, op: BlobOp, env: &str, key: &ObjectKey, expires: u64) -> String {
        let sig = self.signature(op, env, key, expires);
        format!("/v2/blobs/{env}/{key}?op={}&exp={expires}&sig={sig}", op.as_str())
    }

    /// Checks the query of a request for `op` on `key` of `env` at time `now` (unix seconds).
    pub fn verify(&self, used: BlobOp, env: &str, key: &ObjectKey, query: &str, now: u64) -> Result<(), UrlError> {
        let mut op = None;
        let mut exp = None;
        let mut sig = None;
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("op", v)) => op = Some(v),
                Some(("exp", v)) => exp = Some(v),
                Some(("sig", v)) => sig = Some(v),
                _ => {}
            }
        }
        let op = op.and_then(BlobOp::parse).ok_or(UrlError::Malformed("op"))?;
        let exp: u64 = exp.and_then(|e| e.parse().ok()).ok_or(UrlError::Malformed("exp"))?;
        let sig = sig.and_then(decode_hex).ok_or(UrlError::Malformed("sig"))?;
        self.mac(op, env, key, exp).verify_slice(&sig).map_err(|_| UrlError::BadSignature)?;
        if op != used {
            return Err(UrlError::WrongOp { signed: op.as_str(), used: used.as_str() });
        }
        if now > exp {
            return Err(UrlError::Expired(exp));
        }
        Ok(())
    }

    fn mac(&self, op: BlobOp, env: &str, key: &ObjectKey, expires: u64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes keys of any length");
        mac.update(format!("{}\n{env}\n{}\n{expires}", op.as_str(), key.hash()).as_bytes());
        mac
    }

    fn signature(&self, op: BlobOp, env: &str, key: &ObjectKey, expires: u64) -> String {
        let bytes = self.mac(op, env, key, expires).finalize().into_bytes();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(url: &str) -> &str {
        url.split_once('?').unwrap().1
    }

    #[test]
    fn a_signed_url_verifies_until_it_expires() {
        let s = UrlSigner::new(b"secret".to_vec());
        let k = ObjectKey::of(b"data");
        let url = s.sign(BlobOp::Put, "env-1", &k, 1000);
        assert!(url.starts_with(&format!("/v2/blobs/env-1/{k}?")));
        assert_eq!(s.verify(BlobOp::Put, "env-1", &k, query(&url), 999), Ok(()));
        assert_eq!(s.verify(BlobOp::Put, "env-1", &k, query(&url), 1001), Err(UrlError::Expired(1000)));
    }

    #[test]
    fn tampering_with_any_part_is_refused() {
        let s = UrlSigner::new(b"secret".to_vec());
        let k = ObjectKey::of(b"data");
        let url = s.sign(BlobOp::Get, "env-1", &k, 1000);
        let q = query(&url);
        assert_eq!(s.verify(BlobOp::Get, "env-2", &k, q, 0), Err(UrlError::BadSignature));
        assert_eq!(s.verify(BlobOp::Get, "env-1", &ObjectKey::of(b"other"), q, 0), Err(UrlError::BadSignature));
        assert_eq!(
            s.verify(BlobOp::Get, "env-1", &k, &q.replace("exp=1000", "exp=99999"), 0),
            Err(UrlError::BadSignature)
        );
        assert_eq!(s.verify(BlobOp::Put, "env-1", &k, &q.replace("op=get", "op=put"), 0), Err(UrlError::BadSignature));
        assert_eq!(s.verify(BlobOp::Put, "env-1", &k, q, 0), Err(UrlError::WrongOp { signed: "get", used: "put" }));
        assert_eq!(
            UrlSigner::new(b"other".to_vec()).verify(BlobOp::Get, "env-1", &k, q, 0),
            Err(UrlError::BadSignature)
        );
        assert_eq!(s.verify(BlobOp::Get, "env-1", &k, "op=get&exp=1000", 0), Err(UrlError::Malformed("sig")));
    }
}
