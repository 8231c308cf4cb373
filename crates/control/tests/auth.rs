//! Identity end to end over a real store: first start, client credentials, tokens, scopes, revocation, rotation.

use std::time::Duration;

use compute_control::{AuthError, Control, ControlConfig, ControlError};

fn open(name: &str) -> (Control, compute_control::NewClientCredentials) {
    let dir = std::env::temp_dir().join(format!("compute-control-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (control, first) = Control::open(&dir, ControlConfig::default()).unwrap();
    (control, first.admin.expect("first start creates the admin client"))
}

fn auth_err(e: ControlError) -> AuthError {
    match e {
        ControlError::Auth(a) => a,
        other => panic!("expected an auth error, got {other:?}"),
    }
}

#[test]
fn first_start_creates_admin_once() {
    let dir = std::env::temp_dir().join(format!("compute-control-once-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (_, first) = Control::open(&dir, ControlConfig::default()).unwrap();
    assert!(first.admin.is_some());
    let (control, again) = Control::open(&dir, ControlConfig::default()).unwrap();
    assert!(again.admin.is_none(), "the admin client is created on the first start only");
    assert_eq!(control.auth().clients().unwrap().len(), 1);
    let stored = &control.auth().clients().unwrap()[0];
    let secret = first.admin.unwrap().client_secret;
    assert!(!stored.secret_hash.contains(&secret), "only a hash of the secret is stored");
}

#[test]
fn token_round_trip_and_scopes() {
    let (control, admin) = open("scopes");
    let auth = control.auth();
    let t = auth.get_token(&admin.client_id, &admin.client_secret, "client_credentials", None).unwrap();
    assert_eq!(t.environment_id, admin.environment_id);
    let p = auth.authenticate(&t.access_token, None).unwrap();
    assert_eq!(p.client_id, admin.client_id);
    assert_eq!(p.environment_id, admin.environment_id);
    // The header may name the token's environment by id or by name, or be empty.
    auth.authenticate(&t.access_token, Some(&admin.environment_id)).unwrap();
    auth.authenticate(&t.access_token, Some("default")).unwrap();
    auth.authenticate(&t.access_token, Some("")).unwrap();

    let staging = control.create_environment("staging").unwrap();
    let scoped = auth
        .get_token(&admin.client_id, &admin.client_secret, "client_credentials", Some(&format!("env:{}", staging.id)))
        .unwrap();
    assert_eq!(auth.authenticate(&scoped.access_token, Some(&staging.id)).unwrap().environment_id, staging.id);
    // A token for one environment cannot act in another.
    let err = auth_err(auth.authenticate(&scoped.access_token, Some(&admin.environment_id)).unwrap_err());
    assert!(matches!(err, AuthError::EnvironmentMismatch { .. }), "{err}");
    let err = auth_err(auth.authenticate(&t.access_token, Some("staging")).unwrap_err());
    assert!(matches!(err, AuthError::EnvironmentMismatch { .. }), "{err}");

    // A client bound to staging may not ask for default.
    let dev = auth.create_client("dev", "staging", false).unwrap();
    let err = auth_err(auth.get_token(&dev.client_id, &dev.client_secret, "", Some("env:default")).unwrap_err());
    assert!(matches!(err, AuthError::EnvironmentDenied { .. }), "{err}");
    let dt = auth.get_token(&dev.client_id, &dev.client_secret, "", None).unwrap();
    assert_eq!(dt.environment_id, staging.id);
    assert_eq!(dt.environments, vec![(staging.id.clone(), "staging".to_string())]);

    for bad in ["staging", "env:", "env:nope"] {
        assert!(auth.get_token(&admin.client_id, &admin.client_secret, "", Some(bad)).is_err(), "{bad}");
    }
    let err = auth_err(auth.get_token(&admin.client_id, &admin.client_secret, "password", None).unwrap_err());
    assert!(matches!(err, AuthError::UnsupportedGrant(_)));
}

#[test]
fn wrong_secret_unknown_client_and_garbage_tokens() {
    let (control, admin) = open("wrong");
    let auth = control.auth();
    let err = auth_err(auth.get_token(&admin.client_id, "nope", "", None).unwrap_err());
    assert!(matches!(err, AuthError::InvalidCredentials));
    let err = auth_err(auth.get_token("client-unknown", &admin.client_secret, "", None).unwrap_err());
    assert!(matches!(err, AuthError::InvalidCredentials));
    for garbage in ["", "x", "a.b.c", "eyJhbGciOiJIUzI1NiJ9.e30.AAAA"] {
        assert!(matches!(auth_err(auth.authenticate(garbage, None).unwrap_err()), AuthError::InvalidToken(_)));
    }
}

#[test]
fn revoked_client_loses_secret_and_tokens() {
    let (control, admin) = open("revoke");
    let auth = control.auth();
    let other = auth.create_client("ci", "default", false).unwrap();
    let t = auth.get_token(&other.client_id, &other.client_secret, "", None).unwrap();
    auth.authenticate(&t.access_token, None).unwrap();
    auth.revoke_client(&other.client_id).unwrap();
    assert!(matches!(auth_err(auth.authenticate(&t.access_token, None).unwrap_err()), AuthError::Revoked(_)));
    assert!(matches!(
        auth_err(auth.get_token(&other.client_id, &other.client_secret, "", None).unwrap_err()),
        AuthError::Revoked(_)
    ));
    // Others are unaffected.
    let t = auth.get_token(&admin.client_id, &admin.client_secret, "", None).unwrap();
    auth.authenticate(&t.access_token, None).unwrap();
    assert!(matches!(auth.revoke_client("client-missing"), Err(ControlError::NotFound(_))));
}

#[test]
fn key_rotation_keeps_or_cuts_old_tokens() {
    let (control, admin) = open("rotate");
    let auth = control.auth();
    let old = auth.get_token(&admin.client_id, &admin.client_secret, "", None).unwrap().access_token;
    auth.rotate_signing_key(false).unwrap();
    let new = auth.get_token(&admin.client_id, &admin.client_secret, "", None).unwrap().access_token;
    assert_ne!(old.split('.').next(), new.split('.').next(), "a new kid signs after rotation");
    auth.authenticate(&old, None).expect("old tokens survive a plain rotation");
    auth.rotate_signing_key(true).unwrap();
    assert!(auth.authenticate(&old, None).is_err(), "retiring previous keys cuts old tokens");
    assert!(auth.authenticate(&new, None).is_err());
}

#[test]
fn short_ttl_tokens_expire() {
    let dir = std::env::temp_dir().join(format!("compute-control-ttl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (control, first) =
        Control::open(&dir, ControlConfig { token_ttl: Duration::from_secs(1), ..ControlConfig::default() }).unwrap();
    let admin = first.admin.unwrap();
    let t = control.auth().get_token(&admin.client_id, &admin.client_secret, "", None).unwrap();
    assert_eq!(t.expires_in, 1);
    control.auth().authenticate(&t.access_token, None).unwrap();
    std::thread::sleep(Duration::from_millis(2100));
    let err = auth_err(control.auth().authenticate(&t.access_token, None).unwrap_err());
    assert!(matches!(err, AuthError::InvalidToken(compute_control::token::TokenError::Expired)), "{err}");
}
