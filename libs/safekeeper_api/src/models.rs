//! JSON bodies of the safekeeper's HTTP API, shared with its clients (neon_local, tests).

use serde::{Deserialize, Serialize};
use utils::{Lsn, NodeId, TenantId, TimelineId};

use crate::term::{Term, TermHistory};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimelineCreateRequest {
    pub timeline_id: TimelineId,
    /// Where the timeline's WAL begins.
    pub start_lsn: Lsn,
    /// PG_VERSION_NUM (150018) or major version (15).
    pub pg_version: u32,
    #[serde(default)]
    pub system_id: Option<u64>,
    #[serde(default)]
    pub wal_seg_size: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TimelineStatus {
    pub tenant_id: TenantId,
    pub timeline_id: TimelineId,
    pub term: Term,
    pub term_history: TermHistory,
    pub flush_lsn: Lsn,
    pub commit_lsn: Lsn,
    pub timeline_start_lsn: Lsn,
    pub local_start_lsn: Lsn,
    pub backup_lsn: Lsn,
    pub peer_horizon_lsn: Lsn,
    pub remote_consistent_lsn: Lsn,
    pub system_id: u64,
    pub pg_version: u32,
    /// Lowest LSN this safekeeper still holds on local disk (WAL below it was offloaded and
    /// removed, or the safekeeper joined later).
    #[serde(default)]
    pub wal_start_lsn: Lsn,
    /// The last failed WAL offload attempt (object, cause, fix), until one succeeds.
    #[serde(default)]
    pub last_backup_error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SafekeeperStatus {
    pub id: NodeId,
    pub timelines: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WalDigest {
    pub from_lsn: Lsn,
    pub until_lsn: Lsn,
    /// SHA-256 of the WAL bytes in `[from_lsn, until_lsn)`, hex.
    pub sha256: String,
}
