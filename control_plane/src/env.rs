//! The local environment: its config file, daemons and endpoints.

use std::collections::BTreeMap;
use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use utils::{Lsn, TenantId, TimelineId};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum StopMode {
    Fast,
    Immediate,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PageserverConf {
    pub pg_port: u16,
    pub http_port: u16,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SafekeeperConf {
    pub id: u32,
    pub pg_port: u16,
    pub http_port: u16,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EndpointConf {
    pub tenant_id: TenantId,
    pub timeline_id: TimelineId,
    pub branch: String,
    pub pg_port: u16,
    pub http_port: u16,
    /// A read-only endpoint at this LSN; `None` for the branch's primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub static_lsn: Option<Lsn>,
    /// A hot standby streaming the branch's WAL from the safekeepers (read-only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hot_standby: bool,
}

impl EndpointConf {
    /// With the stack's CA (`init --auth`), the URL asks for TLS checked against it.
    pub fn connstr(&self, tls_ca: Option<&Path>) -> String {
        let base = format!("postgresql://cloud_admin@127.0.0.1:{}/postgres", self.pg_port);
        match tls_ca {
            Some(ca) => format!("{base}?sslmode=verify-full&sslrootcert={}", url_encode(&ca.display().to_string())),
            None => base,
        }
    }

    pub fn mode_desc(&self) -> String {
        match self.static_lsn {
            Some(l) => format!("static at {l}"),
            None if self.hot_standby => "hot standby".into(),
            None => "primary".into(),
        }
    }

    /// The branch's read-write endpoint (at most one per branch).
    pub fn is_primary(&self) -> bool {
        self.static_lsn.is_none() && !self.hot_standby
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    pub pg_install: PathBuf,
    /// Added to every default port (`NEON_LOCAL_PORT_OFFSET` at init), to run beside another stack.
    #[serde(default)]
    pub port_offset: u16,
    /// First port tried for endpoints (`NEON_LOCAL_ENDPOINT_PORT_BASE` at init; default 55432
    /// plus the offset); their HTTP ports start at 3080 plus the offset.
    #[serde(default)]
    pub endpoint_port_base: Option<u16>,
    pub bin_dir: PathBuf,
    pub pageserver: PageserverConf,
    pub safekeepers: Vec<SafekeeperConf>,
    pub default_tenant: Option<TenantId>,
    /// tenant → branch name → timeline
    pub branches: BTreeMap<String, BTreeMap<String, TimelineId>>,
    pub endpoints: BTreeMap<String, EndpointConf>,
    /// The remote storage `init` gave the pageserver, as the safekeepers' `--remote-storage`
    /// JSON: they offload WAL to the same place (under `wal/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safekeeper_remote_storage: Option<serde_json::Value>,
    /// `init --auth`: every daemon checks JWTs against `auth/public.pem`; tokens are minted
    /// from `auth/private.pem` when a daemon starts (see [`Env::token`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auth: bool,
    /// `init --auth` also turns on TLS: every daemon and compute serves `tls/server.crt` and
    /// refuses plaintext; every client checks servers against `tls/ca.crt`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls: bool,
}

pub struct Env {
    pub dir: PathBuf,
    pub conf: Config,
}

/// A process neon_local starts and stops.
pub struct Daemon {
    pub name: String,
    pub dir: PathBuf,
    pub argv: Vec<String>,
    pub health_url: String,
    pub ports: Vec<u16>,
    /// Extra environment (the daemon's token as `NEON_AUTH_TOKEN`); never printed.
    pub env: Vec<(String, String)>,
}

/// neon_local's own token for the daemons' HTTP APIs (`admin`), when the environment has auth.
static HTTP_TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// neon_local's HTTP client: HTTPS trusting only the stack's CA when it has TLS.
static AGENT: std::sync::OnceLock<ureq::Agent> = std::sync::OnceLock::new();

fn http() -> &'static ureq::Agent {
    AGENT.get_or_init(ureq::Agent::new)
}

/// Adds neon_local's bearer token to a request when the environment has auth.
fn authed(req: ureq::Request) -> ureq::Request {
    match HTTP_TOKEN.get() {
        Some(t) => req.set("Authorization", &format!("Bearer {t}")),
        None => req,
    }
}

/// Absolute, so every path handed to a daemon (config files, keys, certificates) is too.
fn repo_dir() -> PathBuf {
    let dir = std::env::var_os("NEON_REPO_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".neon"));
    std::path::absolute(&dir).unwrap_or(dir)
}

fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Where the pageserver offloads its layers (`init --remote-storage`).
pub enum RemoteStorage {
    None,
    /// `<repo>/remote_storage`.
    Local,
    S3 {
        bucket: String,
        region: String,
        endpoint: Option<String>,
        prefix: Option<String>,
    },
}

impl RemoteStorage {
    /// The same storage as the safekeepers' `--remote-storage` JSON.
    fn safekeeper_json(&self, local: &Path) -> Option<serde_json::Value> {
        match self {
            RemoteStorage::None => None,
            RemoteStorage::Local => Some(serde_json::json!({ "local_path": local })),
            RemoteStorage::S3 { bucket, region, endpoint, prefix } => {
                let mut v = serde_json::json!({ "bucket_name": bucket, "bucket_region": region });
                if let Some(e) = endpoint {
                    v["endpoint"] = e.clone().into();
                }
                if let Some(p) = prefix {
                    v["prefix_in_bucket"] = p.clone().into();
                }
                Some(v)
            }
        }
    }

    /// The `[remote_storage]` section of `pageserver.toml`.
    fn toml_section(&self, local: &Path) -> anyhow::Result<String> {
        let lit = |what: &str, v: &str| -> anyhow::Result<String> {
            if v.is_empty() || v.contains(['\'', '\n', '\r']) {
                bail!("{what} '{v}' must be non-empty and hold no quote or line break");
            }
            Ok(format!("'{v}'"))
        };
        Ok(match self {
            RemoteStorage::None => String::new(),
            RemoteStorage::Local => {
                format!(
                    "\n[remote_storage]\nlocal_path = {}\n",
                    lit("remote storage path", &local.display().to_string())?
                )
            }
            RemoteStorage::S3 { bucket, region, endpoint, prefix } => {
                let mut s = format!(
                    "\n[remote_storage]\nbucket_name = {}\nbucket_region = {}\n",
                    lit("--s3-bucket", bucket)?,
                    lit("--s3-region", region)?
                );
                if let Some(e) = endpoint {
                    s.push_str(&format!("endpoint = {}\n", lit("--s3-endpoint", e)?));
                }
                if let Some(p) = prefix {
                    s.push_str(&format!("prefix_in_bucket = {}\n", lit("--s3-prefix", p)?));
                }
                s
            }
        })
    }
}

/// Encryption at rest of what goes to remote storage (`init --encryption-kek-file`): the
/// `encryption` section both the pageserver and the safekeepers get.
pub struct RemoteEncryption {
    pub kek_id: String,
    /// Absolute, so the daemons find it from their own directories.
    pub kek_file: PathBuf,
}

impl RemoteEncryption {
    /// Checks the id and that the file holds a key (64 hex digits or 32 raw bytes), so that a bad
    /// key fails `init`, not the first `start`. The daemons check it again when they load it.
    pub fn new(kek_id: String, kek_file: &Path) -> anyhow::Result<RemoteEncryption> {
        if kek_id.is_empty()
            || kek_id.len() > 64
            || !kek_id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            bail!("--encryption-kek-id '{kek_id}' must be 1 to 64 ASCII letters, digits, '_', '-' or '.'");
        }
        let contents = fs::read(kek_file)
            .with_context(|| format!("--encryption-kek-file {}: cannot read it", kek_file.display()))?;
        let is_hex_key = std::str::from_utf8(&contents)
            .map(|text| text.trim().len() == 64 && text.trim().bytes().all(|b| b.is_ascii_hexdigit()))
            .unwrap_or(false);
        if contents.len() != 32 && !is_hex_key {
            bail!(
                "--encryption-kek-file {} must hold a 256-bit key as 64 hex digits (openssl rand -hex 32) or 32 raw \
                 bytes; it holds {} bytes",
                kek_file.display(),
                contents.len()
            );
        }
        Ok(RemoteEncryption { kek_id, kek_file: std::path::absolute(kek_file)? })
    }

    /// The `[remote_storage.encryption]` table, appended after `[remote_storage]`.
    fn toml_section(&self) -> anyhow::Result<String> {
        let file = self.kek_file.display().to_string();
        if file.contains(['\'', '\n', '\r']) {
            bail!("--encryption-kek-file '{file}' must hold no quote or line break");
        }
        Ok(format!("[remote_storage.encryption]\nkek_id = '{}'\nkek_file = '{file}'\n", self.kek_id))
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({ "kek_id": self.kek_id, "kek_file": self.kek_file })
    }
}

/// Who answers an HTTP call, for error messages: its name and the command that starts it.
#[derive(Clone)]
pub struct Peer {
    pub name: String,
    pub start_cmd: String,
}

fn api_error(peer: &Peer, url: &str, e: ureq::Error) -> anyhow::Error {
    match e {
        ureq::Error::Status(code, resp) => {
            let text = resp.into_string().unwrap_or_default();
            let msg = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("msg").and_then(|m| m.as_str()).map(str::to_string))
                .unwrap_or(text);
            anyhow::anyhow!("{}: {} (HTTP {code})", peer.name, msg.trim())
        }
        ureq::Error::Transport(t) => {
            let base = url.split('/').take(3).collect::<Vec<_>>().join("/");
            anyhow::anyhow!(
                "{} is not answering at {base} ({}): is the daemon running? start it with '{}'",
                peer.name,
                t.kind(),
                peer.start_cmd
            )
        }
    }
}

fn http_get(peer: &Peer, url: &str) -> anyhow::Result<serde_json::Value> {
    match authed(http().get(url)).timeout(Duration::from_secs(10)).call() {
        Ok(resp) => Ok(resp.into_json()?),
        Err(e) => Err(api_error(peer, url, e)),
    }
}

fn http_post(peer: &Peer, url: &str, body: serde_json::Value) -> anyhow::Result<serde_json::Value> {
    match authed(http().post(url)).timeout(Duration::from_secs(180)).send_json(body) {
        Ok(resp) => Ok(resp.into_json()?),
        Err(e) => Err(api_error(peer, url, e)),
    }
}

fn http_put(peer: &Peer, url: &str, body: serde_json::Value) -> anyhow::Result<serde_json::Value> {
    match authed(http().put(url)).timeout(Duration::from_secs(180)).send_json(body) {
        Ok(resp) => Ok(resp.into_json()?),
        Err(e) => Err(api_error(peer, url, e)),
    }
}

fn http_delete(peer: &Peer, url: &str) -> anyhow::Result<()> {
    match authed(http().delete(url)).timeout(Duration::from_secs(30)).call() {
        Ok(_) => Ok(()),
        Err(e) => Err(api_error(peer, url, e)),
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| !s.contains(") Z ")).unwrap_or(false)
}

impl Env {
    fn config_path(dir: &Path) -> PathBuf {
        dir.join("config.json")
    }

    pub fn init(
        num_safekeepers: u32,
        remote: &RemoteStorage,
        encryption: Option<&RemoteEncryption>,
        force: bool,
        auth: bool,
    ) -> anyhow::Result<Env> {
        let dir = repo_dir();
        let mut remote_section = remote.toml_section(&dir.join("remote_storage"))?;
        let mut safekeeper_remote_storage = remote.safekeeper_json(&dir.join("remote_storage"));
        if let Some(encryption) = encryption {
            let Some(safekeeper_json) = safekeeper_remote_storage.as_mut() else {
                bail!("--encryption-kek-file needs --remote-storage local|s3 (it encrypts what is uploaded there)");
            };
            remote_section.push_str(&encryption.toml_section()?);
            safekeeper_json["encryption"] = encryption.json();
        }
        if dir.exists() {
            if !force {
                bail!(
                    "{} already exists; use 'neon_local init --force' to replace it (its data is lost)",
                    dir.display()
                );
            }
            if let Ok(env) = Env::load() {
                let _ = env.stop_all(StopMode::Immediate);
            }
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        if num_safekeepers == 0 {
            bail!("--num-safekeepers must be at least 1");
        }
        let pg_install =
            std::env::var_os("PG_INSTALL_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("pg_install"));
        // Absolute but not resolved: `pg_install` is a symlink postgres/build.sh moves to each new
        // build, and the build it pointed to before is eventually deleted.
        let pg_install = std::path::absolute(&pg_install)?;
        if !pg_install.join("bin/postgres").exists() {
            bail!("Postgres build not found at {}: run postgres/build.sh or set PG_INSTALL_DIR", pg_install.display());
        }
        let bin_dir = std::env::current_exe()?.parent().context("binary directory")?.to_path_buf();
        for b in ["pageserver", "safekeeper", "compute_ctl"] {
            if !bin_dir.join(b).exists() {
                bail!(
                    "{b} not found next to neon_local in {}: run 'cargo build --workspace --bins'",
                    bin_dir.display()
                );
            }
        }
        let off: u16 = match std::env::var("NEON_LOCAL_PORT_OFFSET") {
            Ok(v) => v
                .parse()
                .ok()
                .filter(|&o: &u16| o <= 1500)
                .context("NEON_LOCAL_PORT_OFFSET must be a number 0..=1500")?,
            Err(_) => 0,
        };
        fs::create_dir_all(&dir)?;
        let conf = Config {
            pg_install,
            port_offset: off,
            endpoint_port_base: match std::env::var("NEON_LOCAL_ENDPOINT_PORT_BASE") {
                Ok(v) => Some(v.parse().context("NEON_LOCAL_ENDPOINT_PORT_BASE must be a port number")?),
                Err(_) => None,
            },
            bin_dir,
            pageserver: PageserverConf { pg_port: 64000 + off, http_port: 9898 + off },
            safekeepers: (1..=num_safekeepers)
                .map(|id| SafekeeperConf {
                    id,
                    pg_port: 5454 + off + id as u16 - 1,
                    http_port: 7676 + off + id as u16 - 1,
                })
                .collect(),
            default_tenant: None,
            branches: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            safekeeper_remote_storage,
            auth,
            tls: auth,
        };
        let env = Env { dir, conf };
        fs::create_dir_all(env.dir.join("pageserver"))?;
        let auth_section = if auth {
            utils::auth::write_keypair(&env.auth_dir())?;
            format!(
                "auth_validation_public_key_path = '{}'\nhttp_auth_type = 'NeonJWT'\npg_auth_type = 'NeonJWT'\n",
                env.auth_dir().join("public.pem").display()
            )
        } else {
            String::new()
        };
        let tls_section = if env.conf.tls {
            crate::tls::generate(&env.tls_dir())?;
            let f = |name: &str| env.tls_dir().join(name).display().to_string();
            format!(
                "ssl_cert_file = '{}'\nssl_key_file = '{}'\nssl_ca_file = '{}'\n",
                f(crate::tls::SERVER_CERT),
                f(crate::tls::SERVER_KEY),
                f(crate::tls::CA_CERT)
            )
        } else {
            String::new()
        };
        env.set_http_client()?;
        let sks: Vec<String> = env.conf.safekeepers.iter().map(|s| format!("'127.0.0.1:{}'", s.pg_port)).collect();
        fs::write(
            env.dir.join("pageserver/pageserver.toml"),
            format!(
                "id = 1\nlisten_pg_addr = '127.0.0.1:{}'\nlisten_http_addr = '127.0.0.1:{}'\npg_distrib_dir = '{}'\nsafekeepers = [{}]\n{auth_section}{tls_section}{remote_section}",
                env.conf.pageserver.pg_port,
                env.conf.pageserver.http_port,
                env.conf.pg_install.display(),
                sks.join(", ")
            ),
        )?;
        fs::create_dir_all(env.dir.join("remote_storage"))?;
        env.save()?;
        Ok(env)
    }

    pub fn load() -> anyhow::Result<Env> {
        let dir = repo_dir();
        let path = Self::config_path(&dir);
        let text = fs::read_to_string(&path)
            .with_context(|| format!("no environment at {}: run 'neon_local init' first", dir.display()))?;
        let conf = serde_json::from_str(&text).with_context(|| format!("bad {}", path.display()))?;
        let env = Env { dir, conf };
        env.set_http_client()?;
        Ok(env)
    }

    /// neon_local's token and TLS trust for the daemons' HTTP APIs.
    fn set_http_client(&self) -> anyhow::Result<()> {
        if self.conf.auth {
            if let Some(t) = self.token(utils::auth::Scope::Admin, None)? {
                let _ = HTTP_TOKEN.set(t);
            }
        }
        let ca = self.tls_ca();
        let _ = AGENT.set(crate::tls::agent(ca.as_deref())?);
        Ok(())
    }

    pub fn tls_dir(&self) -> PathBuf {
        self.dir.join("tls")
    }

    /// The stack's CA certificate, when it has TLS.
    pub fn tls_ca(&self) -> Option<PathBuf> {
        self.conf.tls.then(|| self.tls_dir().join(crate::tls::CA_CERT))
    }

    /// `http` or `https`.
    fn scheme(&self) -> &'static str {
        if self.conf.tls {
            "https"
        } else {
            "http"
        }
    }

    /// The TLS flags of a safekeeper or compute_ctl: serve the stack's certificate, trust its CA.
    fn tls_args(&self) -> Vec<String> {
        if !self.conf.tls {
            return Vec::new();
        }
        let f = |name: &str| self.tls_dir().join(name).display().to_string();
        vec![
            "--ssl-cert-file".into(),
            f(crate::tls::SERVER_CERT),
            "--ssl-key-file".into(),
            f(crate::tls::SERVER_KEY),
            "--ssl-ca-file".into(),
            f(crate::tls::CA_CERT),
        ]
    }

    /// The connection string of an endpoint.
    pub fn connstr(&self, ep: &EndpointConf) -> String {
        ep.connstr(self.tls_ca().as_deref())
    }

    fn save(&self) -> anyhow::Result<()> {
        let path = Self::config_path(&self.dir);
        let tmp = path.with_extension("json.tmp");
        fs::write(&tmp, serde_json::to_string_pretty(&self.conf)?)?;
        fs::rename(&tmp, &path)?;
        Ok(())
    }

    fn bin(&self, name: &str) -> String {
        self.conf.bin_dir.join(name).display().to_string()
    }

    pub fn auth_dir(&self) -> PathBuf {
        self.dir.join("auth")
    }

    /// A fresh token (valid 7 days) when the environment has auth, minted from its private key.
    pub fn token(&self, scope: utils::auth::Scope, tenant_id: Option<TenantId>) -> anyhow::Result<Option<String>> {
        if !self.conf.auth {
            return Ok(None);
        }
        let key_path = self.auth_dir().join("private.pem");
        let key = fs::read(&key_path).with_context(|| format!("reading {}", key_path.display()))?;
        let exp = utils::auth::now_unix_secs() + 7 * 24 * 3600;
        Ok(Some(utils::auth::encode(&key, &utils::auth::Claims { scope, tenant_id, exp })?))
    }

    /// `NEON_AUTH_TOKEN` for a daemon, or nothing without auth.
    fn token_env(&self, scope: utils::auth::Scope, tenant_id: Option<TenantId>) -> Vec<(String, String)> {
        match self.token(scope, tenant_id) {
            Ok(Some(t)) => vec![("NEON_AUTH_TOKEN".to_string(), t)],
            _ => Vec::new(),
        }
    }

    /// The safekeepers' auth flags.
    fn auth_args(&self, public_key_flag: &str) -> Vec<String> {
        if !self.conf.auth {
            return Vec::new();
        }
        let key = self.auth_dir().join("public.pem");
        let mut args = vec![public_key_flag.to_string(), key.display().to_string()];
        if public_key_flag == "--auth-validation-public-key-path" {
            args.extend(["--http-auth-type", "NeonJWT", "--pg-auth-type", "NeonJWT"].map(String::from));
        }
        args
    }

    fn ps_http(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.conf.pageserver.http_port)
    }

    pub fn pageserver_daemon(&self) -> Daemon {
        let dir = self.dir.join("pageserver");
        Daemon {
            name: "pageserver".into(),
            argv: vec![self.bin("pageserver"), "--workdir".into(), dir.display().to_string()],
            dir,
            health_url: format!("{}/v1/status", self.ps_http()),
            ports: vec![self.conf.pageserver.pg_port, self.conf.pageserver.http_port],
            // For the safekeepers (WAL receiver).
            env: self.token_env(utils::auth::Scope::SafekeeperData, None),
        }
    }

    pub fn safekeeper_daemon(&self, id: u32) -> anyhow::Result<Daemon> {
        let sk = self.conf.safekeepers.iter().find(|s| s.id == id).with_context(|| {
            format!("safekeeper {id} does not exist; this environment has {}", self.conf.safekeepers.len())
        })?;
        let dir = self.dir.join(format!("safekeepers/sk{id}"));
        let peers: Vec<String> =
            self.conf.safekeepers.iter().filter(|s| s.id != id).map(|s| format!("127.0.0.1:{}", s.pg_port)).collect();
        let mut argv = vec![
            self.bin("safekeeper"),
            "--id".into(),
            id.to_string(),
            "--datadir".into(),
            dir.join("data").display().to_string(),
            "--listen-pg".into(),
            format!("127.0.0.1:{}", sk.pg_port),
            "--listen-http".into(),
            format!("127.0.0.1:{}", sk.http_port),
        ];
        if !peers.is_empty() {
            argv.push("--peers".into());
            argv.push(peers.join(","));
        }
        if let Some(rs) = &self.conf.safekeeper_remote_storage {
            argv.push("--remote-storage".into());
            argv.push(rs.to_string());
        }
        argv.extend(self.auth_args("--auth-validation-public-key-path"));
        argv.extend(self.tls_args());
        Ok(Daemon {
            name: format!("safekeeper {id}"),
            dir,
            argv,
            health_url: format!("{}://127.0.0.1:{}/v1/status", self.scheme(), sk.http_port),
            ports: vec![sk.pg_port, sk.http_port],
            // For its peers (recovery, offload polls).
            env: self.token_env(utils::auth::Scope::SafekeeperData, None),
        })
    }

    fn read_pid(d: &Daemon) -> Option<u32> {
        fs::read_to_string(d.dir.join("pid")).ok()?.trim().parse().ok().filter(|&p| pid_alive(p))
    }

    pub fn daemon_status(&self, d: &Daemon) -> String {
        match Self::read_pid(d) {
            Some(pid) => {
                let healthy = authed(http().get(&d.health_url)).timeout(Duration::from_secs(2)).call().is_ok();
                format!(
                    "{}: running (pid {pid}, ports {:?}, {})",
                    d.name,
                    d.ports,
                    if healthy { "healthy" } else { "NOT answering" }
                )
            }
            None => format!("{}: stopped (ports {:?})", d.name, d.ports),
        }
    }

    pub fn start_daemon(&self, d: &Daemon) -> anyhow::Result<()> {
        if let Some(pid) = Self::read_pid(d) {
            println!("{} already running (pid {pid})", d.name);
            return Ok(());
        }
        for &p in &d.ports {
            if !port_free(p) {
                bail!(
                    "port {p} for {} is in use by another process; stop it or change the port in {}",
                    d.name,
                    Self::config_path(&self.dir).display()
                );
            }
        }
        fs::create_dir_all(&d.dir)?;
        let log_path = d.dir.join("log");
        let log = fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let mut cmd = Command::new(&d.argv[0]);
        cmd.args(&d.argv[1..]).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).process_group(0);
        cmd.envs(d.env.iter().map(|(k, v)| (k, v)));
        let child = cmd.spawn().with_context(|| format!("starting {}", d.name))?;
        fs::write(d.dir.join("pid"), child.id().to_string())?;
        print!("starting {} (pid {}, waiting for {})...", d.name, child.id(), d.health_url);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if authed(http().get(&d.health_url)).timeout(Duration::from_secs(1)).call().is_ok() {
                println!(" ok");
                return Ok(());
            }
            let exited = !pid_alive(child.id());
            if exited || Instant::now() > deadline {
                println!(" failed");
                if !exited {
                    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).status();
                }
                let _ = fs::remove_file(d.dir.join("pid"));
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                let why = last_error(&log).unwrap_or_else(|| {
                    if exited {
                        "it exited".into()
                    } else {
                        format!("{} did not answer within 60 s", d.health_url)
                    }
                });
                bail!("{} failed to start: {why}; see {}", d.name, log_path.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stop_daemon(&self, d: &Daemon, mode: StopMode) -> anyhow::Result<()> {
        let Some(pid) = Self::read_pid(d) else {
            println!("{} is not running", d.name);
            return Ok(());
        };
        // Daemons run in their own process group: an immediate stop kills the group, so a
        // compute's Postgres goes with its compute_ctl.
        let group = format!("-{pid}");
        match mode {
            StopMode::Fast => {
                let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
            }
            StopMode::Immediate => {
                let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while pid_alive(pid) {
            if Instant::now() > deadline {
                let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Whatever is left of the group (a compute's Postgres while it shuts down) must not
        // keep the ports.
        let deadline = Instant::now() + Duration::from_secs(30);
        while d.ports.iter().any(|&p| !port_free(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = fs::remove_file(d.dir.join("pid"));
        println!("stopped {}", d.name);
        Ok(())
    }

    pub fn start_all(&self) -> anyhow::Result<()> {
        for sk in &self.conf.safekeepers {
            self.start_daemon(&self.safekeeper_daemon(sk.id)?)?;
        }
        self.start_daemon(&self.pageserver_daemon())
    }

    pub fn stop_all(&self, mode: StopMode) -> anyhow::Result<()> {
        for name in self.conf.endpoints.keys() {
            self.stop_daemon(&self.endpoint_daemon(name)?, mode)?;
        }
        self.stop_daemon(&self.pageserver_daemon(), mode)?;
        for sk in &self.conf.safekeepers {
            self.stop_daemon(&self.safekeeper_daemon(sk.id)?, mode)?;
        }
        Ok(())
    }

    fn ps_peer(&self) -> Peer {
        Peer { name: "pageserver".into(), start_cmd: "neon_local pageserver start".into() }
    }

    fn sk_peer(sk: &SafekeeperConf) -> Peer {
        Peer { name: format!("safekeeper {}", sk.id), start_cmd: format!("neon_local safekeeper start {}", sk.id) }
    }

    fn ps_get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        http_get(&self.ps_peer(), &format!("{}{path}", self.ps_http()))
    }

    fn ps_post(&self, path: &str, body: serde_json::Value) -> anyhow::Result<serde_json::Value> {
        http_post(&self.ps_peer(), &format!("{}{path}", self.ps_http()), body)
    }

    fn ps_put(&self, path: &str, body: serde_json::Value) -> anyhow::Result<serde_json::Value> {
        http_put(&self.ps_peer(), &format!("{}{path}", self.ps_http()), body)
    }

    fn sk_url(&self, sk: &SafekeeperConf, path: &str) -> String {
        format!("{}://127.0.0.1:{}{path}", self.scheme(), sk.http_port)
    }

    /// Branch name of a timeline, if neon_local knows it.
    fn branch_name(&self, tenant: TenantId, tl: &str) -> Option<String> {
        self.conf
            .branches
            .get(&tenant.to_string())
            .and_then(|b| b.iter().find(|(_, id)| id.to_string() == tl).map(|(n, _)| n.clone()))
    }

    pub fn print_status(&self) -> anyhow::Result<()> {
        let ps = self.pageserver_daemon();
        println!("{}", self.daemon_status(&ps));
        let ps_up = Self::read_pid(&ps).is_some();
        for t in self.conf.branches.keys() {
            let Ok(tenant) = t.parse::<TenantId>() else { continue };
            if !ps_up {
                break;
            }
            match self.ps_get(&format!("/v1/tenant/{t}/timeline")) {
                Ok(infos) => {
                    for i in infos.as_array().into_iter().flatten() {
                        let id = i["timeline_id"].as_str().unwrap_or("?");
                        println!(
                            "  tenant {t} branch '{}' [{id}]: last record {}, disk consistent {}",
                            self.branch_name(tenant, id).unwrap_or_else(|| "(unnamed)".into()),
                            i["last_record_lsn"].as_str().unwrap_or("?"),
                            i["disk_consistent_lsn"].as_str().unwrap_or("?"),
                        );
                    }
                }
                Err(e) => println!("  tenant {t}: {e:#}"),
            }
        }
        for sk in &self.conf.safekeepers {
            let d = self.safekeeper_daemon(sk.id)?;
            println!("{}", self.daemon_status(&d));
            if Self::read_pid(&d).is_none() {
                continue;
            }
            for (t, branches) in &self.conf.branches {
                for (name, tl) in branches {
                    let url = self.sk_url(sk, &format!("/v1/tenant/{t}/timeline/{tl}"));
                    match http_get(&Self::sk_peer(sk), &url) {
                        Ok(v) => println!(
                            "  tenant {t} branch '{name}' [{tl}]: commit {}, flush {}, term {}",
                            v["commit_lsn"].as_str().unwrap_or("?"),
                            v["flush_lsn"].as_str().unwrap_or("?"),
                            v["term"]
                        ),
                        Err(e) => println!("  tenant {t} branch '{name}' [{tl}]: {e:#}"),
                    }
                }
            }
        }
        for (name, ep) in &self.conf.endpoints {
            let d = self.endpoint_daemon(name)?;
            println!("{}", self.daemon_status(&d));
            let lsn = if Self::read_pid(&d).is_some() {
                authed(http().get(&d.health_url))
                    .timeout(Duration::from_secs(2))
                    .call()
                    .ok()
                    .and_then(|r| r.into_json::<serde_json::Value>().ok())
                    .map(|v| {
                        format!(
                            ", compute {} from {}",
                            v["status"].as_str().unwrap_or("?"),
                            v["start_lsn"].as_str().unwrap_or("?")
                        )
                    })
                    .unwrap_or_default()
            } else {
                String::new()
            };
            println!("  {} on branch '{}'{lsn}: {}", ep.mode_desc(), ep.branch, self.connstr(ep));
        }
        Ok(())
    }

    fn tenant(&self, t: Option<TenantId>) -> anyhow::Result<TenantId> {
        t.or(self.conf.default_tenant).context(
            "no tenant given and no default tenant; run 'neon_local tenant create --set-default' or pass --tenant-id",
        )
    }

    fn timeline_of(&self, tenant: TenantId, branch: &str) -> anyhow::Result<TimelineId> {
        self.conf
            .branches
            .get(&tenant.to_string())
            .and_then(|b| b.get(branch))
            .copied()
            .with_context(|| format!("branch '{branch}' does not exist; see 'neon_local timeline list'"))
    }

    /// Every safekeeper must answer before we create anything, so a failure cannot leave a
    /// timeline on some daemons only.
    fn check_safekeepers_up(&self) -> anyhow::Result<()> {
        for sk in &self.conf.safekeepers {
            http_get(&Self::sk_peer(sk), &self.sk_url(sk, "/v1/status"))?;
        }
        Ok(())
    }

    fn create_sk_timelines(&self, tenant: TenantId, timeline: TimelineId, start_lsn: Lsn) -> anyhow::Result<()> {
        let mut done = Vec::new();
        for sk in &self.conf.safekeepers {
            let r = http_post(
                &Self::sk_peer(sk),
                &self.sk_url(sk, &format!("/v1/tenant/{tenant}/timeline")),
                serde_json::json!({ "timeline_id": timeline, "start_lsn": start_lsn, "pg_version": 150018 }),
            );
            if let Err(e) = r {
                // Take back what was created, so no safekeeper keeps a timeline nobody knows.
                for s in done {
                    let _ = http_delete(
                        &Self::sk_peer(s),
                        &self.sk_url(s, &format!("/v1/tenant/{tenant}/timeline/{timeline}")),
                    );
                }
                return Err(e.context(format!("creating timeline {timeline} on safekeeper {}", sk.id)));
            }
            done.push(sk);
        }
        Ok(())
    }

    pub fn create_tenant(
        &mut self,
        t: Option<TenantId>,
        tl: Option<TimelineId>,
        set_default: bool,
        config: std::collections::BTreeMap<String, String>,
    ) -> anyhow::Result<(TenantId, TimelineId)> {
        let t = t.unwrap_or_else(TenantId::generate);
        let tl = tl.unwrap_or_else(TimelineId::generate);
        if self.conf.branches.contains_key(&t.to_string()) {
            bail!("tenant {t} already exists; see 'neon_local tenant list'");
        }
        self.ps_get("/v1/status")?;
        self.check_safekeepers_up()?;
        self.ps_post("/v1/tenant", serde_json::json!({ "tenant_id": t, "config": config }))?;
        let info = self.ps_post(&format!("/v1/tenant/{t}/timeline"), serde_json::json!({ "new_timeline_id": tl }))?;
        let lsn: Lsn = info["last_record_lsn"].as_str().context("no last_record_lsn")?.parse()?;
        self.create_sk_timelines(t, tl, lsn)?;
        self.conf.branches.entry(t.to_string()).or_default().insert("main".into(), tl);
        if set_default || self.conf.default_tenant.is_none() {
            self.conf.default_tenant = Some(t);
        }
        self.save()?;
        Ok((t, tl))
    }

    /// Replaces the settings of `tenant` (default: the default tenant) and prints the effective ones.
    pub fn set_tenant_config(
        &self,
        tenant: Option<TenantId>,
        config: std::collections::BTreeMap<String, String>,
    ) -> anyhow::Result<()> {
        let t = match tenant.or(self.conf.default_tenant) {
            Some(t) => t,
            None => bail!("no tenant given and no default tenant; pass --tenant-id (see 'neon_local tenant list')"),
        };
        let v = self.ps_put(&format!("/v1/tenant/{t}/config"), serde_json::json!(config))?;
        if let Some(map) = v["effective_config"].as_object() {
            for (k, v) in map {
                println!("{k} = {}", v.as_str().unwrap_or_default());
            }
        }
        Ok(())
    }

    pub fn list_tenants(&self) -> anyhow::Result<()> {
        let v = self.ps_get("/v1/tenant")?;
        for t in v.as_array().into_iter().flatten() {
            let id = t["id"].as_str().unwrap_or("?");
            let default = self.conf.default_tenant.map(|d| d.to_string()) == Some(id.to_string());
            println!("{id} ({} timelines){}", t["timelines"], if default { " default" } else { "" });
        }
        Ok(())
    }

    fn timeline_info(&self, t: TenantId, tl: TimelineId) -> anyhow::Result<serde_json::Value> {
        self.ps_get(&format!("/v1/tenant/{t}/timeline/{tl}"))
    }

    /// The LSN at which branch `branch` looked as at `timestamp` (RFC 3339), from the
    /// pageserver: the end of the last commit at or before it.
    fn lsn_for_timestamp(&self, t: TenantId, branch: &str, timestamp: &str) -> anyhow::Result<Lsn> {
        let tl = self.timeline_of(t, branch)?;
        // The answer covers what the pageserver has ingested: let it catch up with what the
        // safekeepers have committed first.
        if let Some(committed) = self.committed_lsn(t, tl) {
            self.wait_ingested(t, tl, committed)?;
        }
        let url = format!(
            "{}/v1/tenant/{t}/timeline/{tl}/get_lsn_by_timestamp?timestamp={}",
            self.ps_http(),
            url_encode(timestamp)
        );
        let v = http_get(&self.ps_peer(), &url)?;
        let lsn: Lsn = v["lsn"].as_str().context("no lsn in get_lsn_by_timestamp answer")?.parse()?;
        match v["kind"].as_str().unwrap_or("?") {
            "present" | "future" => Ok(lsn),
            "past" => bail!(
                "timestamp {timestamp} is before the first commit on branch '{branch}'; pick a later time or use --lsn"
            ),
            "nodata" => bail!("branch '{branch}' has no commits to find timestamp {timestamp} by; use --lsn"),
            k => bail!("pageserver answered kind '{k}' for timestamp {timestamp}"),
        }
    }

    /// Waits (up to 30 s) until the pageserver has ingested branch timeline `tl` up to `lsn`.
    fn wait_ingested(&self, t: TenantId, tl: TimelineId, lsn: Lsn) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let info = self.timeline_info(t, tl)?;
            let last: Lsn = info["last_record_lsn"].as_str().context("no last_record_lsn")?.parse()?;
            if last >= lsn {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the pageserver has ingested timeline {tl} only up to {last}, not {lsn}, after 30 s; see {}",
                    self.dir.join("pageserver/log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Checks that `lsn` lies within branch `branch`'s history: not before its start (initdb
    /// or branch point), not beyond what the safekeepers have committed.
    fn check_lsn_on_branch(&self, t: TenantId, branch: &str, lsn: Lsn) -> anyhow::Result<()> {
        let tl = self.timeline_of(t, branch)?;
        let info = self.timeline_info(t, tl)?;
        let get = |k: &str| info[k].as_str().and_then(|s| s.parse::<Lsn>().ok());
        let last = get("last_record_lsn").context("no last_record_lsn")?;
        let last = self.committed_lsn(t, tl).map_or(last, |c| c.max(last));
        if let Some(anc) = get("ancestor_lsn") {
            if lsn < anc {
                bail!(
                    "LSN {lsn} is before branch '{branch}' starts at {anc}; use its ancestor branch for older data (see 'neon_local timeline list')"
                );
            }
        }
        if let Some(initdb) = get("initdb_lsn") {
            if lsn < initdb {
                bail!(
                    "LSN {lsn} is before initdb LSN {initdb} of branch '{branch}', where its data begins; pick an LSN at or after it"
                );
            }
        }
        if let Some(cutoff) = get("latest_gc_cutoff_lsn") {
            if lsn < cutoff {
                bail!(
                    "LSN {lsn} is below the garbage-collection cutoff {cutoff} of branch '{branch}': history older than \
                     the tenant's pitr_interval is not kept; pick an LSN at or after it (or raise pitr_interval with \
                     'neon_local tenant config')"
                );
            }
        }
        if lsn > last {
            bail!(
                "LSN {lsn} is beyond the last LSN {last} of branch '{branch}'; pick an LSN at or below it (see 'neon_local timeline list')"
            );
        }
        if !lsn.0.is_multiple_of(8) {
            bail!("LSN {lsn} is not a WAL record boundary (records start 8-byte aligned)");
        }
        Ok(())
    }

    pub fn branch(
        &mut self,
        tenant: Option<TenantId>,
        name: &str,
        ancestor: &str,
        lsn: Option<Lsn>,
        timestamp: Option<&str>,
    ) -> anyhow::Result<(TimelineId, Lsn)> {
        let t = self.tenant(tenant)?;
        check_name("branch", name)?;
        if self.conf.branches.get(&t.to_string()).is_some_and(|b| b.contains_key(name)) {
            bail!("branch '{name}' already exists; see 'neon_local timeline list'");
        }
        let parent = self.timeline_of(t, ancestor)?;
        self.ps_get("/v1/status")?;
        self.check_safekeepers_up()?;
        let lsn = match (lsn, timestamp) {
            (Some(_), Some(_)) => bail!("give --ancestor-start-lsn or --timestamp, not both"),
            (Some(l), None) => {
                self.check_lsn_on_branch(t, ancestor, l)?;
                Some(l)
            }
            (None, Some(ts)) => {
                let l = self.lsn_for_timestamp(t, ancestor, ts)?;
                self.check_lsn_on_branch(t, ancestor, l).with_context(|| format!("timestamp {ts}"))?;
                Some(l)
            }
            // Without an LSN, branch at what the safekeepers have committed: everything a
            // client saw acknowledged (the pageserver waits until it has ingested that far).
            (None, None) => self.committed_lsn(t, parent),
        };
        let tl = TimelineId::generate();
        let mut body = serde_json::json!({ "new_timeline_id": tl, "ancestor_timeline_id": parent });
        if let Some(l) = lsn {
            body["ancestor_start_lsn"] = serde_json::json!(l);
        }
        let info = self
            .ps_post(&format!("/v1/tenant/{t}/timeline"), body)
            .with_context(|| format!("creating branch '{name}' from '{ancestor}'"))?;
        let start: Lsn = info["last_record_lsn"].as_str().context("no last_record_lsn")?.parse()?;
        self.create_sk_timelines(t, tl, start).with_context(|| {
            format!("branch '{name}' not created (pageserver timeline {tl} stays unnamed and unused)")
        })?;
        self.conf.branches.entry(t.to_string()).or_default().insert(name.into(), tl);
        self.save()?;
        Ok((tl, start))
    }

    /// The highest commit LSN the safekeepers report for a timeline, if any answers.
    fn committed_lsn(&self, tenant: TenantId, timeline: TimelineId) -> Option<Lsn> {
        self.conf
            .safekeepers
            .iter()
            .filter_map(|sk| {
                http_get(&Self::sk_peer(sk), &self.sk_url(sk, &format!("/v1/tenant/{tenant}/timeline/{timeline}"))).ok()
            })
            .filter_map(|v| v["commit_lsn"].as_str().and_then(|s| s.parse().ok()))
            .max()
    }

    /// Branches as a tree: each with its timeline, current LSN, and where it forks off its parent.
    pub fn list_timelines(&self, tenant: Option<TenantId>) -> anyhow::Result<()> {
        let t = self.tenant(tenant)?;
        let infos = self.ps_get(&format!("/v1/tenant/{t}/timeline"))?;
        let infos: Vec<&serde_json::Value> = infos.as_array().into_iter().flatten().collect();
        let name_of = |id: &str| self.branch_name(t, id).unwrap_or_else(|| format!("(unnamed {id})"));
        let mut children: BTreeMap<Option<String>, Vec<&serde_json::Value>> = BTreeMap::new();
        let known: Vec<&str> = infos.iter().filter_map(|i| i["timeline_id"].as_str()).collect();
        for i in &infos {
            // A parent the pageserver does not list makes its child a root.
            let parent = i["ancestor_timeline_id"].as_str().filter(|p| known.contains(p)).map(str::to_string);
            children.entry(parent).or_default().push(i);
        }
        for v in children.values_mut() {
            v.sort_by_key(|i| {
                (
                    i["ancestor_lsn"].as_str().map(|s| s.parse::<Lsn>().unwrap_or_default()),
                    name_of(i["timeline_id"].as_str().unwrap_or("")),
                )
            });
        }
        fn walk(
            node: &serde_json::Value,
            prefix: &str,
            connector: &str,
            children: &BTreeMap<Option<String>, Vec<&serde_json::Value>>,
            name_of: &dyn Fn(&str) -> String,
            endpoints: &BTreeMap<String, Vec<String>>,
        ) {
            let id = node["timeline_id"].as_str().unwrap_or("?");
            let parent = node["ancestor_timeline_id"]
                .as_str()
                .map(|p| format!(" <- {} at {}", name_of(p), node["ancestor_lsn"].as_str().unwrap_or("?")));
            let eps = endpoints.get(id).map(|e| format!(" (endpoints: {})", e.join(", "))).unwrap_or_default();
            println!(
                "{prefix}{connector}{} [{id}] at {}{}{eps}",
                name_of(id),
                node["last_record_lsn"].as_str().unwrap_or("?"),
                parent.unwrap_or_default()
            );
            let kids = children.get(&Some(id.to_string())).cloned().unwrap_or_default();
            let child_prefix = match connector {
                "" => prefix.to_string(),
                "└── " => format!("{prefix}    "),
                _ => format!("{prefix}│   "),
            };
            for (n, k) in kids.iter().enumerate() {
                let c = if n + 1 == kids.len() { "└── " } else { "├── " };
                walk(k, &child_prefix, c, children, name_of, endpoints);
            }
        }
        let mut endpoints: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (n, e) in &self.conf.endpoints {
            if e.tenant_id == t {
                endpoints.entry(e.timeline_id.to_string()).or_default().push(n.clone());
            }
        }
        for root in children.get(&None).cloned().unwrap_or_default() {
            walk(root, "", "", &children, &name_of, &endpoints);
        }
        Ok(())
    }

    fn endpoint_dir(&self, name: &str) -> PathBuf {
        self.dir.join("endpoints").join(name)
    }

    pub fn endpoint_daemon(&self, name: &str) -> anyhow::Result<Daemon> {
        let ep = self
            .conf
            .endpoints
            .get(name)
            .with_context(|| format!("endpoint '{name}' does not exist; see 'neon_local endpoint list'"))?;
        let dir = self.endpoint_dir(name);
        let mut argv = vec![
            self.bin("compute_ctl"),
            "run".into(),
            "--spec".into(),
            dir.join("spec.json").display().to_string(),
            "--pgdata".into(),
            dir.join("pgdata").display().to_string(),
            "--pg-install".into(),
            self.conf.pg_install.display().to_string(),
            "--http-addr".into(),
            format!("127.0.0.1:{}", ep.http_port),
        ];
        argv.extend(self.auth_args("--auth-public-key-path"));
        argv.extend(self.tls_args());
        Ok(Daemon {
            name: format!("endpoint '{name}'"),
            argv,
            health_url: format!("{}://127.0.0.1:{}/status", self.scheme(), ep.http_port),
            ports: vec![ep.pg_port, ep.http_port],
            // The compute's own tenant token: pageserver, safekeepers, and Postgres's reads.
            env: self.token_env(utils::auth::Scope::Tenant, Some(ep.tenant_id)),
            dir,
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn create_endpoint(
        &mut self,
        name: &str,
        tenant: Option<TenantId>,
        branch: &str,
        lsn: Option<Lsn>,
        timestamp: Option<&str>,
        hot_standby: bool,
        settings: &[String],
        pg_port: Option<u16>,
        http_port: Option<u16>,
    ) -> anyhow::Result<EndpointConf> {
        if self.conf.endpoints.contains_key(name) {
            bail!("endpoint '{name}' already exists; see 'neon_local endpoint list'");
        }
        check_name("endpoint", name)?;
        let mut extra = BTreeMap::new();
        for kv in settings {
            let Some((k, v)) = kv.split_once('=') else {
                bail!("setting '{kv}' is not name=value (e.g. -c shared_buffers=16MB)");
            };
            let k = k.trim();
            if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') {
                bail!("setting name '{k}' is not a Postgres parameter name");
            }
            extra.insert(k.to_string(), v.trim().to_string());
        }
        let t = self.tenant(tenant)?;
        let tl = self.timeline_of(t, branch)?;
        if hot_standby && (lsn.is_some() || timestamp.is_some()) {
            bail!("--hot-standby follows the branch as it changes; it takes no --lsn or --timestamp");
        }
        let static_lsn = match (lsn, timestamp) {
            (Some(_), Some(_)) => bail!("give --lsn or --timestamp, not both"),
            (Some(l), None) => {
                self.check_lsn_on_branch(t, branch, l)?;
                Some(l)
            }
            (None, Some(ts)) => {
                let l = self.lsn_for_timestamp(t, branch, ts)?;
                self.check_lsn_on_branch(t, branch, l).with_context(|| format!("timestamp {ts}"))?;
                Some(l)
            }
            (None, None) => None,
        };
        if static_lsn.is_none() && !hot_standby {
            if let Some((other, _)) = self.conf.endpoints.iter().find(|(_, e)| e.timeline_id == tl && e.is_primary()) {
                bail!(
                    "branch '{branch}' already has endpoint '{other}': a branch has one primary; create a branch for another one, a read-only endpoint with --lsn, or a replica with --hot-standby"
                );
            }
        }
        let used: BTreeMap<u16, &String> =
            self.conf.endpoints.iter().flat_map(|(n, e)| [(e.pg_port, n), (e.http_port, n)]).collect();
        for p in [pg_port, http_port].into_iter().flatten() {
            // Allowed (the endpoints may never run at once), but it will not start beside it.
            if let Some(other) = used.get(&p) {
                eprintln!(
                    "warning: port {p} is also assigned to endpoint '{other}'; only one of them can run at a time"
                );
            }
        }
        if pg_port.is_some() && pg_port == http_port {
            bail!("--pg-port and --http-port must differ");
        }
        // The first port not taken by another endpoint and free right now.
        let pick = |given: Option<u16>, base: u16, other: Option<u16>| -> u16 {
            given.unwrap_or_else(|| {
                (base..base.saturating_add(1000))
                    .find(|p| !used.contains_key(p) && Some(*p) != other && port_free(*p))
                    .unwrap_or(base)
            })
        };
        let pg = pick(pg_port, self.conf.endpoint_port_base.unwrap_or(55432 + self.conf.port_offset), http_port);
        let ep = EndpointConf {
            tenant_id: t,
            timeline_id: tl,
            branch: branch.into(),
            pg_port: pg,
            http_port: pick(
                http_port,
                self.conf.endpoint_port_base.map_or(3080 + self.conf.port_offset, |b| b.saturating_add(500)),
                Some(pg),
            ),
            static_lsn,
            hot_standby,
        };
        let mut spec = serde_json::json!({
            "tenant_id": t,
            "timeline_id": tl,
            "pageserver": format!("127.0.0.1:{}", self.conf.pageserver.pg_port),
            "mode": "primary",
            "pg_port": ep.pg_port,
            "settings": {
                // Two-phase commit works out of the box; a read-only endpoint needs at least the
                // primary's value, so every endpoint gets the same.
                "max_prepared_transactions": MAX_PREPARED_TRANSACTIONS.to_string(),
            },
        });
        for (k, v) in extra {
            spec["settings"][k] = serde_json::json!(v);
        }
        match static_lsn {
            Some(l) => {
                spec["mode"] = serde_json::json!("static");
                spec["lsn"] = serde_json::json!(l);
            }
            None => {
                if hot_standby {
                    spec["mode"] = serde_json::json!("replica");
                }
                spec["safekeepers"] = serde_json::json!(self
                    .conf
                    .safekeepers
                    .iter()
                    .map(|s| format!("127.0.0.1:{}", s.pg_port))
                    .collect::<Vec<_>>());
            }
        }
        let dir = self.endpoint_dir(name);
        if dir.exists() {
            // Left over from an endpoint of the same name that was removed by hand.
            fs::remove_dir_all(&dir).with_context(|| format!("removing stale {}", dir.display()))?;
        }
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("spec.json"), serde_json::to_string_pretty(&spec)?)?;
        self.conf.endpoints.insert(name.into(), ep.clone());
        self.save()?;
        Ok(ep)
    }

    pub fn start_endpoint(&self, name: &str) -> anyhow::Result<String> {
        let d = self.endpoint_daemon(name)?;
        if Self::read_pid(&d).is_some() {
            println!("endpoint '{name}' is already running");
            return Ok(self.connstr(&self.conf.endpoints[name]));
        }
        // What the compute needs, checked first for a clear message: the pageserver, and for a
        // primary a majority of the safekeepers.
        self.ps_get("/v1/status").with_context(|| format!("endpoint '{name}' needs the pageserver"))?;
        if self.conf.endpoints[name].static_lsn.is_none() {
            // A primary needs a majority; a replica streams from any one of them.
            let needed = if self.conf.endpoints[name].hot_standby { 1 } else { self.conf.safekeepers.len() / 2 + 1 };
            let down: Vec<String> = self
                .conf
                .safekeepers
                .iter()
                .filter(|sk| http_get(&Self::sk_peer(sk), &self.sk_url(sk, "/v1/status")).is_err())
                .map(|sk| sk.id.to_string())
                .collect();
            let n = self.conf.safekeepers.len();
            if n - down.len() < needed {
                let what = if needed == 1 { "one".to_string() } else { "a majority".to_string() };
                bail!(
                    "endpoint '{name}' needs {what} of the {n} safekeepers, but safekeepers {} are not answering; start them with 'neon_local safekeeper start ID'",
                    down.join(", ")
                );
            }
        }
        self.start_daemon(&d)?;
        if let Err(e) = self.wait_endpoint_running(name, &d) {
            // Leave nothing half-started behind.
            let _ = self.stop_daemon(&d, StopMode::Immediate);
            return Err(e);
        }
        Ok(self.connstr(&self.conf.endpoints[name]))
    }

    fn wait_endpoint_running(&self, name: &str, d: &Daemon) -> anyhow::Result<()> {
        // compute_ctl answers /status at once; wait until Postgres runs.
        print!("waiting for endpoint '{name}' to run Postgres...");
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last = None;
        loop {
            let st = authed(http().get(&d.health_url))
                .timeout(Duration::from_secs(2))
                .call()
                .ok()
                .and_then(|r| r.into_json::<serde_json::Value>().ok());
            match st.as_ref().and_then(|s| s["status"].as_str()) {
                Some("running") => {
                    println!(" ok");
                    return Ok(());
                }
                Some("failed") => {
                    println!(" failed");
                    bail!(
                        "endpoint '{name}' failed to start: {}; see {}",
                        st.as_ref().and_then(|s| s["error"].as_str()).unwrap_or("?").replace('\n', " "),
                        d.dir.join("log").display()
                    )
                }
                _ => {}
            }
            if st.is_some() {
                last = st;
            }
            if Self::read_pid(d).is_none() {
                println!(" failed");
                let log = fs::read_to_string(d.dir.join("log")).unwrap_or_default();
                bail!(
                    "endpoint '{name}' failed to start: {}; see {}",
                    last_error(&log).unwrap_or_else(|| "compute_ctl exited".into()),
                    d.dir.join("log").display()
                );
            }
            if Instant::now() > deadline {
                println!(" timed out");
                let step = last
                    .as_ref()
                    .and_then(|s| s["timings_ms"].as_array().map(|a| a.len()))
                    .map(|n| format!(" ({n} start steps done)"))
                    .unwrap_or_default();
                bail!("endpoint '{name}' did not start within 120 s{step}; see {}", d.dir.join("log").display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stop_endpoint(&mut self, name: &str, mode: StopMode, destroy: bool) -> anyhow::Result<()> {
        let d = self.endpoint_daemon(name)?;
        self.stop_daemon(&d, mode)?;
        if destroy {
            fs::remove_dir_all(&d.dir).ok();
            self.conf.endpoints.remove(name);
            self.save()?;
            println!("endpoint '{name}' destroyed");
        }
        Ok(())
    }

    pub fn list_endpoints(&self) -> anyhow::Result<()> {
        for (name, ep) in &self.conf.endpoints {
            let running = Self::read_pid(&self.endpoint_daemon(name)?).is_some();
            println!(
                "{name}\tbranch {}\t{}\t{}\t{}",
                ep.branch,
                ep.mode_desc(),
                if running { "running" } else { "stopped" },
                self.connstr(ep)
            );
        }
        Ok(())
    }
}

/// The message of the last error line of a daemon's log (tracing `ERROR`, Postgres `FATAL`/
/// `PANIC`, a Rust panic), for a one-line report.
fn last_error(log: &str) -> Option<String> {
    let line =
        log.lines().rev().take(50).find(|l| {
            l.contains(" ERROR ") || l.contains("FATAL:") || l.contains("PANIC:") || l.contains("panicked at")
        })?;
    let msg = match line.find(" ERROR ") {
        // `<time>  ERROR <target>: <message>`
        Some(i) => line[i + 7..].split_once(": ").map_or(&line[i + 7..], |(_, m)| m),
        None => line,
    };
    Some(msg.trim().to_string())
}

/// `max_prepared_transactions` of every endpoint.
const MAX_PREPARED_TRANSACTIONS: u32 = 64;

fn check_name(what: &str, name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.len() > 63 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        bail!("{what} name '{name}' may only hold letters, digits, '-' and '_' (at most 63)");
    }
    Ok(())
}

/// Percent-encodes a query parameter value.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_timestamp() {
        assert_eq!(url_encode("2024-05-01T12:00:00.5+02:00"), "2024-05-01T12%3A00%3A00.5%2B02%3A00");
    }

    #[test]
    fn error_line() {
        let log = "2026-12-04T18:27:01Z  INFO compute_ctl::compute: fetch\n\
                   2026-12-04T18:27:01Z ERROR compute_ctl: compute start failed: refused\nbye\n";
        assert_eq!(last_error(log).as_deref(), Some("compute start failed: refused"));
        assert_eq!(last_error("all fine\n"), None);
    }

    #[test]
    fn names() {
        assert!(check_name("branch", "dev-1_x").is_ok());
        assert!(check_name("branch", "a b").unwrap_err().to_string().contains("'a b'"));
        assert!(check_name("branch", "").is_err());
    }
}
