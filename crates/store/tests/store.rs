//! The store against real SQLite files: migrations, reopening, atomic writes, refusing a newer schema.

use compute_store::{
    CallAnswer, CallOrigin, CallRecord, CallState, Client, Environment, FunctionRecord, SigningKey, Store, StoreError,
    SCHEMA_VERSION,
};

fn temp_db(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("compute-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("state.db")
}

fn env(id: &str, name: &str) -> Environment {
    Environment { id: id.into(), name: name.into(), created_at: 1 }
}

#[test]
fn fresh_database_is_migrated_and_reopens() {
    let path = temp_db("fresh");
    {
        let store = Store::open(&path).unwrap();
        store.write(|r| r.environments().insert(&env("e1", "default"))).unwrap();
    }
    let store = Store::open(&path).unwrap();
    let version: i64 =
        rusqlite::Connection::open(&path).unwrap().pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    assert_eq!(store.read(|r| r.environments().list()).unwrap(), vec![env("e1", "default")]);
    assert!(store.integrity_check().unwrap().is_empty());
    let mode: String =
        rusqlite::Connection::open(&path).unwrap().pragma_query_value(None, "journal_mode", |r| r.get(0)).unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn newer_schema_is_refused_with_a_clear_error() {
    let path = temp_db("newer");
    drop(Store::open(&path).unwrap());
    rusqlite::Connection::open(&path).unwrap().pragma_update(None, "user_version", SCHEMA_VERSION + 5).unwrap();
    let err = Store::open(&path).err().expect("a newer schema must be refused");
    assert!(matches!(err, StoreError::TooNew { .. }), "{err}");
    assert!(err.to_string().contains("upgrade Compute"));
}

#[test]
fn a_failed_write_leaves_nothing_behind() {
    let store = Store::open(temp_db("atomic")).unwrap();
    store.write(|r| r.environments().insert(&env("e1", "default"))).unwrap();
    let err = store
        .write(|r| {
            r.environments().insert(&env("e2", "staging"))?;
            r.environments().insert(&env("e3", "default")) // name taken: the whole transaction rolls back
        })
        .unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err}");
    assert_eq!(store.read(|r| r.environments().list()).unwrap().len(), 1, "e2 must not survive the rollback");
}

#[test]
fn clients_revoke_and_signing_keys_rotate() {
    let store = Store::open(temp_db("clients")).unwrap();
    store.write(|r| r.environments().insert(&env("e1", "default"))).unwrap();
    let client = Client {
        id: "c1".into(),
        name: "admin".into(),
        secret_hash: "$argon2id$...".into(),
        environment_id: "e1".into(),
        all_environments: true,
        created_at: 5,
        revoked_at: None,
    };
    store.write(|r| r.clients().insert(&client)).unwrap();
    let bad_env = Client { id: "c2".into(), environment_id: "nope".into(), ..client.clone() };
    assert!(store.write(|r| r.clients().insert(&bad_env)).is_err(), "foreign keys are enforced");
    assert!(store.write(|r| r.clients().revoke("c1", 10)).unwrap());
    assert!(store.write(|r| r.clients().revoke("c1", 20)).unwrap());
    assert_eq!(store.read(|r| r.clients().get("c1")).unwrap().unwrap().revoked_at, Some(10), "first revocation kept");
    assert!(!store.write(|r| r.clients().revoke("missing", 10)).unwrap());

    let key =
        |kid: &str, at: i64| SigningKey { kid: kid.into(), secret: vec![1, 2, 3], created_at: at, retired_at: None };
    store.write(|r| r.signing_keys().insert(&key("k1", 1))).unwrap();
    store.write(|r| r.signing_keys().insert(&key("k2", 2))).unwrap();
    let active = store.read(|r| r.signing_keys().active()).unwrap();
    assert_eq!(active.iter().map(|k| k.kid.as_str()).collect::<Vec<_>>(), ["k2", "k1"], "newest signs");
    assert_eq!(store.write(|r| r.signing_keys().retire_all_but("k2", 3)).unwrap(), 1);
    assert_eq!(store.read(|r| r.signing_keys().active()).unwrap().len(), 1);
}

#[test]
fn concurrent_writers_on_two_connections_both_land() {
    // The server and a `compute client create` run side by side on one file.
    let path = temp_db("concurrent");
    let a = Store::open(&path).unwrap();
    let b = Store::open(&path).unwrap();
    let ta = std::thread::spawn(move || {
        for i in 0..200 {
            a.write(|r| r.environments().insert(&env(&format!("a{i}"), &format!("a{i}")))).unwrap();
        }
        a
    });
    for i in 0..200 {
        b.write(|r| r.environments().insert(&env(&format!("b{i}"), &format!("b{i}")))).unwrap();
    }
    let a = ta.join().unwrap();
    assert_eq!(a.read(|r| r.environments().list()).unwrap().len(), 400);
}

/// Child half of `killed_writer_leaves_a_consistent_store`: writes pairs of rows in transactions until killed.
#[test]
fn writer_child() {
    let Ok(path) = std::env::var("COMPUTE_STORE_CHILD_DB") else {
        return;
    };
    let store = Store::open(&path).unwrap();
    let start = store.read(|r| r.environments().list()).unwrap().len();
    for i in start.. {
        store
            .write(|r| {
                r.environments().insert(&env(&format!("x{i}"), &format!("x{i}")))?;
                r.environments().insert(&env(&format!("y{i}"), &format!("y{i}")))
            })
            .unwrap();
    }
}

#[test]
fn killed_writer_leaves_a_consistent_store() {
    let path = temp_db("killed");
    drop(Store::open(&path).unwrap());
    for round in 0..5u64 {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "writer_child", "--nocapture", "--test-threads=1"])
            .env("COMPUTE_STORE_CHILD_DB", &path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(150 + round * 37));
        // SIGKILL: no destructor, no rollback, no checkpoint runs in the child.
        child.kill().unwrap();
        child.wait().unwrap();
        let store = Store::open(&path).unwrap();
        assert!(store.integrity_check().unwrap().is_empty());
        let envs = store.read(|r| r.environments().list()).unwrap();
        let xs = envs.iter().filter(|e| e.id.starts_with('x')).count();
        let ys = envs.iter().filter(|e| e.id.starts_with('y')).count();
        assert_eq!(xs, ys, "round {round}: a transaction was half-applied");
    }
    let n = Store::open(&path).unwrap().read(|r| r.environments().list()).unwrap().len();
    assert!(n > 0, "the child never committed anything, so the test proved nothing");
}

#[test]
fn scaling_groups_keep_revisions_and_free_their_name_when_deleted() {
    use compute_store::{RevisionRecord, ScalingGroupRecord};
    let store = Store::open(temp_db("groups")).unwrap();
    store.write(|r| r.environments().insert(&env("e1", "default"))).unwrap();
    let group = |id: &str| ScalingGroupRecord {
        id: id.into(),
        environment_id: "e1".into(),
        name: "api".into(),
        revision_id: format!("{id}-r1"),
        created_by: "c1".into(),
        created_at: 1,
        updated_at: 1,
        deleted_at: None,
    };
    let rev = |group: &str, n: i64| RevisionRecord {
        id: format!("{group}-r{n}"),
        group_id: group.into(),
        number: n,
        spec: vec![n as u8],
        created_by: "c1".into(),
        created_at: n,
    };
    store.write(|r| r.scaling_groups().insert(&group("g1"), &rev("g1", 1))).unwrap();
    let taken = store.write(|r| r.scaling_groups().insert(&group("g2"), &rev("g2", 1))).unwrap_err();
    assert!(matches!(taken, StoreError::AlreadyExists { .. }), "{taken}");

    store.write(|r| r.scaling_groups().add_revision(&rev("g1", 2))).unwrap();
    let g = store.read(|r| r.scaling_groups().get_by_name("e1", "api", false)).unwrap().unwrap();
    assert_eq!((g.revision_id.as_str(), g.updated_at), ("g1-r2", 2));
    assert_eq!(store.read(|r| r.scaling_groups().last_revision_number("g1")).unwrap(), 2);
    let revs = store.read(|r| r.scaling_groups().revisions("g1", 10, 0)).unwrap();
    assert_eq!(revs.iter().map(|r| r.number).collect::<Vec<_>>(), vec![2, 1], "newest first");
    store.write(|r| r.scaling_groups().select("g1", "g1-r1", 3)).unwrap();
    assert_eq!(store.read(|r| r.scaling_groups().get("e1", "g1")).unwrap().unwrap().revision_id, "g1-r1");
    assert!(store.read(|r| r.scaling_groups().get("other-env", "g1")).unwrap().is_none());

    assert!(store.write(|r| r.scaling_groups().delete("g1", 4)).unwrap());
    assert!(!store.write(|r| r.scaling_groups().delete("g1", 5)).unwrap(), "deleted once");
    assert!(store.read(|r| r.scaling_groups().get_by_name("e1", "api", false)).unwrap().is_none());
    assert!(store.read(|r| r.scaling_groups().live()).unwrap().is_empty());
    // The name is free again; the deleted group stays for history.
    store.write(|r| r.scaling_groups().insert(&group("g2"), &rev("g2", 1))).unwrap();
    assert_eq!(store.read(|r| r.scaling_groups().get_by_name("e1", "api", true)).unwrap().unwrap().id, "g2");
    assert_eq!(store.read(|r| r.scaling_groups().list("e1", true, 10, 0)).unwrap().len(), 2);
    assert_eq!(store.read(|r| r.scaling_groups().list("e1", false, 10, 0)).unwrap().len(), 1);
}

fn call(id: &str, at: i64) -> CallRecord {
    CallRecord {
        id: id.into(),
        environment_id: "env-1".into(),
        function_id: "fn-1".into(),
        queue_key: "env-1/f".into(),
        state: CallState::Pending,
        request: b"req".to_vec(),
        results: None,
        error: None,
        attempts: 0,
        created_by: "c".into(),
        created_at: at,
        started_at: None,
        finished_at: None,
        expires_at: None,
        origin: CallOrigin::Deferred,
    }
}

#[test]
fn calls_are_claimed_oldest_first_requeued_after_a_crash_and_expire() {
    let store = Store::open(temp_db("calls")).unwrap();
    store
        .write(|r| {
            r.environments().insert(&env("env-1", "default"))?;
            r.functions().insert(&FunctionRecord {
                id: "fn-1".into(),
                environment_id: "env-1".into(),
                name: "f".into(),
                group_name: "f".into(),
                version_id: None,
                created_by: "c".into(),
                created_at: 0,
                updated_at: 0,
                deleted_at: None,
            })?;
            for (id, at) in [("b", 2), ("a", 1), ("c", 3)] {
                r.function_calls().insert(&call(id, at))?;
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(
        store.read(|r| r.function_calls().pending_by_function()).unwrap(),
        [("env-1".to_string(), "fn-1".to_string(), 3)]
    );
    assert!(store.write(|r| r.function_calls().claim("fn-other", 2, 10)).unwrap().is_empty());
    assert_eq!(store.read(|r| r.function_calls().unfinished_of("fn-1", CallOrigin::Deferred)).unwrap(), 3);
    assert_eq!(store.read(|r| r.function_calls().unfinished_of("fn-1", CallOrigin::Scheduled)).unwrap(), 0);
    assert_eq!(store.read(|r| r.function_calls().unfinished_of_named("env-1", "f")).unwrap(), 3);
    assert_eq!(store.read(|r| r.function_calls().unfinished_of_named("env-2", "f")).unwrap(), 0);
    assert_eq!(store.read(|r| r.functions().live()).unwrap().len(), 0, "a function without a version is not live");
    let claimed = store.write(|r| r.function_calls().claim("fn-1", 2, 10)).unwrap();
    assert_eq!(claimed.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    assert!(claimed.iter().all(|c| c.state == CallState::Running && c.attempts == 1));
    assert_eq!(store.read(|r| r.function_calls().unfinished("env-1/f")).unwrap(), 3);
    // The server died with a and b running: they run again.
    assert_eq!(store.write(|r| r.function_calls().requeue_running()).unwrap(), 2);
    let again = store.write(|r| r.function_calls().claim("fn-1", 10, 20)).unwrap();
    assert!(store.read(|r| r.function_calls().pending_by_function()).unwrap().is_empty());
    assert_eq!(again.len(), 3);
    assert_eq!(again[0].attempts, 2);
    assert!(store.write(|r| r.function_calls().finish("a", CallAnswer::Completed(b"out"), 30, 100)).unwrap());
    assert!(!store.write(|r| r.function_calls().finish("a", CallAnswer::Failed("x"), 31, 100)).unwrap());
    let a = store.read(|r| r.function_calls().get("env-1", "a")).unwrap().unwrap();
    assert_eq!((a.state, a.results.as_deref()), (CallState::Completed, Some(&b"out"[..])));
    assert!(store.read(|r| r.function_calls().get("env-2", "a")).unwrap().is_none());
    assert_eq!(store.write(|r| r.function_calls().expire(100)).unwrap(), 1);
    assert!(store.read(|r| r.function_calls().get("env-1", "a")).unwrap().is_none());
}
