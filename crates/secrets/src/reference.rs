//! A workload's secret references (`SecretRef` on the wire) and the variables they become.

use std::collections::BTreeMap;

use crate::Variable;

/// What a reference names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefSource {
    /// One secret: one variable, named after it.
    Secret(String),
    /// An integration: the variables of its kind.
    Integration(String),
}

/// A reference from a workload's spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    /// The secret or integration.
    pub source: RefSource,
    /// Only these (variable names, or the integration's key names); all when empty.
    pub keys: Vec<String>,
    /// Renames: variable (or key) name → the variable's name in the workload.
    pub aliases: BTreeMap<String, String>,
    /// Put before every variable's name.
    pub prefix: Option<String>,
}

impl SecretRef {
    /// What the reference names, for messages (`secret "X"`, `integration "Y"`).
    pub fn describe(&self) -> String {
        match &self.source {
            RefSource::Secret(n) => format!("secret {n:?}"),
            RefSource::Integration(n) => format!("integration {n:?}"),
        }
    }

    /// The variables the workload gets from `vars` (what the secret or integration holds): filtered by `keys`,
    /// renamed by `aliases`, then prefixed. The error names the key or name that does not fit.
    pub fn expose(&self, vars: Vec<Variable>) -> Result<Vec<(String, String)>, String> {
        let matches = |v: &Variable, k: &str| v.name == k || v.key.as_deref() == Some(k);
        if let Some(k) = self.keys.iter().find(|k| !vars.iter().any(|v| matches(v, k))) {
            let known: Vec<&str> = vars.iter().map(|v| v.key.as_deref().unwrap_or(&v.name)).collect();
            return Err(format!("keys: {k:?} is not a key of {} (it has {})", self.describe(), known.join(", ")));
        }
        let mut out = Vec::new();
        for v in vars {
            if !self.keys.is_empty() && !self.keys.iter().any(|k| matches(&v, k)) {
                continue;
            }
            let renamed = self
                .aliases
                .get(&v.name)
                .or_else(|| v.key.as_ref().and_then(|k| self.aliases.get(k)))
                .cloned()
                .unwrap_or(v.name);
            let name = format!("{}{renamed}", self.prefix.as_deref().unwrap_or(""));
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(format!(
                    "{} would become the variable {name:?}, which is not a valid name",
                    self.describe()
                ));
            }
            out.push((name, v.value));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IntegrationKind;

    #[test]
    fn keys_aliases_and_prefix_shape_an_integrations_variables() {
        let keys: BTreeMap<String, String> = [("host", "h"), ("user", "u"), ("password", "p"), ("database", "d")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let r = SecretRef {
            source: RefSource::Integration("prod_postgres".into()),
            keys: vec!["password".into(), "PGHOST".into()],
            aliases: [("password".to_string(), "DB_PASS".to_string())].into(),
            prefix: Some("APP_".into()),
        };
        let got = r.expose(IntegrationKind::Postgres.variables(&keys)).unwrap();
        assert_eq!(got, [("APP_PGHOST".to_string(), "h".to_string()), ("APP_DB_PASS".to_string(), "p".to_string())]);
        let bad = SecretRef { keys: vec!["nope".into()], ..r };
        assert!(bad.expose(IntegrationKind::Postgres.variables(&keys)).unwrap_err().contains("\"nope\""));
    }

    #[test]
    fn a_secret_becomes_one_variable_named_after_it_unless_renamed() {
        let v = || vec![Variable { name: "TOKEN".into(), key: None, value: "x".into() }];
        let plain = SecretRef {
            source: RefSource::Secret("TOKEN".into()),
            keys: vec![],
            aliases: BTreeMap::new(),
            prefix: None,
        };
        assert_eq!(plain.expose(v()).unwrap(), [("TOKEN".to_string(), "x".to_string())]);
        let aliased = SecretRef { aliases: [("TOKEN".to_string(), "API_TOKEN".to_string())].into(), ..plain };
        assert_eq!(aliased.expose(v()).unwrap()[0].0, "API_TOKEN");
    }
}
