//! JSON bodies of the pageserver's HTTP management API.

use serde::{Deserialize, Serialize};
use utils::{Lsn, TenantId, TimelineId};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantCreateRequest {
    #[serde(default)]
    pub tenant_id: Option<TenantId>,
    /// Per-tenant settings (`checkpoint_distance`, `pitr_interval`, ...), as strings.
    #[serde(default)]
    pub config: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimelineCreateRequest {
    pub new_timeline_id: TimelineId,
    /// Branch from this timeline; bootstrap with initdb when absent.
    #[serde(default)]
    pub ancestor_timeline_id: Option<TimelineId>,
    #[serde(default)]
    pub ancestor_start_lsn: Option<Lsn>,
    #[serde(default)]
    pub pg_version: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TimelineInfo {
    pub tenant_id: TenantId,
    pub timeline_id: TimelineId,
    pub ancestor_timeline_id: Option<TimelineId>,
    pub ancestor_lsn: Option<Lsn>,
    pub last_record_lsn: Lsn,
    pub disk_consistent_lsn: Lsn,
    /// What the uploaded `index_part.json` covers (0 without remote storage).
    pub remote_consistent_lsn: Lsn,
    pub initdb_lsn: Lsn,
    pub pg_version: u32,
    /// Uploads scheduled and not yet done; `None` without remote storage.
    #[serde(default)]
    pub upload_queue_len: Option<usize>,
    /// The latest failure of the upload at the head of the queue, while it keeps failing.
    #[serde(default)]
    pub last_upload_error: Option<String>,
    /// Reads and branches below this LSN are refused: GC may have removed that history.
    #[serde(default)]
    pub latest_gc_cutoff_lsn: Lsn,
    /// Layer files of this timeline (local and remote-only), by kind, and their bytes.
    #[serde(default)]
    pub layer_count: usize,
    #[serde(default)]
    pub l0_delta_count: usize,
    #[serde(default)]
    pub image_layer_count: usize,
    #[serde(default)]
    pub layer_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TenantInfo {
    pub id: TenantId,
    pub timelines: usize,
}

/// Answer of `GET .../get_lsn_by_timestamp`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LsnByTimestamp {
    pub lsn: Lsn,
    /// `present`: a commit at or before the time exists; `past`: the time is before any
    /// commit; `future`: after the last one; `nodata`: no commits at all.
    pub kind: String,
}
