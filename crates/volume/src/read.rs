//! Reading versions: path lookup, listings, file content (inline or through signed ranged URLs), and diffs.

use std::sync::Arc;

use bytes::Bytes;
use compute_store::VersionRecord;

use crate::edit::components;
use crate::key::ObjectKey;
use crate::tree::{kind, Entry, Tree, DIR_MODE};
use crate::{Selector, VolumeError, VolumeSel, VolumeStore, VolumeView};

/// A signed, ranged download of part of a file.
#[derive(Debug, Clone)]
pub struct SignedRange {
    /// Absolute URL of the object.
    pub url: String,
    /// Offset of the range in the object.
    pub offset: u64,
    /// Length of the range.
    pub size: u64,
    /// The object's hash (the pack id, or the chunk's hash).
    pub object: String,
    /// The range's own hash when known (chunks).
    pub hash: String,
    /// URL expiry, unix seconds.
    pub expires: u64,
}

/// Where a file's bytes are, as GetFile reports them.
#[derive(Debug, Clone)]
pub enum FileData {
    /// The bytes themselves.
    Bytes(Bytes),
    /// One range of a pack.
    Packed(SignedRange),
    /// Chunks, in file order.
    Chunked(Vec<SignedRange>),
}

/// A file and where its content is.
#[derive(Debug, Clone)]
pub struct FileView {
    /// The volume and version.
    pub view: VolumeView,
    /// Its path.
    pub path: String,
    /// Its entry.
    pub entry: Entry,
    /// Its content.
    pub data: FileData,
}

/// One listed path.
#[derive(Debug, Clone)]
pub struct ListedFile {
    /// Full path in the volume.
    pub path: String,
    /// Its entry.
    pub entry: Entry,
}

/// Paths that differ between two versions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VersionDiff {
    /// In the new version only.
    pub added: Vec<String>,
    /// In both, with different content or metadata.
    pub modified: Vec<String>,
    /// In the old version only.
    pub removed: Vec<String>,
}

impl VolumeStore {
    /// The entry at `path` of a version (`None` if absent). The root is a directory entry named "".
    pub fn lookup(&self, root: &str, path: &str) -> Result<Option<Entry>, VolumeError> {
        let parts = components(path, "path")?;
        let mut entry = Entry { kind: kind::DIRECTORY, mode: DIR_MODE, hash: root.into(), ..Default::default() };
        for part in parts {
            if !entry.is_dir() {
                return Ok(None);
            }
            match self.dir_entry(&entry.hash, part)? {
                Some(e) => entry = e,
                None => return Ok(None),
            }
        }
        Ok(Some(entry))
    }

    /// The file at `path` of the selected version, with its bytes when small and signed URLs otherwise.
    pub async fn get_file(
        &self,
        env: &str,
        sel: &VolumeSel,
        selector: &Selector,
        path: &str,
        base_url: &str,
    ) -> Result<FileView, VolumeError> {
        let view = self.view(env, sel, selector)?;
        let not_found = || VolumeError::NotFound(format!("{path:?} does not exist in volume {:?}", view.volume.name));
        let Some(version) = &view.version else { return Err(not_found()) };
        let entry = self.lookup(&version.root_tree, path)?.ok_or_else(not_found)?;
        if entry.is_dir() {
            return Err(VolumeError::FailedPrecondition(format!(
                "{path:?} is a directory in volume {:?}: list it with ListFiles",
                view.volume.name
            )));
        }
        let data = if entry.extents.is_empty() {
            FileData::Bytes(Bytes::from(entry.inline.clone()))
        } else if entry.size <= self.config.inline_read_max {
            FileData::Bytes(self.read_range(env, &entry, 0, entry.size).await?)
        } else {
            let ranges: Vec<SignedRange> = entry
                .extents
                .iter()
                .map(|e| {
                    let key = ObjectKey::from_hash(&e.object, "object")?;
                    let (url, expires) = self.sign_get(env, &key, base_url);
                    Ok(SignedRange {
                        url,
                        offset: e.offset,
                        size: e.size,
                        object: e.object.clone(),
                        hash: e.hash.clone(),
                        expires,
                    })
                })
                .collect::<Result<_, VolumeError>>()?;
            if entry.chunked || ranges.len() > 1 {
                FileData::Chunked(ranges)
            } else {
                FileData::Packed(ranges.into_iter().next().expect("one extent"))
            }
        };
        Ok(FileView { view, path: components(path, "path")?.join("/"), entry, data })
    }

    /// Reads `len` bytes at `offset` of a file entry (short at the end of the file).
    pub async fn read_range(&self, env: &str, entry: &Entry, offset: u64, len: u64) -> Result<Bytes, VolumeError> {
        let end = offset.saturating_add(len).min(entry.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        if entry.extents.is_empty() {
            return Ok(Bytes::copy_from_slice(&entry.inline[offset as usize..end as usize]));
        }
        let mut parts = Vec::new();
        for (x, range) in entry.object_ranges(offset, end) {
            let key = ObjectKey::from_hash(&x.object, "object")?;
            parts.push(self.objects.read_bytes(env, &key, range).await?);
        }
        Ok(if parts.len() == 1 { parts.pop().expect("one part") } else { Bytes::from(parts.concat()) })
    }

    /// Lists `path` of the selected version: a directory's children (all descendants, depth first, with
    /// `recursive`), or the file itself; at most `limit` from `cursor`. The cursor pins the version, so paging
    /// through a ref that moves meanwhile still yields one consistent listing.
    #[allow(clippy::too_many_arguments)]
    pub fn list_files(
        &self,
        env: &str,
        sel: &VolumeSel,
        selector: &Selector,
        path: &str,
        recursive: bool,
        cursor: &str,
        limit: usize,
    ) -> Result<(VolumeView, Vec<ListedFile>, String), VolumeError> {
        let (selector, skip) = match cursor {
            "" => (selector.clone(), 0),
            c => {
                let parsed = c.split_once(':').and_then(|(v, n)| Some((v.parse().ok()?, n.parse().ok()?)));
                let (v, n): (u64, usize) = parsed.ok_or_else(|| {
                    VolumeError::InvalidArgument(format!("cursor {c:?} is not one this server returned"))
                })?;
                (Selector::Version(v), n)
            }
        };
        let view = self.view(env, sel, &selector)?;
        let limit = limit.clamp(1, 10_000);
        let Some(version) = &view.version else {
            return if components(path, "path")?.is_empty() {
                Ok((view, Vec::new(), String::new()))
            } else {
                Err(VolumeError::NotFound(format!("{path:?} does not exist in volume {:?}", view.volume.name)))
            };
        };
        let prefix = components(path, "path")?.join("/");
        let entry = self.lookup(&version.root_tree, &prefix)?.ok_or_else(|| {
            VolumeError::NotFound(format!("{path:?} does not exist in volume {:?}", view.volume.name))
        })?;
        let mut out = Vec::new();
        let want = skip + limit + 1;
        if entry.is_dir() {
            self.collect(&entry.hash, &prefix, recursive, want, &mut out)?;
        } else {
            out.push(ListedFile { path: prefix, entry });
        }
        let more = out.len() > skip + limit;
        let mut page: Vec<ListedFile> = out.into_iter().skip(skip).take(limit).collect();
        page.shrink_to_fit();
        let next = if more { format!("{}:{}", version.version_id, skip + limit) } else { String::new() };
        Ok((view, page, next))
    }

    /// Appends the entries under `dir`, depth first, until `out` holds `limit`.
    fn collect(
        &self,
        dir: &str,
        prefix: &str,
        recursive: bool,
        limit: usize,
        out: &mut Vec<ListedFile>,
    ) -> Result<(), VolumeError> {
        let tree = self.load_tree(dir)?;
        for e in &tree.entries {
            if out.len() >= limit {
                return Ok(());
            }
            let path = if prefix.is_empty() { e.name.clone() } else { format!("{prefix}/{}", e.name) };
            out.push(ListedFile { path: path.clone(), entry: e.clone() });
            if recursive && e.is_dir() {
                self.collect(&e.hash, &path, true, limit, out)?;
            }
        }
        Ok(())
    }

    /// The files that differ between two versions of a volume.
    pub fn diff(&self, old: Option<&VersionRecord>, new: &VersionRecord) -> Result<VersionDiff, VolumeError> {
        let mut d = VersionDiff::default();
        let empty = crate::tree::empty_tree_hash();
        let old_root = old.map(|v| v.root_tree.as_str()).unwrap_or(&empty);
        self.diff_trees(old_root, &new.root_tree, "", &mut d)?;
        Ok(d)
    }

    fn diff_trees(&self, old: &str, new: &str, prefix: &str, d: &mut VersionDiff) -> Result<(), VolumeError> {
        if old == new {
            return Ok(());
        }
        let (a, b) = (self.load_tree(old)?, self.load_tree(new)?);
        let join = |n: &str| if prefix.is_empty() { n.to_string() } else { format!("{prefix}/{n}") };
        let (mut i, mut j) = (0, 0);
        while i < a.entries.len() || j < b.entries.len() {
            let (ea, eb) = (a.entries.get(i), b.entries.get(j));
            match (ea, eb) {
                (Some(x), Some(y)) if x.name == y.name => {
                    let path = join(&x.name);
                    match (x.is_dir(), y.is_dir()) {
                        (true, true) => self.diff_trees(&x.hash, &y.hash, &path, d)?,
                        (false, false) if x != y => d.modified.push(path),
                        (false, false) => {}
                        (true, false) => {
                            self.all_files(&x.hash, &path, &mut d.removed)?;
                            d.added.push(path);
                        }
                        (false, true) => {
                            d.removed.push(path.clone());
                            self.all_files(&y.hash, &path, &mut d.added)?;
                        }
                    }
                    i += 1;
                    j += 1;
                }
                (Some(x), y) if y.is_none_or(|y| x.name < y.name) => {
                    let path = join(&x.name);
                    if x.is_dir() {
                        self.all_files(&x.hash, &path, &mut d.removed)?;
                    } else {
                        d.removed.push(path);
                    }
                    i += 1;
                }
                (_, Some(y)) => {
                    let path = join(&y.name);
                    if y.is_dir() {
                        self.all_files(&y.hash, &path, &mut d.added)?;
                    } else {
                        d.added.push(path);
                    }
                    j += 1;
                }
                (_, None) => unreachable!("the arms above cover every remaining case"),
            }
        }
        Ok(())
    }

    fn all_files(&self, dir: &str, prefix: &str, out: &mut Vec<String>) -> Result<(), VolumeError> {
        let tree: Arc<Tree> = self.load_tree(dir)?;
        for e in &tree.entries {
            let path = format!("{prefix}/{}", e.name);
            if e.is_dir() {
                self.all_files(&e.hash, &path, out)?;
            } else {
                out.push(path);
            }
        }
        Ok(())
    }
}
