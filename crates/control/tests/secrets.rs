//! Secrets over a real store and key file: sealed at rest, resolved by scope, refused when missing, and a key
//! rotation that leaves none of the old ciphertext in the database file.

use std::collections::BTreeMap;
use std::path::PathBuf;

use compute_control::{Control, ControlConfig, ControlError, Principal, RefSource, Scope, ScopeKind, SecretRef};

fn open(name: &str) -> (Control, PathBuf, Principal) {
    let dir = std::env::temp_dir().join(format!("compute-secrets-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (control, _) = Control::open(&dir, ControlConfig::default()).unwrap();
    let env = control.environment_id("default").unwrap();
    let who = Principal { client_id: "test".into(), environment_id: env, expires_at: 0 };
    (control, dir, who)
}

fn secret(name: &str) -> SecretRef {
    SecretRef { source: RefSource::Secret(name.into()), keys: vec![], aliases: BTreeMap::new(), prefix: None }
}

/// Every byte the store keeps on disk: the database file and its write-ahead log.
fn store_bytes(dir: &std::path::Path) -> Vec<u8> {
    let mut all = Vec::new();
    for f in ["state.db", "state.db-wal"] {
        all.extend(std::fs::read(dir.join(f)).unwrap_or_default());
    }
    all
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_secret_value_is_never_in_the_database_file_and_opens_for_its_workload() {
    let (control, dir, who) = open("clear");
    let s = control.secrets();
    s.upsert(&who, "API_TOKEN", &Scope::environment(), "tok-3f9a7c1e-value").unwrap();
    s.upsert(&who, "API_TOKEN", &Scope::of(ScopeKind::Sandbox, "box"), "tok-scoped-8d2b").unwrap();
    control.store().checkpoint().unwrap();
    let bytes = store_bytes(&dir);
    assert!(!contains(&bytes, b"tok-3f9a7c1e-value") && !contains(&bytes, b"tok-scoped-8d2b"));

    let env = &who.environment_id;
    // The workload's own scope wins over the environment's.
    let own = [Scope::of(ScopeKind::Sandbox, "box")];
    assert_eq!(s.resolve(env, &own, &[secret("API_TOKEN")]).unwrap(), [("API_TOKEN".into(), "tok-scoped-8d2b".into())]);
    let other = [Scope::of(ScopeKind::Sandbox, "other")];
    assert_eq!(s.resolve(env, &other, &[secret("API_TOKEN")]).unwrap()[0].1, "tok-3f9a7c1e-value");
    // Listing shows names and scopes only.
    let listed = format!("{:?}", s.list(&who, true).unwrap().iter().map(|r| (&r.name, r.scope)).collect::<Vec<_>>());
    assert!(!listed.contains("tok-"));
}

#[test]
fn a_missing_secret_or_integration_is_a_failed_precondition_naming_it() {
    let (control, _dir, who) = open("missing");
    let env = &who.environment_id;
    let refs = [secret("NOPE")];
    match control.secrets().resolve(env, &[], &refs) {
        Err(ControlError::FailedPrecondition(m)) => {
            assert!(m.contains("secret_refs[0]") && m.contains("\"NOPE\""), "{m}")
        }
        other => panic!("{other:?}"),
    }
    let integ = SecretRef { source: RefSource::Integration("prod_pg".into()), ..secret("") };
    match control.secrets().resolve(env, &[], &[integ]) {
        Err(ControlError::FailedPrecondition(m)) => assert!(m.contains("integration \"prod_pg\""), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_integration_exposes_its_kinds_variables() {
    let (control, _dir, who) = open("integration");
    let keys: BTreeMap<String, String> =
        [("host", "db"), ("port", "6543"), ("user", "u"), ("password", "pw"), ("database", "app")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    let env = &who.environment_id;
    control.secrets().set_integration(env, "prod_postgres", "postgres", keys).unwrap();
    let r = SecretRef { source: RefSource::Integration("prod_postgres".into()), ..secret("") };
    let vars: BTreeMap<String, String> = control.secrets().resolve(env, &[], &[r]).unwrap().into_iter().collect();
    assert_eq!(vars["DATABASE_URL"], "postgresql://u:pw@db:6543/app");
    assert_eq!(vars["PGPASSWORD"], "pw");
    let bad = control.secrets().set_integration(env, "x", "postgres", BTreeMap::new());
    assert!(matches!(bad, Err(ControlError::InvalidArgument(_))));
}

#[test]
fn rotating_the_key_leaves_no_old_ciphertext_in_the_database_file() {
    let (control, dir, who) = open("rotate");
    let s = control.secrets();
    let rec = s.upsert(&who, "DB_PASSWORD", &Scope::environment(), "correct horse battery staple").unwrap();
    let keys: BTreeMap<String, String> = [("api_key".to_string(), "sk-live-123".to_string())].into();
    s.set_integration(&who.environment_id, "openai", "openai", keys).unwrap();
    control.store().checkpoint().unwrap();
    let old = rec.sealed.clone();
    assert!(contains(&store_bytes(&dir), &old), "the sealed value is in the file before the rotation");
    let old_key = std::fs::read(dir.join("secrets.key")).unwrap();

    let (new_kid, n) = s.rotate_key().unwrap();
    assert_eq!(n, 2);
    assert_ne!(new_kid, rec.key_id);
    assert!(!contains(&store_bytes(&dir), &old), "the old ciphertext is gone from the database file and its log");
    assert_ne!(std::fs::read(dir.join("secrets.key")).unwrap(), old_key);
    assert!(!dir.join("secrets.key.next").exists());

    // A server opened afterwards reads every value under the new key.
    drop(control);
    let (control, _) = Control::open(&dir, ControlConfig::default()).unwrap();
    let refs = [secret("DB_PASSWORD"), SecretRef { source: RefSource::Integration("openai".into()), ..secret("") }];
    let vars = control.secrets().resolve(&who.environment_id, &[], &refs).unwrap();
    assert_eq!(
        vars,
        [
            ("DB_PASSWORD".into(), "correct horse battery staple".into()),
            ("OPENAI_API_KEY".into(), "sk-live-123".into())
        ]
    );
}
