//! Directory trees: a version is the hash of its root directory; each directory is an immutable, content-addressed
//! list of entries (files with their content's location, symlinks, and subdirectories by tree hash). A commit
//! rewrites only the directories on the paths it touches, and a fork shares every tree, so neither costs more
//! with the volume's size.
//!
//! A large directory is stored in pieces, so that a change to it stores a piece and its index path, not the whole
//! directory (a prolly tree): its sorted entries are cut into leaves where [`is_boundary`] says (after an entry
//! whose name hashes to a boundary, or once a leaf reaches [`NODE_BYTES_MAX`]), and the leaves are indexed by
//! nodes whose [`Tree::parts`] name them, cut the same way, level by level, up to one root. The cut depends only on
//! the entries, so the same directory always has the same hash, however it was built; a directory that fits one
//! leaf is that leaf, as before.

use prost::Message;

/// Entry kinds, as stored.
pub mod kind {
    /// A regular file.
    pub const FILE: u32 = 1;
    /// A directory (its `hash` names the subtree).
    pub const DIRECTORY: u32 = 2;
    /// A symbolic link (its target is in `inline`).
    pub const SYMLINK: u32 = 3;
}

/// Default permission bits.
pub const FILE_MODE: u32 = 0o644;
/// Default permission bits of directories.
pub const DIR_MODE: u32 = 0o755;
/// Permission bits of symlinks.
pub const SYMLINK_MODE: u32 = 0o777;

/// One directory, entries sorted by name; or, for a large directory, one index node of it.
#[derive(Clone, PartialEq, Message)]
pub struct Tree {
    /// The entries, sorted by name, names unique (empty in an index node).
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<Entry>,
    /// An index node's children, in name order (empty in a leaf).
    #[prost(message, repeated, tag = "2")]
    pub parts: Vec<Part>,
    /// An index node's height: 1 when its parts are leaves.
    #[prost(uint32, tag = "3")]
    pub height: u32,
}

/// One child of an index node: a leaf, or a lower index node.
#[derive(Clone, PartialEq, Eq, Message)]
pub struct Part {
    /// The first name under it.
    #[prost(string, tag = "1")]
    pub first: String,
    /// Its tree's hash.
    #[prost(string, tag = "2")]
    pub hash: String,
    /// How many entries are under it.
    #[prost(uint64, tag = "3")]
    pub count: u64,
}

/// One name in a directory.
#[derive(Clone, PartialEq, Message)]
pub struct Entry {
    /// The name (one path component).
    #[prost(string, tag = "1")]
    pub name: String,
    /// One of [`kind`].
    #[prost(uint32, tag = "2")]
    pub kind: u32,
    /// Permission bits (no file type bits).
    #[prost(uint32, tag = "3")]
    pub mode: u32,
    /// File size in bytes (0 for directories; the target length for symlinks).
    #[prost(uint64, tag = "4")]
    pub size: u64,
    /// Modification time, ms since the epoch.
    #[prost(int64, tag = "5")]
    pub mtime_ms: i64,
    /// Owner.
    #[prost(uint32, tag = "6")]
    pub uid: u32,
    /// Group.
    #[prost(uint32, tag = "7")]
    pub gid: u32,
    /// Files: BLAKE3 of the content. Directories: the subtree's hash.
    #[prost(string, tag = "8")]
    pub hash: String,
    /// Small file content kept in the tree, or a symlink's target.
    #[prost(bytes = "vec", tag = "9")]
    pub inline: Vec<u8>,
    /// Where a file's bytes are, in file order (empty for inline and empty files).
    #[prost(message, repeated, tag = "10")]
    pub extents: Vec<Extent>,
    /// Whether the client uploaded the content as chunks (reported back as chunked) rather than a pack entry.
    #[prost(bool, tag = "11")]
    pub chunked: bool,
}

/// A byte range of an object.
#[derive(Clone, PartialEq, Message)]
pub struct Extent {
    /// The object's BLAKE3 hash (its key is `xx/<hash>`).
    #[prost(string, tag = "1")]
    pub object: String,
    /// Offset of the range in the object.
    #[prost(uint64, tag = "2")]
    pub offset: u64,
    /// Length of the range.
    #[prost(uint64, tag = "3")]
    pub size: u64,
    /// BLAKE3 of the range when it is a whole chunk (empty for pack entries).
    #[prost(string, tag = "4")]
    pub hash: String,
}

/// How many bits of a name's hash decide a boundary per level: a piece holds 2^5 = 32 entries (or parts) on
/// average.
const BOUNDARY_BITS: u32 = 5;

/// A piece is cut once it reaches this many encoded bytes, boundary or not (large inline files, or names chosen
/// to avoid boundaries).
pub const NODE_BYTES_MAX: usize = 32 * 1024;

/// Whether a piece at `level` (0: leaves) may end after the entry or part named `name`, by the name alone.
pub fn is_boundary(name: &str, level: u32) -> bool {
    let h = blake3::hash(name.as_bytes());
    let bits = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
    (bits >> (BOUNDARY_BITS * level.min(12))) & ((1 << BOUNDARY_BITS) - 1) == 0
}

/// Cuts a sorted run of entries (level 0) or parts (index levels) into pieces, one item at a time: a piece ends
/// after an item whose name is a boundary of the level, or once it reaches [`NODE_BYTES_MAX`]; an index node
/// holds at least two parts, so every level is at most half as long as the one below and the index always ends
/// in one root. Where a piece ends depends only on the items since the previous end, which is what lets an edit
/// recut only the pieces it touches.
pub struct Cutter<T> {
    level: u32,
    piece: Vec<T>,
    bytes: usize,
}

/// What the [`Cutter`] needs to know of an item.
pub trait Cuttable {
    /// The name the boundary rule hashes.
    fn name(&self) -> &str;
    /// Its size in a stored piece, near enough.
    fn size(&self) -> usize;
}

impl Cuttable for Entry {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> usize {
        self.encoded_len()
    }
}

impl Cuttable for Part {
    fn name(&self) -> &str {
        &self.first
    }
    fn size(&self) -> usize {
        self.encoded_len()
    }
}

impl<T: Cuttable> Cutter<T> {
    /// A cutter for `level` (0: leaves of entries).
    pub fn new(level: u32) -> Self {
        Self { level, piece: Vec::new(), bytes: 0 }
    }

    /// Whether the last item pushed ended a piece (or none was pushed).
    pub fn at_cut(&self) -> bool {
        self.piece.is_empty()
    }

    /// Adds the next item; the piece it completes, if it does.
    pub fn push(&mut self, item: T) -> Option<Vec<T>> {
        self.bytes += item.size();
        let min = if self.level == 0 { 1 } else { 2 };
        let end = self.bytes >= NODE_BYTES_MAX || is_boundary(item.name(), self.level);
        self.piece.push(item);
        if end && self.piece.len() >= min {
            self.bytes = 0;
            return Some(std::mem::take(&mut self.piece));
        }
        None
    }

    /// The last, unfinished piece.
    pub fn finish(self) -> Option<Vec<T>> {
        (!self.piece.is_empty()).then_some(self.piece)
    }
}

/// Stores one leaf of entries; the part naming it.
pub fn seal_leaf(entries: Vec<Entry>, out: &mut Vec<(String, Vec<u8>)>) -> Part {
    let first = entries.first().map(|e| e.name.clone()).unwrap_or_default();
    let count = entries.len() as u64;
    let (body, hash) = Tree { entries, ..Default::default() }.encode_with_hash();
    out.push((hash.clone(), body));
    Part { first, hash, count }
}

/// Builds the index over a directory's leaves, in order, level by level; the directory's hash (a lone leaf is the
/// directory itself; none is the empty directory).
pub fn seal_index(mut parts: Vec<Part>, out: &mut Vec<(String, Vec<u8>)>) -> String {
    let mut height = 1;
    loop {
        match parts.len() {
            0 => return empty_tree_hash(),
            1 => return parts.remove(0).hash,
            _ => {}
        }
        let mut cutter = Cutter::new(height);
        let mut next = Vec::new();
        let mut node = |children: Vec<Part>| {
            let first = children[0].first.clone();
            let count = children.iter().map(|p| p.count).sum();
            let (body, hash) = Tree { parts: children, height, ..Default::default() }.encode_with_hash();
            out.push((hash.clone(), body));
            next.push(Part { first, hash, count });
        };
        for p in parts {
            if let Some(children) = cutter.push(p) {
                node(children);
            }
        }
        if let Some(children) = cutter.finish() {
            node(children);
        }
        parts = next;
        height += 1;
    }
}

/// Stores a whole directory (sorted entries) in its canonical pieces; its hash.
pub fn seal_dir(entries: Vec<Entry>, out: &mut Vec<(String, Vec<u8>)>) -> String {
    if entries.is_empty() {
        let (body, hash) = Tree::default().encode_with_hash();
        out.push((hash.clone(), body));
        return hash;
    }
    let mut cutter = Cutter::new(0);
    let mut leaves = Vec::new();
    for e in entries {
        if let Some(piece) = cutter.push(e) {
            leaves.push(seal_leaf(piece, out));
        }
    }
    if let Some(piece) = cutter.finish() {
        leaves.push(seal_leaf(piece, out));
    }
    seal_index(leaves, out)
}

impl Tree {
    /// The encoded form and its hash (BLAKE3, hex), the tree's identity.
    pub fn encode_with_hash(&self) -> (Vec<u8>, String) {
        let body = self.encode_to_vec();
        let hash = blake3::hash(&body).to_hex().to_string();
        (body, hash)
    }

    /// Whether this is an index node of a large directory (its entries are in the trees its parts name).
    pub fn is_index(&self) -> bool {
        !self.parts.is_empty()
    }

    /// Which part of an index node holds `name`, if it is anywhere: the last one that starts at or before it.
    pub fn part_for(&self, name: &str) -> usize {
        self.parts.partition_point(|p| p.first.as_str() <= name).saturating_sub(1)
    }

    /// The entry named `name` (in a leaf).
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.binary_search_by(|e| e.name.as_str().cmp(name)).ok().map(|i| &self.entries[i])
    }
}

impl Entry {
    /// Whether this is a directory.
    pub fn is_dir(&self) -> bool {
        self.kind == kind::DIRECTORY
    }

    /// Whether this is a regular file.
    pub fn is_file(&self) -> bool {
        self.kind == kind::FILE
    }

    /// Whether this is a symbolic link.
    pub fn is_symlink(&self) -> bool {
        self.kind == kind::SYMLINK
    }

    /// The object byte ranges holding file bytes `offset..end` (clamped to the file), in file order:
    /// `(extent, object range)`. Empty for inline content.
    pub fn object_ranges(&self, offset: u64, end: u64) -> impl Iterator<Item = (&Extent, std::ops::Range<u64>)> {
        let end = end.min(self.size);
        let mut pos = 0u64;
        self.extents.iter().filter_map(move |x| {
            let (start, stop) = (pos, pos + x.size);
            pos = stop;
            if stop <= offset || start >= end {
                return None;
            }
            Some((x, x.offset + (offset.max(start) - start)..x.offset + (end.min(stop) - start)))
        })
    }
}

/// The hash of the empty directory.
pub fn empty_tree_hash() -> String {
    Tree::default().encode_with_hash().1
}
