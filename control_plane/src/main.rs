//! `neon_local`: runs the whole stack on one machine (DESIGN §4). State lives in `.neon/`
//! (or `$NEON_REPO_DIR`): `config.json`, one folder per daemon with its data, log and pid file,
//! and one per endpoint with its spec and data directory.

mod env;
mod tls;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use anyhow::Context;

use crate::env::{Env, RemoteEncryption, RemoteStorage, StopMode};

#[derive(Clone, Copy, clap::ValueEnum)]
enum RemoteKind {
    Local,
    S3,
}

#[derive(Parser)]
#[command(version, about = "Run pageserver, safekeepers and computes locally")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new environment in .neon/.
    Init {
        #[arg(long, default_value_t = 3)]
        num_safekeepers: u32,
        /// Where the pageserver offloads layers: a local folder (.neon/remote_storage) or S3.
        /// Without it, nothing is offloaded.
        #[arg(long, value_enum)]
        remote_storage: Option<RemoteKind>,
        /// S3 endpoint (MinIO, moto); default: AWS.
        #[arg(long)]
        s3_endpoint: Option<String>,
        #[arg(long)]
        s3_bucket: Option<String>,
        #[arg(long)]
        s3_region: Option<String>,
        #[arg(long)]
        s3_prefix: Option<String>,
        /// Encrypt everything uploaded to remote storage (pageserver layers and indexes,
        /// safekeeper WAL) with data keys wrapped by this key-encryption key: a file holding 64
        /// hex digits (e.g. `openssl rand -hex 32 > kek1.key`) or 32 raw bytes.
        #[arg(long)]
        encryption_kek_file: Option<PathBuf>,
        /// The id recorded with the data keys that KEK wraps.
        #[arg(long, default_value = "kek1")]
        encryption_kek_id: String,
        /// Remove an existing environment first.
        #[arg(long)]
        force: bool,
        /// Turn on JWT auth and TLS everywhere: an Ed25519 key pair in .neon/auth/, every daemon
        /// and compute_ctl checking tokens, each given its own (NEON_AUTH_TOKEN); a CA and a
        /// certificate in .neon/tls/ that every listener serves (plaintext refused) and every
        /// client checks servers against.
        #[arg(long)]
        auth: bool,
    },
    /// Start the pageserver and the safekeepers.
    Start,
    /// Print a token of this environment (`init --auth`), e.g. for curl:
    /// `curl -H "Authorization: Bearer $(neon_local auth-token --scope pageserverapi)" ...`.
    AuthToken {
        /// tenant, pageserverapi, safekeeperdata or admin.
        #[arg(long)]
        scope: utils::auth::Scope,
        /// For `--scope tenant`.
        #[arg(long)]
        tenant_id: Option<utils::TenantId>,
    },
    /// Stop endpoints and daemons.
    Stop {
        #[arg(long, value_enum, default_value = "fast")]
        mode: StopMode,
    },
    /// Show every daemon and endpoint.
    Status,
    #[command(subcommand)]
    Tenant(TenantCmd),
    #[command(subcommand)]
    Timeline(TimelineCmd),
    #[command(subcommand)]
    Endpoint(EndpointCmd),
    #[command(subcommand)]
    Pageserver(DaemonCmd),
    /// Manage a safekeeper: `safekeeper start|stop|restart|status ID`.
    #[command(subcommand)]
    Safekeeper(SafekeeperCmd),
}

#[derive(Subcommand)]
enum TenantCmd {
    /// Create a tenant with a `main` branch.
    Create {
        #[arg(long)]
        tenant_id: Option<utils::TenantId>,
        #[arg(long)]
        timeline_id: Option<utils::TimelineId>,
        #[arg(long)]
        set_default: bool,
        /// Tenant settings, `-c key=value` (repeatable): checkpoint_distance, checkpoint_timeout,
        /// compaction_period, compaction_threshold, compaction_target_size,
        /// image_creation_threshold, gc_period, gc_horizon, pitr_interval, lsn_lease_length.
        #[arg(short = 'c', long = "config")]
        config: Vec<String>,
    },
    List,
    /// Replace a tenant's settings (`-c key=value`, repeatable; none resets to the defaults) and
    /// print the effective ones.
    Config {
        #[arg(long)]
        tenant_id: Option<utils::TenantId>,
        #[arg(short = 'c', long = "config")]
        config: Vec<String>,
    },
}

#[derive(Subcommand)]
enum TimelineCmd {
    /// Create a branch.
    Branch {
        #[arg(long)]
        branch_name: String,
        #[arg(long, default_value = "main")]
        ancestor_branch_name: String,
        /// Branch point; default: what the safekeepers have committed on the ancestor.
        #[arg(long, conflicts_with = "timestamp")]
        ancestor_start_lsn: Option<utils::Lsn>,
        /// Branch point as a time (RFC 3339): the ancestor as it was then.
        #[arg(long)]
        timestamp: Option<String>,
        #[arg(long)]
        tenant_id: Option<utils::TenantId>,
    },
    List {
        #[arg(long)]
        tenant_id: Option<utils::TenantId>,
    },
}

#[derive(Subcommand)]
enum EndpointCmd {
    /// Create an endpoint: the branch's primary, a read-only one with --lsn/--timestamp, or a replica
    /// with --hot-standby.
    Create {
        name: String,
        #[arg(long, default_value = "main")]
        branch_name: String,
        /// Read-only (static) endpoint showing the branch at this LSN.
        #[arg(long, conflicts_with = "timestamp")]
        lsn: Option<utils::Lsn>,
        /// Read-only (static) endpoint showing the branch as it was at this time (RFC 3339).
        #[arg(long)]
        timestamp: Option<String>,
        /// Read-only replica following the branch's primary (streams WAL from the safekeepers).
        #[arg(long)]
        hot_standby: bool,
        /// Postgres setting for this endpoint, `-c name=value` (repeatable).
        #[arg(short = 'c', long = "config")]
        config: Vec<String>,
        #[arg(long)]
        pg_port: Option<u16>,
        #[arg(long)]
        http_port: Option<u16>,
        #[arg(long)]
        tenant_id: Option<utils::TenantId>,
    },
    Start {
        name: String,
    },
    Stop {
        name: String,
        #[arg(long, value_enum, default_value = "fast")]
        mode: StopMode,
        /// Also remove the endpoint.
        #[arg(long)]
        destroy: bool,
    },
    List,
}

#[derive(Subcommand)]
enum DaemonCmd {
    Start,
    Stop {
        #[arg(long, value_enum, default_value = "fast")]
        mode: StopMode,
    },
    Restart {
        #[arg(long, value_enum, default_value = "fast")]
        mode: StopMode,
    },
    Status,
}

#[derive(Subcommand)]
enum SafekeeperCmd {
    Start {
        id: u32,
    },
    Stop {
        id: u32,
        #[arg(long, value_enum, default_value = "fast")]
        mode: StopMode,
    },
    Restart {
        id: u32,
        #[arg(long, value_enum, default_value = "fast")]
        mode: StopMode,
    },
    Status {
        id: u32,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Init {
            num_safekeepers,
            remote_storage,
            s3_endpoint,
            s3_bucket,
            s3_region,
            s3_prefix,
            encryption_kek_file,
            encryption_kek_id,
            force,
            auth,
        } => {
            let s3_given = s3_endpoint.is_some() || s3_bucket.is_some() || s3_region.is_some() || s3_prefix.is_some();
            let remote = match remote_storage {
                None if s3_given => anyhow::bail!("--s3-* options need '--remote-storage s3'"),
                None => RemoteStorage::None,
                Some(RemoteKind::Local) if s3_given => {
                    anyhow::bail!("--s3-* options need '--remote-storage s3', not 'local'")
                }
                Some(RemoteKind::Local) => RemoteStorage::Local,
                Some(RemoteKind::S3) => RemoteStorage::S3 {
                    bucket: s3_bucket.context("'--remote-storage s3' needs --s3-bucket")?,
                    region: s3_region.context("'--remote-storage s3' needs --s3-region (e.g. us-east-1)")?,
                    endpoint: s3_endpoint,
                    prefix: s3_prefix,
                },
            };
            let encryption = match encryption_kek_file {
                None => None,
                Some(_) if matches!(remote, RemoteStorage::None) => {
                    anyhow::bail!(
                        "--encryption-kek-file needs --remote-storage local|s3 (it encrypts what is uploaded there)"
                    )
                }
                Some(kek_file) => Some(RemoteEncryption::new(encryption_kek_id, &kek_file)?),
            };
            let env = Env::init(num_safekeepers, &remote, encryption.as_ref(), force, auth)?;
            println!(
                "initialized {} with {num_safekeepers} safekeepers{}{}",
                env.dir.display(),
                match remote {
                    RemoteStorage::None => String::new(),
                    RemoteStorage::Local => format!(", remote storage in {}", env.dir.join("remote_storage").display()),
                    RemoteStorage::S3 { bucket, .. } => format!(", remote storage in S3 bucket {bucket}"),
                },
                match &encryption {
                    None => String::new(),
                    Some(e) => format!(", encrypted under key-encryption key '{}'", e.kek_id),
                }
            );
            if auth {
                let ps = &env.conf.pageserver;
                println!(
                    "auth and TLS are on: keys in {dir} (public.pem checks tokens; keep private.pem secret);\n\
                     CA and certificate in {tls} (every listener is TLS-only; clients trust {ca}).\n\
                     Every daemon and compute gets its own token at start (NEON_AUTH_TOKEN); neon_local uses an admin token.\n\
                     HTTP APIs need 'Authorization: Bearer <token>' (/v1/status and /metrics are open), e.g.\n  \
                     curl --cacert {ca} -H \"Authorization: Bearer $(neon_local auth-token --scope pageserverapi)\" https://127.0.0.1:{}/v1/tenant\n\
                     The page service and safekeepers take the token as the libpq password, e.g.\n  \
                     PGPASSWORD=$(neon_local auth-token --scope tenant --tenant-id <id>) psql \"host=127.0.0.1 port={} sslmode=verify-full sslrootcert={ca} ...\"\n\
                     Endpoints are Postgres with ssl=on: 'neon_local endpoint start NAME' prints their connection string.",
                    ps.http_port,
                    ps.pg_port,
                    dir = env.auth_dir().display(),
                    tls = env.tls_dir().display(),
                    ca = env.tls_ca().unwrap_or_default().display(),
                );
            }
        }
        Cmd::AuthToken { scope, tenant_id } => {
            if scope == utils::auth::Scope::Tenant && tenant_id.is_none() {
                anyhow::bail!("--scope tenant needs --tenant-id");
            }
            let env = Env::load()?;
            match env.token(scope, tenant_id)? {
                Some(t) => println!("{t}"),
                None => anyhow::bail!("this environment has no auth: create it with 'neon_local init --auth'"),
            }
        }
        Cmd::Start => {
            let env = Env::load()?;
            env.start_all()?;
        }
        Cmd::Stop { mode } => Env::load()?.stop_all(mode)?,
        Cmd::Status => Env::load()?.print_status()?,
        Cmd::Tenant(TenantCmd::Create { tenant_id, timeline_id, set_default, config }) => {
            let config = parse_settings(&config)?;
            let mut env = Env::load()?;
            let (t, tl) = env.create_tenant(tenant_id, timeline_id, set_default, config)?;
            println!(
                "tenant {t} created with branch 'main' (timeline {tl}){}",
                if set_default { ", set as default" } else { "" }
            );
        }
        Cmd::Tenant(TenantCmd::List) => Env::load()?.list_tenants()?,
        Cmd::Tenant(TenantCmd::Config { tenant_id, config }) => {
            let config = parse_settings(&config)?;
            Env::load()?.set_tenant_config(tenant_id, config)?
        }
        Cmd::Timeline(TimelineCmd::Branch {
            branch_name,
            ancestor_branch_name,
            ancestor_start_lsn,
            timestamp,
            tenant_id,
        }) => {
            let mut env = Env::load()?;
            let (tl, lsn) =
                env.branch(tenant_id, &branch_name, &ancestor_branch_name, ancestor_start_lsn, timestamp.as_deref())?;
            println!("branch '{branch_name}' (timeline {tl}) created from '{ancestor_branch_name}' at {lsn}");
        }
        Cmd::Timeline(TimelineCmd::List { tenant_id }) => Env::load()?.list_timelines(tenant_id)?,
        Cmd::Endpoint(EndpointCmd::Create {
            name,
            branch_name,
            lsn,
            timestamp,
            hot_standby,
            config,
            pg_port,
            http_port,
            tenant_id,
        }) => {
            let mut env = Env::load()?;
            let ep = env.create_endpoint(
                &name,
                tenant_id,
                &branch_name,
                lsn,
                timestamp.as_deref(),
                hot_standby,
                &config,
                pg_port,
                http_port,
            )?;
            println!("endpoint '{name}' ({}) created on branch '{branch_name}': {}", ep.mode_desc(), env.connstr(&ep));
        }
        Cmd::Endpoint(EndpointCmd::Start { name }) => {
            let env = Env::load()?;
            let connstr = env.start_endpoint(&name)?;
            println!("endpoint '{name}' started: {connstr}");
        }
        Cmd::Endpoint(EndpointCmd::Stop { name, mode, destroy }) => {
            let mut env = Env::load()?;
            env.stop_endpoint(&name, mode, destroy)?;
        }
        Cmd::Endpoint(EndpointCmd::List) => Env::load()?.list_endpoints()?,
        Cmd::Pageserver(cmd) => {
            let env = Env::load()?;
            daemon_cmd(&env, cmd, None)?;
        }
        Cmd::Safekeeper(cmd) => {
            let env = Env::load()?;
            let (id, cmd) = match cmd {
                SafekeeperCmd::Start { id } => (id, DaemonCmd::Start),
                SafekeeperCmd::Stop { id, mode } => (id, DaemonCmd::Stop { mode }),
                SafekeeperCmd::Restart { id, mode } => (id, DaemonCmd::Restart { mode }),
                SafekeeperCmd::Status { id } => (id, DaemonCmd::Status),
            };
            daemon_cmd(&env, cmd, Some(id))?;
        }
    }
    Ok(())
}

fn daemon_cmd(env: &Env, cmd: DaemonCmd, sk: Option<u32>) -> anyhow::Result<()> {
    let d = match sk {
        Some(id) => env.safekeeper_daemon(id)?,
        None => env.pageserver_daemon(),
    };
    match cmd {
        DaemonCmd::Start => env.start_daemon(&d),
        DaemonCmd::Stop { mode } => env.stop_daemon(&d, mode),
        DaemonCmd::Restart { mode } => {
            env.stop_daemon(&d, mode)?;
            env.start_daemon(&d)
        }
        DaemonCmd::Status => {
            println!("{}", env.daemon_status(&d));
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `key=value` settings from `-c` flags.
fn parse_settings(items: &[String]) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let mut out = std::collections::BTreeMap::new();
    for item in items {
        let Some((k, v)) = item.split_once('=') else {
            anyhow::bail!("-c {item}: expected key=value, e.g. -c pitr_interval=1h");
        };
        if k.trim().is_empty() {
            anyhow::bail!("-c {item}: the setting name is empty; expected key=value");
        }
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}
