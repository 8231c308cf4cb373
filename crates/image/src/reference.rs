//! Parsing the base image references the SDK sends (`python:3.14-slim-trixie`, `debian:bookworm-slim`, ...).

use crate::ImageError;

/// A Debian suite and the Python it ships as `python3.X`.
const SUITES: &[(&str, &str)] = &[("bookworm", "3.11"), ("trixie", "3.13"), ("sid", "3.14")];

/// Which distribution release a base uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Distro {
    /// Debian suite.
    pub suite: String,
}

/// A base image this provider can build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseRef {
    /// The reference as given.
    pub reference: String,
    /// The suite whose packages make the root filesystem.
    pub suite: String,
    /// `Some("3.13")` for python images.
    pub python: Option<String>,
    /// The suite the reference named, when a different one had to provide the Python.
    pub requested_suite: Option<String>,
}

impl BaseRef {
    /// Whether `reference` names one of the images the Debian provider builds (Docker Hub's `python` or `debian`),
    /// whatever its tag.
    pub fn covers(reference: &str) -> bool {
        let r = reference.trim();
        let short = r.trim_start_matches("docker.io/").trim_start_matches("library/");
        let name = short.split([':', '@']).next().unwrap_or(short);
        name == "python" || name == "debian"
    }

    /// Parses `python:X.Y[-slim][-SUITE]` and `debian:SUITE[-slim]`, optionally prefixed with
    /// `docker.io/library/` or `library/`.
    pub fn parse(reference: &str) -> Result<BaseRef, ImageError> {
        let r = reference.trim();
        let short = r.trim_start_matches("docker.io/").trim_start_matches("library/");
        let (name, tag) = short.split_once(':').unwrap_or((short, "latest"));
        let tag = tag.split('@').next().unwrap_or(tag);
        let unsupported = |why: &str| {
            ImageError::Unsupported(format!(
                "image {reference:?}: {why}. This server builds python:X.Y-slim-SUITE and debian:SUITE[-slim] from the \
                 Debian archive (suites: bookworm = Python 3.11, trixie = 3.13, sid = 3.14)"
            ))
        };
        match name {
            "python" => {
                let mut parts = tag.split('-');
                let version = parts.next().unwrap_or("");
                let minor: String = version.split('.').take(2).collect::<Vec<_>>().join(".");
                if minor.split('.').count() != 2
                    || !minor.split('.').all(|p| p.chars().all(|c| c.is_ascii_digit()) && !p.is_empty())
                {
                    return Err(unsupported("the tag must start with a Python version such as 3.13"));
                }
                let rest: Vec<&str> = parts.filter(|p| *p != "slim").collect();
                let requested = match rest.as_slice() {
                    [] => None,
                    [suite] if SUITES.iter().any(|(s, _)| s == suite) => Some(suite.to_string()),
                    [other] => return Err(unsupported(&format!("unknown Debian suite {other:?}"))),
                    _ => return Err(unsupported("unrecognised tag")),
                };
                let Some((suite, _)) = SUITES.iter().find(|(_, py)| *py == minor) else {
                    return Err(ImageError::Unsupported(format!(
                        "image {reference:?}: no Debian suite ships Python {minor} (bookworm has 3.11, trixie 3.13, sid 3.14). \
                         Use one of those versions, or have the operator map this image to another with an alias \
                         (image_aliases = {{ {reference:?} = \"python:3.13-slim-trixie\" }} in the settings)"
                    )));
                };
                let suite = suite.to_string();
                let requested_suite = requested.filter(|r| *r != suite);
                Ok(BaseRef { reference: reference.into(), suite, python: Some(minor), requested_suite })
            }
            "debian" => {
                let suite = tag.trim_end_matches("-slim");
                let suite = if suite == "latest" || suite == "stable" { "bookworm" } else { suite };
                if !SUITES.iter().any(|(s, _)| *s == suite) {
                    return Err(unsupported(&format!("unknown Debian suite {suite:?}")));
                }
                Ok(BaseRef { reference: reference.into(), suite: suite.into(), python: None, requested_suite: None })
            }
            _ => Err(unsupported("the Debian provider builds only python and debian images")),
        }
    }

    /// Directory name in the layer store.
    pub fn cache_key(&self) -> String {
        match &self.python {
            Some(py) => format!("python-{py}-{}", self.suite),
            None => format!("debian-{}", self.suite),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_references() {
        let b = BaseRef::parse("python:3.13-slim-trixie").unwrap();
        assert_eq!((b.suite.as_str(), b.python.as_deref(), b.requested_suite), ("trixie", Some("3.13"), None));
        let b = BaseRef::parse("python:3.14-slim-trixie").unwrap();
        assert_eq!((b.suite.as_str(), b.requested_suite.as_deref()), ("sid", Some("trixie")));
        let b = BaseRef::parse("docker.io/library/python:3.11-slim").unwrap();
        assert_eq!(b.suite, "bookworm");
        assert_eq!(BaseRef::parse("python:3.13.2-slim-trixie").unwrap().python.as_deref(), Some("3.13"));
        assert_eq!(b.cache_key(), "python-3.11-bookworm");
    }

    #[test]
    fn unavailable_python_is_a_clear_error() {
        let err = BaseRef::parse("python:3.12-slim-trixie").unwrap_err().to_string();
        assert!(err.contains("no Debian suite ships Python 3.12"), "{err}");
        assert!(err.contains("alias"), "{err}");
        for bad in ["python:latest", "python:3-slim", "python:3.13-slim-jammy", "ubuntu:24.04", "python"] {
            assert!(BaseRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn debian_references() {
        assert_eq!(BaseRef::parse("debian:bookworm-slim").unwrap().suite, "bookworm");
        assert_eq!(BaseRef::parse("debian:trixie").unwrap().python, None);
    }
}
