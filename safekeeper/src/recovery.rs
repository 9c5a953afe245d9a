//! Peer recovery: a safekeeper that lags behind a peer following the same leader pulls the
//! missing WAL from it.
//!
//! Safety: we only copy from a peer whose term equals ours and whose WAL was written by the same
//! term we follow (its last log term is our history's last term). Both then hold a prefix of that
//! leader's WAL, so the peer's WAL extends ours exactly; it goes through the normal append path,
//! as if the leader had sent it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use postgres_client::{Client, ConnectConfig};
use safekeeper_api::proto::{AppendRequest, ProposerMessage};
use safekeeper_api::replication::ReplicationMessage;
use safekeeper_api::Term;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};
use utils::Lsn;

use crate::timeline::{GlobalTimelines, Timeline};
use crate::wal_backup::PeerInfo;

#[derive(Clone, Debug)]
pub struct Peer {
    pub host: String,
    pub port: u16,
    /// `--ssl-ca-file`: connections to the peer are TLS-only, its certificate checked.
    pub tls: Option<utils::tls::TlsConnector>,
}

impl std::str::FromStr for Peer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (h, p) = s.rsplit_once(':').ok_or_else(|| format!("peer '{s}' is not host:port"))?;
        Ok(Peer { host: h.to_string(), port: p.parse().map_err(|_| format!("peer '{s}': bad port"))?, tls: None })
    }
}

struct PeerStatus {
    term: Term,
    flush_lsn: Lsn,
    commit_lsn: Lsn,
    last_log_term: Term,
    /// Offload facts; `None` from a safekeeper too old to report them.
    offload: Option<PeerInfo>,
}

fn conn(peer: &Peer, tl: &Timeline, password: Option<&str>) -> ConnectConfig {
    let mut c = ConnectConfig::new(peer.host.clone(), peer.port, "safekeeper-recovery");
    c.options =
        vec![("tenant_id".into(), tl.tenant_id.to_string()), ("timeline_id".into(), tl.timeline_id.to_string())];
    c.password = password.map(str::to_string);
    c.connect_timeout = Duration::from_secs(3);
    c.tls = peer.tls.clone();
    c
}

async fn peer_status(peer: &Peer, tl: &Timeline, password: Option<&str>) -> anyhow::Result<PeerStatus> {
    let mut c = Client::connect(&conn(peer, tl, password)).await?;
    let rows = c.simple_query("TIMELINE_STATUS").await?;
    let r = rows.first().context("TIMELINE_STATUS returned no row")?;
    let cell = |i: usize| r.get(i).cloned().flatten().with_context(|| format!("TIMELINE_STATUS column {i} missing"));
    let flush_lsn: Lsn = cell(1)?.parse()?;
    let offload = if r.len() > 8 {
        Some(PeerInfo {
            node_id: cell(5)?.parse()?,
            flush_lsn,
            wal_start_lsn: cell(6)?.parse()?,
            backup_lsn: cell(7)?.parse()?,
            remote_consistent_lsn: cell(8)?.parse()?,
        })
    } else {
        None
    };
    Ok(PeerStatus {
        term: cell(0)?.parse()?,
        flush_lsn,
        commit_lsn: cell(2)?.parse()?,
        last_log_term: cell(4)?.parse()?,
        offload,
    })
}

/// One recovery attempt for `tl`: returns the LSN reached, if it pulled anything.
async fn recover_once(tl: &Arc<Timeline>, peers: &[Peer], password: Option<&str>) -> anyhow::Result<Option<Lsn>> {
    let st = tl.status();
    let our_last = st.term_history.last().map(|e| e.term);
    if our_last != Some(st.term) {
        return Ok(None); // not following a leader of our term yet
    }
    for peer in peers {
        let ps = match peer_status(peer, tl, password).await {
            Ok(s) => s,
            Err(e) => {
                debug!("peer {}:{} unavailable for recovery: {e:#}", peer.host, peer.port);
                continue;
            }
        };
        // The peer's WAL in our term came from the same leader as ours: all of it up to its
        // flush LSN (committed or not) is what that leader would send us.
        if ps.term != st.term || ps.last_log_term != st.term || ps.flush_lsn <= st.flush_lsn {
            continue;
        }
        info!(
            "timeline {}/{}: our WAL ends at {}, peer {}:{} has it up to {}; recovering from it",
            tl.tenant_id, tl.timeline_id, st.flush_lsn, peer.host, peer.port, ps.flush_lsn
        );
        let mut c = conn(peer, tl, password);
        c.replication = Some("true".into());
        let client = Client::connect(&c).await?;
        let (mut reader, _w) =
            client.copy_both(&format!("START_REPLICATION PHYSICAL {} TERM {}", st.flush_lsn, st.term)).await?;
        let mut pos = st.flush_lsn;
        while pos < ps.flush_lsn {
            let Some(d) = reader.next().await? else { bail!("peer ended the stream at {pos}") };
            let ReplicationMessage::XLogData { wal_start, data, .. } = ReplicationMessage::decode(&d)? else {
                continue;
            };
            if wal_start != pos {
                bail!("peer sent WAL at {wal_start}, expected {pos}");
            }
            let take = data.len().min((ps.flush_lsn - pos) as usize);
            let msg = ProposerMessage::Append(AppendRequest {
                term: st.term,
                begin_lsn: pos,
                end_lsn: pos + take as u64,
                commit_lsn: ps.commit_lsn,
                truncate_lsn: Lsn::INVALID,
                wal: data.slice(..take),
            });
            let tl2 = tl.clone();
            tokio::task::spawn_blocking(move || tl2.process(&msg)).await??;
            pos += take as u64;
        }
        return Ok(Some(pos));
    }
    Ok(None)
}

/// Polls every peer's `TIMELINE_STATUS` for every timeline every `period` and records what it
/// says, for WAL offload (who is alive, the remote-consistent LSN). Separate from recovery, which
/// stops polling while it streams from a peer, so a busy peer never looks dead.
pub async fn poll_peers(
    timelines: Arc<GlobalTimelines>,
    peers: Vec<Peer>,
    password: Option<String>,
    period: Duration,
    stop: CancellationToken,
) {
    if peers.is_empty() {
        return;
    }
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for tl in timelines.list() {
            for peer in &peers {
                match peer_status(peer, &tl, password.as_deref()).await {
                    Ok(PeerStatus { offload: Some(info), .. }) => {
                        tl.record_peer(&format!("{}:{}", peer.host, peer.port), info)
                    }
                    Ok(_) => {}
                    Err(e) => debug!("peer {}:{} did not answer TIMELINE_STATUS: {e:#}", peer.host, peer.port),
                }
            }
        }
    }
}

/// Checks every timeline every `period` and recovers those that lag.
pub async fn run(
    timelines: Arc<GlobalTimelines>,
    peers: Vec<Peer>,
    password: Option<String>,
    period: Duration,
    stop: CancellationToken,
) {
    if peers.is_empty() {
        return;
    }
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for tl in timelines.list() {
            match recover_once(&tl, &peers, password.as_deref()).await {
                Ok(Some(lsn)) => {
                    info!("timeline {}/{}: recovered from a peer up to {lsn}", tl.tenant_id, tl.timeline_id)
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("timeline {}/{}: peer recovery failed: {e:#}", tl.tenant_id, tl.timeline_id),
            }
        }
    }
}
