//! Identifiers and the name rules shared by every resource.

use rand::RngExt;

use crate::ControlError;

const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// `len` random characters from `[0-9a-z]`.
pub fn random_token(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

/// A new environment id.
pub fn environment_id() -> String {
    format!("env-{}", random_token(12))
}

/// A new client id.
pub fn client_id() -> String {
    format!("client-{}", random_token(16))
}

/// A new client secret: 40 random characters (~206 bits).
pub fn client_secret() -> String {
    format!("secret-{}", random_token(40))
}

/// Checks a resource name: 1–63 characters of `[a-z0-9-]`, starting and ending with a letter or digit (a DNS
/// label, because names become host names and pod names).
pub fn validate_name(field: &str, name: &str) -> Result<(), ControlError> {
    let ok_chars = name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ok_ends = name.bytes().next().is_some_and(|b| b != b'-') && name.bytes().last().is_some_and(|b| b != b'-');
    if name.is_empty() || name.len() > 63 || !ok_chars || !ok_ends {
        return Err(ControlError::InvalidArgument(format!(
            "{field} {name:?} is not valid: use 1-63 characters of lowercase letters, digits and '-', starting and \
             ending with a letter or digit"
        )));
    }
    Ok(())
}

/// Checks a function's name (the SDK's: a Python identifier, or an explicit name): 1-128 characters of letters,
/// digits, '_', '-' and '.', starting with a letter or '_'.
pub fn validate_function_name(field: &str, name: &str) -> Result<(), ControlError> {
    let ok_chars = name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    let ok_start = name.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if name.len() > 128 || !ok_chars || !ok_start {
        return Err(ControlError::InvalidArgument(format!(
            "{field} {name:?} is not valid: use 1-128 characters of letters, digits, '_', '-' and '.', starting \
             with a letter or '_'"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_names_are_identifiers_or_dns_names() {
        for good in ["normalize_name", "_private", "api-v2", "pkg.fn", "A1"] {
            validate_function_name("function_name", good).unwrap();
        }
        for bad in ["", "1abc", "-a", "a b", "a/b", "a\0", &"x".repeat(129)] {
            let err = validate_function_name("function_name", bad).unwrap_err().to_string();
            assert!(err.contains("is not valid"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn names() {
        for good in ["a", "default", "my-env-2", "0abc"] {
            validate_name("name", good).unwrap();
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"x".repeat(64)] {
            let err = validate_name("name", bad).unwrap_err().to_string();
            assert!(err.contains("is not valid"), "{bad}: {err}");
        }
    }

    #[test]
    fn ids_are_distinct_and_shaped() {
        let a = client_id();
        assert!(a.starts_with("client-") && a.len() == 23);
        assert_ne!(a, client_id());
        assert!(environment_id().starts_with("env-"));
    }
}
