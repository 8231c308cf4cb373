//! Integration kinds: which keys each takes, and the environment variables its clients expect.

use std::collections::BTreeMap;

/// One variable an integration exposes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    /// The variable's name.
    pub name: String,
    /// The integration key it comes from, when it is one key's value (a URL built from several has none).
    pub key: Option<String>,
    /// Its value.
    pub value: String,
}

/// What an integration connects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntegrationKind {
    /// PostgreSQL: `DATABASE_URL` and libpq's `PG*` variables.
    Postgres,
    /// MySQL: `DATABASE_URL` and `MYSQL_*`.
    Mysql,
    /// Redis: `REDIS_URL`.
    Redis,
    /// AWS or any S3-compatible store: `AWS_*`.
    Aws,
    /// OpenAI: `OPENAI_API_KEY`.
    Openai,
    /// Each key as its own variable.
    Generic,
}

const ALL: &[(&str, IntegrationKind)] = &[
    ("postgres", IntegrationKind::Postgres),
    ("mysql", IntegrationKind::Mysql),
    ("redis", IntegrationKind::Redis),
    ("aws", IntegrationKind::Aws),
    ("s3", IntegrationKind::Aws),
    ("openai", IntegrationKind::Openai),
    ("generic", IntegrationKind::Generic),
];

const SQL_KEYS: &[&str] = &["host", "port", "user", "password", "database", "sslmode"];
const AWS_KEYS: &[(&str, &str)] = &[
    ("access_key_id", "AWS_ACCESS_KEY_ID"),
    ("secret_access_key", "AWS_SECRET_ACCESS_KEY"),
    ("region", "AWS_REGION"),
    ("endpoint_url", "AWS_ENDPOINT_URL"),
    ("session_token", "AWS_SESSION_TOKEN"),
];

/// Percent-encodes what may not stand in a URL's user, password or path as it is.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl IntegrationKind {
    /// Reads a kind's name (`postgres`, `mysql`, `redis`, `s3`/`aws`, `openai`, `generic`).
    pub fn parse(s: &str) -> Result<Self, String> {
        ALL.iter().find(|(n, _)| n.eq_ignore_ascii_case(s)).map(|(_, k)| *k).ok_or_else(|| {
            format!(
                "integration kind {s:?} is not known: use one of postgres, mysql, redis, s3 (or aws), openai, generic"
            )
        })
    }

    /// The kind's name.
    pub fn as_str(self) -> &'static str {
        match self {
            IntegrationKind::Postgres => "postgres",
            IntegrationKind::Mysql => "mysql",
            IntegrationKind::Redis => "redis",
            IntegrationKind::Aws => "aws",
            IntegrationKind::Openai => "openai",
            IntegrationKind::Generic => "generic",
        }
    }

    /// Checks that `keys` are what this kind takes; the error names the key and what is allowed.
    pub fn check(self, keys: &BTreeMap<String, String>) -> Result<(), String> {
        let (allowed, required): (Vec<&str>, Vec<&str>) = match self {
            IntegrationKind::Postgres | IntegrationKind::Mysql => {
                (SQL_KEYS.to_vec(), vec!["host", "user", "password", "database"])
            }
            IntegrationKind::Redis => (vec!["url", "host", "port", "password", "username", "db"], vec![]),
            IntegrationKind::Aws => {
                (AWS_KEYS.iter().map(|(k, _)| *k).collect(), vec!["access_key_id", "secret_access_key"])
            }
            IntegrationKind::Openai => (vec!["api_key", "base_url", "organization"], vec!["api_key"]),
            IntegrationKind::Generic => {
                if keys.is_empty() {
                    return Err("a generic integration needs at least one key (--set NAME=VALUE)".into());
                }
                for k in keys.keys() {
                    if k.is_empty() || k.contains('=') || k.contains('\0') {
                        return Err(format!("key {k:?} cannot be a variable name"));
                    }
                }
                return Ok(());
            }
        };
        if let Some(k) = keys.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(format!(
                "a {} integration has no key {k:?}: its keys are {}",
                self.as_str(),
                allowed.join(", ")
            ));
        }
        if let Some(k) = required.iter().find(|k| !keys.contains_key(**k)) {
            return Err(format!(
                "a {} integration needs the key {k:?} (its keys are {})",
                self.as_str(),
                allowed.join(", ")
            ));
        }
        if self == IntegrationKind::Redis && !keys.contains_key("url") && !keys.contains_key("host") {
            return Err("a redis integration needs \"url\", or \"host\" (with optional port, password, db)".into());
        }
        if let Some(p) = keys.get("port") {
            if p.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(format!("port {p:?} is not a TCP port (1-65535)"));
            }
        }
        Ok(())
    }

    /// The variables an integration of this kind with `keys` exposes (after [`IntegrationKind::check`]).
    pub fn variables(self, keys: &BTreeMap<String, String>) -> Vec<Variable> {
        let var = |name: &str, key: Option<&str>, value: &str| Variable {
            name: name.into(),
            key: key.map(str::to_string),
            value: value.into(),
        };
        let get = |k: &str| keys.get(k).map(String::as_str);
        let mut out = Vec::new();
        match self {
            IntegrationKind::Postgres | IntegrationKind::Mysql => {
                let (scheme, default_port, p) = match self {
                    IntegrationKind::Postgres => ("postgresql", "5432", "PG"),
                    _ => ("mysql", "3306", "MYSQL_"),
                };
                let port = get("port").unwrap_or(default_port);
                let mut url = format!(
                    "{scheme}://{}:{}@{}:{port}/{}",
                    escape(get("user").unwrap_or_default()),
                    escape(get("password").unwrap_or_default()),
                    get("host").unwrap_or_default(),
                    escape(get("database").unwrap_or_default()),
                );
                if let Some(mode) = get("sslmode") {
                    let param = if self == IntegrationKind::Postgres { "sslmode" } else { "ssl-mode" };
                    url.push_str(&format!("?{param}={}", escape(mode)));
                }
                out.push(var("DATABASE_URL", None, &url));
                for (key, suffix) in [
                    ("host", "HOST"),
                    ("port", "PORT"),
                    ("user", "USER"),
                    ("password", "PASSWORD"),
                    ("database", "DATABASE"),
                ] {
                    let value = if key == "port" { Some(port) } else { get(key) };
                    if let Some(v) = value {
                        out.push(var(&format!("{p}{suffix}"), Some(key), v));
                    }
                }
                if let (IntegrationKind::Postgres, Some(mode)) = (self, get("sslmode")) {
                    out.push(var("PGSSLMODE", Some("sslmode"), mode));
                }
            }
            IntegrationKind::Redis => {
                let url = match get("url") {
                    Some(u) => u.to_string(),
                    None => {
                        let auth = match (get("username"), get("password")) {
                            (Some(u), Some(p)) => format!("{}:{}@", escape(u), escape(p)),
                            (None, Some(p)) => format!(":{}@", escape(p)),
                            (Some(u), None) => format!("{}@", escape(u)),
                            (None, None) => String::new(),
                        };
                        let db = get("db").map(|d| format!("/{d}")).unwrap_or_default();
                        format!(
                            "redis://{auth}{}:{}{db}",
                            get("host").unwrap_or_default(),
                            get("port").unwrap_or("6379")
                        )
                    }
                };
                out.push(var("REDIS_URL", get("url").map(|_| "url"), &url));
            }
            IntegrationKind::Aws => {
                for (key, name) in AWS_KEYS {
                    if let Some(v) = get(key) {
                        out.push(var(name, Some(key), v));
                    }
                }
                if let Some(r) = get("region") {
                    out.push(var("AWS_DEFAULT_REGION", Some("region"), r));
                }
            }
            IntegrationKind::Openai => {
                for (key, name) in
                    [("api_key", "OPENAI_API_KEY"), ("base_url", "OPENAI_BASE_URL"), ("organization", "OPENAI_ORG_ID")]
                {
                    if let Some(v) = get(key) {
                        out.push(var(name, Some(key), v));
                    }
                }
            }
            IntegrationKind::Generic => out.extend(keys.iter().map(|(k, v)| var(k, Some(k), v))),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn postgres_exposes_a_url_with_escaped_credentials_and_libpq_variables() {
        let k = keys(&[
            ("host", "db.internal"),
            ("user", "app"),
            ("password", "p@ss/w"),
            ("database", "prod"),
            ("sslmode", "require"),
        ]);
        IntegrationKind::Postgres.check(&k).unwrap();
        let vars = IntegrationKind::Postgres.variables(&k);
        let get = |n: &str| vars.iter().find(|v| v.name == n).map(|v| v.value.as_str());
        assert_eq!(get("DATABASE_URL"), Some("postgresql://app:p%40ss%2Fw@db.internal:5432/prod?sslmode=require"));
        assert_eq!(get("PGPORT"), Some("5432"));
        assert_eq!(get("PGPASSWORD"), Some("p@ss/w"));
        assert_eq!(get("PGSSLMODE"), Some("require"));
    }

    #[test]
    fn kinds_refuse_keys_they_do_not_take_and_want_the_ones_they_need() {
        let err = IntegrationKind::Postgres.check(&keys(&[("host", "h"), ("pass", "x")])).unwrap_err();
        assert!(err.contains("no key \"pass\""), "{err}");
        let err = IntegrationKind::Mysql.check(&keys(&[("host", "h")])).unwrap_err();
        assert!(err.contains("needs the key \"user\""), "{err}");
        assert!(IntegrationKind::Redis.check(&keys(&[("password", "x")])).is_err());
        assert!(IntegrationKind::parse("oracle").unwrap_err().contains("postgres, mysql"));
        assert_eq!(IntegrationKind::parse("S3").unwrap(), IntegrationKind::Aws);
    }

    #[test]
    fn redis_aws_openai_and_generic_variables() {
        let r = IntegrationKind::Redis.variables(&keys(&[("host", "cache"), ("password", "pw")]));
        assert_eq!(r[0].value, "redis://:pw@cache:6379");
        let a = IntegrationKind::Aws.variables(&keys(&[
            ("access_key_id", "AK"),
            ("secret_access_key", "SK"),
            ("region", "eu-west-1"),
        ]));
        let names: Vec<&str> = a.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION"]);
        let o = IntegrationKind::Openai.variables(&keys(&[("api_key", "sk-1")]));
        assert_eq!((o[0].name.as_str(), o[0].value.as_str()), ("OPENAI_API_KEY", "sk-1"));
        let g = IntegrationKind::Generic.variables(&keys(&[("A", "1"), ("B", "2")]));
        assert_eq!(g.len(), 2);
    }
}
