//! `compute secret …` and `compute integration …`: secrets and integrations of an environment, managed in the
//! data directory's store directly (like `compute client`), so they work whether the server runs or not. Values
//! are read from a flag, a file or standard input and are never printed.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use compute_control::{Control, Principal, Scope, ScopeKind};

use crate::client::{print_json, Format, Output};

/// Which environment a command acts in.
#[derive(Args, Debug, Clone)]
pub struct EnvFlag {
    /// Environment (name or id).
    #[arg(long, default_value = compute_control::DEFAULT_ENVIRONMENT)]
    environment: String,
}

/// `compute secret`.
#[derive(Subcommand, Debug)]
pub enum SecretCommand {
    /// Set a secret (created, or its value replaced): from --value, --from-file, or standard input.
    Set {
        /// Its name (the variable it becomes in a workload that references it).
        name: String,
        /// The value (visible in your shell's history: prefer --from-file or standard input).
        #[arg(long, conflicts_with = "from_file")]
        value: Option<String>,
        /// Read the value from this file (taken as it is, a final newline included).
        #[arg(long)]
        from_file: Option<PathBuf>,
        /// Scope it to one workload: sandbox:NAME, scaling-group:NAME or function:NAME [default: the environment].
        #[arg(long)]
        scope: Option<String>,
        #[command(flatten)]
        env: EnvFlag,
    },
    /// List secrets (names and scopes; never values).
    Ls {
        #[command(flatten)]
        env: EnvFlag,
        #[command(flatten)]
        format: Format,
    },
    /// Delete a secret.
    Rm {
        /// Its name.
        name: String,
        /// Its scope, as for `set`.
        #[arg(long)]
        scope: Option<String>,
        #[command(flatten)]
        env: EnvFlag,
    },
    /// Seal every secret and integration under a new key (DATA_DIR/secrets.key, or COMPUTE_SECRETS_KEY_NEXT
    /// when the key comes from COMPUTE_SECRETS_KEY); the old ciphertext is overwritten in the store.
    RotateKey,
}

/// `compute integration`.
#[derive(Subcommand, Debug)]
pub enum IntegrationCommand {
    /// Create or replace an integration: a named bundle of keys exposed as the variables its clients expect.
    Set {
        /// Its name (what Secret.from_integration names).
        name: String,
        /// postgres, mysql, redis, s3 (or aws), openai, generic.
        #[arg(long)]
        kind: String,
        /// KEY=VALUE, repeated (postgres/mysql: host, port, user, password, database, sslmode; redis: url or
        /// host, port, password; s3: access_key_id, secret_access_key, region, endpoint_url; openai: api_key).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        keys: Vec<String>,
        #[command(flatten)]
        env: EnvFlag,
    },
    /// List integrations (kinds, key names and the variables they expose; never values).
    Ls {
        #[command(flatten)]
        env: EnvFlag,
        #[command(flatten)]
        format: Format,
    },
    /// Delete an integration.
    Rm {
        /// Its name.
        name: String,
        #[command(flatten)]
        env: EnvFlag,
    },
}

fn parse_scope(s: Option<&str>) -> anyhow::Result<Scope> {
    let Some(s) = s else { return Ok(Scope::environment()) };
    if s == "environment" {
        return Ok(Scope::environment());
    }
    let (kind, name) =
        s.split_once(':').context("--scope is KIND:NAME (sandbox:NAME, scaling-group:NAME, function:NAME)")?;
    let kind = match kind {
        "sandbox" | "container" => ScopeKind::Sandbox,
        "scaling-group" | "sg" => ScopeKind::ScalingGroup,
        "function" | "fn" => ScopeKind::Function,
        other => anyhow::bail!("--scope kind {other:?} is not known: use sandbox, scaling-group or function"),
    };
    anyhow::ensure!(!name.is_empty(), "--scope {s:?} names no workload");
    Ok(Scope::of(kind, name))
}

fn operator(control: &Control, env: &EnvFlag) -> anyhow::Result<Principal> {
    Ok(Principal {
        client_id: "operator".into(),
        environment_id: control.environment_id(&env.environment)?,
        expires_at: 0,
    })
}

fn read_value(value: Option<String>, from_file: Option<PathBuf>) -> anyhow::Result<String> {
    if let Some(v) = value {
        return Ok(v);
    }
    if let Some(f) = from_file {
        return std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()));
    }
    let mut v = String::new();
    std::io::stdin().read_to_string(&mut v).context("reading the value from standard input")?;
    // A value typed or piped with `echo` ends with one newline that is not part of it.
    if v.ends_with('\n') {
        v.pop();
        if v.ends_with('\r') {
            v.pop();
        }
    }
    Ok(v)
}

/// Runs a `compute secret` command against `control`.
pub fn secret(control: &Control, cmd: SecretCommand) -> anyhow::Result<()> {
    match cmd {
        SecretCommand::Set { name, value, from_file, scope, env } => {
            let who = operator(control, &env)?;
            let scope = parse_scope(scope.as_deref())?;
            let value = read_value(value, from_file)?;
            let rec = control.secrets().upsert(&who, &name, &scope, &value)?;
            println!("secret {} set ({}, id {})", rec.name, scope.describe(), rec.id);
        }
        SecretCommand::Ls { env, format } => {
            let who = operator(control, &env)?;
            let all = control.secrets().list(&who, true)?;
            if format.output == Output::Json {
                let items = all.iter().map(|rec| {
                    let scope = Scope { kind: rec.scope, name: rec.scope_ref.clone() };
                    serde_json::json!({ "id": rec.id, "name": rec.name, "scope": scope.describe(),
                        "updatedAtMs": rec.updated_at })
                });
                return print_json(&serde_json::Value::Array(items.collect()));
            }
            println!("{:<32} {:<36} {:<24} UPDATED", "NAME", "SCOPE", "ID");
            for rec in all {
                let scope = Scope { kind: rec.scope, name: rec.scope_ref.clone() };
                println!(
                    "{:<32} {:<36} {:<24} {}",
                    rec.name,
                    scope.describe(),
                    rec.id,
                    crate::client::ago(rec.updated_at / 1000)
                );
            }
        }
        SecretCommand::Rm { name, scope, env } => {
            let who = operator(control, &env)?;
            let scope = parse_scope(scope.as_deref())?;
            control.secrets().delete(&who, &name, &scope)?;
            println!("secret {name} deleted ({})", scope.describe());
        }
        SecretCommand::RotateKey => {
            let (kid, n) = control.secrets().rotate_key()?;
            println!(
                "secrets sealed under key {kid}: {n} value{} resealed; the previous key is gone",
                if n == 1 { "" } else { "s" }
            );
        }
    }
    Ok(())
}

/// Runs a `compute integration` command against `control`.
pub fn integration(control: &Control, cmd: IntegrationCommand) -> anyhow::Result<()> {
    match cmd {
        IntegrationCommand::Set { name, kind, keys, env } => {
            let env_id = control.environment_id(&env.environment)?;
            let mut map = BTreeMap::new();
            for kv in keys {
                let (k, v) = kv.split_once('=').with_context(|| format!("--set {kv:?} is not KEY=VALUE"))?;
                map.insert(k.to_string(), v.to_string());
            }
            let view = control.secrets().set_integration(&env_id, &name, &kind, map)?;
            println!("integration {} ({}) set: exposes {}", view.name, view.kind, view.variables.join(", "));
        }
        IntegrationCommand::Ls { env, format } => {
            let env_id = control.environment_id(&env.environment)?;
            let all = control.secrets().integrations(&env_id)?;
            if format.output == Output::Json {
                let items = all.iter().map(
                    |v| serde_json::json!({ "name": v.name, "kind": v.kind, "keys": v.keys, "variables": v.variables }),
                );
                return print_json(&serde_json::Value::Array(items.collect()));
            }
            println!("{:<24} {:<10} {:<40} VARIABLES", "NAME", "KIND", "KEYS");
            for v in all {
                println!("{:<24} {:<10} {:<40} {}", v.name, v.kind, v.keys.join(","), v.variables.join(","));
            }
        }
        IntegrationCommand::Rm { name, env } => {
            let env_id = control.environment_id(&env.environment)?;
            control.secrets().delete_integration(&env_id, &name)?;
            println!("integration {name} deleted");
        }
    }
    Ok(())
}
