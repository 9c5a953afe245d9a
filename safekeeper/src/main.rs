//! `safekeeper`: one member of the WAL quorum (DESIGN D7). Serves walproposers and WAL readers
//! over libpq, operators over HTTP, and pulls WAL it lacks from its peers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use pq_proto::{BackendConfig, PostgresBackend, TrustAuth};
use remote_storage::{GenericRemoteStorage, RemoteStorageConfig};
use safekeeper::handler::SafekeeperHandler;
use safekeeper::recovery::{self, Peer};
use safekeeper::timeline::GlobalTimelines;
use safekeeper::wal_backup::{self, WalBackup};
use tracing::{info, warn};
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

async fn run(args: Args) -> anyhow::Result<()> {
    if args.no_sync {
        warn!("--no-sync: WAL and control files are NOT fsynced; acknowledged commits can be lost on a crash. Use only in tests.");
    }
    let timelines = Arc::new(GlobalTimelines::load(NodeId(args.id), &args.datadir, !args.no_sync)?);
    info!("safekeeper {} with {} timelines in {}", args.id, timelines.list().len(), args.datadir.display());
    let shutdown = utils::shutdown::on_signals()?;

    let pg_listener = tokio::net::TcpListener::bind(args.listen_pg)
        .await
        .with_context(|| format!("cannot listen on {} (libpq): is another process using it?", args.listen_pg))?;
    let http_listener = tokio::net::TcpListener::bind(args.listen_http)
        .await
        .with_context(|| format!("cannot listen on {} (HTTP): is another process using it?", args.listen_http))?;
    info!("listening for libpq on {}, HTTP on {}", args.listen_pg, args.listen_http);

    let http = axum::serve(http_listener, safekeeper::http::router(timelines.clone()))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let http_task = tokio::spawn(async move { http.await });
    tokio::spawn(recovery::run(timelines.clone(), args.peers.clone(), None, Duration::from_secs(1), shutdown.clone()));
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
            None,
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

    let config = BackendConfig::default();
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
        let mut handler = SafekeeperHandler { timelines: timelines.clone() };
        let config = config.clone();
        tokio::spawn(async move {
            let pgb = PostgresBackend::new(sock, config);
            match pgb.run(&TrustAuth, &mut handler).await {
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
