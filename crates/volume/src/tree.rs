//! Directory trees: a version is the hash of its root directory; each directory is an immutable, content-addressed
//! list of entries (files with their content's location, symlinks, and subdirectories by tree hash). A commit
//! rewrites only the directories on the paths it touches, and a fork shares every tree, so neither costs more
//! with the volume's size.

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

/// One directory, entries sorted by name.
#[derive(Clone, PartialEq, Message)]
pub struct Tree {
    /// The entries, sorted by name, names unique.
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<Entry>,
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

impl Tree {
    /// The encoded form and its hash (BLAKE3, hex), the tree's identity.
    pub fn encode_with_hash(&self) -> (Vec<u8>, String) {
        let body = self.encode_to_vec();
        let hash = blake3::hash(&body).to_hex().to_string();
        (body, hash)
    }

    /// The entry named `name`.
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
