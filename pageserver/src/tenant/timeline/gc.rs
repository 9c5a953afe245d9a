//! Garbage collection and point-in-time retention (DESIGN D6), and LSN leases.
//!
//! **Cutoff.** History at or above the GC cutoff stays readable:
//! `cutoff = min(last_record_lsn - gc_horizon, LSN at (now - pitr_interval), every unexpired
//! lease, disk_consistent_lsn)`, never moving back. It is saved in the metadata
//! (`latest_gc_cutoff_lsn`) before any layer goes, so reads and branches below it are refused
//! with a clear error instead of seeing half-deleted history.
//!
//! **Leases.** A compute reads at a fixed LSN for its whole life (its start LSN, DESIGN D3), so
//! it holds a lease on that LSN, renewed by compute_ctl (`lease lsn` on the page service); a
//! basebackup takes one too. Leases live in memory: after a restart, GC waits one lease length
//! before it runs, so every live compute has renewed its lease by then.
//!
//! **Which layers go.** A layer is removed only when nothing at or above the cutoff, and nothing
//! at a child branch point, can need it:
//! - a delta layer holding LSNs `s..e` needs `e - 1 <= cutoff` and, for the cutoff and for
//!   every branch point `b >= s`, an image layer covering its whole key range with an LSN in
//!   `e - 1 ..= b` (reads at `b` then stop at that image before reaching the delta);
//! - an image layer at `L` needs `L < cutoff` and, likewise, a strictly newer image (`L + 1
//!   ..= b`) for the cutoff and every branch point `b >= L`.
//!
//! A branch point below the cutoff thus keeps exactly the layers reads at it use.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use tracing::info;
use utils::Lsn;

use super::{lock, Timeline, TimelineError};
use crate::layer::LayerName;
use crate::pgdatadir_mapping::LsnForTimestamp;

/// What one GC run decided and did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct GcResult {
    pub cutoff: Lsn,
    /// Child branch points below the cutoff, whose history GC kept (leases lower the cutoff
    /// itself instead).
    pub retained_branch_points: Vec<Lsn>,
    pub layers_total: usize,
    pub layers_removed: usize,
    pub bytes_removed: u64,
    /// Why GC did nothing, when it did nothing on purpose.
    pub skipped: Option<String>,
}

/// The leases of one timeline: LSN → when the lease ends.
#[derive(Debug, Default)]
pub(crate) struct Leases {
    pub(crate) until: HashMap<Lsn, SystemTime>,
}

impl Timeline {
    /// Keeps history at `lsn` readable for `length` from now (renewing any lease on it).
    /// Refused below the GC cutoff: that history may be gone already. Returns when it ends.
    pub fn lease_lsn(&self, lsn: Lsn, length: Duration) -> Result<SystemTime, TimelineError> {
        let _gc = lock(&self.gc_branch_lock);
        let cutoff = self.get_latest_gc_cutoff_lsn();
        if lsn < cutoff {
            return Err(TimelineError::Invalid(format!(
                "cannot lease LSN {lsn} on timeline {}: it is below the garbage-collection cutoff {cutoff}; start the \
                 compute at a later LSN",
                self.timeline_id
            )));
        }
        let until = SystemTime::now() + length;
        let mut leases = lock(&self.leases);
        let entry = leases.until.entry(lsn).or_insert(until);
        *entry = (*entry).max(until);
        Ok(*entry)
    }

    /// Unexpired leases, dropping the expired ones.
    pub fn active_leases(&self, now: SystemTime) -> Vec<Lsn> {
        let mut leases = lock(&self.leases);
        leases.until.retain(|_, until| *until > now);
        let mut out: Vec<Lsn> = leases.until.keys().copied().collect();
        out.sort();
        out
    }

    /// Unexpired leases and when each ends, by LSN (read-only: for the HTTP API and tests).
    pub fn lease_list(&self, now: SystemTime) -> Vec<(Lsn, SystemTime)> {
        let leases = lock(&self.leases);
        let mut out: Vec<(Lsn, SystemTime)> =
            leases.until.iter().filter(|(_, u)| **u > now).map(|(l, u)| (*l, *u)).collect();
        out.sort();
        out
    }

    /// The cutoff GC would use now (see the module docs), before leases and the old cutoff.
    fn retention_cutoff(&self, now: SystemTime) -> Result<Lsn, TimelineError> {
        let conf = self.conf();
        let last = self.get_last_record_lsn();
        let horizon = Lsn(last.0.saturating_sub(conf.gc_horizon_bytes));
        let pitr = if conf.pitr_interval.is_zero() {
            last
        } else {
            let since = now.checked_sub(conf.pitr_interval).unwrap_or(SystemTime::UNIX_EPOCH);
            let ts = postgres_ffi::system_time_to_timestamptz(since);
            match self.find_lsn_by_timestamp(ts) {
                Ok(LsnForTimestamp::Present(lsn)) => lsn,
                Ok(LsnForTimestamp::Future(lsn)) => lsn,
                // Every commit is newer than the window's start (or there is none): keep all.
                Ok(LsnForTimestamp::Past(_)) | Ok(LsnForTimestamp::NoData(_)) => Lsn::INVALID,
                Err(e) => {
                    return Err(TimelineError::Invalid(format!(
                        "timeline {}: finding the LSN at the start of the pitr_interval window: {e}",
                        self.timeline_id
                    )))
                }
            }
        };
        Ok(horizon.min(pitr).min(self.get_disk_consistent_lsn()))
    }

    /// Runs GC (module docs). Blocking; one compaction or GC of a timeline runs at a time.
    pub fn gc(&self, now: SystemTime) -> Result<GcResult, TimelineError> {
        let _one_at_a_time = lock(&self.compaction_lock);
        let conf = self.conf();
        let mut result = GcResult::default();
        let since_load = self.loaded_at.elapsed();
        if since_load < conf.lsn_lease_length {
            result.cutoff = self.get_latest_gc_cutoff_lsn();
            result.skipped = Some(format!(
                "the timeline was loaded {since_load:?} ago; GC waits one lsn_lease_length ({:?}) after a start so \
                 that running computes renew their leases first",
                conf.lsn_lease_length
            ));
            return Ok(result);
        }
        let retention = self.retention_cutoff(now)?;
        // Decide the cutoff and the branch points together, so no branch is created below
        // the new cutoff meanwhile (branch() takes the same lock for its check).
        let (cutoff, branch_points) = {
            let _gc = lock(&self.gc_branch_lock);
            let mut cutoff = retention;
            for lease in self.active_leases(now) {
                cutoff = cutoff.min(lease);
            }
            let old = self.get_latest_gc_cutoff_lsn();
            let cutoff = cutoff.max(old);
            if cutoff > old {
                self.update_metadata(|md| md.latest_gc_cutoff_lsn = cutoff)?;
            }
            let mut points: Vec<Lsn> =
                self.child_branch_points().into_iter().map(|(_, lsn)| lsn).filter(|lsn| *lsn < cutoff).collect();
            points.sort();
            points.dedup();
            (cutoff, points)
        };
        result.cutoff = cutoff;
        result.retained_branch_points = branch_points.clone();

        let victims: Vec<(LayerName, u64)> = {
            let layers = self.layers_read();
            let covered = |d: &crate::layer::PersistentLayerDesc, from: Lsn, upto: Lsn| {
                from <= upto && layers.is_covered_by_images(d.key_range, from..Lsn(upto.0 + 1))
            };
            let mut out = Vec::new();
            for layer in layers.historic_layers() {
                result.layers_total += 1;
                let d = layer.desc();
                // `low`: the oldest LSN the layer holds; `from`: where a covering image must start.
                let (low, from) = match d.image_lsn() {
                    Some(l) => (l, Lsn(l.0 + 1)),
                    None => (d.lsn_range.start, Lsn(d.lsn_range.end.0 - 1)),
                };
                if from > cutoff || !covered(d, from, cutoff) {
                    continue;
                }
                if branch_points.iter().filter(|b| **b >= low).all(|b| covered(d, from, *b)) {
                    out.push((d.layer_name(), d.file_size_bytes));
                }
            }
            out
        };
        if !victims.is_empty() {
            let names: Vec<LayerName> = victims.iter().map(|(n, _)| n.clone()).collect();
            self.replace_layers(&names, Vec::new())?;
            result.layers_removed = victims.len();
            result.bytes_removed = victims.iter().map(|(_, size)| size).sum();
            info!(
                timeline = %self.timeline_id,
                "gc: cutoff {cutoff}: removed {} of {} layers ({} bytes); branch points kept: {:?}",
                result.layers_removed,
                result.layers_total,
                result.bytes_removed,
                branch_points
            );
        }
        Ok(result)
    }

    /// When the timeline was loaded (GC's lease grace period starts there).
    pub fn loaded_at(&self) -> Instant {
        self.loaded_at
    }
}
