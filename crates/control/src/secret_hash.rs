//! Slow, salted hashing of client secrets (Argon2id, PHC string format), so a leaked store reveals no secret.

use argon2::{Argon2, PasswordHasher, PasswordVerifier};

use crate::ControlError;

/// Hashes `secret` with a fresh random salt.
pub fn hash(secret: &str) -> Result<String, ControlError> {
    // A fresh random salt from the OS.
    Argon2::default()
        .hash_password(secret.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| ControlError::Internal(format!("hashing a client secret: {e}")))
}

/// Whether `secret` matches `phc` (constant time in the secret). A malformed stored hash never matches.
pub fn verify(secret: &str, phc: &str) -> bool {
    Argon2::default().verify_password(secret.as_bytes(), phc).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_salting() {
        let h1 = hash("hunter2").unwrap();
        let h2 = hash("hunter2").unwrap();
        assert!(h1.starts_with("$argon2id$"), "{h1}");
        assert_ne!(h1, h2, "each hash has its own salt");
        assert!(!h1.contains("hunter2"));
        assert!(verify("hunter2", &h1));
        assert!(verify("hunter2", &h2));
        assert!(!verify("hunter3", &h1));
        assert!(!verify("", &h1));
        assert!(!verify("hunter2", "not a phc string"));
    }
}
