//! A cache of decoded directory trees bounded by the memory they take, not by their number (a few large
//! directories would otherwise hold any amount).
//!
//! Two generations: new and used entries go to the young one; when it reaches half the budget it becomes the old
//! one and the previous old one is dropped. A hit in the old generation moves the entry back to the young one, so
//! what is in use stays and the cache never holds more than the budget, with O(1) work per operation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::tree::Tree;

/// A bounded cache of trees by hash.
pub(crate) struct TreeCache {
    inner: Mutex<Generations>,
    budget: usize,
}

#[derive(Default)]
struct Generations {
    young: HashMap<String, (Arc<Tree>, usize)>,
    young_bytes: usize,
    old: HashMap<String, (Arc<Tree>, usize)>,
}

impl TreeCache {
    /// A cache holding at most about `budget` bytes of trees.
    pub(crate) fn new(budget: usize) -> Self {
        Self { inner: Mutex::default(), budget }
    }

    fn lock(&self) -> MutexGuard<'_, Generations> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The tree, if cached.
    pub(crate) fn get(&self, hash: &str) -> Option<Arc<Tree>> {
        let mut g = self.lock();
        if let Some((t, _)) = g.young.get(hash) {
            return Some(t.clone());
        }
        let (t, size) = g.old.remove(hash)?;
        g.admit(hash.to_string(), t.clone(), size, self.budget);
        Some(t)
    }

    /// Caches a tree (one larger than half the budget is not kept).
    pub(crate) fn insert(&self, hash: &str, tree: Arc<Tree>) {
        let size = approx_bytes(&tree);
        if size <= self.budget / 2 {
            self.lock().admit(hash.to_string(), tree, size, self.budget);
        }
    }

    /// Forgets a tree (it was deleted).
    pub(crate) fn remove(&self, hash: &str) {
        let mut g = self.lock();
        if let Some((_, size)) = g.young.remove(hash) {
            g.young_bytes -= size;
        }
        g.old.remove(hash);
    }

    /// About how many bytes the cached trees take.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        let g = self.lock();
        g.young_bytes + g.old.values().map(|(_, s)| s).sum::<usize>()
    }
}

impl Generations {
    fn admit(&mut self, hash: String, tree: Arc<Tree>, size: usize, budget: usize) {
        if self.young_bytes + size > budget / 2 {
            self.old = std::mem::take(&mut self.young);
            self.young_bytes = 0;
        }
        if let Some((_, old_size)) = self.young.insert(hash, (tree, size)) {
            self.young_bytes -= old_size;
        }
        self.young_bytes += size;
    }
}

/// About how much memory a decoded tree takes.
pub(crate) fn approx_bytes(tree: &Tree) -> usize {
    let entries: usize =
        tree.entries.iter().map(|e| 160 + e.name.len() + e.hash.len() + e.inline.len() + e.extents.len() * 120).sum();
    let parts: usize = tree.parts.iter().map(|p| 80 + p.first.len() + p.hash.len()).sum();
    64 + entries + parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::Entry;

    fn tree(n: usize) -> Arc<Tree> {
        let entries = (0..n).map(|i| Entry { name: format!("f{i}"), ..Default::default() }).collect();
        Arc::new(Tree { entries, ..Default::default() })
    }

    #[test]
    fn the_cache_stays_within_its_budget_whatever_it_is_given() {
        let cache = TreeCache::new(1 << 20);
        for i in 0..10_000 {
            cache.insert(&format!("t{i}"), tree(i % 300));
            assert!(cache.bytes() <= 1 << 20, "{} bytes after {i} inserts", cache.bytes());
        }
    }

    #[test]
    fn a_tree_in_use_survives_a_generation_change() {
        let cache = TreeCache::new(1 << 20);
        cache.insert("hot", tree(10));
        for i in 0..2_000 {
            cache.insert(&format!("t{i}"), tree(20));
            assert!(cache.get("hot").is_some(), "lost after {i} inserts");
        }
        cache.remove("hot");
        assert!(cache.get("hot").is_none());
        // Too large to be worth keeping.
        cache.insert("huge", tree(20_000));
        assert!(cache.get("huge").is_none());
    }
}
