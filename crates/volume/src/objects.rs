//! The object store: packs and chunks by BLAKE3 key under one prefix per environment, through the `object_store`
//! crate (a local directory by default; S3, GCS or Azure by URL when built with those backends).

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload};

use crate::key::ObjectKey;
use crate::VolumeError;

/// An object as listed: its key, size and age.
#[derive(Debug, Clone)]
pub struct ListedObject {
    /// The key.
    pub key: ObjectKey,
    /// Size in bytes.
    pub size: u64,
    /// Last modification, unix seconds.
    pub modified: i64,
}

/// A ranged read in progress.
pub struct ObjectRead {
    /// The object's whole size.
    pub total: u64,
    /// The range being returned.
    pub range: Range<u64>,
    /// The bytes, as they arrive.
    pub body: BoxStream<'static, Result<Bytes, VolumeError>>,
}

/// Where volume objects live.
#[derive(Clone)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    location: String,
    /// For a local directory: its path, so that synchronous readers (the FUSE threads) can read objects directly.
    local_root: Option<std::path::PathBuf>,
}

impl Objects {
    /// Objects in the local directory `dir` (created if missing).
    pub fn local(dir: &std::path::Path) -> Result<Self, VolumeError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| VolumeError::Internal(format!("creating the object directory {}: {e}", dir.display())))?;
        let store = LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| VolumeError::Internal(format!("opening the object directory {}: {e}", dir.display())))?;
        Ok(Self {
            store: Arc::new(store),
            prefix: Path::default(),
            location: dir.display().to_string(),
            local_root: Some(dir.to_path_buf()),
        })
    }

    /// Objects at `url`: `file:///path`, or a cloud URL (`s3://bucket/prefix`, …) with `options` (credentials,
    /// region, endpoint) when this build includes that backend.
    pub fn from_url(url: &str, options: &[(String, String)]) -> Result<Self, VolumeError> {
        let parsed = url::Url::parse(url)
            .map_err(|e| VolumeError::InvalidArgument(format!("volume object store URL {url:?}: {e}")))?;
        if parsed.scheme() == "file" {
            let dir = parsed.to_file_path().map_err(|()| {
                VolumeError::InvalidArgument(format!("volume object store URL {url:?}: not a local path"))
            })?;
            return Self::local(&dir);
        }
        let (store, prefix) =
            object_store::parse_url_opts(&parsed, options.iter().map(|(k, v)| (k, v))).map_err(|e| {
                VolumeError::InvalidArgument(format!(
                "volume object store URL {url:?}: {e} (this build serves file:// URLs; cloud stores need the backend \
                 compiled in)"
            ))
            })?;
        Ok(Self { store: Arc::from(store), prefix, location: url.to_string(), local_root: None })
    }

    /// Where the objects are, for messages and `VolumeInfo.object_store_uri`.
    pub fn location(&self) -> &str {
        &self.location
    }

    fn path(&self, env: &str, key: &ObjectKey) -> Path {
        self.env_prefix(env).join(&key.hash()[..2]).join(key.hash())
    }

    fn env_prefix(&self, env: &str) -> Path {
        self.prefix.clone().join(env)
    }

    /// The object's size, or `None` if it is not there.
    pub async fn size(&self, env: &str, key: &ObjectKey) -> Result<Option<u64>, VolumeError> {
        match self.store.head(&self.path(env, key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(storage(e)),
        }
    }

    /// Stores `bytes` as `key` after checking they hash to it; the object becomes visible only whole.
    pub async fn put_verified(&self, env: &str, key: &ObjectKey, bytes: Bytes) -> Result<(), VolumeError> {
        let data = bytes.clone();
        let actual = tokio::task::spawn_blocking(move || blake3::hash(&data).to_hex().to_string())
            .await
            .map_err(|e| VolumeError::Internal(format!("hashing: {e}")))?;
        if actual != key.hash() {
            return Err(VolumeError::InvalidArgument(format!(
                "the uploaded bytes hash to {actual}, not to the object key {key}: the upload was corrupted or sent to \
                 the wrong URL"
            )));
        }
        self.put_trusted(env, key, bytes).await
    }

    /// Stores bytes the server produced itself (their key computed here).
    pub async fn put_trusted(&self, env: &str, key: &ObjectKey, bytes: Bytes) -> Result<(), VolumeError> {
        self.store.put(&self.path(env, key), PutPayload::from_bytes(bytes)).await.map_err(storage)?;
        Ok(())
    }

    /// Stores bytes the server produced itself under their own key, unless that object is there already.
    pub async fn put_if_absent(&self, env: &str, bytes: Bytes) -> Result<ObjectKey, VolumeError> {
        let key = ObjectKey::of(&bytes);
        if self.size(env, &key).await?.is_none() {
            self.put_trusted(env, &key, bytes).await?;
        }
        Ok(key)
    }

    /// Reads `range` of the object (the whole object with `None`).
    pub async fn read(&self, env: &str, key: &ObjectKey, range: Option<Range<u64>>) -> Result<ObjectRead, VolumeError> {
        let opts = GetOptions { range: range.map(GetRange::Bounded), ..Default::default() };
        let got = self.store.get_opts(&self.path(env, key), opts).await.map_err(|e| match e {
            object_store::Error::NotFound { .. } => VolumeError::NotFound(format!("object {key} does not exist")),
            other => storage(other),
        })?;
        let total = got.meta.size;
        let range = got.range.clone();
        Ok(ObjectRead { total, range, body: got.into_stream().map(|r| r.map_err(storage)).boxed() })
    }

    /// Reads `range` of the object into memory.
    pub async fn read_bytes(&self, env: &str, key: &ObjectKey, range: Range<u64>) -> Result<Bytes, VolumeError> {
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        let read = self.read(env, key, Some(range)).await?;
        let chunks: Vec<Bytes> = read.body.collect::<Vec<_>>().await.into_iter().collect::<Result<_, _>>()?;
        if chunks.len() == 1 {
            return Ok(chunks.into_iter().next().expect("one chunk"));
        }
        Ok(Bytes::from(chunks.concat()))
    }

    /// Up to `len` bytes at `offset` of an object, synchronously and without copying them, when the store is a
    /// local directory (`None` otherwise: use [`Objects::read_bytes`]): the range is mapped from the object's file
    /// and its pages brought in at once, so handing them on (to the FUSE device) is the only copy. `offset` must
    /// be a multiple of the page size. Short only at the end of the object.
    pub fn map_local(&self, env: &str, key: &ObjectKey, offset: u64, len: usize) -> Option<std::io::Result<Bytes>> {
        let path = self.local_root.as_ref()?.join(self.path(env, key).as_ref());
        Some((|| {
            let file = std::fs::File::open(path)?;
            let size = file.metadata()?.len();
            let len = size.saturating_sub(offset).min(len as u64) as usize;
            if len == 0 {
                return Ok(Bytes::new());
            }
            // Ask for the whole range at once: faulting the mapping in alone would read it in read-ahead sized
            // pieces (128 KiB on most disks), one after another.
            let _ = nix::fcntl::posix_fadvise(
                &file,
                offset as libc::off_t,
                len as libc::off_t,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
            );
            // SAFETY: the mapping is only ever read, and the file under it never changes: objects are content
            // addressed, written whole to a temporary file and renamed into place, and never rewritten or
            // truncated; deleting one (GC) unlinks its name and leaves the inode mapped here intact. What a
            // mapping cannot turn into an error is a disk failing under it (SIGBUS instead of EIO): a trade made
            // for reads that copy nothing, on a disk the server's own database lives on too.
            let map = unsafe { memmap2::MmapOptions::new().offset(offset).len(len).populate().map(&file)? };
            Ok(Bytes::from_owner(map))
        })())
    }

    /// Every object of an environment.
    pub async fn list(&self, env: &str) -> Result<Vec<ListedObject>, VolumeError> {
        let mut out = Vec::new();
        let mut stream = self.store.list(Some(&self.env_prefix(env)));
        while let Some(meta) = stream.next().await {
            let meta = meta.map_err(storage)?;
            let Some(name) = meta.location.filename() else { continue };
            // Anything that is not a finished object (a temporary file of an interrupted upload) is not listed.
            let Ok(key) = ObjectKey::from_hash(name, "object") else { continue };
            out.push(ListedObject { key, size: meta.size, modified: meta.last_modified.timestamp() });
        }
        Ok(out)
    }

    /// Deletes an object (a missing one is not an error).
    pub async fn delete(&self, env: &str, key: &ObjectKey) -> Result<(), VolumeError> {
        match self.store.delete(&self.path(env, key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(storage(e)),
        }
    }
}

fn storage(e: object_store::Error) -> VolumeError {
    VolumeError::Storage(e.to_string())
}
