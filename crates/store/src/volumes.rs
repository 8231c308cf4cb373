use rusqlite::{Connection, OptionalExtension, Row};

use crate::{Result, StoreError};

/// A named volume of one environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecord {
    /// Server-assigned id (`vol-…`).
    pub id: String,
    /// The environment it belongs to.
    pub environment_id: String,
    /// Unique within the environment.
    pub name: String,
    /// `data` or `source_code`.
    pub kind: String,
    /// Creation time, ms since the epoch.
    pub created_at: i64,
}

/// One immutable version of a volume: a root directory tree, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRecord {
    /// The volume.
    pub volume_id: String,
    /// Numbered from 1 within the volume.
    pub version_id: u64,
    /// The version the commit was applied on, if any.
    pub parent_id: Option<u64>,
    /// The ref the commit advanced.
    pub ref_name: String,
    /// Hash of the root tree (see `volume_trees`).
    pub root_tree: String,
    /// The client's commit id (idempotency key).
    pub commit_id: String,
    /// Who committed, as the client reported it.
    pub author: String,
    /// The first pack the commit referenced, if any.
    pub primary_pack_id: String,
    /// Commit time, ms since the epoch.
    pub created_at: i64,
}

/// A named pointer to a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefRecord {
    /// The volume.
    pub volume_id: String,
    /// Ref name (`main`, or a fork's name).
    pub name: String,
    /// The version it points at.
    pub version_id: u64,
    /// How many times the ref has moved (1 after its first commit or creation).
    pub sequence_number: u64,
    /// Commit id of the version it points at.
    pub commit_id: String,
    /// For a fork, the version it was created from.
    pub parent_version_id: Option<u64>,
    /// Last move, ms since the epoch.
    pub updated_at: i64,
}

/// Repository of volumes, their versions, refs and directory trees.
pub struct Volumes<'c> {
    conn: &'c Connection,
}

const VOLUME_COLS: &str = "id, environment_id, name, kind, created_at";
const VERSION_COLS: &str =
    "volume_id, version_id, parent_id, ref, root_tree, commit_id, author, primary_pack_id, created_at";
const REF_COLS: &str = "volume_id, name, version_id, sequence_number, commit_id, parent_version_id, updated_at";

impl<'c> Volumes<'c> {
    pub(crate) fn new(conn: &'c Connection) -> Self {
        Self { conn }
    }

    /// Inserts a volume; a taken name fails with [`StoreError::AlreadyExists`].
    pub fn insert(&self, v: &VolumeRecord) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO volumes (id, environment_id, name, kind, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                (&v.id, &v.environment_id, &v.name, &v.kind, v.created_at),
            )
            .map_err(|e| StoreError::on_insert(e, || format!("volume {:?}", v.name)))?;
        Ok(())
    }

    /// The volume named `name` in `environment_id`.
    pub fn get_by_name(&self, environment_id: &str, name: &str) -> Result<Option<VolumeRecord>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {VOLUME_COLS} FROM volumes WHERE environment_id = ?1 AND name = ?2"))?;
        Ok(stmt.query_row((environment_id, name), volume_row).optional()?)
    }

    /// The volume with id `id` in `environment_id`.
    pub fn get(&self, environment_id: &str, id: &str) -> Result<Option<VolumeRecord>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {VOLUME_COLS} FROM volumes WHERE environment_id = ?1 AND id = ?2"))?;
        Ok(stmt.query_row((environment_id, id), volume_row).optional()?)
    }

    /// Volumes of an environment whose name starts with `prefix` and sorts after `after`, by name.
    pub fn list(&self, environment_id: &str, prefix: &str, after: &str, limit: usize) -> Result<Vec<VolumeRecord>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {VOLUME_COLS} FROM volumes WHERE environment_id = ?1 AND name > ?2 AND substr(name, 1, length(?3)) = ?3 \
             ORDER BY name LIMIT ?4"
        ))?;
        let rows = stmt.query_map((environment_id, after, prefix, limit as i64), volume_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Every volume of every environment (for garbage collection).
    pub fn all(&self) -> Result<Vec<VolumeRecord>> {
        let mut stmt = self.conn.prepare_cached(&format!("SELECT {VOLUME_COLS} FROM volumes ORDER BY id"))?;
        let rows = stmt.query_map([], volume_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Deletes a volume with its versions and refs (trees and objects are left to garbage collection).
    pub fn delete(&self, id: &str) -> Result<bool> {
        Ok(self.conn.execute("DELETE FROM volumes WHERE id = ?1", [id])? > 0)
    }

    /// Takes the next version number of a volume.
    pub fn allocate_version(&self, volume_id: &str) -> Result<u64> {
        let n: i64 = self.conn.query_row(
            "UPDATE volumes SET next_version = next_version + 1 WHERE id = ?1 RETURNING next_version - 1",
            [volume_id],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    /// Records a version.
    pub fn insert_version(&self, v: &VersionRecord) -> Result<()> {
        self.conn
            .execute(
                &format!("INSERT INTO volume_versions ({VERSION_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
                rusqlite::params![
                    v.volume_id,
                    v.version_id as i64,
                    v.parent_id.map(|p| p as i64),
                    v.ref_name,
                    v.root_tree,
                    v.commit_id,
                    v.author,
                    v.primary_pack_id,
                    v.created_at
                ],
            )
            .map_err(|e| StoreError::on_insert(e, || format!("commit {:?}", v.commit_id)))?;
        Ok(())
    }

    /// One version.
    pub fn version(&self, volume_id: &str, version_id: u64) -> Result<Option<VersionRecord>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {VERSION_COLS} FROM volume_versions WHERE volume_id = ?1 AND version_id = ?2"
        ))?;
        Ok(stmt.query_row((volume_id, version_id as i64), version_row).optional()?)
    }

    /// The version a commit id produced.
    pub fn version_by_commit(&self, volume_id: &str, commit_id: &str) -> Result<Option<VersionRecord>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {VERSION_COLS} FROM volume_versions WHERE volume_id = ?1 AND commit_id = ?2"
        ))?;
        Ok(stmt.query_row((volume_id, commit_id), version_row).optional()?)
    }

    /// Versions newest first, below `before` (exclusive; `None` for the newest), optionally of one ref only.
    pub fn versions(
        &self,
        volume_id: &str,
        ref_name: Option<&str>,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<VersionRecord>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {VERSION_COLS} FROM volume_versions WHERE volume_id = ?1 AND (?2 IS NULL OR ref = ?2) \
             AND version_id < ?3 ORDER BY version_id DESC LIMIT ?4"
        ))?;
        let before = before.map(|b| b as i64).unwrap_or(i64::MAX);
        let rows = stmt.query_map((volume_id, ref_name, before, limit as i64), version_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Deletes versions created before `cutoff` that no ref points at and whose root tree is not in `keep_roots`
    /// (trees live mounts read from). Returns how many went.
    pub fn prune_versions(
        &self,
        volume_id: &str,
        cutoff: i64,
        keep_roots: &std::collections::HashSet<String>,
    ) -> Result<usize> {
        let candidates: Vec<(i64, String)> = self
            .conn
            .prepare_cached(
                "SELECT version_id, root_tree FROM volume_versions WHERE volume_id = ?1 AND created_at < ?2 AND \
                 version_id NOT IN (SELECT version_id FROM volume_refs WHERE volume_id = ?1)",
            )?
            .query_map((volume_id, cutoff), |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut pruned = 0;
        for (version, root) in candidates {
            if !keep_roots.contains(&root) {
                pruned += self.conn.execute(
                    "DELETE FROM volume_versions WHERE volume_id = ?1 AND version_id = ?2",
                    (volume_id, version),
                )?;
            }
        }
        Ok(pruned)
    }

    /// One ref.
    pub fn get_ref(&self, volume_id: &str, name: &str) -> Result<Option<RefRecord>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {REF_COLS} FROM volume_refs WHERE volume_id = ?1 AND name = ?2"))?;
        Ok(stmt.query_row((volume_id, name), ref_row).optional()?)
    }

    /// Every ref of a volume, by name.
    pub fn refs(&self, volume_id: &str) -> Result<Vec<RefRecord>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {REF_COLS} FROM volume_refs WHERE volume_id = ?1 ORDER BY name"))?;
        let rows = stmt.query_map([volume_id], ref_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Creates or moves a ref.
    pub fn put_ref(&self, r: &RefRecord) -> Result<()> {
        Ok(self.write_ref(
            r,
            " ON CONFLICT (volume_id, name) DO UPDATE SET version_id = excluded.version_id, \
             sequence_number = excluded.sequence_number, commit_id = excluded.commit_id, \
             updated_at = excluded.updated_at",
        )?)
    }

    /// Creates a ref that must not exist yet.
    pub fn insert_ref(&self, r: &RefRecord) -> Result<()> {
        self.write_ref(r, "").map_err(|e| StoreError::on_insert(e, || format!("ref {:?}", r.name)))
    }

    fn write_ref(&self, r: &RefRecord, on_conflict: &str) -> rusqlite::Result<()> {
        self.conn
            .execute(
                &format!("INSERT INTO volume_refs ({REF_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7){on_conflict}"),
                rusqlite::params![
                    r.volume_id,
                    r.name,
                    r.version_id as i64,
                    r.sequence_number as i64,
                    r.commit_id,
                    r.parent_version_id.map(|p| p as i64),
                    r.updated_at
                ],
            )
            .map(|_| ())
    }

    /// Deletes a ref; its versions stay.
    pub fn delete_ref(&self, volume_id: &str, name: &str) -> Result<bool> {
        Ok(self.conn.execute("DELETE FROM volume_refs WHERE volume_id = ?1 AND name = ?2", (volume_id, name))? > 0)
    }

    /// Stores a directory tree under its hash (a no-op when it is already there: trees are immutable).
    pub fn put_tree(&self, hash: &str, body: &[u8], now: i64) -> Result<()> {
        let mut stmt = self
            .conn
            .prepare_cached("INSERT OR IGNORE INTO volume_trees (hash, body, created_at) VALUES (?1, ?2, ?3)")?;
        stmt.execute((hash, body, now))?;
        Ok(())
    }

    /// A directory tree's encoded body.
    pub fn tree(&self, hash: &str) -> Result<Option<Vec<u8>>> {
        let mut stmt = self.conn.prepare_cached("SELECT body FROM volume_trees WHERE hash = ?1")?;
        Ok(stmt.query_row([hash], |r| r.get(0)).optional()?)
    }

    /// How many directory trees are stored, and their bytes.
    pub fn tree_totals(&self) -> Result<(u64, u64)> {
        let mut stmt = self.conn.prepare_cached("SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM volume_trees")?;
        Ok(stmt.query_row([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)))?)
    }

    /// Hashes of trees stored before `cutoff` (candidates for garbage collection).
    pub fn tree_hashes_before(&self, cutoff: i64) -> Result<Vec<String>> {
        let mut stmt = self.conn.prepare_cached("SELECT hash FROM volume_trees WHERE created_at < ?1")?;
        let rows = stmt.query_map([cutoff], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Deletes a tree.
    pub fn delete_tree(&self, hash: &str) -> Result<()> {
        self.conn.execute("DELETE FROM volume_trees WHERE hash = ?1", [hash])?;
        Ok(())
    }

    /// A server secret by name, creating it with `make` on first use.
    pub fn server_secret(&self, name: &str, make: impl FnOnce() -> Vec<u8>, now: i64) -> Result<Vec<u8>> {
        if let Some(v) =
            self.conn.query_row("SELECT value FROM server_secrets WHERE name = ?1", [name], |r| r.get(0)).optional()?
        {
            return Ok(v);
        }
        let value = make();
        self.conn
            .execute("INSERT INTO server_secrets (name, value, created_at) VALUES (?1, ?2, ?3)", (name, &value, now))?;
        Ok(value)
    }
}

fn volume_row(r: &Row<'_>) -> rusqlite::Result<VolumeRecord> {
    Ok(VolumeRecord {
        id: r.get(0)?,
        environment_id: r.get(1)?,
        name: r.get(2)?,
        kind: r.get(3)?,
        created_at: r.get(4)?,
    })
}

fn version_row(r: &Row<'_>) -> rusqlite::Result<VersionRecord> {
    Ok(VersionRecord {
        volume_id: r.get(0)?,
        version_id: r.get::<_, i64>(1)? as u64,
        parent_id: r.get::<_, Option<i64>>(2)?.map(|p| p as u64),
        ref_name: r.get(3)?,
        root_tree: r.get(4)?,
        commit_id: r.get(5)?,
        author: r.get(6)?,
        primary_pack_id: r.get(7)?,
        created_at: r.get(8)?,
    })
}

fn ref_row(r: &Row<'_>) -> rusqlite::Result<RefRecord> {
    Ok(RefRecord {
        volume_id: r.get(0)?,
        name: r.get(1)?,
        version_id: r.get::<_, i64>(2)? as u64,
        sequence_number: r.get::<_, i64>(3)? as u64,
        commit_id: r.get(4)?,
        parent_version_id: r.get::<_, Option<i64>>(5)?.map(|p| p as u64),
        updated_at: r.get(6)?,
    })
}
