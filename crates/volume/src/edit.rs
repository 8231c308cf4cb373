//! Changes to a version, and applying them to its tree: only the directories on touched paths are loaded and
//! rewritten; every other subtree keeps its hash.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::tree::{kind, Entry, Extent, Tree, DIR_MODE, FILE_MODE, SYMLINK_MODE};
use crate::VolumeError;

/// How an upsert treats an existing path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Create or replace.
    Upsert,
    /// The path must not exist yet.
    Create,
    /// The path must exist already.
    Replace,
}

/// A file's content as a commit names it.
#[derive(Debug, Clone, PartialEq)]
pub enum FileContent {
    /// Zero bytes.
    Empty,
    /// The bytes themselves (small files).
    Inline {
        /// The content.
        data: Vec<u8>,
    },
    /// Ranges of uploaded objects.
    Located {
        /// BLAKE3 of the whole content.
        hash: String,
        /// Total size.
        size: u64,
        /// The ranges, in file order.
        extents: Vec<Extent>,
        /// Uploaded as chunks (else one pack entry).
        chunked: bool,
    },
}

/// What a path becomes.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeSpec {
    /// A regular file.
    File(FileContent),
    /// A directory (children are kept when it exists already).
    Directory,
    /// A symbolic link to `target`.
    Symlink(Vec<u8>),
}

/// Optional metadata; unset fields take defaults (0644/0755, now, root).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    /// Permission bits.
    pub mode: Option<u32>,
    /// Modification time, ms since the epoch.
    pub mtime_ms: Option<i64>,
    /// Owner.
    pub uid: Option<u32>,
    /// Group.
    pub gid: Option<u32>,
}

/// Create or replace one path.
#[derive(Debug, Clone, PartialEq)]
pub struct Upsert {
    /// Relative path, `/`-separated.
    pub path: String,
    /// What it becomes.
    pub node: NodeSpec,
    /// Its metadata.
    pub meta: Metadata,
    /// How an existing path is treated.
    pub mode: WriteMode,
}

/// Remove one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remove {
    /// Relative path.
    pub path: String,
    /// Remove a non-empty directory with everything in it.
    pub recursive: bool,
}

/// The changes of one commit. Removes apply first, then upserts, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Changes {
    /// Paths created or replaced.
    pub upserts: Vec<Upsert>,
    /// Paths removed.
    pub removes: Vec<Remove>,
}

/// Splits a volume path into its components, refusing what could escape or is not a name.
pub fn components<'p>(path: &'p str, field: &str) -> Result<Vec<&'p str>, VolumeError> {
    let bad = |why: &str| VolumeError::InvalidArgument(format!("{field} {path:?} is not a valid volume path: {why}"));
    if path.len() > 4096 {
        return Err(bad("longer than 4096 bytes"));
    }
    if path.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    if path.contains('\\') {
        return Err(bad("contains a backslash; use '/'"));
    }
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    for p in &parts {
        if *p == "." || *p == ".." {
            return Err(bad("'.' and '..' are not allowed"));
        }
        if p.len() > 255 {
            return Err(bad("a component is longer than 255 bytes"));
        }
    }
    Ok(parts)
}

enum Slot {
    Entry(Entry),
    Dir { meta: Entry, dir: MutDir },
}

#[derive(Default)]
struct MutDir {
    entries: BTreeMap<String, Slot>,
}

/// Applies changes to a tree, loading subtrees through `load` and collecting new trees.
pub struct Editor<L> {
    load: L,
    root: MutDir,
    now_ms: i64,
}

/// The result of an edit: the new root and every tree that must be stored for it.
pub struct Edited {
    /// Hash of the new root tree.
    pub root: String,
    /// New trees (hash, encoded body), children before parents.
    pub trees: Vec<(String, Vec<u8>)>,
}

impl<L: FnMut(&str) -> Result<Arc<Tree>, VolumeError>> Editor<L> {
    /// An editor over the tree `root` (loaded with `load`).
    pub fn new(mut load: L, root: &str, now_ms: i64) -> Result<Self, VolumeError> {
        let tree = load(root)?;
        Ok(Self { root: MutDir::from_tree(&tree), load, now_ms })
    }

    /// Applies `changes` in order.
    pub fn apply(&mut self, changes: &Changes) -> Result<(), VolumeError> {
        for r in &changes.removes {
            self.remove(r)?;
        }
        for u in &changes.upserts {
            self.upsert(u)?;
        }
        Ok(())
    }

    fn remove(&mut self, r: &Remove) -> Result<(), VolumeError> {
        let parts = components(&r.path, "removes[].path")?;
        let Some((name, parents)) = parts.split_last() else {
            // The root itself: empty the volume (the SDK's "clear the source volume" intent before a redeploy's
            // upserts, which then apply to the emptied tree in the same commit).
            if !r.recursive && !self.root.entries.is_empty() {
                return Err(VolumeError::FailedPrecondition(format!(
                    "cannot remove {:?}: the volume's root is not empty (set recursive to empty the volume)",
                    r.path
                )));
            }
            self.root.entries.clear();
            return Ok(());
        };
        let not_found = || VolumeError::NotFound(format!("cannot remove {:?}: no such file or directory", r.path));
        let dir = self.walk(parents, false, &r.path)?.ok_or_else(not_found)?;
        let non_empty = match dir.entries.get(*name) {
            None => return Err(not_found()),
            Some(Slot::Entry(e)) => e.is_dir() && e.hash != crate::tree::empty_tree_hash(),
            Some(Slot::Dir { dir, .. }) => !dir.entries.is_empty(),
        };
        if non_empty && !r.recursive {
            return Err(VolumeError::FailedPrecondition(format!(
                "cannot remove {:?}: it is a non-empty directory (set recursive to remove it with its contents)",
                r.path
            )));
        }
        dir.entries.remove(*name);
        Ok(())
    }

    fn upsert(&mut self, u: &Upsert) -> Result<(), VolumeError> {
        let parts = components(&u.path, "upserts[].path")?;
        let Some((name, parents)) = parts.split_last() else {
            return Err(VolumeError::InvalidArgument("upserts[].path is empty: name a file or directory".into()));
        };
        let now = self.now_ms;
        let dir = self.walk(parents, true, &u.path)?.expect("walk with create always yields a directory");
        let exists = dir.entries.contains_key(*name);
        match u.mode {
            WriteMode::Create if exists => {
                return Err(VolumeError::AlreadyExists(format!(
                    "{:?} already exists (write mode CREATE); use UPSERT to replace it",
                    u.path
                )))
            }
            WriteMode::Replace if !exists => {
                return Err(VolumeError::NotFound(format!(
                    "{:?} does not exist (write mode REPLACE); use UPSERT to create it",
                    u.path
                )))
            }
            _ => {}
        }
        let meta = |kind: u32, default_mode: u32| Entry {
            name: name.to_string(),
            kind,
            mode: u.meta.mode.map(|m| m & 0o7777).unwrap_or(default_mode),
            mtime_ms: u.meta.mtime_ms.unwrap_or(now),
            uid: u.meta.uid.unwrap_or(0),
            gid: u.meta.gid.unwrap_or(0),
            ..Default::default()
        };
        let slot = match &u.node {
            NodeSpec::Directory => match dir.entries.remove(*name) {
                // An existing directory keeps its children; only its metadata changes.
                Some(Slot::Dir { dir: d, meta: old }) => {
                    Slot::Dir { meta: Entry { hash: old.hash, ..meta(kind::DIRECTORY, DIR_MODE) }, dir: d }
                }
                Some(Slot::Entry(old)) if old.is_dir() => {
                    Slot::Entry(Entry { hash: old.hash, ..meta(kind::DIRECTORY, DIR_MODE) })
                }
                _ => Slot::Dir { meta: meta(kind::DIRECTORY, DIR_MODE), dir: MutDir::default() },
            },
            NodeSpec::Symlink(target) => Slot::Entry(Entry {
                size: target.len() as u64,
                inline: target.clone(),
                hash: blake3::hash(target).to_hex().to_string(),
                ..meta(kind::SYMLINK, SYMLINK_MODE)
            }),
            NodeSpec::File(content) => {
                let base = meta(kind::FILE, FILE_MODE);
                Slot::Entry(match content {
                    FileContent::Empty => Entry { hash: blake3::hash(b"").to_hex().to_string(), ..base },
                    FileContent::Inline { data } => Entry {
                        size: data.len() as u64,
                        hash: blake3::hash(data).to_hex().to_string(),
                        inline: data.clone(),
                        ..base
                    },
                    FileContent::Located { hash, size, extents, chunked } => {
                        Entry { size: *size, hash: hash.clone(), extents: extents.clone(), chunked: *chunked, ..base }
                    }
                })
            }
        };
        dir.entries.insert(name.to_string(), slot);
        Ok(())
    }

    /// The directory at `parts`, loading trees on the way. With `create`, missing directories are made;
    /// without, a missing one yields `None`.
    fn walk(&mut self, parts: &[&str], create: bool, path: &str) -> Result<Option<&mut MutDir>, VolumeError> {
        let now = self.now_ms;
        let mut dir = &mut self.root;
        for (i, part) in parts.iter().enumerate() {
            if !dir.entries.contains_key(*part) {
                if !create {
                    return Ok(None);
                }
                let meta = Entry {
                    name: part.to_string(),
                    kind: kind::DIRECTORY,
                    mode: DIR_MODE,
                    mtime_ms: now,
                    ..Default::default()
                };
                dir.entries.insert(part.to_string(), Slot::Dir { meta, dir: MutDir::default() });
            }
            let slot = dir.entries.get_mut(*part).expect("present: checked or inserted above");
            if let Slot::Entry(e) = slot {
                if !e.is_dir() {
                    return Err(VolumeError::FailedPrecondition(format!(
                        "{path:?}: {:?} is not a directory",
                        parts[..=i].join("/")
                    )));
                }
                let tree = (self.load)(&e.hash)?;
                *slot = Slot::Dir { meta: e.clone(), dir: MutDir::from_tree(&tree) };
            }
            let Slot::Dir { dir: d, .. } = slot else { unreachable!("converted to a directory above") };
            dir = d;
        }
        Ok(Some(dir))
    }

    /// Encodes every loaded directory (children first) and returns the new root.
    pub fn finish(self) -> Edited {
        let mut trees = Vec::new();
        let root = self.root.seal(&mut trees);
        Edited { root, trees }
    }
}

impl MutDir {
    fn from_tree(tree: &Tree) -> Self {
        Self { entries: tree.entries.iter().map(|e| (e.name.clone(), Slot::Entry(e.clone()))).collect() }
    }

    fn seal(self, out: &mut Vec<(String, Vec<u8>)>) -> String {
        let entries = self
            .entries
            .into_values()
            .map(|slot| match slot {
                Slot::Entry(e) => e,
                Slot::Dir { mut meta, dir } => {
                    meta.hash = dir.seal(out);
                    meta
                }
            })
            .collect();
        let (body, hash) = Tree { entries }.encode_with_hash();
        out.push((hash.clone(), body));
        hash
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn file(path: &str, data: &[u8]) -> Upsert {
        Upsert {
            path: path.into(),
            node: NodeSpec::File(FileContent::Inline { data: data.to_vec() }),
            meta: Metadata { mtime_ms: Some(1), ..Default::default() },
            mode: WriteMode::Upsert,
        }
    }

    /// Applies changes on top of `root`, storing new trees in `trees`.
    fn commit(trees: &mut HashMap<String, Arc<Tree>>, root: &str, changes: Changes) -> Result<String, VolumeError> {
        let snapshot = trees.clone();
        let load = |h: &str| snapshot.get(h).cloned().ok_or_else(|| VolumeError::Internal(format!("no tree {h}")));
        let mut ed = Editor::new(load, root, 1)?;
        ed.apply(&changes)?;
        let out = ed.finish();
        for (h, body) in out.trees {
            trees.insert(h, Arc::new(<Tree as prost::Message>::decode(body.as_slice()).unwrap()));
        }
        Ok(out.root)
    }

    fn empty() -> (HashMap<String, Arc<Tree>>, String) {
        let (_, h) = Tree::default().encode_with_hash();
        (HashMap::from([(h.clone(), Arc::new(Tree::default()))]), h)
    }

    #[test]
    fn untouched_subtrees_keep_their_hash() {
        let (mut trees, root) = empty();
        let v1 = commit(
            &mut trees,
            &root,
            Changes { upserts: vec![file("a/x", b"1"), file("b/y", b"2")], ..Default::default() },
        )
        .unwrap();
        let v2 = commit(&mut trees, &v1, Changes { upserts: vec![file("a/z", b"3")], ..Default::default() }).unwrap();
        let b1 = trees[&v1].get("b").unwrap().hash.clone();
        let b2 = trees[&v2].get("b").unwrap().hash.clone();
        assert_eq!(b1, b2);
        assert_ne!(trees[&v1].get("a").unwrap().hash, trees[&v2].get("a").unwrap().hash);
        // The same content makes the same root, whatever the order of commits.
        let other = commit(
            &mut trees,
            &root,
            Changes { upserts: vec![file("a/z", b"3"), file("b/y", b"2"), file("a/x", b"1")], ..Default::default() },
        )
        .unwrap();
        assert_eq!(trees[&other].get("a").unwrap().hash, trees[&v2].get("a").unwrap().hash);
    }

    #[test]
    fn removes_refuse_non_empty_directories_unless_recursive() {
        let (mut trees, root) = empty();
        let v1 = commit(&mut trees, &root, Changes { upserts: vec![file("d/f", b"1")], ..Default::default() }).unwrap();
        let rm = |recursive| Changes { removes: vec![Remove { path: "d".into(), recursive }], ..Default::default() };
        assert!(matches!(commit(&mut trees, &v1, rm(false)), Err(VolumeError::FailedPrecondition(_))));
        let v2 = commit(&mut trees, &v1, rm(true)).unwrap();
        assert!(trees[&v2].entries.is_empty());
        let missing = Changes { removes: vec![Remove { path: "nope".into(), recursive: false }], ..Default::default() };
        assert!(matches!(commit(&mut trees, &v1, missing), Err(VolumeError::NotFound(_))));
    }

    #[test]
    fn a_recursive_remove_of_the_root_empties_the_volume_before_the_upserts_of_the_same_commit() {
        let (mut trees, root) = empty();
        let v1 = commit(
            &mut trees,
            &root,
            Changes { upserts: vec![file("old/f", b"1"), file("handler.py", b"0")], ..Default::default() },
        )
        .unwrap();
        let not_recursive =
            Changes { removes: vec![Remove { path: "/".into(), recursive: false }], ..Default::default() };
        assert!(matches!(commit(&mut trees, &v1, not_recursive), Err(VolumeError::FailedPrecondition(_))));
        let redeploy = Changes {
            removes: vec![Remove { path: "/".into(), recursive: true }],
            upserts: vec![file("handler.py", b"2"), file("user_module.py", b"3")],
        };
        let v2 = commit(&mut trees, &v1, redeploy).unwrap();
        let names: Vec<&str> = trees[&v2].entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["handler.py", "user_module.py"]);
        let clear = Changes { removes: vec![Remove { path: "".into(), recursive: true }], ..Default::default() };
        let v3 = commit(&mut trees, &v2, clear).unwrap();
        assert!(trees[&v3].entries.is_empty());
    }

    #[test]
    fn write_modes_and_bad_paths() {
        let (mut trees, root) = empty();
        let v1 = commit(&mut trees, &root, Changes { upserts: vec![file("f", b"1")], ..Default::default() }).unwrap();
        let create = Upsert { mode: WriteMode::Create, ..file("f", b"2") };
        assert!(matches!(
            commit(&mut trees, &v1, Changes { upserts: vec![create], ..Default::default() }),
            Err(VolumeError::AlreadyExists(_))
        ));
        let replace = Upsert { mode: WriteMode::Replace, ..file("g", b"2") };
        assert!(matches!(
            commit(&mut trees, &v1, Changes { upserts: vec![replace], ..Default::default() }),
            Err(VolumeError::NotFound(_))
        ));
        for bad in ["../x", "a/./b", "", "a\\b"] {
            let r = commit(&mut trees, &v1, Changes { upserts: vec![file(bad, b"")], ..Default::default() });
            assert!(matches!(r, Err(VolumeError::InvalidArgument(_))), "{bad:?}: {r:?}");
        }
        let under_file = commit(&mut trees, &v1, Changes { upserts: vec![file("f/x", b"")], ..Default::default() });
        assert!(matches!(under_file, Err(VolumeError::FailedPrecondition(_))));
    }
}
