//! WAL receiver: streams a timeline's WAL from the safekeeper with the highest commit LSN,
//! ingests every record, and reports progress back (write = last ingested record,
//! flush = disk-consistent, apply = remote-consistent LSN).
//!
//! Contiguity is checked twice: the stream must continue exactly where ingest stopped, and
//! ingest checks each record's start and `xl_prev` against the previous record.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use postgres_client::{Client, ConnectConfig};
use postgres_ffi::{decode_record, WalStreamDecoder};
use safekeeper_api::replication::{pg_now_us, FeedbackMessage, ReplicationMessage};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use utils::Lsn;

use crate::config::SafekeeperAuthToken;
use crate::pgdatadir_mapping::DatadirModification;
use crate::tenant::timeline::Timeline;
use crate::walingest::WalIngest;

/// How often to compare our source with the other safekeepers.
const LAG_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Switch to another safekeeper when it is this far ahead of what we have received...
const MAX_LAG_BYTES: u64 = 16 * 1024 * 1024;
/// ...or ahead at all while ours has not moved for this long: ours may have missed a commit
/// (e.g. it was unreachable while a new compute's election committed the last WAL), and nothing
/// may come to tell it (that compute waits for us before it starts).
const STALLED_SWITCH_AFTER: Duration = Duration::from_secs(2);

/// Where WAL comes from and how to reach it.
#[derive(Debug, Clone)]
pub struct WalSources {
    /// `host:port` of each safekeeper.
    pub safekeepers: Vec<String>,
    /// `ssl_ca_file`: connections are TLS-only, certificates checked against this CA.
    pub tls: Option<utils::tls::TlsConnector>,
    /// The token for safekeepers with auth on (`safekeeper_auth_token_path`, else
    /// `$NEON_AUTH_TOKEN`; see `PageServerConf`).
    pub token: Option<SafekeeperAuthToken>,
}

impl WalSources {
    /// The token as it is now (a token file is read again: rewriting it rotates the token).
    fn password(&self) -> anyhow::Result<Option<String>> {
        self.token.as_ref().map(SafekeeperAuthToken::get).transpose()
    }
}

/// How to reach safekeeper `addr` for `tl`; `password`: from [`WalSources::password`], read once
/// per round of connections.
fn conn_config(addr: &str, tl: &Timeline, src: &WalSources, password: Option<String>) -> anyhow::Result<ConnectConfig> {
    let (host, port) =
        addr.rsplit_once(':').with_context(|| format!("safekeeper address '{addr}' is not host:port"))?;
    let mut c = ConnectConfig::new(host, port.parse().with_context(|| format!("bad port in '{addr}'"))?, "pageserver");
    c.options =
        vec![("tenant_id".into(), tl.tenant_id().to_string()), ("timeline_id".into(), tl.timeline_id().to_string())];
    c.connect_timeout = Duration::from_secs(5);
    c.tls = src.tls.clone();
    // Sent only if the safekeeper asks for it.
    c.password = password;
    Ok(c)
}

/// The reachable safekeeper with the highest commit LSN.
/// Fails only if the token cannot be read (the safekeepers' own failures just skip them).
async fn pick_safekeeper(tl: &Timeline, src: &WalSources) -> anyhow::Result<Option<(String, Lsn)>> {
    let mut best: Option<(String, Lsn)> = None;
    let password = src.password()?;
    for sk in &src.safekeepers {
        let Ok(cfg) = conn_config(sk, tl, src, password.clone()) else { continue };
        let status = async {
            let mut c = Client::connect(&cfg).await?;
            let rows = c.simple_query("TIMELINE_STATUS").await?;
            let commit: Lsn =
                rows.first().and_then(|r| r.get(2).cloned().flatten()).context("no commit_lsn")?.parse()?;
            anyhow::Ok(commit)
        };
        match status.await {
            Ok(commit) if best.as_ref().is_none_or(|(_, b)| commit > *b) => best = Some((sk.clone(), commit)),
            Ok(_) => {}
            Err(e) => debug!("safekeeper {sk} not usable for {}/{}: {e:#}", tl.tenant_id(), tl.timeline_id()),
        }
    }
    Ok(best)
}

/// Runs until `stop`, reconnecting with backoff.
pub async fn run(tl: Arc<Timeline>, src: Arc<WalSources>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let r = tokio::select! {
            _ = stop.cancelled() => return,
            r = session(&tl, &src) => r,
        };
        match r {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                warn!("WAL receiver for {}/{}: {e:#}; retrying in {backoff:?}", tl.tenant_id(), tl.timeline_id());
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
    }
}

async fn session(tl: &Arc<Timeline>, src: &WalSources) -> anyhow::Result<()> {
    let Some((sk, commit)) = pick_safekeeper(tl, src).await? else {
        bail!("no safekeeper has timeline {}/{}", tl.tenant_id(), tl.timeline_id())
    };
    let start = tl.get_last_record_lsn();
    if commit <= start {
        // Nothing new anywhere; look again later (a compute may start writing).
        tokio::time::sleep(Duration::from_millis(500)).await;
        return Ok(());
    }
    let mut cfg = conn_config(&sk, tl, src, src.password()?)?;
    cfg.replication = Some("true".into());
    let client = Client::connect(&cfg).await?;
    let (mut reader, mut writer) = client.copy_both(&format!("START_REPLICATION PHYSICAL {start}")).await?;
    info!(
        "streaming WAL of {}/{} from safekeeper {sk} at {start} (its commit LSN is {commit})",
        tl.tenant_id(),
        tl.timeline_id()
    );
    let tl2 = tl.clone();
    let ingest = tokio::task::spawn_blocking(move || WalIngest::new(tl2)).await??;
    let ingest = Arc::new(Mutex::new(ingest));
    let mut decoder = WalStreamDecoder::new(start);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut lag_check = tokio::time::interval(LAG_CHECK_INTERVAL);
    lag_check.tick().await; // the first tick is immediate
                            // How far our safekeeper says WAL is committed (from its messages).
    let mut source_end = commit;
    let mut source_moved_at = tokio::time::Instant::now();
    loop {
        tokio::select! {
            msg = reader.next() => {
                let Some(data) = msg? else { bail!("safekeeper {sk} ended the stream") };
                let (wal_start, data) = match ReplicationMessage::decode(&data)? {
                    ReplicationMessage::XLogData { wal_start, wal_end, data, .. } => {
                        if wal_end > source_end {
                            source_end = wal_end;
                            source_moved_at = tokio::time::Instant::now();
                        }
                        (wal_start, data)
                    }
                    ReplicationMessage::Keepalive { wal_end, .. } => {
                        if wal_end > source_end {
                            source_end = wal_end;
                            source_moved_at = tokio::time::Instant::now();
                        }
                        continue;
                    }
                };
                if wal_start != decoder.fed_up_to() {
                    bail!("safekeeper {sk} sent WAL at {wal_start}, expected {}: refusing a gap", decoder.fed_up_to());
                }
                decoder.feed(&data);
                let mut records = Vec::new();
                while let Some(r) = decoder.poll_record().with_context(|| format!("decoding WAL from {sk}"))? {
                    records.push(r);
                }
                if records.is_empty() {
                    continue;
                }
                let (tl2, ingest2) = (tl.clone(), ingest.clone());
                tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                    let mut ingest = ingest2.lock().expect("ingest lock");
                    let mut m = DatadirModification::new(&tl2);
                    for r in records {
                        let rec = decode_record(r.record, r.start_lsn)?;
                        ingest.ingest_record(&rec, r.end_lsn, &mut m)?;
                    }
                    tl2.checkpoint_if_due()?;
                    Ok(())
                })
                .await??;
            }
            _ = lag_check.tick() => {
                // Another safekeeper far ahead of ours: ours lags or is cut off from the quorum;
                // reconnect to the best one. (Our own ingest lag is not a reason to switch.)
                if let Ok(Some((best, commit))) = pick_safekeeper(tl, src).await {
                    let ahead = commit.checked_sub(source_end).unwrap_or(0);
                    let stalled = source_moved_at.elapsed() >= STALLED_SWITCH_AFTER;
                    if best != sk && (ahead > MAX_LAG_BYTES || (ahead > 0 && stalled)) {
                        info!("safekeeper {best} has committed up to {commit}, {sk} only up to {source_end}: switching");
                        return Ok(());
                    }
                }
            }
            _ = tick.tick() => {
                let tl2 = tl.clone();
                tokio::task::spawn_blocking(move || tl2.checkpoint_if_due()).await??;
                let fb = FeedbackMessage::StandbyStatus {
                    write_lsn: tl.get_last_record_lsn(),
                    flush_lsn: tl.get_disk_consistent_lsn(),
                    // Remote-consistent: what the uploaded index covers (0 without remote storage).
                    apply_lsn: tl.remote_consistent_lsn().unwrap_or(Lsn::INVALID),
                    send_time_us: pg_now_us(),
                    reply_requested: false,
                };
                writer.send(&fb.encode()).await?;
            }
        }
    }
}
