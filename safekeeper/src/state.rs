//! The durable state of one timeline on one safekeeper: what the control file holds.

use safekeeper_api::{Term, TermHistory};
use utils::{Lsn, TenantId, TimelineId};

/// Facts about the Postgres cluster whose WAL this is, fixed at timeline creation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerInfo {
    /// `PG_VERSION_NUM`-style, e.g. 150018; 0 until known.
    pub pg_version: u32,
    /// `pg_control`'s system identifier; 0 until the first proposer tells it.
    pub system_id: u64,
    pub wal_seg_size: u32,
}

/// Everything the acceptor must not forget across restarts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimelinePersistentState {
    pub tenant_id: TenantId,
    pub timeline_id: TimelineId,
    pub server: ServerInfo,
    /// Highest term this acceptor voted for (or accepted a leader of).
    pub term: Term,
    /// History of the WAL this acceptor holds (adopted from the last leader it accepted).
    pub term_history: TermHistory,
    /// The id of the last proposer that got this acceptor's vote (for logs).
    pub proposer_id: [u8; 16],
    /// Where the timeline's WAL begins (fixed at creation).
    pub timeline_start_lsn: Lsn,
    /// Where this safekeeper's WAL begins (above timeline start if it joined later).
    pub local_start_lsn: Lsn,
    /// WAL below this is committed (a quorum has it). Monotonic.
    pub commit_lsn: Lsn,
    /// WAL below this is offloaded to remote storage.
    pub backup_lsn: Lsn,
    /// WAL below this is on every acceptor; no peer will need it from us.
    pub peer_horizon_lsn: Lsn,
    /// WAL below this is durable in the pageserver's remote storage.
    pub remote_consistent_lsn: Lsn,
}

impl TimelinePersistentState {
    /// State of a freshly created timeline whose WAL starts at `start_lsn`.
    pub fn new(tenant_id: TenantId, timeline_id: TimelineId, server: ServerInfo, start_lsn: Lsn) -> Self {
        TimelinePersistentState {
            tenant_id,
            timeline_id,
            server,
            term: 0,
            term_history: TermHistory::empty(),
            proposer_id: [0; 16],
            timeline_start_lsn: start_lsn,
            local_start_lsn: start_lsn,
            commit_lsn: start_lsn,
            backup_lsn: start_lsn,
            peer_horizon_lsn: start_lsn,
            remote_consistent_lsn: Lsn::INVALID,
        }
    }
}
