//! Pageserver configuration: `<workdir>/pageserver.toml`, overridable on the command line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use remote_storage::RemoteStorageConfig;
use serde::Deserialize;
use utils::auth::JwtAuth;
use utils::NodeId;

use crate::tenant::timeline::TenantConf;

/// What the daemon reads at start.
#[derive(Clone, Debug)]
pub struct PageServerConf {
    pub id: NodeId,
    pub workdir: PathBuf,
    pub listen_pg_addr: SocketAddr,
    pub listen_http_addr: SocketAddr,
    /// Our patched Postgres: initdb for bootstrap, `postgres --wal-redo` for redo.
    pub pg_install_dir: PathBuf,
    /// Safekeepers' libpq addresses: where timelines stream their WAL from.
    pub safekeepers: Vec<String>,
    pub walredo_process_count: usize,
    /// Superuser initdb creates for new timelines.
    pub superuser: String,
    pub default_tenant_conf: TenantConf,
    /// How long a read waits for ingest to reach the requested LSN.
    pub wait_lsn_timeout: Duration,
    /// Where layers and `index_part.json` are uploaded (DESIGN D8); `None`: local disk only.
    pub remote_storage: Option<RemoteStorageConfig>,
    /// With remote storage: keep local layer files under this many bytes by evicting the
    /// least recently read uploaded ones (reads download them again). `None`: no limit.
    pub max_local_layer_bytes: Option<u64>,
    /// `http_auth_type = 'NeonJWT'`: tokens verified with these keys on the HTTP API.
    pub http_auth: Option<Arc<JwtAuth>>,
    /// `pg_auth_type = 'NeonJWT'`: the page service takes a token as the password.
    pub pg_auth: Option<Arc<JwtAuth>>,
    /// HTTP requests of one tenant handled at once; more get 429 (one tenant cannot tie up the
    /// API for the others).
    pub http_tenant_concurrency_limit: usize,
    /// `ssl_cert_file` + `ssl_key_file`: TLS on the page service, which then refuses plaintext.
    pub pg_tls: Option<Arc<pq_proto::RustlsAcceptor>>,
    /// The same certificate on the HTTP API, which is then HTTPS only.
    pub http_tls: Option<Arc<utils::http_server::TlsServerConfig>>,
    /// `ssl_ca_file`: the CA that signs the safekeepers' certificates. With it, WAL is fetched
    /// over TLS only, each safekeeper checked against it (verify-full).
    pub ssl_ca: Option<utils::tls::TlsConnector>,
    /// The token the WAL receivers present to safekeepers with auth on (`safekeeperdata`
    /// scope): `safekeeper_auth_token_path`, else `$NEON_AUTH_TOKEN`, else none.
    pub safekeeper_auth_token: Option<SafekeeperAuthToken>,
}

/// Where the pageserver's token for the safekeepers comes from. Its `Debug` never shows the
/// token (the config is logged and printed in errors).
#[derive(Clone)]
pub enum SafekeeperAuthToken {
    /// `safekeeper_auth_token_path`: read again at every connection, so a token rotated by
    /// rewriting the file is used without a restart (and an expiring token can be replaced).
    File(PathBuf),
    /// `$NEON_AUTH_TOKEN` as it was at start (Neon's convention; the fallback).
    Env(Arc<str>),
}

impl std::fmt::Debug for SafekeeperAuthToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SafekeeperAuthToken::File(p) => f.debug_tuple("File").field(p).finish(),
            SafekeeperAuthToken::Env(_) => f.write_str("Env(NEON_AUTH_TOKEN, redacted)"),
        }
    }
}

impl SafekeeperAuthToken {
    /// The token now. Errors name the file and what to put in it.
    pub fn get(&self) -> anyhow::Result<String> {
        match self {
            SafekeeperAuthToken::File(p) => read_token_file(p),
            SafekeeperAuthToken::Env(t) => Ok(t.to_string()),
        }
    }
}

/// Reads a file holding one JWT (surrounding whitespace ignored). The token itself is never in
/// an error.
fn read_token_file(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        anyhow::anyhow!("safekeeper_auth_token_path {}: cannot read the token file: {e}", path.display())
    })?;
    let token = text.trim();
    if token.is_empty() {
        anyhow::bail!(
            "safekeeper_auth_token_path {}: the file is empty; put the pageserver's safekeeperdata JWT in it \
             (e.g. `neon_auth token --scope safekeeperdata`)",
            path.display()
        );
    }
    if token.split('.').count() != 3 || token.chars().any(char::is_whitespace) {
        anyhow::bail!(
            "safekeeper_auth_token_path {}: the file does not hold a single JWT (header.claims.signature); put \
             only the pageserver's safekeeperdata token in it",
            path.display()
        );
    }
    Ok(token.to_string())
}

/// Default [`PageServerConf::http_tenant_concurrency_limit`].
pub const DEFAULT_HTTP_TENANT_CONCURRENCY_LIMIT: usize = 16;

/// `http_auth_type` / `pg_auth_type`: Neon's names.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AuthType {
    #[default]
    Trust,
    NeonJWT,
}

/// The file format (every field optional; defaults as in neon_local).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfFile {
    pub id: Option<u64>,
    pub listen_pg_addr: Option<String>,
    pub listen_http_addr: Option<String>,
    pub pg_distrib_dir: Option<PathBuf>,
    #[serde(default)]
    pub safekeepers: Vec<String>,
    pub walredo_process_count: Option<usize>,
    pub superuser: Option<String>,
    pub checkpoint_distance: Option<u64>,
    pub checkpoint_timeout: Option<String>,
    pub wait_lsn_timeout: Option<String>,
    /// `[remote_storage]` with `local_path = '...'`, or `bucket_name`, `bucket_region`,
    /// `endpoint`, `prefix_in_bucket` (S3; credentials from the standard AWS chain).
    pub remote_storage: Option<RemoteStorageConfig>,
    /// `[tenant_config]`: defaults of the per-tenant settings (`pitr_interval = '7d'`,
    /// `compaction_threshold = 10`, ...; see [`crate::tenant::config`]).
    #[serde(default)]
    pub tenant_config: std::collections::BTreeMap<String, toml::Value>,
    /// See [`PageServerConf::max_local_layer_bytes`].
    pub max_local_layer_bytes: Option<u64>,
    /// A PEM Ed25519 public key file, or a directory of them (rotation).
    pub auth_validation_public_key_path: Option<PathBuf>,
    #[serde(default)]
    pub http_auth_type: AuthType,
    #[serde(default)]
    pub pg_auth_type: AuthType,
    /// See [`PageServerConf::http_tenant_concurrency_limit`].
    pub http_tenant_concurrency_limit: Option<usize>,
    /// PEM certificate chain and key for TLS on the page service and the HTTP API (relative to
    /// the workdir).
    pub ssl_cert_file: Option<PathBuf>,
    pub ssl_key_file: Option<PathBuf>,
    /// PEM CA certificate(s) the pageserver trusts when it connects to safekeepers.
    pub ssl_ca_file: Option<PathBuf>,
    /// A file holding the JWT for the safekeepers (relative to the workdir); see
    /// [`PageServerConf::safekeeper_auth_token`]. Keeps the secret out of this file.
    pub safekeeper_auth_token_path: Option<PathBuf>,
}

/// Parses durations like `10s`, `500ms`, `10m`, `1h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a duration like 10s, 500ms, 10m, 1h or 7d"))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" | "min" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86400),
        u => return Err(format!("'{s}': unknown unit '{u}' (use ms, s, m, h or d)")),
    };
    Ok(d)
}

impl PageServerConf {
    /// Reads `<workdir>/pageserver.toml` if present; `pg_install_dir` falls back to
    /// `$PG_INSTALL_DIR` or `pg_install` next to the working directory.
    pub fn load(workdir: &Path) -> anyhow::Result<PageServerConf> {
        let path = workdir.join("pageserver.toml");
        let file: ConfFile = match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ConfFile::default(),
            Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
        };
        let addr = |v: Option<String>, default: &str, what: &str| -> anyhow::Result<SocketAddr> {
            let s = v.unwrap_or_else(|| default.to_string());
            s.parse().map_err(|e| anyhow::anyhow!("{}: {what} '{s}': {e}", path.display()))
        };
        let pg_install_dir = file
            .pg_distrib_dir
            .or_else(|| std::env::var_os("PG_INSTALL_DIR").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("pg_install"));
        let mut tenant_conf = TenantConf::default();
        if let Some(d) = file.checkpoint_distance {
            tenant_conf.checkpoint_distance_bytes = d;
        }
        if let Some(t) = &file.checkpoint_timeout {
            tenant_conf.checkpoint_timeout =
                parse_duration(t).map_err(|e| anyhow::anyhow!("checkpoint_timeout: {e}"))?;
        }
        for (key, value) in &file.tenant_config {
            let value = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                other => {
                    anyhow::bail!("{}: tenant_config.{key}: expected a string or a number, got {other}", path.display())
                }
            };
            tenant_conf.set(key, &value).map_err(|e| anyhow::anyhow!("{}: tenant_config.{e}", path.display()))?;
        }
        let jwt = match (&file.auth_validation_public_key_path, file.http_auth_type, file.pg_auth_type) {
            (_, AuthType::Trust, AuthType::Trust) => None,
            (None, _, _) => anyhow::bail!(
                "{}: http_auth_type/pg_auth_type = 'NeonJWT' needs auth_validation_public_key_path",
                path.display()
            ),
            (Some(p), _, _) => {
                let p = if p.is_relative() { workdir.join(p) } else { p.clone() };
                Some(Arc::new(JwtAuth::from_key_path(&p).map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))?))
            }
        };
        let pick = |t: AuthType| if t == AuthType::NeonJWT { jwt.clone() } else { None };
        let http_auth = pick(file.http_auth_type);
        let pg_auth = pick(file.pg_auth_type);
        let http_tenant_concurrency_limit =
            file.http_tenant_concurrency_limit.unwrap_or(DEFAULT_HTTP_TENANT_CONCURRENCY_LIMIT);
        if http_tenant_concurrency_limit == 0 {
            anyhow::bail!("{}: http_tenant_concurrency_limit must be at least 1", path.display());
        }
        let rel = |p: &PathBuf| if p.is_relative() { workdir.join(p) } else { p.clone() };
        let (pg_tls, http_tls) = match (&file.ssl_cert_file, &file.ssl_key_file) {
            (None, None) => (None, None),
            (Some(cert), Some(key)) => {
                let tls = pq_proto::ListenerTls::from_pem_files(&rel(cert), &rel(key))
                    .map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))?;
                (Some(tls.pg), Some(tls.http))
            }
            _ => anyhow::bail!("{}: ssl_cert_file and ssl_key_file go together", path.display()),
        };
        let ssl_ca = file
            .ssl_ca_file
            .as_ref()
            .map(|ca| utils::tls::TlsConnector::from_ca_file(&rel(ca)))
            .transpose()
            .map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))?;
        let safekeeper_auth_token = match &file.safekeeper_auth_token_path {
            Some(p) => {
                let p = rel(p);
                // Checked now so a wrong path fails the start, not every WAL connection later.
                read_token_file(&p).map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))?;
                Some(SafekeeperAuthToken::File(p))
            }
            None => std::env::var("NEON_AUTH_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
                .map(|t| SafekeeperAuthToken::Env(t.into())),
        };
        Ok(PageServerConf {
            safekeeper_auth_token,
            ssl_ca,
            http_auth,
            pg_auth,
            http_tenant_concurrency_limit,
            pg_tls,
            http_tls,
            id: NodeId(file.id.unwrap_or(1)),
            workdir: workdir.to_path_buf(),
            listen_pg_addr: addr(file.listen_pg_addr, "127.0.0.1:64000", "listen_pg_addr")?,
            listen_http_addr: addr(file.listen_http_addr, "127.0.0.1:9898", "listen_http_addr")?,
            pg_install_dir,
            safekeepers: file.safekeepers,
            walredo_process_count: file.walredo_process_count.unwrap_or(2),
            superuser: file.superuser.unwrap_or_else(|| "cloud_admin".to_string()),
            default_tenant_conf: tenant_conf,
            wait_lsn_timeout: match &file.wait_lsn_timeout {
                Some(t) => parse_duration(t).map_err(|e| anyhow::anyhow!("wait_lsn_timeout: {e}"))?,
                None => Duration::from_secs(60),
            },
            max_local_layer_bytes: match (file.max_local_layer_bytes, &file.remote_storage) {
                (Some(_), None) => anyhow::bail!(
                    "{}: max_local_layer_bytes needs [remote_storage]: evicted layers are downloaded from there",
                    path.display()
                ),
                (limit, _) => limit,
            },
            remote_storage: file.remote_storage,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(7 * 86400));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("10y").is_err());
    }

    #[test]
    fn config_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("pageserver.toml"),
            "id = 7\nlisten_pg_addr = '127.0.0.1:1234'\nsafekeepers = ['127.0.0.1:5454']\ncheckpoint_distance = 1048576\n\
             [tenant_config]\npitr_interval = '1h'\ncompaction_threshold = 4\n",
        )
        .unwrap();
        let c = PageServerConf::load(dir.path()).unwrap();
        assert_eq!(c.id, NodeId(7));
        assert_eq!(c.listen_pg_addr.port(), 1234);
        assert_eq!(c.default_tenant_conf.checkpoint_distance_bytes, 1 << 20);
        assert_eq!(c.default_tenant_conf.pitr_interval, Duration::from_secs(3600));
        assert_eq!(c.default_tenant_conf.compaction_threshold, 4);
        std::fs::write(dir.path().join("pageserver.toml"), "bogus = 1\n").unwrap();
        let e = PageServerConf::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
        assert!(c.remote_storage.is_none(), "no remote storage unless configured");
    }

    #[test]
    fn remote_storage_section() {
        let dir = tempfile::tempdir().unwrap();
        let write = |text: &str| std::fs::write(dir.path().join("pageserver.toml"), text).unwrap();
        write("id = 1\n[remote_storage]\nlocal_path = '/tmp/remote'\n");
        let c = PageServerConf::load(dir.path()).unwrap();
        assert_eq!(
            c.remote_storage,
            Some(RemoteStorageConfig::LocalFs(remote_storage::LocalFsConfig { local_path: "/tmp/remote".into() }))
        );
        write(
            "remote_storage = { bucket_name = 'neon', bucket_region = 'us-east-1', endpoint = 'http://127.0.0.1:5000', \
             prefix_in_bucket = 'ps' }\n",
        );
        let Some(RemoteStorageConfig::S3(s3)) = PageServerConf::load(dir.path()).unwrap().remote_storage else {
            panic!("expected S3");
        };
        assert_eq!((s3.bucket_name.as_str(), s3.prefix_in_bucket.as_deref()), ("neon", Some("ps")));
        write("[remote_storage]\nbucket_name = 'neon'\n");
        let e = PageServerConf::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("bucket_region"), "{e}");
    }

    #[test]
    fn safekeeper_auth_token_file() {
        let dir = tempfile::tempdir().unwrap();
        let token = "eyJhbGciOiJFZERTQSJ9.eyJzY29wZSI6InNhZmVrZWVwZXJkYXRhIn0.c2lnbmF0dXJlLW9mLXRoZS10ZXN0";
        let write = |text: &str| std::fs::write(dir.path().join("pageserver.toml"), text).unwrap();
        std::fs::write(dir.path().join("sk.jwt"), format!("{token}\n")).unwrap();
        write("safekeeper_auth_token_path = 'sk.jwt'\n");
        let c = PageServerConf::load(dir.path()).unwrap();
        let t = c.safekeeper_auth_token.as_ref().expect("configured");
        assert_eq!(t.get().unwrap(), token, "read relative to the workdir, newline trimmed");
        let debug = format!("{c:?}");
        assert!(debug.contains("sk.jwt") && !token.split('.').any(|p| debug.contains(p)), "{debug}");
        // Re-read at each use: a rotated token is picked up.
        std::fs::write(dir.path().join("sk.jwt"), "a.b.c").unwrap();
        assert_eq!(t.get().unwrap(), "a.b.c");
        // Errors name the file and never carry its content.
        for (content, want) in [(None, "cannot read"), (Some("  \n"), "empty"), (Some("not a jwt"), "single JWT")] {
            match content {
                Some(text) => std::fs::write(dir.path().join("sk.jwt"), text).unwrap(),
                None => std::fs::remove_file(dir.path().join("sk.jwt")).unwrap(),
            }
            let e = format!("{:#}", PageServerConf::load(dir.path()).unwrap_err());
            assert!(e.contains("sk.jwt") && e.contains("pageserver.toml") && e.contains(want), "{e}");
            assert!(!e.contains("not a jwt"), "{e}");
        }
        let env = SafekeeperAuthToken::Env(token.into());
        assert_eq!(env.get().unwrap(), token);
        assert!(!format!("{env:?}").contains(token.split('.').nth(2).unwrap()));
    }
}
