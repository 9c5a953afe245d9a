//! `compute_ctl`: runs one compute. So far it offers the walproposer pieces (DESIGN D2):
//! `sync-safekeepers` (elect, bring a quorum of safekeepers up to date, print the LSN a new
//! compute must start at) and `walproposer` (stream a running Postgres's WAL to the
//! safekeepers and release its synchronous commits once a quorum has them). The spec-driven
//! compute start arrives with the stateless-compute work.

mod compute;
mod http;
mod spec;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tracing::error;
use utils::{TenantId, TimelineId};
use walproposer::driver::{self, DriverConfig, HostPort, Outcome, PostgresSource};

#[derive(Parser)]
#[command(version, about = "Runs a compute: Postgres on pageserver storage with its WAL on safekeepers")]
struct Cli {
    /// Log format: human or json.
    #[arg(long, default_value = "human", global = true)]
    log_format: utils::logging::LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct SafekeeperArgs {
    /// Safekeepers' libpq addresses, comma-separated host:port.
    #[arg(long, value_delimiter = ',', required = true)]
    safekeepers: Vec<HostPort>,
    #[arg(long)]
    tenant_id: TenantId,
    #[arg(long)]
    timeline_id: TimelineId,
    /// PG_VERSION_NUM of the compute.
    #[arg(long, default_value_t = 150018)]
    pg_version: u32,
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    wal_seg_size: u32,
    /// Password (JWT) for safekeeper connections; also read from NEON_SAFEKEEPER_TOKEN.
    #[arg(long, env = "NEON_SAFEKEEPER_TOKEN", hide_env_values = true)]
    safekeeper_token: Option<String>,
    /// PEM CA certificate(s) of the safekeepers: connections become TLS-only, each safekeeper
    /// checked against it (verify-full).
    #[arg(long)]
    ssl_ca_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a compute from a JSON spec and supervise it (exits non-zero if Postgres dies).
    Run {
        /// The compute spec (JSON file).
        #[arg(long)]
        spec: PathBuf,
        /// Data directory (a cache: replaced from the basebackup at every start).
        #[arg(long)]
        pgdata: PathBuf,
        /// Our Postgres build (postgres/build.sh's pg_install).
        #[arg(long, env = "PG_INSTALL_DIR", default_value = "pg_install")]
        pg_install: PathBuf,
        /// HTTP API address (status, metrics, terminate).
        #[arg(long, default_value = "127.0.0.1:3080")]
        http_addr: std::net::SocketAddr,
        /// Ed25519 public key (PEM) or a directory of them: the HTTP API then needs an `admin`
        /// token or a `tenant` token for this compute's tenant. The compute's own token for
        /// the pageserver and safekeepers comes from $NEON_AUTH_TOKEN.
        #[arg(long)]
        auth_public_key_path: Option<PathBuf>,
        /// PEM CA certificate(s) that sign the pageserver's and safekeepers' certificates: every
        /// connection to them (compute_ctl, walproposer, Postgres) is TLS, verify-full.
        #[arg(long)]
        ssl_ca_file: Option<PathBuf>,
        /// PEM certificate chain this compute serves TLS with: its HTTP API, and Postgres
        /// (`ssl = on`; non-loopback clients must use TLS). Needs --ssl-key-file.
        #[arg(long, requires = "ssl_key_file")]
        ssl_cert_file: Option<PathBuf>,
        /// PEM private key of --ssl-cert-file.
        #[arg(long, requires = "ssl_cert_file")]
        ssl_key_file: Option<PathBuf>,
    },
    /// Elect a proposer, make a quorum of safekeepers agree, print the start LSN, exit.
    SyncSafekeepers {
        #[command(flatten)]
        sk: SafekeeperArgs,
        /// System identifier of the timeline's cluster, if known (0 = take the safekeepers').
        #[arg(long, default_value_t = 0)]
        system_id: u64,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout_s: u64,
    },
    /// Stream the WAL of a running Postgres to the safekeepers until stopped or superseded.
    Walproposer {
        #[command(flatten)]
        sk: SafekeeperArgs,
        /// The local Postgres (replication connection).
        #[arg(long, default_value = "127.0.0.1:5432")]
        pg_addr: HostPort,
        #[arg(long, default_value = "cloud_admin")]
        pg_user: String,
    },
}

fn driver_config(
    sk: &SafekeeperArgs,
    postgres: Option<PostgresSource>,
    system_id: u64,
) -> anyhow::Result<DriverConfig> {
    let safekeeper_tls =
        sk.ssl_ca_file.as_deref().map(utils::tls::TlsConnector::from_ca_file).transpose().context("--ssl-ca-file")?;
    Ok(DriverConfig {
        safekeepers: sk.safekeepers.clone(),
        tenant_id: sk.tenant_id,
        timeline_id: sk.timeline_id,
        postgres,
        system_id,
        pg_version: sk.pg_version,
        wal_seg_size: sk.wal_seg_size,
        safekeeper_password: sk.safekeeper_token.clone(),
        safekeeper_tls,
        reconnect_backoff_max: Duration::from_secs(2),
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = utils::logging::init(cli.log_format) {
        eprintln!("{e}");
        return ExitCode::FAILURE;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let shutdown = utils::shutdown::on_signals()?;
        match cli.cmd {
            Cmd::SyncSafekeepers { sk, system_id, timeout_s } => {
                let run = driver::run(driver_config(&sk, None, system_id)?, shutdown);
                match tokio::time::timeout(Duration::from_secs(timeout_s), run).await {
                    Err(_) => anyhow::bail!(
                        "sync-safekeepers did not finish in {timeout_s}s: is a quorum of safekeepers ({}) reachable?",
                        sk.safekeepers.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")
                    ),
                    Ok(Ok(Outcome::Synced(lsn))) => {
                        println!("{lsn}");
                        Ok(())
                    }
                    Ok(Ok(Outcome::Stopped)) => anyhow::bail!("interrupted"),
                    Ok(Err(e)) => Err(e),
                }
            }
            Cmd::Run {
                spec,
                pgdata,
                pg_install,
                http_addr,
                auth_public_key_path,
                ssl_ca_file,
                ssl_cert_file,
                ssl_key_file,
            } => {
                let tls =
                    compute::ComputeTls { ca_file: ssl_ca_file, server_identity: ssl_cert_file.zip(ssl_key_file) };
                let text = std::fs::read_to_string(&spec)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", spec.display()))?;
                let spec = spec::ComputeSpec::parse(&text)?;
                let status =
                    Arc::new(Mutex::new(compute::ComputeStatus { status: "init".into(), ..Default::default() }));
                let listener = tokio::net::TcpListener::bind(http_addr)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on {http_addr} (HTTP): {e}"))?;
                let auth = match &auth_public_key_path {
                    Some(p) => Some(http::HttpAuth {
                        jwt: Arc::new(utils::auth::JwtAuth::from_key_path(p)?),
                        tenant_id: spec.tenant_id,
                    }),
                    None => None,
                };
                // The HTTP API is HTTPS only when the compute has a certificate (DESIGN D9).
                let http_tls = match &tls.server_identity {
                    Some((cert, key)) => {
                        Some(utils::http_server::tls_config(cert, key).context("--ssl-cert-file/--ssl-key-file")?)
                    }
                    None => None,
                };
                let app = http::router(status.clone(), shutdown.clone(), auth);
                // Never stopped: /status stays up while Postgres shuts down, until the process exits.
                let http_stop = tokio_util::sync::CancellationToken::new();
                tokio::spawn(utils::http_server::serve(listener, app, http_tls, http_stop));
                compute::run(spec, pgdata, pg_install, tls, status, shutdown).await
            }
            Cmd::Walproposer { sk, pg_addr, pg_user } => {
                let pg = PostgresSource { addr: pg_addr, user: pg_user };
                driver::run(driver_config(&sk, Some(pg), 0)?, shutdown).await.map(|_| ())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
