//! Changes to a version, and applying them to its tree: only the directories on touched paths are loaded and
//! rewritten; every other subtree keeps its hash. Of a large directory stored in pieces (see [`crate::tree`]) only
//! the leaves holding touched names are loaded, and only those, with any a changed cut runs into, are stored anew.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::tree::{
    kind, seal_dir, seal_index, seal_leaf, Cutter, Entry, Extent, Part, Tree, DIR_MODE, FILE_MODE, SYMLINK_MODE,
};
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

/// A directory being edited.
#[derive(Default)]
struct MutDir {
    /// Its entries; for a directory in pieces, those of the loaded leaves.
    entries: BTreeMap<String, Slot>,
    /// For a directory in pieces: its leaves in order, each with whether its entries are in `entries` yet. Empty
    /// when `entries` is the whole directory.
    leaves: Vec<(Part, bool)>,
}

/// Loads a stored tree by hash.
type Load<'a> = dyn FnMut(&str) -> Result<Arc<Tree>, VolumeError> + 'a;

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
    /// An editor over the tree `root` (its stored pieces loaded with `load`).
    pub fn new(mut load: L, root: &str, now_ms: i64) -> Result<Self, VolumeError> {
        let root = MutDir::load(root, &mut load)?;
        Ok(Self { root, load, now_ms })
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
            if !r.recursive && !self.root.is_empty() {
                return Err(VolumeError::FailedPrecondition(format!(
                    "cannot remove {:?}: the volume's root is not empty (set recursive to empty the volume)",
                    r.path
                )));
            }
            self.root = MutDir::default();
            return Ok(());
        };
        let not_found = || VolumeError::NotFound(format!("cannot remove {:?}: no such file or directory", r.path));
        let dir = self.walk(parents, name, false, &r.path)?.ok_or_else(not_found)?;
        let non_empty = match dir.entries.get(*name) {
            None => return Err(not_found()),
            Some(Slot::Entry(e)) => e.is_dir() && e.hash != crate::tree::empty_tree_hash(),
            Some(Slot::Dir { dir, .. }) => !dir.is_empty(),
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
        let dir = self.walk(parents, name, true, &u.path)?.expect("walk with create always yields a directory");
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

    /// The directory at `parts`, loading trees on the way, with the leaf that would hold `name` loaded. With
    /// `create`, missing directories are made; without, a missing one yields `None`.
    fn walk(
        &mut self,
        parts: &[&str],
        name: &str,
        create: bool,
        path: &str,
    ) -> Result<Option<&mut MutDir>, VolumeError> {
        let now = self.now_ms;
        let load = &mut self.load;
        let mut dir = &mut self.root;
        for (i, part) in parts.iter().enumerate() {
            dir.open(part, load)?;
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
                *slot = Slot::Dir { meta: e.clone(), dir: MutDir::load(&e.hash, load)? };
            }
            let Slot::Dir { dir: d, .. } = slot else { unreachable!("converted to a directory above") };
            dir = d;
        }
        dir.open(name, load)?;
        Ok(Some(dir))
    }

    /// Encodes every loaded directory (children first) and returns the new root.
    pub fn finish(mut self) -> Result<Edited, VolumeError> {
        let mut trees = Vec::new();
        let root = std::mem::take(&mut self.root).seal(&mut self.load, &mut trees)?;
        Ok(Edited { root, trees })
    }
}

impl MutDir {
    /// The directory stored at `hash`: a leaf's entries, or, for a directory in pieces, the list of its leaves
    /// (read through its index nodes; the leaves themselves load when a name in them is opened).
    fn load(hash: &str, load: &mut Load<'_>) -> Result<Self, VolumeError> {
        let tree = load(hash)?;
        if !tree.is_index() {
            let entries = tree.entries.iter().map(|e| (e.name.clone(), Slot::Entry(e.clone()))).collect();
            return Ok(Self { entries, leaves: Vec::new() });
        }
        let mut leaves = Vec::new();
        collect_leaves(&tree, load, &mut leaves)?;
        Ok(Self { entries: BTreeMap::new(), leaves: leaves.into_iter().map(|p| (p, false)).collect() })
    }

    /// Makes sure the entry `name` would be in `entries` if it exists: loads the leaf that holds its range.
    fn open(&mut self, name: &str, load: &mut Load<'_>) -> Result<(), VolumeError> {
        if self.leaves.is_empty() {
            return Ok(());
        }
        let i = self.leaves.partition_point(|(p, _)| p.first.as_str() <= name).saturating_sub(1);
        let (part, loaded) = &mut self.leaves[i];
        if !*loaded {
            for e in &load(&part.hash)?.entries {
                self.entries.insert(e.name.clone(), Slot::Entry(e.clone()));
            }
            *loaded = true;
        }
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.leaves.iter().all(|(_, loaded)| *loaded)
    }

    /// Stores what changed (children first); the directory's new hash. A directory in pieces keeps every leaf
    /// that was not loaded and that no changed cut runs into.
    fn seal(self, load: &mut Load<'_>, out: &mut Vec<(String, Vec<u8>)>) -> Result<String, VolumeError> {
        if self.leaves.is_empty() {
            let entries = self.entries.into_values().map(|s| seal_slot(s, load, out)).collect::<Result<_, _>>()?;
            return Ok(seal_dir(entries, out));
        }
        let mut cutter = Cutter::new(0);
        let mut parts = Vec::with_capacity(self.leaves.len());
        let mut edited = self.entries.into_iter().peekable();
        let n = self.leaves.len();
        for (i, (part, loaded)) in self.leaves.iter().enumerate() {
            // A leaf nobody touched, where the cut before it still falls, stays as it is.
            if !*loaded && cutter.at_cut() {
                parts.push(part.clone());
                continue;
            }
            let entries: Vec<Entry> = if *loaded {
                let end = self.leaves.get(i + 1).map(|(p, _)| p.first.as_str());
                let mut mine = Vec::new();
                while let Some((_, slot)) = edited.next_if(|(k, _)| i + 1 == n || end.is_some_and(|e| k.as_str() < e)) {
                    mine.push(seal_slot(slot, load, out)?);
                }
                mine
            } else {
                load(&part.hash)?.entries.clone()
            };
            for e in entries {
                if let Some(piece) = cutter.push(e) {
                    parts.push(seal_leaf(piece, out));
                }
            }
        }
        if let Some(piece) = cutter.finish() {
            parts.push(seal_leaf(piece, out));
        }
        Ok(seal_index(parts, out))
    }
}

fn seal_slot(slot: Slot, load: &mut Load<'_>, out: &mut Vec<(String, Vec<u8>)>) -> Result<Entry, VolumeError> {
    Ok(match slot {
        Slot::Entry(e) => e,
        Slot::Dir { mut meta, dir } => {
            meta.hash = dir.seal(load, out)?;
            meta
        }
    })
}

/// The leaves under an index node, in order.
pub(crate) fn collect_leaves(node: &Tree, load: &mut Load<'_>, out: &mut Vec<Part>) -> Result<(), VolumeError> {
    if node.height <= 1 {
        out.extend(node.parts.iter().cloned());
        return Ok(());
    }
    for p in &node.parts {
        let child = load(&p.hash)?;
        collect_leaves(&child, load, out)?;
    }
    Ok(())
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
        let out = ed.finish().unwrap();
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

    fn files(range: std::ops::Range<usize>) -> Changes {
        Changes { upserts: range.map(|i| file(&format!("big/f{i:05}"), b"x")).collect(), ..Default::default() }
    }

    /// Every entry of the directory at `hash`, joined from its pieces.
    fn all_entries(trees: &HashMap<String, Arc<Tree>>, hash: &str) -> Vec<Entry> {
        let t = &trees[hash];
        if !t.is_index() {
            return t.entries.clone();
        }
        t.parts.iter().flat_map(|p| all_entries(trees, &p.hash)).collect()
    }

    #[test]
    fn a_large_directory_has_the_same_hash_however_it_was_built() {
        let (mut trees, root) = empty();
        let at_once = commit(&mut trees, &root, files(0..3000)).unwrap();
        let mut one_by_one = root.clone();
        // Backwards and in uneven batches, so inserts land before, inside and after existing leaves.
        let mut end: usize = 3000;
        while end > 0 {
            let start = end.saturating_sub(1 + end % 97);
            one_by_one = commit(&mut trees, &one_by_one, files(start..end)).unwrap();
            end = start;
        }
        assert_eq!(one_by_one, at_once);
        let big = trees[&at_once].get("big").unwrap().hash.clone();
        assert!(trees[&big].is_index(), "3,000 entries are stored in pieces");
        let names: Vec<String> = all_entries(&trees, &big).into_iter().map(|e| e.name).collect();
        assert_eq!(names, (0..3000).map(|i| format!("f{i:05}")).collect::<Vec<_>>());

        // Removing every third name (boundaries among them) matches building the rest from scratch.
        let removes = (0..3000).step_by(3).map(|i| Remove { path: format!("big/f{i:05}"), recursive: false }).collect();
        let thinned = commit(&mut trees, &at_once, Changes { removes, ..Default::default() }).unwrap();
        let rest = Changes {
            upserts: (0..3000).filter(|i| i % 3 != 0).map(|i| file(&format!("big/f{i:05}"), b"x")).collect(),
            ..Default::default()
        };
        assert_eq!(thinned, commit(&mut trees, &root, rest).unwrap());
        // And removing everything leaves the empty directory.
        let gone = Changes { removes: vec![Remove { path: "big".into(), recursive: true }], ..Default::default() };
        let emptied = commit(&mut trees, &thinned, gone).unwrap();
        assert!(trees[&emptied].entries.is_empty());
    }

    #[test]
    fn a_one_file_commit_into_a_large_directory_stores_a_leaf_and_its_index_path_not_the_directory() {
        let (mut trees, root) = empty();
        let mut head = commit(&mut trees, &root, files(0..10_000)).unwrap();
        let whole: usize = {
            let big = trees[&head].get("big").unwrap().hash.clone();
            all_entries(&trees, &big).iter().map(prost::Message::encoded_len).sum()
        };
        for i in 0..200 {
            let before = trees.clone();
            head = commit(
                &mut trees,
                &head,
                Changes { upserts: vec![file(&format!("big/n{i}"), b"y")], ..Default::default() },
            )
            .unwrap();
            let stored: usize = trees
                .iter()
                .filter(|(h, _)| !before.contains_key(*h))
                .map(|(_, t)| prost::Message::encoded_len(t.as_ref()))
                .sum();
            // A leaf is 32 entries on average and at most 32 KiB; the index path above it is a few nodes.
            assert!(
                stored < 48 * 1024 && stored * 8 < whole,
                "commit {i} stored {stored} bytes of a {whole}-byte directory"
            );
        }
    }
}
