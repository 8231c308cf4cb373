//! Garbage collection: mark every tree and object reachable from a live version, then delete the rest that is
//! older than the grace period. Commits wait while it runs, so nothing it sweeps can become referenced meanwhile;
//! an object uploaded but not committed yet is protected by its age, and a version a mount reads from by its hold.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use compute_store::now_millis;

use crate::key::ObjectKey;
use crate::{VolumeError, VolumeSel, VolumeStore};

/// What a collection removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Versions past retention that no ref pointed at.
    pub versions_pruned: usize,
    /// Directory trees no version reaches.
    pub trees_deleted: usize,
    /// Objects no version references.
    pub objects_deleted: usize,
    /// Their bytes.
    pub bytes_freed: u64,
    /// Objects still referenced (kept).
    pub objects_kept: usize,
}

/// The version trees in use by mounts, by (environment, root tree hash), with how many mounts use each.
pub(crate) type Held = Arc<Mutex<HashMap<(String, String), usize>>>;

/// Keeps one version's tree, and every tree and object under it, from garbage collection while it lives, and that
/// version from retention: a mount reads from it. Made by [`VolumeStore::hold_version`]; released on drop.
#[derive(Debug)]
pub struct TreeHold {
    held: Held,
    key: (String, String),
}

impl Drop for TreeHold {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

impl VolumeStore {
    /// Holds the tree `root` of environment `env` (see [`TreeHold`]).
    pub(crate) fn hold_tree(&self, env: &str, root: &str) -> TreeHold {
        let key = (env.to_string(), root.to_string());
        *self.held.lock().unwrap_or_else(|p| p.into_inner()).entry(key.clone()).or_insert(0) += 1;
        TreeHold { held: self.held.clone(), key }
    }

    /// Holds a version of a volume against garbage collection and retention while the hold lives (what a mount
    /// of it does).
    pub fn hold_version(&self, env: &str, volume: &VolumeSel, version: u64) -> Result<TreeHold, VolumeError> {
        let view = self.view(env, volume, &crate::Selector::Version(version))?;
        let root = view.version.map(|v| v.root_tree).unwrap_or_else(crate::tree::empty_tree_hash);
        Ok(self.hold_tree(env, &root))
    }

    /// Collects garbage, treating everything younger than `grace` (the configured grace when `None`) as live.
    pub async fn gc(&self, grace: Option<Duration>) -> Result<GcReport, VolumeError> {
        let grace = grace.unwrap_or(self.config.gc_grace);
        let _exclusive = self.gc_lock.write().await;
        let mut report = GcReport::default();
        let now_ms = now_millis();
        let cutoff_ms = now_ms - grace.as_millis() as i64;

        let volumes = self.store.read(|r| r.volumes().all())?;
        // Trees mounts read from stay, and so do their versions.
        let held: Vec<(String, String)> = self.held.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        if let Some(retention) = self.config.retention {
            let before = now_ms - retention.as_millis() as i64;
            for v in &volumes {
                let keep: HashSet<String> =
                    held.iter().filter(|(env, _)| *env == v.environment_id).map(|(_, root)| root.clone()).collect();
                report.versions_pruned += self.store.write(|r| r.volumes().prune_versions(&v.id, before, &keep))?;
            }
        }

        // Mark: trees globally, objects per environment (each environment has its own object prefix).
        let mut live_trees: HashSet<String> = HashSet::new();
        let mut live_objects: HashMap<String, HashSet<String>> = HashMap::new();
        let mut walked: HashSet<(String, String)> = HashSet::new();
        let versions_by_env = self.store.read(|r| {
            let mut out: Vec<(String, String)> = Vec::new();
            for v in &volumes {
                for ver in r.volumes().versions(&v.id, None, None, usize::MAX >> 1)? {
                    out.push((v.environment_id.clone(), ver.root_tree));
                }
            }
            Ok(out)
        })?;
        for (env, root) in versions_by_env.into_iter().chain(held) {
            let objects = live_objects.entry(env.clone()).or_default();
            let mut stack = vec![root];
            while let Some(hash) = stack.pop() {
                if !walked.insert((env.clone(), hash.clone())) {
                    continue;
                }
                live_trees.insert(hash.clone());
                let tree = self.load_node(&hash)?;
                stack.extend(tree.parts.iter().map(|p| p.hash.clone()));
                for e in &tree.entries {
                    if e.is_dir() {
                        stack.push(e.hash.clone());
                    }
                    for x in &e.extents {
                        objects.insert(x.object.clone());
                    }
                }
            }
        }
        live_trees.insert(crate::tree::empty_tree_hash());

        // Sweep trees.
        let old_trees = self.store.read(|r| r.volumes().tree_hashes_before(cutoff_ms))?;
        let dead: Vec<String> = old_trees.into_iter().filter(|h| !live_trees.contains(h)).collect();
        if !dead.is_empty() {
            self.store.write(|r| {
                for h in &dead {
                    r.volumes().delete_tree(h)?;
                }
                Ok(())
            })?;
            for h in &dead {
                self.nodes.remove(h);
                self.dirs.remove(h);
            }
        }
        report.trees_deleted = dead.len();

        // Sweep objects of every environment, including ones whose volumes are all gone.
        let envs = self.store.read(|r| r.environments().list())?;
        let cutoff_s = cutoff_ms / 1000;
        for env in envs {
            let live = live_objects.get(&env.id);
            for obj in self.objects.list(&env.id).await? {
                if live.is_some_and(|l| l.contains(obj.key.hash())) {
                    report.objects_kept += 1;
                    continue;
                }
                // Object times have one-second granularity (S3's Last-Modified): one from the cutoff's own second
                // is as old as the grace asks, so a grace of zero sweeps what was written a moment ago too.
                if obj.modified > cutoff_s {
                    continue;
                }
                self.objects.delete(&env.id, &obj.key).await?;
                report.objects_deleted += 1;
                report.bytes_freed += obj.size;
            }
        }
        tracing::info!(?report, "volume garbage collection done");
        Ok(report)
    }

    /// How many directory trees the store holds, and their bytes (for tests, benchmarks and tools).
    pub fn tree_totals(&self) -> Result<(u64, u64), VolumeError> {
        Ok(self.store.read(|r| r.volumes().tree_totals())?)
    }

    /// Whether an object is stored for `env` (for tests and tools).
    pub async fn has_object(&self, env: &str, key: &ObjectKey) -> Result<bool, VolumeError> {
        Ok(self.objects.size(env, key).await?.is_some())
    }
}
