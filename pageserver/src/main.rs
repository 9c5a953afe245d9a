//! `pageserver`: ingests WAL from the safekeepers into layered timelines and serves pages,
//! basebackups and a management API (DESIGN §1, D4–D6).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use pageserver::config::PageServerConf;
use pageserver::page_service::PageServiceHandler;
use pageserver::redo_applier::PostgresRedoApplier;
use pageserver::tenant::timeline::TimelineResources;
use pageserver::tenant_mgr::TenantManager;
use pageserver::walredo::{WalRedoConfig, WalRedoManager};
use pq_proto::{BackendConfig, JwtPasswordAuth, PostgresBackend, TrustAuth};
use tracing::{info, warn};

#[derive(Parser)]
#[command(version, about = "Pageserver: WAL ingest, layered timelines, GetPage@LSN")]
struct Args {
    /// Working directory: pageserver.toml and tenants/ live here.
    #[arg(long, short = 'D')]
    workdir: PathBuf,
    #[arg(long, default_value = "human")]
    log_format: utils::logging::LogFormat,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    utils::logging::init(args.log_format)?;
    let conf = PageServerConf::load(&args.workdir)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run(conf))
}

async fn run(conf: PageServerConf) -> anyhow::Result<()> {
    let shutdown = utils::shutdown::on_signals()?;
    let mut redo_conf = WalRedoConfig::new(conf.pg_install_dir.clone());
    redo_conf.process_count = conf.walredo_process_count;
    let redo = Arc::new(WalRedoManager::new(redo_conf).context("starting the WAL redo pool")?);
    let applier = Arc::new(PostgresRedoApplier::new(redo, tokio::runtime::Handle::current()));
    let remote_storage = match &conf.remote_storage {
        Some(rs) => Some(
            remote_storage::GenericRemoteStorage::from_config(rs)
                .await
                .with_context(|| format!("setting up remote storage {rs:?}"))?,
        ),
        None => None,
    };
    let resources =
        TimelineResources::new(conf.default_tenant_conf.clone(), applier).with_remote_storage(remote_storage);
    let pg_listener = tokio::net::TcpListener::bind(conf.listen_pg_addr)
        .await
        .with_context(|| format!("cannot listen on {} (libpq): is another pageserver running?", conf.listen_pg_addr))?;
    let http_listener = tokio::net::TcpListener::bind(conf.listen_http_addr).await.with_context(|| {
        format!("cannot listen on {} (HTTP): is another pageserver running?", conf.listen_http_addr)
    })?;
    let mgr = {
        let (conf, resources, sd) = (conf.clone(), resources.clone(), shutdown.clone());
        TenantManager::load(conf, resources, sd).await?
    };
    info!(
        "pageserver {} in {}: libpq on {}{}, HTTP{} on {}",
        conf.id,
        conf.workdir.display(),
        conf.listen_pg_addr,
        if conf.pg_tls.is_some() { " (TLS only)" } else { "" },
        if conf.http_tls.is_some() { "S" } else { "" },
        conf.listen_http_addr
    );
    let http = utils::http_server::serve(
        http_listener,
        pageserver::http::router(mgr.clone()),
        conf.http_tls.clone(),
        shutdown.clone(),
    );
    let http_task = tokio::spawn(http);
    loop {
        let (sock, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = pg_listener.accept() => match r {
                Ok(x) => x,
                Err(e) => { warn!("accept failed: {e}"); continue; }
            },
        };
        let _ = sock.set_nodelay(true);
        let pg_auth = conf.pg_auth.clone();
        let backend_config = BackendConfig {
            tls: conf.pg_tls.clone().map(|t| t as Arc<dyn pq_proto::TlsAcceptor>),
            // With a certificate, tokens and page traffic never travel in the clear (DESIGN D9).
            require_tls: conf.pg_tls.is_some(),
            ..BackendConfig::default()
        };
        let mut handler = PageServiceHandler::new(mgr.clone(), Some(peer));
        tokio::spawn(async move {
            let pgb = PostgresBackend::new(sock, backend_config);
            let result = match pg_auth {
                Some(auth) => {
                    let hook = JwtPasswordAuth::new(auth, "pageserver", Some(peer));
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
    info!("shutting down: waiting for compaction/GC, flushing open layers");
    mgr.wait_background_jobs(std::time::Duration::from_secs(60)).await;
    let m = mgr.clone();
    tokio::task::spawn_blocking(move || m.checkpoint_all()).await?;
    mgr.wait_uploads(std::time::Duration::from_secs(10)).await;
    let _ = http_task.await;
    Ok(())
}
