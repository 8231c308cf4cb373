//! The keys that seal secret values: one current key in `DATA_DIR/secrets.key` (0600, made on first start), or
//! given in `COMPUTE_SECRETS_KEY`; during a rotation the next key sits beside it in `secrets.key.next` and is
//! the one that seals, while both open.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::TryRng;
use sha2::{Digest, Sha256};

use crate::SecretsError;

/// The key file's name in the data directory.
pub const KEY_FILE: &str = "secrets.key";
/// Where a rotation keeps the next key until every value is sealed under it.
pub const NEXT_KEY_FILE: &str = "secrets.key.next";

const NONCE_LEN: usize = 24;

struct Key {
    id: String,
    cipher: XChaCha20Poly1305,
}

impl Key {
    fn new(bytes: &[u8; 32]) -> Self {
        let digest = Sha256::new_with_prefix(b"compute secrets key\0").chain_update(bytes).finalize();
        let id: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Self { id, cipher: XChaCha20Poly1305::new(bytes.into()) }
    }
}

/// Identity of a key file on disk, to notice when another process (the CLI's rotation) changed it.
type Stamp = Option<(u64, u64, i64, i64)>;

struct Loaded {
    /// Seals; the first of `keys`.
    keys: Vec<Key>,
    stamps: (Stamp, Stamp),
}

enum Source {
    Dir(PathBuf),
    Given { current: [u8; 32], next: Option<[u8; 32]> },
}

/// The sealing keys of one server.
pub struct Keyring {
    source: Source,
    loaded: Mutex<Loaded>,
}

/// Reads a key written as base64 (32 bytes) or as 64 hex digits.
fn decode_key(text: &str, what: &str) -> Result<[u8; 32], SecretsError> {
    let t = text.trim();
    let bytes = if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..32).map(|i| u8::from_str_radix(&t[2 * i..2 * i + 2], 16).expect("hex digits")).collect()
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(t)
            .map_err(|_| SecretsError::BadKey(format!("{what} is neither base64 nor 64 hex digits")))?
    };
    bytes.try_into().map_err(|b: Vec<u8>| {
        SecretsError::BadKey(format!(
            "{what} holds {} bytes; a secrets key is 32 bytes (e.g. `openssl rand -base64 32`)",
            b.len()
        ))
    })
}

fn random_key() -> [u8; 32] {
    let mut k = [0u8; 32];
    rand::rngs::SysRng.try_fill_bytes(&mut k).expect("the OS random number generator works");
    k
}

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.mtime(), m.mtime_nsec()))
}

fn read_key_file(path: &Path) -> Result<Option<[u8; 32]>, SecretsError> {
    let io = |source| SecretsError::Io { what: "reading the secrets key", path: path.into(), source };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretsError::Permissions { path: path.into(), mode });
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    decode_key(&text, &path.display().to_string()).map(Some)
}

/// Writes a new key file (0600) and makes it durable; fails if one is already there.
fn write_key_file(path: &Path, key: &[u8; 32]) -> Result<(), SecretsError> {
    let io = |source| SecretsError::Io { what: "writing the secrets key", path: path.into(), source };
    let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
    let text = base64::engine::general_purpose::STANDARD.encode(key);
    f.write_all(format!("{text}\n").as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    sync_dir(path)
}

fn sync_dir(path: &Path) -> Result<(), SecretsError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|source| SecretsError::Io {
        what: "syncing the directory of",
        path: path.into(),
        source,
    })
}

impl Keyring {
    /// The keyring of a data directory: `secrets.key` there, created (0600) on first use.
    pub fn open_dir(dir: &Path) -> Result<Self, SecretsError> {
        let path = dir.join(KEY_FILE);
        if read_key_file(&path)?.is_none() {
            match write_key_file(&path, &random_key()) {
                Ok(()) => {}
                // Another process made it first: use theirs.
                Err(SecretsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        let source = Source::Dir(dir.to_path_buf());
        let loaded = Self::load(&source)?;
        Ok(Self { source, loaded: Mutex::new(loaded) })
    }

    /// A keyring whose key the operator gives (`COMPUTE_SECRETS_KEY`: base64 or hex of 32 bytes), with the next
    /// key while a rotation is under way.
    pub fn from_key(current: &str, next: Option<&str>) -> Result<Self, SecretsError> {
        let current = decode_key(current, "COMPUTE_SECRETS_KEY")?;
        let next = next.map(|n| decode_key(n, "the next secrets key")).transpose()?;
        let source = Source::Given { current, next };
        let loaded = Self::load(&source)?;
        Ok(Self { source, loaded: Mutex::new(loaded) })
    }

    fn load(source: &Source) -> Result<Loaded, SecretsError> {
        match source {
            Source::Dir(dir) => {
                let (cur, next) = (dir.join(KEY_FILE), dir.join(NEXT_KEY_FILE));
                let stamps = (stamp(&cur), stamp(&next));
                let mut keys = Vec::new();
                if let Some(k) = read_key_file(&next)? {
                    keys.push(Key::new(&k));
                }
                match read_key_file(&cur)? {
                    Some(k) => keys.push(Key::new(&k)),
                    None if !keys.is_empty() => {}
                    None => return Err(SecretsError::BadKey(format!("{} is missing", cur.display()))),
                }
                Ok(Loaded { keys, stamps })
            }
            Source::Given { current, next } => {
                let keys = next.iter().chain(std::iter::once(current)).map(Key::new).collect();
                Ok(Loaded { keys, stamps: (None, None) })
            }
        }
    }

    /// The keys as they are on disk now (reloaded when a rotation by another process changed the files).
    fn keys(&self) -> Result<MutexGuard<'_, Loaded>, SecretsError> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Source::Dir(dir) = &self.source {
            let now = (stamp(&dir.join(KEY_FILE)), stamp(&dir.join(NEXT_KEY_FILE)));
            if now != loaded.stamps {
                *loaded = Self::load(&self.source)?;
            }
        }
        Ok(loaded)
    }

    /// The id of the key that seals now.
    pub fn sealing_key_id(&self) -> Result<String, SecretsError> {
        Ok(self.keys()?.keys[0].id.clone())
    }

    /// Seals `plaintext`, bound to `aad` (the record it belongs to): returns the key's id and nonce‖ciphertext.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<(String, Vec<u8>), SecretsError> {
        let keys = self.keys()?;
        let key = &keys.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::SysRng.try_fill_bytes(&mut nonce).expect("the OS random number generator works");
        let ct = key
            .cipher
            .encrypt(&XNonce::from(nonce), Payload { msg: plaintext, aad })
            .map_err(|_| SecretsError::Decrypt(key.id.clone()))?;
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok((key.id.clone(), out))
    }

    /// Opens what [`Keyring::seal`] sealed under `key_id` with the same `aad`.
    pub fn open(&self, key_id: &str, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SecretsError> {
        let keys = self.keys()?;
        let key = keys.keys.iter().find(|k| k.id == key_id).ok_or_else(|| SecretsError::UnknownKey(key_id.into()))?;
        if sealed.len() < NONCE_LEN {
            return Err(SecretsError::Decrypt(key_id.into()));
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().expect("split at the nonce's length");
        key.cipher
            .decrypt(&XNonce::from(nonce), Payload { msg: ct, aad })
            .map_err(|_| SecretsError::Decrypt(key_id.into()))
    }

    /// Starts a rotation: a next key that seals from now on (both open). In a data directory it is written to
    /// `secrets.key.next`, or the one an interrupted rotation left there is taken up again; a given key's
    /// rotation needs the next key given too. Returns the next key's id.
    pub fn begin_rotation(&self) -> Result<String, SecretsError> {
        match &self.source {
            Source::Dir(dir) => {
                let next = dir.join(NEXT_KEY_FILE);
                if read_key_file(&next)?.is_none() {
                    write_key_file(&next, &random_key())?;
                }
            }
            Source::Given { next: None, .. } => {
                return Err(SecretsError::BadKey(
                    "the secrets key comes from COMPUTE_SECRETS_KEY: give the new key in COMPUTE_SECRETS_KEY_NEXT \
                     to rotate to it"
                        .into(),
                ))
            }
            Source::Given { .. } => {}
        }
        self.sealing_key_id()
    }

    /// Ends a rotation once every value is sealed under the next key: it becomes the only key.
    pub fn finish_rotation(&self) -> Result<(), SecretsError> {
        if let Source::Dir(dir) = &self.source {
            let (cur, next) = (dir.join(KEY_FILE), dir.join(NEXT_KEY_FILE));
            std::fs::rename(&next, &cur).map_err(|source| SecretsError::Io {
                what: "installing the new secrets key",
                path: cur.clone(),
                source,
            })?;
            sync_dir(&cur)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_opens_only_under_its_key_and_record() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::open_dir(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (kid, sealed) = ring.seal(b"env/a", b"hunter2").unwrap();
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(ring.open(&kid, b"env/a", &sealed).unwrap(), b"hunter2");
        assert!(matches!(ring.open(&kid, b"env/b", &sealed), Err(SecretsError::Decrypt(_))));
        assert!(matches!(ring.open("0000", b"env/a", &sealed), Err(SecretsError::UnknownKey(_))));
        // The same directory gives the same key back.
        let again = Keyring::open_dir(dir.path()).unwrap();
        assert_eq!(again.open(&kid, b"env/a", &sealed).unwrap(), b"hunter2");
    }

    #[test]
    fn a_rotation_seals_with_the_next_key_and_then_drops_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::open_dir(dir.path()).unwrap();
        let (old, sealed) = ring.seal(b"r", b"v").unwrap();
        let next = ring.begin_rotation().unwrap();
        assert_ne!(old, next);
        // Begun twice (an interrupted rotation taken up again): the same next key.
        assert_eq!(ring.begin_rotation().unwrap(), next);
        let other_process = Keyring::open_dir(dir.path()).unwrap();
        assert_eq!(other_process.seal(b"r", b"v").unwrap().0, next);
        assert_eq!(ring.open(&old, b"r", &sealed).unwrap(), b"v");
        ring.finish_rotation().unwrap();
        assert!(matches!(ring.open(&old, b"r", &sealed), Err(SecretsError::UnknownKey(_))));
        assert_eq!(other_process.sealing_key_id().unwrap(), next);
    }

    #[test]
    fn keys_are_refused_when_others_can_read_them_or_they_are_not_32_bytes() {
        let dir = tempfile::tempdir().unwrap();
        Keyring::open_dir(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(Keyring::open_dir(dir.path()), Err(SecretsError::Permissions { mode: 0o644, .. })));
        assert!(matches!(Keyring::from_key("c2hvcnQ=", None), Err(SecretsError::BadKey(_))));
        let hex = "00".repeat(32);
        let ring = Keyring::from_key(&hex, None).unwrap();
        assert!(matches!(ring.begin_rotation(), Err(SecretsError::BadKey(_))));
    }
}
