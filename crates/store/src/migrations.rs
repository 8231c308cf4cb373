//! Versioned schema migrations, applied in order inside one transaction each and recorded in `user_version`.

use rusqlite::Connection;

use crate::{Result, StoreError};

/// Each entry moves the schema from version `index` to `index + 1`. Never edit a released entry; append.
const MIGRATIONS: &[&str] = &[
    // 1: environments, API clients and token signing keys.
    r#"
    CREATE TABLE environments (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        created_at  INTEGER NOT NULL
    );
    CREATE TABLE clients (
        id              TEXT PRIMARY KEY,
        name            TEXT NOT NULL,
        secret_hash     TEXT NOT NULL,
        environment_id  TEXT NOT NULL REFERENCES environments(id),
        all_environments INTEGER NOT NULL DEFAULT 0,
        created_at      INTEGER NOT NULL,
        revoked_at      INTEGER
    );
    CREATE TABLE signing_keys (
        kid         TEXT PRIMARY KEY,
        secret      BLOB NOT NULL,
        created_at  INTEGER NOT NULL,
        retired_at  INTEGER
    );
    "#,
    // 2: sandboxes and containers (one table: a container is a sandbox driven through the container API).
    r#"
    CREATE TABLE sandboxes (
        id              TEXT PRIMARY KEY,
        environment_id  TEXT NOT NULL REFERENCES environments(id),
        kind            TEXT NOT NULL CHECK (kind IN ('sandbox', 'container')),
        name            TEXT NOT NULL,
        image           TEXT NOT NULL,
        spec            BLOB NOT NULL,
        status          TEXT NOT NULL,
        status_message  TEXT,
        status_details  TEXT,
        exit_code       INTEGER,
        created_by      TEXT NOT NULL,
        created_at      INTEGER NOT NULL,
        started_at      INTEGER,
        finished_at     INTEGER
    );
    CREATE INDEX sandboxes_by_env ON sandboxes (environment_id, created_at);
    -- A name is unique among the live workloads of an environment; finished ones keep theirs for history.
    CREATE UNIQUE INDEX sandboxes_live_name ON sandboxes (environment_id, name)
        WHERE status IN ('pending', 'running');
    "#,
    // 3: volumes: a chain of immutable versions per volume, named refs pointing at versions, and the
    // content-addressed directory trees the versions' root hashes name (shared between versions and volumes).
    r#"
    CREATE TABLE volumes (
        id              TEXT PRIMARY KEY,
        environment_id  TEXT NOT NULL REFERENCES environments(id),
        name            TEXT NOT NULL,
        kind            TEXT NOT NULL CHECK (kind IN ('data', 'source_code')),
        created_at      INTEGER NOT NULL,
        next_version    INTEGER NOT NULL DEFAULT 1,
        UNIQUE (environment_id, name)
    );
    CREATE TABLE volume_versions (
        volume_id       TEXT NOT NULL REFERENCES volumes(id) ON DELETE CASCADE,
        version_id      INTEGER NOT NULL,
        parent_id       INTEGER,
        ref             TEXT NOT NULL,
        root_tree       TEXT NOT NULL,
        commit_id       TEXT NOT NULL,
        author          TEXT NOT NULL,
        primary_pack_id TEXT NOT NULL,
        created_at      INTEGER NOT NULL,
        PRIMARY KEY (volume_id, version_id),
        UNIQUE (volume_id, commit_id)
    );
    CREATE TABLE volume_refs (
        volume_id         TEXT NOT NULL REFERENCES volumes(id) ON DELETE CASCADE,
        name              TEXT NOT NULL,
        version_id        INTEGER NOT NULL,
        sequence_number   INTEGER NOT NULL,
        commit_id         TEXT NOT NULL,
        parent_version_id INTEGER,
        updated_at        INTEGER NOT NULL,
        PRIMARY KEY (volume_id, name)
    );
    CREATE TABLE volume_trees (
        hash        TEXT PRIMARY KEY,
        body        BLOB NOT NULL,
        created_at  INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE server_secrets (
        name        TEXT PRIMARY KEY,
        value       BLOB NOT NULL,
        created_at  INTEGER NOT NULL
    );
    "#,
    // 4: scaling groups: a group's immutable spec revisions and which one it serves; its replicas are sandboxes
    // of kind 'replica' (SQLite cannot widen a CHECK, so the sandboxes table is rebuilt with the same rows).
    r#"
    CREATE TABLE sandboxes_v4 (
        id              TEXT PRIMARY KEY,
        environment_id  TEXT NOT NULL REFERENCES environments(id),
        kind            TEXT NOT NULL CHECK (kind IN ('sandbox', 'container', 'replica')),
        name            TEXT NOT NULL,
        image           TEXT NOT NULL,
        spec            BLOB NOT NULL,
        status          TEXT NOT NULL,
        status_message  TEXT,
        status_details  TEXT,
        exit_code       INTEGER,
        created_by      TEXT NOT NULL,
        created_at      INTEGER NOT NULL,
        started_at      INTEGER,
        finished_at     INTEGER
    );
    INSERT INTO sandboxes_v4 SELECT id, environment_id, kind, name, image, spec, status, status_message,
        status_details, exit_code, created_by, created_at, started_at, finished_at FROM sandboxes;
    DROP TABLE sandboxes;
    ALTER TABLE sandboxes_v4 RENAME TO sandboxes;
    CREATE INDEX sandboxes_by_env ON sandboxes (environment_id, created_at);
    CREATE UNIQUE INDEX sandboxes_live_name ON sandboxes (environment_id, name)
        WHERE status IN ('pending', 'running');
    CREATE TABLE scaling_groups (
        id              TEXT PRIMARY KEY,
        environment_id  TEXT NOT NULL REFERENCES environments(id),
        name            TEXT NOT NULL,
        revision_id     TEXT NOT NULL,
        created_by      TEXT NOT NULL,
        created_at      INTEGER NOT NULL,
        updated_at      INTEGER NOT NULL,
        deleted_at      INTEGER
    );
    CREATE UNIQUE INDEX scaling_groups_live_name ON scaling_groups (environment_id, name)
        WHERE deleted_at IS NULL;
    CREATE TABLE scaling_group_revisions (
        id              TEXT PRIMARY KEY,
        group_id        TEXT NOT NULL REFERENCES scaling_groups(id),
        number          INTEGER NOT NULL,
        spec            BLOB NOT NULL,
        created_by      TEXT NOT NULL,
        created_at      INTEGER NOT NULL,
        UNIQUE (group_id, number)
    );
    "#,
    // 5: secrets (sealed values, environment-wide or scoped to one workload) and integrations (named, sealed
    // bundles of keys of a kind). Values are ciphertext; only names, kinds and key names are in clear.
    r#"
    CREATE TABLE secrets (
        id              TEXT PRIMARY KEY,
        environment_id  TEXT NOT NULL REFERENCES environments(id),
        name            TEXT NOT NULL,
        scope_type      TEXT NOT NULL
                        CHECK (scope_type IN ('environment', 'sandbox', 'scaling_group', 'function')),
        scope_ref       TEXT NOT NULL,
        key_id          TEXT NOT NULL,
        sealed          BLOB NOT NULL,
        created_by      TEXT NOT NULL,
        created_at      INTEGER NOT NULL,
        updated_at      INTEGER NOT NULL,
        UNIQUE (environment_id, scope_type, scope_ref, name)
    );
    CREATE TABLE integrations (
        id              TEXT PRIMARY KEY,
        environment_id  TEXT NOT NULL REFERENCES environments(id),
        name            TEXT NOT NULL,
        kind            TEXT NOT NULL,
        key_names       TEXT NOT NULL,
        key_id          TEXT NOT NULL,
        sealed          BLOB NOT NULL,
        created_at      INTEGER NOT NULL,
        updated_at      INTEGER NOT NULL,
        UNIQUE (environment_id, name)
    );
    "#,
    // 6: functions (a stable name served by one scaling group) and their immutable versions.
    r#"
    CREATE TABLE functions (
        id              TEXT PRIMARY KEY,
        environment_id  TEXT NOT NULL REFERENCES environments(id),
        name            TEXT NOT NULL,
        group_name      TEXT NOT NULL,
        version_id      TEXT,
        created_by      TEXT NOT NULL,
        created_at      INTEGER NOT NULL,
        updated_at      INTEGER NOT NULL,
        deleted_at      INTEGER
    );
    CREATE UNIQUE INDEX functions_live_name ON functions (environment_id, name) WHERE deleted_at IS NULL;
    CREATE TABLE function_versions (
        id                  TEXT PRIMARY KEY,
        function_id         TEXT NOT NULL REFERENCES functions(id),
        number              INTEGER NOT NULL,
        digest              TEXT NOT NULL,
        spec                BLOB NOT NULL,
        group_name          TEXT NOT NULL,
        group_revision_id   TEXT NOT NULL,
        created_by          TEXT NOT NULL,
        created_at          INTEGER NOT NULL,
        UNIQUE (function_id, number)
    );
    CREATE INDEX function_versions_by_digest ON function_versions (function_id, digest);
    "#,
    // 7: deferred function calls (`.defer()`), a durable queue: pending, running, then a result kept for a while.
    r#"
    CREATE TABLE function_calls (
        id              TEXT PRIMARY KEY,
        environment_id  TEXT NOT NULL REFERENCES environments(id),
        function_id     TEXT NOT NULL REFERENCES functions(id),
        queue_key       TEXT NOT NULL,
        state           TEXT NOT NULL,
        request         BLOB NOT NULL,
        results         BLOB,
        error           TEXT,
        attempts        INTEGER NOT NULL DEFAULT 0,
        created_by      TEXT NOT NULL,
        created_at      INTEGER NOT NULL,
        started_at      INTEGER,
        finished_at     INTEGER,
        expires_at      INTEGER
    );
    CREATE INDEX function_calls_by_state ON function_calls (state, created_at);
    CREATE INDEX function_calls_by_queue ON function_calls (queue_key, state);
    CREATE INDEX function_calls_by_function ON function_calls (function_id, created_at);
    "#,
    // 8: what started a call: `.defer()` or the function's schedule.
    r#"
    ALTER TABLE function_calls ADD COLUMN origin TEXT NOT NULL DEFAULT 'deferred';
    "#,
];

/// The schema version this binary migrates to.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

pub(crate) fn migrate(conn: &mut Connection) -> Result<()> {
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew { found, supported: SCHEMA_VERSION });
    }
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)?;
        // Re-check under the lock: another process may have migrated between our read and the lock.
        let now: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if now > from as i64 {
            continue;
        }
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", from as i64 + 1)?;
        tx.commit()?;
        tracing::info!(version = from + 1, "applied state store migration");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_4_keeps_every_workload_and_allows_replicas() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "foreign_keys", "ON").unwrap();
        for sql in &MIGRATIONS[..3] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 3).unwrap();
        conn.execute_batch(
            "INSERT INTO environments VALUES ('e1', 'default', 1);
             INSERT INTO sandboxes VALUES ('sbx-1', 'e1', 'container', 'web', 'img', x'0a01', 'running', 'ok',
                 NULL, NULL, 'c1', 10, 11, NULL);
             INSERT INTO sandboxes VALUES ('sbx-2', 'e1', 'sandbox', 'old', 'img', x'', 'failed', 'boom', 'tail',
                 3, 'c1', 5, 6, 7);",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let rows: Vec<(String, String, String, Option<i64>)> = conn
            .prepare("SELECT id, kind, status, exit_code FROM sandboxes ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(
            rows,
            vec![
                ("sbx-1".into(), "container".into(), "running".into(), None),
                ("sbx-2".into(), "sandbox".into(), "failed".into(), Some(3)),
            ]
        );
        conn.execute(
            "INSERT INTO sandboxes VALUES ('sbx-3', 'e1', 'replica', 'web-r1-abc', 'img', x'', 'pending', NULL, NULL,
                 NULL, 'c1', 12, NULL, NULL)",
            [],
        )
        .unwrap();
        // The live-name index came back with the table.
        let dup = conn.execute(
            "INSERT INTO sandboxes VALUES ('sbx-4', 'e1', 'container', 'web', 'img', x'', 'pending', NULL, NULL, NULL,
                 'c1', 13, NULL, NULL)",
            [],
        );
        assert!(dup.is_err(), "two live workloads named web");
        assert!(conn
            .execute(
                "INSERT INTO sandboxes (id, environment_id, kind, name, image, spec, status, created_by, \
                              created_at) VALUES ('sbx-5', 'e1', 'bogus', 'x', 'i', x'', 'pending', 'c', 1)",
                []
            )
            .is_err());
    }
}
