use rusqlite::{Connection, OptionalExtension, Row};

use crate::{Result, StoreError};

/// A scaling group as recorded: its identity and the revision it serves. What it runs is in the revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScalingGroupRecord {
    /// Id.
    pub id: String,
    /// Environment it belongs to.
    pub environment_id: String,
    /// Name, unique among the environment's groups that are not deleted.
    pub name: String,
    /// The revision it serves.
    pub revision_id: String,
    /// Client that created it.
    pub created_by: String,
    /// ms since the epoch.
    pub created_at: i64,
    /// When its spec last changed.
    pub updated_at: i64,
    /// When it was deleted (its record stays for history).
    pub deleted_at: Option<i64>,
}

/// One immutable spec of a scaling group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevisionRecord {
    /// Id.
    pub id: String,
    /// The group.
    pub group_id: String,
    /// 1 for the first spec, then counting up.
    pub number: i64,
    /// The spec as the client sent it (encoded).
    pub spec: Vec<u8>,
    /// Client that wrote it.
    pub created_by: String,
    /// ms since the epoch.
    pub created_at: i64,
}

const GROUP_COLUMNS: &str = "id, environment_id, name, revision_id, created_by, created_at, updated_at, deleted_at";
const REVISION_COLUMNS: &str = "id, group_id, number, spec, created_by, created_at";

/// Repository of [`ScalingGroupRecord`]s and their [`RevisionRecord`]s.
pub struct ScalingGroups<'c> {
    conn: &'c Connection,
}

impl<'c> ScalingGroups<'c> {
    pub(crate) fn new(conn: &'c Connection) -> Self {
        Self { conn }
    }

    /// Inserts a group with its first revision; [`StoreError::AlreadyExists`] when a group of the environment
    /// that is not deleted has its name.
    pub fn insert(&self, group: &ScalingGroupRecord, first: &RevisionRecord) -> Result<()> {
        self.conn
            .execute(
                &format!("INSERT INTO scaling_groups ({GROUP_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"),
                rusqlite::params![
                    group.id,
                    group.environment_id,
                    group.name,
                    group.revision_id,
                    group.created_by,
                    group.created_at,
                    group.updated_at,
                    group.deleted_at
                ],
            )
            .map_err(|e| StoreError::on_insert(e, || format!("a scaling group named {:?}", group.name)))?;
        self.insert_revision(first)
    }

    /// Adds a revision and makes the group serve it.
    pub fn add_revision(&self, rev: &RevisionRecord) -> Result<()> {
        self.insert_revision(rev)?;
        self.conn.execute(
            "UPDATE scaling_groups SET revision_id = ?2, updated_at = ?3 WHERE id = ?1",
            (&rev.group_id, &rev.id, rev.created_at),
        )?;
        Ok(())
    }

    /// Makes the group serve one of its existing revisions (a rollback).
    pub fn select(&self, group_id: &str, revision_id: &str, at: i64) -> Result<()> {
        self.conn.execute(
            "UPDATE scaling_groups SET revision_id = ?2, updated_at = ?3 WHERE id = ?1",
            (group_id, revision_id, at),
        )?;
        Ok(())
    }

    fn insert_revision(&self, rev: &RevisionRecord) -> Result<()> {
        self.conn.execute(
            &format!("INSERT INTO scaling_group_revisions ({REVISION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"),
            rusqlite::params![rev.id, rev.group_id, rev.number, rev.spec, rev.created_by, rev.created_at],
        )?;
        Ok(())
    }

    /// By id within an environment (deleted ones too).
    pub fn get(&self, environment_id: &str, id: &str) -> Result<Option<ScalingGroupRecord>> {
        Ok(self
            .conn
            .prepare_cached(&format!(
                "SELECT {GROUP_COLUMNS} FROM scaling_groups WHERE id = ?1 AND environment_id = ?2"
            ))?
            .query_row((id, environment_id), group_row)
            .optional()?)
    }

    /// The group of this name that is not deleted, else (with `include_deleted`) the most recently deleted one.
    pub fn get_by_name(
        &self,
        environment_id: &str,
        name: &str,
        include_deleted: bool,
    ) -> Result<Option<ScalingGroupRecord>> {
        Ok(self
            .conn
            .prepare_cached(&format!(
                "SELECT {GROUP_COLUMNS} FROM scaling_groups WHERE environment_id = ?1 AND name = ?2 \
                 AND (?3 OR deleted_at IS NULL) ORDER BY deleted_at IS NULL DESC, deleted_at DESC LIMIT 1"
            ))?
            .query_row(rusqlite::params![environment_id, name, include_deleted], group_row)
            .optional()?)
    }

    /// An environment's groups, newest first, from `offset`.
    pub fn list(
        &self,
        environment_id: &str,
        include_deleted: bool,
        limit: u32,
        offset: u32,
    ) -> Result<Vec<ScalingGroupRecord>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {GROUP_COLUMNS} FROM scaling_groups WHERE environment_id = ?1 AND (?2 OR deleted_at IS NULL) \
             ORDER BY created_at DESC, id DESC LIMIT ?3 OFFSET ?4"
        ))?;
        let rows = stmt.query_map(rusqlite::params![environment_id, include_deleted, limit, offset], group_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Every group that is not deleted, of every environment (to resume serving them after a restart).
    pub fn live(&self) -> Result<Vec<ScalingGroupRecord>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {GROUP_COLUMNS} FROM scaling_groups WHERE deleted_at IS NULL"))?;
        let rows = stmt.query_map([], group_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Marks a group deleted; false if it already was.
    pub fn delete(&self, id: &str, at: i64) -> Result<bool> {
        let n = self
            .conn
            .execute("UPDATE scaling_groups SET deleted_at = ?2 WHERE id = ?1 AND deleted_at IS NULL", (id, at))?;
        Ok(n > 0)
    }

    /// One revision of a group.
    pub fn revision(&self, group_id: &str, revision_id: &str) -> Result<Option<RevisionRecord>> {
        Ok(self
            .conn
            .prepare_cached(&format!(
                "SELECT {REVISION_COLUMNS} FROM scaling_group_revisions WHERE group_id = ?1 AND id = ?2"
            ))?
            .query_row((group_id, revision_id), revision_row)
            .optional()?)
    }

    /// A group's revisions, newest first, from `offset`.
    pub fn revisions(&self, group_id: &str, limit: u32, offset: u32) -> Result<Vec<RevisionRecord>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {REVISION_COLUMNS} FROM scaling_group_revisions WHERE group_id = ?1 \
             ORDER BY number DESC LIMIT ?2 OFFSET ?3"
        ))?;
        let rows = stmt.query_map(rusqlite::params![group_id, limit, offset], revision_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// The highest revision number a group has.
    pub fn last_revision_number(&self, group_id: &str) -> Result<i64> {
        Ok(self.conn.query_row(
            "SELECT COALESCE(MAX(number), 0) FROM scaling_group_revisions WHERE group_id = ?1",
            [group_id],
            |r| r.get(0),
        )?)
    }
}

fn group_row(r: &Row<'_>) -> rusqlite::Result<ScalingGroupRecord> {
    Ok(ScalingGroupRecord {
        id: r.get(0)?,
        environment_id: r.get(1)?,
        name: r.get(2)?,
        revision_id: r.get(3)?,
        created_by: r.get(4)?,
        created_at: r.get(5)?,
        updated_at: r.get(6)?,
        deleted_at: r.get(7)?,
    })
}

fn revision_row(r: &Row<'_>) -> rusqlite::Result<RevisionRecord> {
    Ok(RevisionRecord {
        id: r.get(0)?,
        group_id: r.get(1)?,
        number: r.get(2)?,
        spec: r.get(3)?,
        created_by: r.get(4)?,
        created_at: r.get(5)?,
    })
}
