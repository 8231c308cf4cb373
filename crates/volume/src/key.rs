//! Object keys: the SDK's content addresses, `"<first two hex digits>/<BLAKE3 hex>"`.

use std::fmt;

use crate::VolumeError;

/// A validated object key: the lowercase hex BLAKE3 hash of the object's bytes, stored under its two-digit
/// fan-out directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    hash: String,
}

impl ObjectKey {
    /// Parses `"xx/<64 hex>"`, checking that the fan-out prefix matches the hash. `field` names the request field
    /// for the error message.
    pub fn parse(key: &str, field: &str) -> Result<Self, VolumeError> {
        let bad = || {
            VolumeError::InvalidArgument(format!(
                "{field} {key:?} is not an object key: expected \"<2 hex>/<64 hex BLAKE3>\" with the prefix equal to \
                 the hash's first two digits"
            ))
        };
        let (prefix, hash) = key.split_once('/').ok_or_else(bad)?;
        if !is_hash(hash) || prefix.len() != 2 || !hash.starts_with(prefix) {
            return Err(bad());
        }
        Ok(Self { hash: hash.to_string() })
    }

    /// The key of the object with this BLAKE3 hash (lowercase hex).
    pub fn from_hash(hash: &str, field: &str) -> Result<Self, VolumeError> {
        if !is_hash(hash) {
            return Err(VolumeError::InvalidArgument(format!(
                "{field} {hash:?} is not a 64-digit lowercase hex BLAKE3 hash"
            )));
        }
        Ok(Self { hash: hash.to_string() })
    }

    /// The key of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self { hash: blake3::hash(bytes).to_hex().to_string() }
    }

    /// The BLAKE3 hash, lowercase hex.
    pub fn hash(&self) -> &str {
        &self.hash
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", &self.hash[..2], self.hash)
    }
}

/// Whether `s` is 64 lowercase hex digits.
pub fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_the_sdk_form() {
        let k = ObjectKey::of(b"hello\n");
        let s = k.to_string();
        assert_eq!(ObjectKey::parse(&s, "object_key").unwrap(), k);
        assert_eq!(&s[..3], &format!("{}/", &k.hash()[..2]));
    }

    #[test]
    fn rejects_mismatched_prefix_and_bad_hex() {
        let h = ObjectKey::of(b"x").hash().to_string();
        let wrong = if h.starts_with("00") { "01" } else { "00" };
        assert!(ObjectKey::parse(&format!("{wrong}/{h}"), "k").is_err());
        assert!(ObjectKey::parse(&h, "k").is_err());
        assert!(ObjectKey::parse(&format!("{}/{}", &h[..2], h.to_uppercase()), "k").is_err());
        assert!(ObjectKey::parse("ab/../../etc/passwd", "k").is_err());
    }
}
