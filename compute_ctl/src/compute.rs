//! Starting and supervising one compute (DESIGN D2–D4): find the start LSN, fetch the
//! basebackup, write the config, start Postgres, run the walproposer beside a primary, apply
//! roles and databases, and exit non-zero if Postgres dies (its data directory is a cache and
//! is never crash-recovered: a new compute starts from the pageserver instead).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use postgres_client::{Client, ConnectConfig};
use postgres_ffi::controlfile::ControlFileData;
use serde::Serialize;
use tokio::process::Child;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use utils::pg_os_user::{command_as, PgOsUser};
use utils::Lsn;
use walproposer::driver::{self, DriverConfig, HostPort, Outcome, PostgresSource};

use crate::spec::{quote_literal, ComputeMode, ComputeSpec};

/// Superuser every compute has (trusted on loopback).
pub const SUPERUSER: &str = "cloud_admin";
/// Largest basebackup we accept (it carries no relation data: normally well under 1 MB).
const MAX_BASEBACKUP_BYTES: usize = 256 * 1024 * 1024;

#[derive(Clone, Debug, Default, Serialize)]
pub struct ComputeStatus {
    /// `init`, `running`, `failed` or `terminated`.
    pub status: String,
    pub start_lsn: Option<Lsn>,
    pub error: Option<String>,
    /// Milliseconds each start step took, in order.
    pub timings_ms: Vec<(String, u128)>,
}

pub type SharedStatus = Arc<Mutex<ComputeStatus>>;

fn host_port(s: &str) -> anyhow::Result<HostPort> {
    s.parse().map_err(|e: String| anyhow::anyhow!(e))
}

/// Runs `f` as a named start step, logging and recording how long it took.
async fn step<T>(
    status: &SharedStatus,
    name: &str,
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    info!("{name}...");
    let t0 = Instant::now();
    let r = f.await.with_context(|| format!("compute start failed at step '{name}'"));
    let ms = t0.elapsed().as_millis();
    info!("{name}: {} in {ms} ms", if r.is_ok() { "done" } else { "FAILED" });
    status.lock().expect("status lock").timings_ms.push((name.to_string(), ms));
    r
}

/// This compute's token (`$NEON_AUTH_TOKEN`, a `tenant` token for its tenant) for the
/// pageserver and the safekeepers when they check tokens; sent only when a server asks for a
/// password, never logged. Postgres gets it as `PGPASSWORD` (the `neon` extension's pageserver
/// connection and a replica's `primary_conninfo` use libpq).
pub fn auth_token() -> Option<String> {
    std::env::var("NEON_AUTH_TOKEN").ok().filter(|t| !t.is_empty())
}

/// TLS settings of a compute (`compute_ctl run --ssl-ca-file / --ssl-cert-file / --ssl-key-file`).
#[derive(Clone, Debug, Default)]
pub struct ComputeTls {
    /// The CA that signs the pageserver's and safekeepers' certificates: every connection to
    /// them, from compute_ctl, the walproposer and Postgres itself (the `neon` extension, a
    /// replica's `primary_conninfo`), is TLS with the server checked against it (verify-full).
    pub ca_file: Option<PathBuf>,
    /// Postgres serves TLS with this certificate and key (`ssl = on`); non-loopback clients must
    /// use it (`hostssl` in pg_hba.conf).
    pub server_identity: Option<(PathBuf, PathBuf)>,
}

/// compute_ctl's own client side of [`ComputeTls::ca_file`], set once at start.
static CLIENT_TLS: std::sync::OnceLock<Option<utils::tls::TlsConnector>> = std::sync::OnceLock::new();

/// How compute_ctl (and the walproposer it runs) reaches a pageserver or safekeeper: this
/// compute's token, and TLS when a CA is configured.
fn server_conn(hp: &HostPort, user: &str) -> ConnectConfig {
    let mut c = ConnectConfig::new(hp.host.clone(), hp.port, user);
    c.password = auth_token();
    c.tls = CLIENT_TLS.get().cloned().flatten();
    c
}

/// The walproposer of this compute: sync-safekeepers (`postgres: None`) or streaming from its
/// Postgres; safekeepers reached like [`server_conn`] does.
fn walproposer_config(spec: &ComputeSpec, postgres: Option<PostgresSource>) -> anyhow::Result<DriverConfig> {
    Ok(DriverConfig {
        safekeepers: spec.safekeepers.iter().map(|s| host_port(s)).collect::<anyhow::Result<_>>()?,
        tenant_id: spec.tenant_id,
        timeline_id: spec.timeline_id,
        postgres,
        system_id: 0,
        pg_version: 150018,
        wal_seg_size: 16 * 1024 * 1024,
        safekeeper_password: auth_token(),
        safekeeper_tls: CLIENT_TLS.get().cloned().flatten(),
        reconnect_backoff_max: Duration::from_secs(2),
    })
}

/// Where Postgres finds its TLS files: copied into the data directory, where the OS user
/// Postgres runs as owns them (Postgres refuses a key file others can read).
const PG_SERVER_CERT: &str = "server.crt";
const PG_SERVER_KEY: &str = "server.key";
const PG_ROOT_CERT: &str = "neon_ca.crt";

/// libpq options that make a connection from Postgres to our servers verify-full, or "".
fn libpq_tls_options(tls: &ComputeTls, pgdata: &Path) -> String {
    match &tls.ca_file {
        Some(_) => {
            let path = pgdata.join(PG_ROOT_CERT).display().to_string();
            format!(" sslmode=verify-full sslrootcert='{}'", path.replace('\\', "\\\\").replace('\'', "\\'"))
        }
        None => String::new(),
    }
}

/// (flush, commit) LSN of the timeline on every safekeeper that answers TIMELINE_STATUS.
async fn safekeeper_positions(spec: &ComputeSpec) -> Vec<(Lsn, Lsn)> {
    let mut answers = Vec::new();
    for sk in &spec.safekeepers {
        let r = async {
            let hp = host_port(sk)?;
            let mut c = server_conn(&hp, "compute_ctl");
            c.options = vec![
                ("tenant_id".into(), spec.tenant_id.to_string()),
                ("timeline_id".into(), spec.timeline_id.to_string()),
            ];
            c.connect_timeout = Duration::from_secs(3);
            let mut client = Client::connect(&c).await?;
            let rows = client.simple_query("TIMELINE_STATUS").await?;
            let row = rows.first().context("no row")?;
            let cell = |i: usize| row.get(i).cloned().flatten().context("missing column");
            anyhow::Ok((cell(1)?.parse::<Lsn>()?, cell(2)?.parse::<Lsn>()?))
        };
        match r.await {
            Ok(a) => answers.push(a),
            Err(e) => warn!("safekeeper {sk}: {e:#}"),
        }
    }
    answers
}

/// What a replica must not start below: the highest commit LSN a safekeeper reports (read-only:
/// a replica never runs the election, which would depose the primary).
async fn replica_min_lsn(spec: &ComputeSpec) -> anyhow::Result<Lsn> {
    let answers = safekeeper_positions(spec).await;
    answers.iter().map(|(_, commit)| *commit).max().with_context(|| {
        format!("no safekeeper of {:?} answered; a replica streams its WAL from them", spec.safekeepers)
    })
}

/// The LSN a new primary starts at: where the safekeepers agree WAL is committed. Fast path: a
/// quorum answers TIMELINE_STATUS with commit == flush at the same LSN and nobody has more WAL;
/// otherwise run the election (sync-safekeepers).
async fn primary_start_lsn(spec: &ComputeSpec) -> anyhow::Result<Lsn> {
    let answers = safekeeper_positions(spec).await;
    let quorum = spec.safekeepers.len() / 2 + 1;
    if let Some(&(flush, _)) = answers.first() {
        let agree = answers.iter().filter(|(f, c)| *f == flush && *c == flush).count();
        let max_flush = answers.iter().map(|(f, _)| *f).max().unwrap_or(flush);
        if agree >= quorum && max_flush == flush {
            info!("safekeepers agree: WAL committed up to {flush}");
            return Ok(flush);
        }
    }
    info!("safekeepers do not agree on the WAL end; running the election (sync-safekeepers)");
    let cfg = walproposer_config(spec, None)?;
    match tokio::time::timeout(Duration::from_secs(120), driver::run(cfg, CancellationToken::new())).await {
        Ok(Ok(Outcome::Synced(lsn))) => Ok(lsn),
        Ok(Ok(Outcome::Stopped)) => bail!("sync-safekeepers was interrupted"),
        Ok(Err(e)) => Err(e),
        Err(_) => bail!("sync-safekeepers did not finish in 120 s: is a quorum of {:?} reachable?", spec.safekeepers),
    }
}

/// Fetches and unpacks the basebackup at `lsn`, or a hot standby's basebackup (at the timeline's
/// latest running-xacts record) when `lsn` is `None`. Returns the tar size and the LSN the
/// compute reads pages at (the checkpoint's redo LSN in the unpacked pg_control).
async fn fetch_basebackup(
    spec: &ComputeSpec,
    lsn: Option<Lsn>,
    pgdata: &Path,
    os_user: Option<&PgOsUser>,
) -> anyhow::Result<(usize, Lsn)> {
    let hp = host_port(&spec.pageserver)?;
    let mut c = server_conn(&hp, SUPERUSER);
    c.connect_timeout = Duration::from_secs(10);
    let mut client =
        Client::connect(&c).await.with_context(|| format!("connecting to the pageserver at {}", spec.pageserver))?;
    let (at, what) = match lsn {
        // A static compute never writes WAL: any LSN will do (see the page service).
        Some(lsn) if spec.mode == ComputeMode::Static => (format!("{lsn} readonly"), format!("at {lsn}")),
        Some(lsn) => (lsn.to_string(), format!("at {lsn}")),
        None => (format!("standby {}", replica_min_lsn(spec).await?), "for a hot standby".to_string()),
    };
    let tar = client
        .copy_out_to_vec(&format!("basebackup {} {} {at}", spec.tenant_id, spec.timeline_id), MAX_BASEBACKUP_BYTES)
        .await
        .with_context(|| format!("basebackup of {}/{} {what}", spec.tenant_id, spec.timeline_id))?;
    let size = tar.len();
    let pgdata = pgdata.to_path_buf();
    let os_user = os_user.cloned();
    let start_lsn = tokio::task::spawn_blocking(move || -> anyhow::Result<Lsn> {
        if pgdata.exists() {
            // The data directory is a cache of this compute's last life: never reused.
            std::fs::remove_dir_all(&pgdata).with_context(|| format!("removing old {}", pgdata.display()))?;
        }
        std::fs::create_dir_all(&pgdata)?;
        tar::Archive::new(&tar[..]).unpack(&pgdata).context("unpacking the basebackup")?;
        std::fs::set_permissions(&pgdata, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        if let Some(u) = &os_user {
            u.chown_recursive(&pgdata)?;
        }
        let control = std::fs::read(pgdata.join("global/pg_control")).context("reading the unpacked pg_control")?;
        let control = ControlFileData::decode(&control).context("decoding the unpacked pg_control")?;
        Ok(control.checkpoint_copy.redo)
    })
    .await??;
    Ok((size, start_lsn))
}

/// `primary_conninfo` of a replica: every safekeeper (libpq tries them in turn), the timeline in
/// the startup options.
fn replica_conninfo(spec: &ComputeSpec, tls_options: &str) -> anyhow::Result<String> {
    let addrs = spec.safekeepers.iter().map(|s| host_port(s)).collect::<anyhow::Result<Vec<_>>>()?;
    let hosts = addrs.iter().map(|a| a.host.as_str()).collect::<Vec<_>>().join(",");
    let ports = addrs.iter().map(|a| a.port.to_string()).collect::<Vec<_>>().join(",");
    Ok(format!(
        "host={hosts} port={ports} user={SUPERUSER} application_name=replica options='-c tenant_id={} -c timeline_id={}'{tls_options}",
        spec.tenant_id, spec.timeline_id
    ))
}

/// Loopback connections are trusted (compute_ctl, the walproposer, replicas and tests connect as
/// the superuser there; the compute listens on loopback unless `listen_addresses` is set in the
/// spec); any other connection must prove a SCRAM-SHA-256 password.
const PG_HBA_LOOPBACK: &str = "# written by compute_ctl\n\
host all all 127.0.0.1/32 trust\n\
host all all ::1/128 trust\n\
host replication all 127.0.0.1/32 trust\n\
host replication all ::1/128 trust\n";

/// pg_hba.conf: with TLS (`ssl = on`), a non-loopback client must also come over TLS (no line
/// matches a plaintext one, so it is refused).
fn pg_hba_conf(tls: bool) -> String {
    let kind = if tls { "hostssl" } else { "host" };
    format!("{PG_HBA_LOOPBACK}{kind} all all all scram-sha-256\n{kind} replication all all scram-sha-256\n")
}

/// Copies `from` to `pgdata/name` with owner-only permissions (Postgres insists on them for keys).
fn install_file(from: &Path, pgdata: &Path, name: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let to = pgdata.join(name);
    std::fs::copy(from, &to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", to.display()))?;
    Ok(())
}

fn write_config(spec: &ComputeSpec, tls: &ComputeTls, pgdata: &Path, lsn: Lsn) -> anyhow::Result<()> {
    let (ps_host, ps_port) = spec.pageserver.rsplit_once(':').context("pageserver address is not host:port")?;
    let tls_options = libpq_tls_options(tls, pgdata);
    let ps_connstring = quote_literal(&format!("host={ps_host} port={ps_port} user={SUPERUSER}{tls_options}"));
    let mut conf = format!(
        "# written by compute_ctl\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n\
         shared_preload_libraries = 'neon'\nneon.pageserver_connstring = {ps_connstring}\n\
         neon.tenant_id = '{}'\nneon.timeline_id = '{}'\nneon.start_lsn = '{lsn}'\n\
         fsync = off\nwal_level = replica\nmax_wal_senders = 10\nmax_replication_slots = 10\nwal_sender_timeout = 60s\n",
        spec.pg_port, spec.tenant_id, spec.timeline_id
    );
    match spec.mode {
        ComputeMode::Primary => conf.push_str("synchronous_standby_names = 'walproposer'\nsynchronous_commit = on\n"),
        ComputeMode::Static => conf.push_str("hot_standby = on\n"),
        ComputeMode::Replica => {
            conf.push_str("hot_standby = on\n");
            conf.push_str(&format!("primary_conninfo = {}\n", quote_literal(&replica_conninfo(spec, &tls_options)?)));
        }
    }
    if let Some(ca) = &tls.ca_file {
        install_file(ca, pgdata, PG_ROOT_CERT)?;
    }
    if let Some((cert, key)) = &tls.server_identity {
        install_file(cert, pgdata, PG_SERVER_CERT)?;
        install_file(key, pgdata, PG_SERVER_KEY)?;
        conf.push_str(&format!("ssl = on\nssl_cert_file = '{PG_SERVER_CERT}'\nssl_key_file = '{PG_SERVER_KEY}'\n"));
    }
    for (k, v) in &spec.settings {
        conf.push_str(&format!("{k} = {}\n", quote_literal(v)));
    }
    let path = pgdata.join("postgresql.conf");
    std::fs::write(&path, conf).with_context(|| format!("writing {}", path.display()))?;
    let hba = pgdata.join("pg_hba.conf");
    std::fs::write(&hba, pg_hba_conf(tls.server_identity.is_some()))
        .with_context(|| format!("writing {}", hba.display()))?;
    if spec.mode != ComputeMode::Primary {
        std::fs::write(pgdata.join("standby.signal"), "")?;
    }
    Ok(())
}

/// Whether the postmaster says it accepts connections: line 8 of `postmaster.pid` is "ready" (or
/// "standby" for a read-only compute). Connecting earlier would work too, but every attempt while
/// it starts leaves a "FATAL: the database system is starting up" in the log.
fn postmaster_accepts_connections(pgdata: &Path) -> bool {
    std::fs::read_to_string(pgdata.join("postmaster.pid"))
        .ok()
        .and_then(|pid_file| pid_file.lines().nth(7).map(|l| matches!(l.trim(), "ready" | "standby")))
        .unwrap_or(false)
}

async fn wait_ready(port: u16, pgdata: &Path, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("Postgres exited during start with {status}; see its log above");
        }
        if !postmaster_accepts_connections(pgdata) {
            if Instant::now() > deadline {
                bail!("Postgres did not get ready to accept connections within 60 s; see its log above");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let mut c = ConnectConfig::new("127.0.0.1", port, SUPERUSER);
        c.dbname = Some("postgres".into());
        c.connect_timeout = Duration::from_secs(2);
        if let Ok(mut client) = Client::connect(&c).await {
            if client.simple_query("select 1").await.is_ok() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("Postgres did not accept connections on port {port} within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn apply_roles_and_databases(spec: &ComputeSpec) -> anyhow::Result<()> {
    let mut c = ConnectConfig::new("127.0.0.1", spec.pg_port, SUPERUSER);
    c.dbname = Some("postgres".into());
    let mut client = Client::connect(&c).await?;
    for r in &spec.roles {
        let exists = !client
            .simple_query(&format!("select 1 from pg_roles where rolname = {}", quote_literal(&r.name)))
            .await?
            .is_empty();
        // The SCRAM-SHA-256 verifier, not the password: Postgres stores a verifier given in this
        // form as is, so the plaintext never reaches the server, its logs or pg_stat_activity.
        let pw = r
            .password
            .as_deref()
            .map(|p| format!(" PASSWORD {}", quote_literal(&postgres_protocol::password::scram_sha_256(p.as_bytes()))))
            .unwrap_or_default();
        let verb = if exists { "ALTER" } else { "CREATE" };
        client
            .simple_query(&format!("{verb} ROLE {} LOGIN{pw}", r.name))
            .await
            .with_context(|| format!("{verb} ROLE {}", r.name))?;
        info!("{} role {}", if exists { "updated" } else { "created" }, r.name);
    }
    for d in &spec.databases {
        let exists = !client
            .simple_query(&format!("select 1 from pg_database where datname = {}", quote_literal(&d.name)))
            .await?
            .is_empty();
        if !exists {
            client
                .simple_query(&format!("CREATE DATABASE {} OWNER {}", d.name, d.owner))
                .await
                .with_context(|| format!("CREATE DATABASE {}", d.name))?;
            info!("created database {} owned by {}", d.name, d.owner);
        }
    }
    Ok(())
}

/// Longest wait between two renewals of the compute's LSN lease.
const LEASE_RENEW_INTERVAL_MAX: Duration = Duration::from_secs(60);

/// Keeps the pageserver's lease on `lsn` (where this compute reads pages, DESIGN D3) alive, so
/// GC keeps that history: renews it at half its remaining time (at most every minute), and
/// retries every few seconds while the pageserver is unreachable. Runs until `stop`.
async fn renew_lsn_lease(spec: ComputeSpec, lsn: Lsn, stop: CancellationToken) {
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = match lease_once(&spec, lsn).await {
            Ok(valid_for) => (valid_for / 2).min(LEASE_RENEW_INTERVAL_MAX).max(Duration::from_secs(1)),
            Err(e) => {
                warn!("renewing the lease on LSN {lsn} at the pageserver {}: {e:#}; retrying in 5 s", spec.pageserver);
                Duration::from_secs(5)
            }
        };
    }
}

/// One `lease lsn` call; returns how long the lease is valid from now.
async fn lease_once(spec: &ComputeSpec, lsn: Lsn) -> anyhow::Result<Duration> {
    let hp = host_port(&spec.pageserver)?;
    let mut c = server_conn(&hp, SUPERUSER);
    c.connect_timeout = Duration::from_secs(10);
    let mut client = Client::connect(&c).await?;
    let rows = client.simple_query(&format!("lease lsn {} {} {lsn}", spec.tenant_id, spec.timeline_id)).await?;
    let millis: u128 = rows
        .first()
        .and_then(|r| r.first())
        .and_then(|c| c.as_deref())
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("the pageserver's answer to 'lease lsn' has no valid_until: {rows:?}"))?;
    let until = std::time::UNIX_EPOCH + Duration::from_millis(millis.min(u128::from(u64::MAX)) as u64);
    Ok(until.duration_since(std::time::SystemTime::now()).unwrap_or_default())
}

/// Starts the compute and supervises it until `shutdown` or a failure.
pub async fn run(
    spec: ComputeSpec,
    pgdata: PathBuf,
    pg_install: PathBuf,
    tls: ComputeTls,
    status: SharedStatus,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let os_user = PgOsUser::resolve()?;
    let connector =
        tls.ca_file.as_deref().map(utils::tls::TlsConnector::from_ca_file).transpose().context("--ssl-ca-file")?;
    if CLIENT_TLS.set(connector).is_err() {
        bail!("compute::run runs once per process");
    }
    let t0 = Instant::now();
    let lsn = match spec.mode {
        ComputeMode::Primary => {
            Some(step(&status, "find the start LSN on the safekeepers", primary_start_lsn(&spec)).await?)
        }
        ComputeMode::Static => Some(spec.lsn.expect("validated")),
        ComputeMode::Replica => None,
    };
    let (size, redo_lsn) =
        step(&status, "fetch the basebackup", fetch_basebackup(&spec, lsn, &pgdata, os_user.as_ref())).await?;
    // Pages are read at the requested LSN (which the pageserver has), or for a replica at its
    // backup's redo LSN, where its replay begins.
    let lsn = lsn.unwrap_or(redo_lsn);
    status.lock().expect("status lock").start_lsn = Some(lsn);
    info!("basebackup at {lsn}: {size} bytes");
    let lease_stop = shutdown.child_token();
    let _lease_guard = lease_stop.clone().drop_guard();
    tokio::spawn(renew_lsn_lease(spec.clone(), lsn, lease_stop));
    step(&status, "write postgresql.conf", async { write_config(&spec, &tls, &pgdata, lsn) }).await?;
    if let Some(u) = &os_user {
        u.chown_recursive(&pgdata)?;
    }
    let mut cmd = tokio::process::Command::from(command_as(os_user.as_ref(), &pg_install.join("bin/postgres")));
    cmd.arg("-D").arg(&pgdata).stdin(Stdio::null()).kill_on_drop(true);
    if os_user.is_some() {
        // Postgres runs as another OS user than us: our HOME is not its own. libpq (the neon
        // extension's pageserver connection) looks there for ~/.postgresql client certificates
        // and fails a TLS connection when it may not even look.
        cmd.env("HOME", &pgdata);
    }
    if let Some(token) = auth_token() {
        cmd.env("PGPASSWORD", token);
    }
    let mut child = cmd.spawn().context("starting postgres")?;
    step(&status, "start Postgres", wait_ready(spec.pg_port, &pgdata, &mut child)).await?;
    // Not a child of `shutdown`: the walproposer stops after Postgres, so that it can still pass
    // on the WAL Postgres writes while shutting down.
    let wp_stop = CancellationToken::new();
    let mut walproposer = if spec.mode == ComputeMode::Primary {
        let pg =
            PostgresSource { addr: HostPort { host: "127.0.0.1".into(), port: spec.pg_port }, user: SUPERUSER.into() };
        let cfg = walproposer_config(&spec, Some(pg))?;
        Some(tokio::spawn(driver::run(cfg, wp_stop.clone())))
    } else {
        None
    };
    if spec.mode == ComputeMode::Primary {
        step(&status, "apply roles and databases", apply_roles_and_databases(&spec)).await?;
    } else if !spec.roles.is_empty() || !spec.databases.is_empty() {
        warn!("roles and databases in the spec are not applied: a read-only compute has those of its timeline");
    }
    info!("compute running on port {} after {} ms", spec.pg_port, t0.elapsed().as_millis());
    status.lock().expect("status lock").status = "running".into();

    let result = tokio::select! {
        // A requested stop wins over whatever it sets off.
        biased;
        _ = shutdown.cancelled() => Ok(()),
        s = child.wait() => Err(anyhow::anyhow!("Postgres exited unexpectedly ({}); the compute is gone, start a new one", s?)),
        r = async { match walproposer.as_mut() { Some(h) => h.await, None => std::future::pending().await } } => {
            match r {
                Ok(Ok(_)) => Err(anyhow::anyhow!("the walproposer stopped")),
                Ok(Err(e)) => Err(e.context("the walproposer failed")),
                Err(e) => Err(anyhow::anyhow!("the walproposer task failed: {e}")),
            }
        }
    };
    // Fast shutdown of Postgres (SIGINT), then stop the walproposer.
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    wp_stop.cancel();
    let mut st = status.lock().expect("status lock");
    match &result {
        Ok(()) => st.status = "terminated".into(),
        Err(e) => {
            st.status = "failed".into();
            st.error = Some(format!("{e:#}"));
        }
    }
    result
}
