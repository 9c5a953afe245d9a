//! The compute spec: what `compute_ctl run` starts, as JSON.

use std::collections::BTreeMap;

use serde::Deserialize;
use utils::{Lsn, TenantId, TimelineId};

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ComputeMode {
    /// Read-write; its WAL goes to the safekeepers through the walproposer.
    Primary,
    /// Read-only at `lsn` (or the LSN of `timestamp`).
    Static,
    /// A hot standby: replays the timeline's WAL streamed from the safekeepers, read-only.
    Replica,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    pub name: String,
    /// Stored as a SCRAM-SHA-256 verifier; never logged (see the `Debug` impl).
    #[serde(default)]
    pub password: Option<String>,
}

impl std::fmt::Debug for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Role")
            .field("name", &self.name)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Database {
    pub name: String,
    pub owner: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputeSpec {
    pub tenant_id: TenantId,
    pub timeline_id: TimelineId,
    /// Pageserver libpq address, `host:port`.
    pub pageserver: String,
    /// Safekeepers' libpq addresses (primary: its WAL goes there; replica: it streams from them).
    #[serde(default)]
    pub safekeepers: Vec<String>,
    pub mode: ComputeMode,
    /// Static mode: read at this LSN.
    #[serde(default)]
    pub lsn: Option<Lsn>,
    /// Port Postgres listens on (loopback).
    pub pg_port: u16,
    /// Extra `postgresql.conf` settings.
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
    #[serde(default)]
    pub roles: Vec<Role>,
    #[serde(default)]
    pub databases: Vec<Database>,
}

impl ComputeSpec {
    pub fn parse(text: &str) -> anyhow::Result<ComputeSpec> {
        let spec: ComputeSpec = serde_json::from_str(text).map_err(|e| anyhow::anyhow!("bad compute spec: {e}"))?;
        match spec.mode {
            ComputeMode::Primary | ComputeMode::Replica if spec.safekeepers.is_empty() => {
                anyhow::bail!("a primary or replica needs safekeepers in its spec")
            }
            ComputeMode::Static if spec.lsn.is_none() => anyhow::bail!("a static compute needs an lsn in its spec"),
            _ => {}
        }
        for r in &spec.roles {
            if !valid_ident(&r.name) {
                anyhow::bail!("role name '{}' must be letters, digits and underscores", r.name);
            }
        }
        for d in &spec.databases {
            if !valid_ident(&d.name) || !valid_ident(&d.owner) {
                anyhow::bail!("database '{}' / owner '{}' must be letters, digits and underscores", d.name, d.owner);
            }
        }
        for k in spec.settings.keys() {
            if !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') {
                anyhow::bail!("setting name '{k}' is not a Postgres parameter name");
            }
        }
        Ok(spec)
    }
}

/// Names we put into SQL unquoted-safe form; keeping them simple avoids quoting mistakes.
fn valid_ident(s: &str) -> bool {
    !s.is_empty() && s.len() < 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A SQL string literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_validate() {
        let ok = r#"{"tenant_id":"0123456789abcdef0123456789abcdef","timeline_id":"0123456789abcdef0123456789abcdef",
            "pageserver":"127.0.0.1:64000","safekeepers":["127.0.0.1:5454"],"mode":"primary","pg_port":55432,
            "roles":[{"name":"alice","password":"it's"}],"databases":[{"name":"app","owner":"alice"}]}"#;
        let s = ComputeSpec::parse(ok).unwrap();
        assert_eq!(s.mode, ComputeMode::Primary);
        assert_eq!(quote_literal(s.roles[0].password.as_deref().unwrap()), "'it''s'");
        let bad_role = ok.replace("\"alice\",\"password\"", "\"al ice\",\"password\"");
        assert!(ComputeSpec::parse(&bad_role).is_err());
        let no_sk = ok.replace("\"safekeepers\":[\"127.0.0.1:5454\"],", "");
        assert!(ComputeSpec::parse(&no_sk).unwrap_err().to_string().contains("safekeepers"));
        assert!(ComputeSpec::parse("{}").is_err());
    }
}
