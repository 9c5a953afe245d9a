//! `safekeeper`: one member of the WAL quorum (DESIGN D7). Serves walproposers and WAL readers
//! over libpq, operators over HTTP, and pulls WAL it lacks from its peers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use pq_proto::{BackendConfig, JwtPasswordAuth, PostgresBackend, TrustAuth};
use remote_storage::{GenericRemoteStorage, RemoteStorageConfig};
use safekeeper::handler::SafekeeperHandler;
use safekeeper::recovery::{self, Peer};
use safekeeper::timeline::GlobalTimelines;
use safekeeper::wal_backup::{self, WalBackup};
use tracing::{info, warn};
use utils::auth::JwtAuth;
use utils::NodeId;

#[derive(Parser)]
#[command(version, about = "Safekeeper: makes compute WAL durable on a quorum")]
struct Args {
    /// This safekeeper's node id (unique among the safekeepers of a timeline).
    #[arg(long)]
    id: u64,
    /// Where timelines live.
    #[arg(long, short = 'D')]
    datadir: PathBuf,
    /// libpq listen address (walproposers, WAL readers).
    #[arg(long, default_value = "127.0.0.1:5454")]
    listen_pg: SocketAddr,
    /// HTTP listen address (management API, metrics).
    #[arg(long, default_value = "127.0.0.1:7676")]
    listen_http: SocketAddr,
    /// Other safekeepers' libpq addresses (host:port, comma-separated), for peer recovery.
    #[arg(long, value_delimiter = ',')]
    peers: Vec<Peer>,
    /// Skip fsync. Loses acknowledged WAL on a machine crash: for tests only.
    #[arg(long)]
    no_sync: bool,
    /// Remote storage for offloaded WAL, the pageserver's `remote_storage` value as a TOML
    /// inline table or JSON: '{local_path = "/srv/remote"}' or '{bucket_name = "b",
    /// bucket_region = "us-east-1", endpoint = "http://127.0.0.1:5000", prefix_in_bucket = "p"}'.
    /// Objects go to `wal/<tenant>/<timeline>/<segment>`. Without it WAL is kept locally forever.
    #[arg(long, value_parser = parse_remote_storage)]
    remote_storage: Option<RemoteStorageConfig>,
    /// Upload whole committed segments and remove offloaded local WAL (only with
    /// --remote-storage). `false` keeps the storage for reading old WAL only.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    wal_backup_enabled: bool,
    #[arg(long, default_value = "human")]
    log_format: utils::logging::LogFormat,
    /// Ed25519 public key (PEM) or a directory of them, to verify JWTs with.
    #[arg(long)]
    auth_validation_public_key_path: Option<PathBuf>,
    /// `Trust` or `NeonJWT`: tokens on the HTTP API (`/v1/status` and `/metrics` stay open).
    #[arg(long, default_value = "Trust", value_parser = parse_auth_type, action = clap::ArgAction::Set)]
    http_auth_type: bool,
    /// `Trust` or `NeonJWT`: the token as the libpq password, checked against each
    /// connection's tenant.
    #[arg(long, default_value = "Trust", value_parser = parse_auth_type, action = clap::ArgAction::Set)]
    pg_auth_type: bool,
    /// PEM certificate chain: the libpq listener then accepts TLS connections only and the HTTP
    /// API is HTTPS only; needs --ssl-key-file.
    #[arg(long, requires = "ssl_key_file")]
    ssl_cert_file: Option<PathBuf>,
    /// PEM private key of --ssl-cert-file.
    #[arg(long, requires = "ssl_cert_file")]
    ssl_key_file: Option<PathBuf>,
    /// PEM CA certificate(s) that sign the peers' certificates: peer connections become
    /// TLS-only, each peer checked against it (verify-full).
    #[arg(long)]
    ssl_ca_file: Option<PathBuf>,
}

/// `NeonJWT` → true, `Trust` → false (Neon's names).
fn parse_auth_type(s: &str) -> Result<bool, String> {
    match s {
        "Trust" => Ok(false),
        "NeonJWT" => Ok(true),
        other => Err(format!("unknown auth type '{other}': use Trust or NeonJWT")),
    }
}

/// Parses `--remote-storage`: a TOML inline table (as in pageserver.toml) or JSON.
fn parse_remote_storage(s: &str) -> Result<RemoteStorageConfig, String> {
    #[derive(serde::Deserialize)]
    struct Wrapper {
        remote_storage: RemoteStorageConfig,
    }
    let toml_err = match toml::from_str::<Wrapper>(&format!("remote_storage = {s}")) {
        Ok(w) => return Ok(w.remote_storage),
        Err(e) => e.message().to_string(),
    };
    RemoteStorageConfig::from_json(s).map_err(|json_err| {
        format!(
            "'{s}' is not a remote storage config: as TOML: {toml_err}; as JSON: {json_err}. Example: \
             '{{local_path = \"/srv/remote\"}}'"
        )
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    utils::logging::init(args.log_format)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run(args))
}

async fn run(mut args: Args) -> anyhow::Result<()> {
    if let Some(ca) = &args.ssl_ca_file {
        let tls = utils::tls::TlsConnector::from_ca_file(ca).context("--ssl-ca-file")?;
        for p in &mut args.peers {
            p.tls = Some(tls.clone());
        }
    }
    if args.no_sync {
        warn!("--no-sync: WAL and control files are NOT fsynced; acknowledged commits can be lost on a crash. Use only in tests.");
    }
    let jwt = match (&args.auth_validation_public_key_path, args.http_auth_type || args.pg_auth_type) {
        (_, false) => None,
        (None, true) => anyhow::bail!("--http-auth-type/--pg-auth-type NeonJWT need --auth-validation-public-key-path"),
        (Some(p), true) => Some(Arc::new(JwtAuth::from_key_path(p)?)),
    };
    let http_auth = if args.http_auth_type { jwt.clone() } else { None };
    let pg_auth = if args.pg_auth_type { jwt.clone() } else { None };
    // Our own token for peers (recovery, offload polls) when they check tokens; never logged.
    let peer_token = std::env::var("NEON_AUTH_TOKEN").ok().filter(|t| !t.is_empty());
    let timelines = Arc::new(GlobalTimelines::load(NodeId(args.id), &args.datadir, !args.no_sync)?);
    info!("safekeeper {} with {} timelines in {}", args.id, timelines.list().len(), args.datadir.display());
    let shutdown = utils::shutdown::on_signals()?;

    let pg_listener = tokio::net::TcpListener::bind(args.listen_pg)
        .await
        .with_context(|| format!("cannot listen on {} (libpq): is another process using it?", args.listen_pg))?;
    let http_listener = tokio::net::TcpListener::bind(args.listen_http)
        .await
        .with_context(|| format!("cannot listen on {} (HTTP): is another process using it?", args.listen_http))?;
    let tls_note = if args.ssl_cert_file.is_some() { " (TLS only on both)" } else { "" };
    info!("listening for libpq on {}, HTTP on {}{tls_note}", args.listen_pg, args.listen_http);

    let (pg_tls, http_tls) = match (&args.ssl_cert_file, &args.ssl_key_file) {
        (Some(cert), Some(key)) => {
            let tls = pq_proto::ListenerTls::from_pem_files(cert, key).context("--ssl-cert-file/--ssl-key-file")?;
            (Some(tls.pg as Arc<dyn pq_proto::TlsAcceptor>), Some(tls.http))
        }
        _ => (None, None),
    };
    let http = utils::http_server::serve(
        http_listener,
        safekeeper::http::router(timelines.clone(), http_auth),
        http_tls,
        shutdown.clone(),
    );
    let http_task = tokio::spawn(http);
    tokio::spawn(recovery::run(
        timelines.clone(),
        args.peers.clone(),
        peer_token.clone(),
        Duration::from_secs(1),
        shutdown.clone(),
    ));
    if let Some(rs) = &args.remote_storage {
        let storage = GenericRemoteStorage::from_config(rs)
            .await
            .with_context(|| format!("cannot open the remote storage {rs:?} given with --remote-storage"))?;
        let backup =
            Arc::new(WalBackup { storage, upload_enabled: args.wal_backup_enabled, has_peers: !args.peers.is_empty() });
        timelines.set_remote(backup.clone());
        info!(
            "remote storage {rs:?}: {}",
            if args.wal_backup_enabled {
                "offloading WAL"
            } else {
                "reading offloaded WAL only (--wal-backup-enabled false)"
            }
        );
        tokio::spawn(recovery::poll_peers(
            timelines.clone(),
            args.peers.clone(),
            peer_token.clone(),
            Duration::from_secs(1),
            shutdown.clone(),
        ));
        tokio::spawn(wal_backup::run(timelines.clone(), backup, shutdown.clone()));
    } else {
        info!("no --remote-storage: WAL is kept on local disk only");
    }

    // The commit LSN is persisted lazily (see Acceptor::process_appends); write it out now and then.
    let tls = timelines.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let list = tls.list();
            let _ = tokio::task::spawn_blocking(move || list.iter().for_each(|t| t.persist_if_dirty())).await;
        }
    });

    // With a certificate, WAL and tokens never travel in the clear (DESIGN D9).
    let config = BackendConfig { require_tls: pg_tls.is_some(), tls: pg_tls, ..BackendConfig::default() };
    loop {
        let (sock, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = pg_listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!("accept failed: {e}");
                    continue;
                }
            },
        };
        let _ = sock.set_nodelay(true);
        let mut handler = SafekeeperHandler { timelines: timelines.clone(), claims: None, peer: Some(peer) };
        let config = config.clone();
        let pg_auth = pg_auth.clone();
        tokio::spawn(async move {
            let pgb = PostgresBackend::new(sock, config);
            let result = match pg_auth {
                Some(auth) => {
                    let hook = JwtPasswordAuth::new(auth, "safekeeper", Some(peer));
                    handler.claims = Some(hook.claims_slot());
                    pgb.run(&hook, &mut handler).await
                }
                None => pgb.run(&TrustAuth, &mut handler).await,
            };
            match result {
                Ok(end) => tracing::debug!("connection from {peer} ended: {end:?}"),
                Err(e) if e.is_client_disconnect() => tracing::debug!("connection from {peer} closed: {e}"),
                Err(e) => warn!("connection from {peer} failed: {e}"),
            }
        });
    }
    info!("shutting down");
    for tl in timelines.list() {
        tl.persist();
    }
    let _ = http_task.await;
    Ok(())
}
