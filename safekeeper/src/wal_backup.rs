//! WAL offload (DESIGN D7): whole committed segments go to remote storage, local WAL that is
//! offloaded and durable in the pageserver's remote storage is removed, and WAL older than what
//! is still on local disk is read back from remote storage.
//!
//! Remote layout: `wal/<tenant_id>/<timeline_id>/<segment file name>`, the segment file name as
//! on local disk (`000000010000000000000003`, Postgres timeline always 1), each object one whole
//! segment of `wal_seg_size` bytes. Bytes of a timeline's first segment before the timeline's
//! start are zeros. A put is atomic on both backends, so an object is a whole segment or absent.
//!
//! Who uploads: every safekeeper with remote storage runs the backup loop. For each segment due
//! (wholly below the commit LSN, at or above the backup LSN) the uploader is the lowest node id
//! among this safekeeper and the peers that answered `TIMELINE_STATUS` in the last
//! [`PEER_FRESH`] and hold the whole segment locally. So with the lowest one down the next one
//! takes over within seconds. Every upload is preceded by a listing of the timeline's objects and
//! an object that exists is never uploaded again, so two uploaders at once (a stale view of the
//! peers) only write the same bytes twice: committed WAL is identical on every safekeeper. As a
//! last resort a segment still missing [`TAKEOVER_AFTER`] after it became due here is uploaded by
//! whoever holds it, so a peer that answers but cannot upload does not stall offload.
//!
//! The backup LSN (persisted in the control file) is the end of the contiguous run of offloaded
//! segments. A safekeeper that did not upload a segment learns it from a listing, which it takes
//! every [`OTHERS_LIST_PERIOD`] (not trusting peers' word: a misconfigured peer could point at
//! another bucket, and removal must only follow what this safekeeper's storage holds). A crash
//! between an upload and the control file update loses nothing: the next pass finds the object
//! and advances past it.
//!
//! Removal: segments wholly below `min(commit LSN, backup LSN, remote-consistent LSN)` go; the
//! segment holding that LSN and the last segment stay (see `PhysicalStorage::remove_wal_below`).

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use postgres_ffi::xlog_file::{parse_xlog_file_name, xlog_file_name};
use postgres_ffi::xlog_page::XLogPageHeader;
use postgres_ffi::XLOG_BLCKSZ;
use remote_storage::{GenericRemoteStorage, ListingMode, RemotePath, RemoteStorage};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use utils::{Lsn, TenantId, TimelineId};

use crate::timeline::{GlobalTimelines, Timeline};
use crate::wal_storage::WAL_FILE_TIMELINE_ID;

/// Top-level folder of offloaded WAL in the remote storage (the pageserver uses `tenants/`).
pub const REMOTE_WAL_PREFIX: &str = "wal";
/// A peer that answered this recently counts as alive for the uploader election.
pub const PEER_FRESH: Duration = Duration::from_secs(5);
/// A due segment still missing after this long is uploaded by any safekeeper holding it.
pub const TAKEOVER_AFTER: Duration = Duration::from_secs(30);
/// How often the backup loop looks at every timeline.
const BACKUP_PERIOD: Duration = Duration::from_secs(1);
/// How often a safekeeper that is not the uploader lists the remote storage to learn what the
/// uploader offloaded (and so how far it may remove).
pub const OTHERS_LIST_PERIOD: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const PAGE_BYTES: u64 = XLOG_BLCKSZ as u64;

/// The configured remote storage for WAL.
pub struct WalBackup {
    pub storage: GenericRemoteStorage,
    /// Upload segments and remove offloaded local WAL (`--wal-backup-enabled`). When false, the
    /// storage is only read (old WAL for readers).
    pub upload_enabled: bool,
    /// `--peers` were given: wait until they could be polled before electing an uploader. A
    /// safekeeper without peers is its own uploader at once.
    pub has_peers: bool,
}

/// What a peer said about a timeline in its last `TIMELINE_STATUS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub node_id: u64,
    pub flush_lsn: Lsn,
    /// Lowest LSN it holds on local disk.
    pub wal_start_lsn: Lsn,
    pub backup_lsn: Lsn,
    pub remote_consistent_lsn: Lsn,
}

/// Per-timeline offload bookkeeping kept in memory.
#[derive(Debug, Default)]
pub struct BackupState {
    /// The last failure (object, cause, fix) until an attempt succeeds; shown over HTTP.
    pub last_error: Option<String>,
    /// Peers by address, with when they last answered.
    pub peers: HashMap<String, (PeerInfo, Instant)>,
    /// The lowest segment due for upload and since when (the takeover clock).
    due_since: Option<(u64, Instant)>,
    /// The first backup pass over this timeline: no upload before every live peer could be seen.
    first_pass: Option<Instant>,
    /// No attempt before this (backoff after a failure).
    retry_at: Option<Instant>,
    /// When a safekeeper that is not the uploader lists the remote storage next.
    next_list_at: Option<Instant>,
    backoff: Duration,
}

/// `wal/<tenant>/<timeline>`.
pub fn timeline_prefix(tenant_id: TenantId, timeline_id: TimelineId) -> RemotePath {
    RemotePath::from_components(&[REMOTE_WAL_PREFIX, &tenant_id.to_string(), &timeline_id.to_string()])
        .expect("hex ids are valid path components")
}

/// `wal/<tenant>/<timeline>/<segment file name>`.
pub fn segment_path(tenant_id: TenantId, timeline_id: TimelineId, segno: u64, seg_size_bytes: u64) -> RemotePath {
    timeline_prefix(tenant_id, timeline_id)
        .join(&xlog_file_name(WAL_FILE_TIMELINE_ID, segno, seg_size_bytes as usize))
        .expect("segment file names are valid path components")
}

/// Segments due for upload: from the one holding `backup_lsn` to the last one wholly below
/// `commit_lsn`.
pub fn segments_to_upload(backup_lsn: Lsn, commit_lsn: Lsn, seg_size_bytes: u64) -> Range<u64> {
    backup_lsn.segment_number(seg_size_bytes)..commit_lsn.segment_number(seg_size_bytes)
}

/// `backup_lsn` moved past the due segments already in remote storage, in order, stopping at
/// the first missing one (the backup LSN covers a contiguous run).
pub fn advance_over_present(backup_lsn: Lsn, commit_lsn: Lsn, seg_size_bytes: u64, present: &BTreeSet<u64>) -> Lsn {
    let mut lsn = backup_lsn;
    for segno in segments_to_upload(backup_lsn, commit_lsn, seg_size_bytes) {
        if !present.contains(&segno) {
            break;
        }
        lsn = Lsn((segno + 1) * seg_size_bytes);
    }
    lsn
}

/// Local WAL below this may be removed: committed, offloaded, and durable in the pageserver's
/// remote storage (so no pageserver needs it from us again).
pub fn removal_horizon(commit_lsn: Lsn, backup_lsn: Lsn, remote_consistent_lsn: Lsn) -> Lsn {
    commit_lsn.min(backup_lsn).min(remote_consistent_lsn)
}

/// A safekeeper that may upload a segment.
#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    pub node_id: u64,
    pub flush_lsn: Lsn,
    pub wal_start_lsn: Lsn,
}

/// The uploader of segment `segno`: the lowest node id among `candidates` holding all of it.
pub fn elect_uploader(
    candidates: &[Candidate],
    segno: u64,
    seg_size_bytes: u64,
    timeline_start_lsn: Lsn,
) -> Option<u64> {
    let seg_start = Lsn(segno * seg_size_bytes);
    let first_needed = seg_start.max(timeline_start_lsn);
    let end = seg_start + seg_size_bytes;
    candidates.iter().filter(|c| c.wal_start_lsn <= first_needed && c.flush_lsn >= end).map(|c| c.node_id).min()
}

/// Checks a segment's bytes (uploaded or downloaded): its size, and every page from the first
/// one at or after the timeline start carries a header naming its own position, except the
/// all-zero rest of a segment an `XLOG_SWITCH` ended (Postgres streams that padding as zeros).
/// Catches a truncated, misnamed or foreign object before its bytes are served as WAL.
pub fn verify_segment(bytes: &[u8], segno: u64, seg_size_bytes: u64, timeline_start_lsn: Lsn) -> Result<(), String> {
    if bytes.len() as u64 != seg_size_bytes {
        return Err(format!("it is {} bytes long, a WAL segment has {seg_size_bytes}", bytes.len()));
    }
    let seg_start = Lsn(segno * seg_size_bytes);
    let first = seg_start.max(timeline_start_lsn);
    let mut page = if first.page_offset() == 0 { first } else { first.page_start() + PAGE_BYTES };
    // The first page of a segment always has a header: a switch pads only to the segment end.
    let mut checked_one = false;
    while page < seg_start + seg_size_bytes {
        let off = (page.0 - seg_start.0) as usize;
        if checked_one && bytes[off..].iter().all(|&b| b == 0) {
            break; // XLOG_SWITCH padding to the segment end
        }
        XLogPageHeader::decode(&bytes[off..])
            .and_then(|h| h.validate(page, seg_size_bytes as usize, None))
            .map_err(|e| format!("the page header at {page} is not valid: {e}"))?;
        checked_one = true;
        page += PAGE_BYTES;
    }
    Ok(())
}

/// The segment numbers among a listing of a timeline's objects.
fn present_segments(keys: &[RemotePath], seg_size_bytes: u64) -> BTreeSet<u64> {
    keys.iter()
        .filter_map(|k| parse_xlog_file_name(k.object_name(), seg_size_bytes as usize))
        .filter(|&(_, tli)| tli == WAL_FILE_TIMELINE_ID)
        .map(|(segno, _)| segno)
        .collect()
}

/// Downloads and verifies segment `segno` of `tl`.
pub async fn download_segment(backup: &WalBackup, tl: &Timeline, segno: u64) -> anyhow::Result<Bytes> {
    let st = tl.status();
    let seg = tl.wal_seg_size_bytes();
    let path = segment_path(tl.tenant_id, tl.timeline_id, segno, seg);
    let bytes = backup.storage.get_bytes(&path).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot read offloaded WAL segment {}: {e}; the backup LSN here is {}, so it should exist: check the \
             remote storage configuration (--remote-storage) and that nothing deleted objects under {}",
            path.as_str(),
            st.backup_lsn,
            timeline_prefix(tl.tenant_id, tl.timeline_id).as_str()
        )
    })?;
    verify_segment(&bytes, segno, seg, st.timeline_start_lsn).map_err(|e| {
        anyhow::anyhow!(
            "offloaded WAL segment {} is damaged: {e}; delete the object so that a safekeeper still holding \
             the segment uploads it again",
            path.as_str()
        )
    })?;
    Ok(bytes)
}

/// Reads WAL `[from, to)` of `tl`, from local disk where it still is, else from the offloaded
/// segment (only one segment per call: `to` is cut at the segment end). `cache` keeps the last
/// downloaded segment, so a reader streaming old WAL downloads each segment once.
pub async fn read_wal_any(
    tl: &Arc<Timeline>,
    remote: Option<&Arc<WalBackup>>,
    from: Lsn,
    to: Lsn,
    cache: &mut Option<(u64, Bytes)>,
) -> anyhow::Result<Bytes> {
    if from >= tl.wal_start_lsn() {
        let tl2 = tl.clone();
        let r = tokio::task::spawn_blocking(move || tl2.read_wal(from, to)).await?;
        match r {
            Ok(b) => {
                *cache = None; // past the offloaded part: free the segment
                return Ok(b);
            }
            // Removed between the check and the read: fall through to remote storage.
            Err(_) if from < tl.wal_start_lsn() && remote.is_some() => {}
            Err(e) => return Err(e.into()),
        }
    }
    let st = tl.status();
    let Some(remote) = remote else {
        anyhow::bail!(
            "WAL at {from} is below this safekeeper's local WAL (from {}) and no remote storage is configured; \
             start the safekeeper with --remote-storage to serve offloaded WAL",
            st.wal_start_lsn
        );
    };
    let seg = tl.wal_seg_size_bytes();
    let segno = from.segment_number(seg);
    let seg_end = Lsn((segno + 1) * seg);
    if from < st.timeline_start_lsn || seg_end > st.backup_lsn {
        anyhow::bail!(
            "WAL at {from} of timeline {}/{} is neither on this safekeeper's disk (from {}) nor offloaded \
             (backup LSN {}, timeline start {})",
            tl.tenant_id,
            tl.timeline_id,
            st.wal_start_lsn,
            st.backup_lsn,
            st.timeline_start_lsn
        );
    }
    let bytes = match cache {
        Some((s, b)) if *s == segno => b.clone(),
        _ => {
            let b = download_segment(remote, tl, segno).await?;
            *cache = Some((segno, b.clone()));
            b
        }
    };
    let to = to.min(seg_end);
    let off = from.segment_offset(seg) as usize;
    Ok(bytes.slice(off..off + (to.0 - from.0) as usize))
}

/// Runs the backup loop until `stop`: every timeline every [`BACKUP_PERIOD`].
pub async fn run(timelines: Arc<GlobalTimelines>, backup: Arc<WalBackup>, stop: CancellationToken) {
    if !backup.upload_enabled {
        return;
    }
    let mut tick = tokio::time::interval(BACKUP_PERIOD);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for tl in timelines.list() {
            if tl.backup_state().retry_at.is_some_and(|t| Instant::now() < t) {
                continue;
            }
            let r = tokio::select! {
                _ = stop.cancelled() => return,
                r = backup_timeline(&timelines, &backup, &tl) => r,
            };
            let mut bs = tl.backup_state();
            match r {
                Ok(()) => {
                    if bs.last_error.take().is_some() {
                        info!("timeline {}/{}: WAL offload works again", tl.tenant_id, tl.timeline_id);
                    }
                    bs.retry_at = None;
                    bs.backoff = Duration::ZERO;
                }
                Err(e) => {
                    bs.backoff = (bs.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                    bs.retry_at = Some(Instant::now() + bs.backoff);
                    let msg = format!("{e:#}");
                    warn!(
                        "timeline {}/{}: WAL offload failed, retrying in {:?}: {msg}",
                        tl.tenant_id, tl.timeline_id, bs.backoff
                    );
                    bs.last_error = Some(msg);
                }
            }
        }
    }
}

/// One pass over one timeline: learn what is offloaded, upload what is ours to upload, remove
/// local WAL below the removal horizon.
pub async fn backup_timeline(
    timelines: &GlobalTimelines,
    backup: &WalBackup,
    tl: &Arc<Timeline>,
) -> anyhow::Result<()> {
    let seg = tl.wal_seg_size_bytes();
    let st = tl.status();
    let due = segments_to_upload(st.backup_lsn, st.commit_lsn, seg);
    // A safekeeper that is not the uploader learns what was offloaded from a listing, but only
    // every OTHERS_LIST_PERIOD: a LIST per second per timeline and safekeeper costs money on S3.
    let list_now = !due.is_empty() && {
        let ours = should_upload(timelines, backup, tl, due.start, seg, st.timeline_start_lsn);
        let now = Instant::now();
        let mut bs = tl.backup_state();
        if ours || bs.next_list_at.is_none_or(|t| now >= t) {
            bs.next_list_at = Some(now + OTHERS_LIST_PERIOD);
            true
        } else {
            false
        }
    };
    if list_now {
        let prefix = timeline_prefix(tl.tenant_id, tl.timeline_id);
        let listing = backup.storage.list(Some(&prefix), ListingMode::WithDelimiter, None).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot list offloaded WAL under {}: {e}; check that the remote storage is reachable and the \
                 credentials allow listing",
                prefix.as_str()
            )
        })?;
        let mut present = present_segments(&listing.keys, seg);
        let mut backup_lsn = st.backup_lsn;
        for segno in due {
            if !present.contains(&segno) {
                if !should_upload(timelines, backup, tl, segno, seg, st.timeline_start_lsn) {
                    break;
                }
                let Some(path) = tl.complete_segment_path(segno) else { break };
                upload_segment(backup, tl, segno, seg, path, st.timeline_start_lsn).await?;
                present.insert(segno);
            }
            let next = advance_over_present(backup_lsn, st.commit_lsn, seg, &present);
            if next > backup_lsn {
                let tl2 = tl.clone();
                tokio::task::spawn_blocking(move || tl2.update_backup_lsn(next)).await?.map_err(|e| {
                    anyhow::anyhow!(
                        "cannot record the backup LSN {next} in the control file in {}: {e}; check the disk",
                        tl.dir.display()
                    )
                })?;
                backup_lsn = next;
            }
        }
    }
    remove_offloaded_wal(tl).await
}

/// Whether this safekeeper uploads `segno` now (see the module docs).
fn should_upload(
    timelines: &GlobalTimelines,
    backup: &WalBackup,
    tl: &Timeline,
    segno: u64,
    seg: u64,
    timeline_start_lsn: Lsn,
) -> bool {
    let me = timelines.node_id.0;
    let st = tl.status();
    let mut candidates = vec![Candidate { node_id: me, flush_lsn: st.flush_lsn, wal_start_lsn: st.wal_start_lsn }];
    let mut bs = tl.backup_state();
    let now = Instant::now();
    for (info, seen) in bs.peers.values() {
        if now.duration_since(*seen) <= PEER_FRESH && info.node_id != me {
            candidates.push(Candidate {
                node_id: info.node_id,
                flush_lsn: info.flush_lsn,
                wal_start_lsn: info.wal_start_lsn,
            });
        }
    }
    // Right after start (or timeline creation) no peer has been polled yet, and every
    // safekeeper would think itself the lowest live one.
    let first_pass = *bs.first_pass.get_or_insert(now);
    if backup.has_peers && now.duration_since(first_pass) < PEER_FRESH {
        return false;
    }
    let since = match bs.due_since {
        Some((s, t)) if s == segno => t,
        _ => {
            bs.due_since = Some((segno, now));
            now
        }
    };
    match elect_uploader(&candidates, segno, seg, timeline_start_lsn) {
        Some(id) if id == me => true,
        elected if now.duration_since(since) >= TAKEOVER_AFTER => {
            info!(
                "timeline {}/{}: segment {segno} is still not offloaded {TAKEOVER_AFTER:?} after it was due \
                 (elected uploader: {elected:?}); uploading it here",
                tl.tenant_id, tl.timeline_id
            );
            true
        }
        _ => false,
    }
}

async fn upload_segment(
    backup: &WalBackup,
    tl: &Timeline,
    segno: u64,
    seg: u64,
    file: std::path::PathBuf,
    timeline_start_lsn: Lsn,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let remote = segment_path(tl.tenant_id, tl.timeline_id, segno, seg);
    let bytes = tokio::fs::read(&file)
        .await
        .map_err(|e| anyhow::anyhow!("cannot read {} to offload it: {e}; check the disk", file.display()))?;
    // A local segment that fails this is not uploaded: better no object than a wrong one.
    verify_segment(&bytes, segno, seg, timeline_start_lsn).map_err(|e| {
        anyhow::anyhow!(
            "refusing to offload {}: {e}; the local WAL is damaged: delete this timeline's directory on this \
             safekeeper and let it recover from its peers",
            file.display()
        )
    })?;
    backup.storage.put_bytes(&remote, Bytes::from(bytes)).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot upload WAL segment {}: {e}; check that the remote storage is reachable and writable \
             (credentials, bucket, free space)",
            remote.as_str()
        )
    })?;
    info!(
        "timeline {}/{}: offloaded WAL segment {} in {} ms",
        tl.tenant_id,
        tl.timeline_id,
        remote.as_str(),
        started.elapsed().as_millis()
    );
    Ok(())
}

/// Removes local WAL below the removal horizon.
async fn remove_offloaded_wal(tl: &Arc<Timeline>) -> anyhow::Result<()> {
    let st = tl.status();
    let horizon = removal_horizon(st.commit_lsn, st.backup_lsn, st.remote_consistent_lsn);
    let seg = tl.wal_seg_size_bytes();
    if horizon.segment_number(seg) <= st.wal_start_lsn.segment_number(seg) {
        return Ok(());
    }
    let tl2 = tl.clone();
    tokio::task::spawn_blocking(move || tl2.remove_wal_below(horizon)).await?.map_err(|e| {
        anyhow::anyhow!("cannot remove offloaded WAL below {horizon} in {}: {e}; check the disk", tl.dir.display())
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_wal::real_wal;

    const SEG: u64 = 16 << 20;

    #[test]
    fn due_segments_are_whole_and_committed() {
        // Timeline starting mid-segment 2, committed into segment 5: 2, 3, 4 are due.
        assert_eq!(segments_to_upload(Lsn(2 * SEG + 100), Lsn(5 * SEG + 8), SEG), 2..5);
        // Commit exactly at a segment end: that segment is whole.
        assert_eq!(segments_to_upload(Lsn(3 * SEG), Lsn(5 * SEG), SEG), 3..5);
        assert!(segments_to_upload(Lsn(5 * SEG), Lsn(5 * SEG + 8), SEG).is_empty());
        assert!(segments_to_upload(Lsn(2 * SEG + 100), Lsn(2 * SEG + 4000), SEG).is_empty());
    }

    #[test]
    fn backup_lsn_covers_a_contiguous_run_below_commit() {
        let present: BTreeSet<u64> = [2, 3, 5, 6, 7].into();
        assert_eq!(advance_over_present(Lsn(2 * SEG + 100), Lsn(7 * SEG + 9), SEG, &present), Lsn(4 * SEG));
        // Segment 7 is in remote storage but not committed here yet (a lagging safekeeper).
        assert_eq!(advance_over_present(Lsn(5 * SEG), Lsn(7 * SEG + 9), SEG, &present), Lsn(7 * SEG));
        assert_eq!(advance_over_present(Lsn(4 * SEG), Lsn(7 * SEG), SEG, &present), Lsn(4 * SEG));
    }

    /// A crash after the upload and before the control file update: the restarted safekeeper
    /// still has the old backup LSN, finds the object, moves past it and uploads nothing twice.
    #[test]
    fn crash_between_upload_and_control_file_is_harmless() {
        let (backup_lsn, commit) = (Lsn(3 * SEG), Lsn(6 * SEG + 50));
        let uploaded_before_crash: BTreeSet<u64> = [3, 4].into();
        let due = segments_to_upload(backup_lsn, commit, SEG);
        let next = advance_over_present(backup_lsn, commit, SEG, &uploaded_before_crash);
        assert_eq!(next, Lsn(5 * SEG));
        let still_due: Vec<u64> = due.filter(|s| !uploaded_before_crash.contains(s)).collect();
        assert_eq!(still_due, vec![5]);
    }

    #[test]
    fn removal_needs_commit_backup_and_remote_consistent() {
        assert_eq!(removal_horizon(Lsn(9 * SEG), Lsn(5 * SEG), Lsn(7 * SEG)), Lsn(5 * SEG));
        assert_eq!(removal_horizon(Lsn(9 * SEG), Lsn(8 * SEG), Lsn(7 * SEG)), Lsn(7 * SEG));
        // No pageserver has reported yet: nothing goes.
        assert_eq!(removal_horizon(Lsn(9 * SEG), Lsn(8 * SEG), Lsn::INVALID), Lsn::INVALID);
    }

    #[test]
    fn uploader_is_the_lowest_live_holder() {
        let start = Lsn(2 * SEG + 100);
        let c = |node_id, flush: u64, wal_start: Lsn| Candidate {
            node_id,
            flush_lsn: Lsn(flush),
            wal_start_lsn: wal_start,
        };
        let all = [c(3, 9 * SEG, start), c(1, 9 * SEG, start), c(2, 9 * SEG, start)];
        assert_eq!(elect_uploader(&all, 4, SEG, start), Some(1));
        // Node 1 is down (not a candidate): node 2 uploads.
        assert_eq!(elect_uploader(&all[..1], 4, SEG, start), Some(3));
        assert_eq!(elect_uploader(&[all[0], all[2]], 4, SEG, start), Some(2));
        // Node 1 lags inside segment 2, node 2 joined later (its WAL starts inside the
        // timeline's first segment): node 3 uploads segment 2, nodes 2 and 3 may upload 3.
        let mixed = [c(1, 2 * SEG + 500, start), c(2, 9 * SEG, Lsn(3 * SEG)), c(3, 9 * SEG, start)];
        assert_eq!(elect_uploader(&mixed, 2, SEG, start), Some(3));
        assert_eq!(elect_uploader(&mixed, 3, SEG, start), Some(2));
        // Nobody holds it: nobody uploads.
        assert_eq!(elect_uploader(&mixed, 9, SEG, start), None);
    }

    #[test]
    fn layout() {
        let (t, tl) = (TenantId([0xab; 16]), TimelineId([0xcd; 16]));
        assert_eq!(segment_path(t, tl, 3, SEG).as_str(), format!("wal/{t}/{tl}/000000010000000000000003"));
        let keys =
            [segment_path(t, tl, 3, SEG), segment_path(t, tl, 5, SEG), timeline_prefix(t, tl).join("junk").unwrap()];
        assert_eq!(present_segments(&keys, SEG), [3, 5].into());
    }

    /// A timeline on disk holding all of `real_wal()` (1 MiB segments), committed.
    fn timeline_with_real_wal(datadir: &std::path::Path) -> (Arc<GlobalTimelines>, Arc<Timeline>) {
        use safekeeper_api::models::TimelineCreateRequest;
        use safekeeper_api::proto::{AppendRequest, ProposerElected, ProposerGreeting, ProposerMessage, VoteRequest};
        use safekeeper_api::{TermHistory, TermLsn};

        let wal = real_wal();
        let (tenant_id, timeline_id) = (TenantId([1; 16]), TimelineId([2; 16]));
        let tls = Arc::new(GlobalTimelines::load(utils::NodeId(1), datadir, false).unwrap());
        let req = TimelineCreateRequest {
            timeline_id,
            start_lsn: wal.start_lsn,
            pg_version: 150018,
            system_id: Some(wal.system_id),
            wal_seg_size: Some(wal.seg_size_bytes as u32),
        };
        let tl = tls.create(tenant_id, &req).unwrap();
        let greeting = ProposerMessage::Greeting(ProposerGreeting {
            protocol_version: 1,
            pg_version: 150018,
            proposer_id: [9; 16],
            system_id: wal.system_id,
            tenant_id,
            timeline_id,
            wal_seg_size: wal.seg_size_bytes as u32,
        });
        tl.process(&greeting).unwrap();
        tl.process(&ProposerMessage::VoteRequest(VoteRequest { term: 1, proposer_id: [9; 16] })).unwrap();
        tl.process(&ProposerMessage::Elected(ProposerElected {
            term: 1,
            start_streaming_at: wal.start_lsn,
            term_history: TermHistory(vec![TermLsn { term: 1, lsn: wal.start_lsn }]),
            timeline_start_lsn: wal.start_lsn,
        }))
        .unwrap();
        let mut pos = wal.start_lsn;
        while pos < wal.end_lsn() {
            let next = (pos + 300_000).min(wal.end_lsn());
            tl.process_appends(&[AppendRequest {
                term: 1,
                begin_lsn: pos,
                end_lsn: next,
                commit_lsn: next,
                truncate_lsn: Lsn::INVALID,
                wal: Bytes::copy_from_slice(wal.slice(pos, next)),
            }])
            .unwrap();
            pos = next;
        }
        // The last append carried the final commit LSN; one more makes the acceptor take it.
        tl.process_appends(&[AppendRequest {
            term: 1,
            begin_lsn: pos,
            end_lsn: pos,
            commit_lsn: pos,
            truncate_lsn: Lsn::INVALID,
            wal: Bytes::new(),
        }])
        .unwrap();
        assert_eq!(tl.status().commit_lsn, wal.end_lsn());
        (tls, tl)
    }

    async fn read_all(tl: &Arc<Timeline>, backup: &Arc<WalBackup>, from: Lsn, to: Lsn) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut cache = None;
        let mut pos = from;
        while pos < to {
            let chunk = read_wal_any(tl, Some(backup), pos, Lsn(to.0.min(pos.0 + 200_000)), &mut cache).await?;
            pos += chunk.len() as u64;
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Upload, a crash before the control file update, removal and reads of removed WAL, on a
    /// real timeline directory and LocalFs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn offload_remove_and_read_back_on_local_fs() {
        use std::os::unix::fs::MetadataExt;

        let wal = real_wal();
        let seg = wal.seg_size_bytes;
        let data = tempfile::tempdir().unwrap();
        let remote_root = tempfile::tempdir().unwrap();
        let backup = Arc::new(WalBackup {
            storage: GenericRemoteStorage::LocalFs(remote_storage::LocalFs::new(remote_root.path().into()).unwrap()),
            upload_enabled: true,
            has_peers: false,
        });
        let (tls, tl) = timeline_with_real_wal(data.path());
        let (first, end_segno) = (wal.start_lsn.segment_number(seg), wal.end_lsn().segment_number(seg));

        backup_timeline(&tls, &backup, &tl).await.unwrap();
        let st = tl.status();
        assert_eq!(st.backup_lsn, Lsn(end_segno * seg), "every whole segment below commit is offloaded");
        assert_eq!(st.wal_start_lsn, wal.start_lsn, "nothing removed: the pageserver has reported nothing");
        let (tenant_id, timeline_id) = (tl.tenant_id, tl.timeline_id);
        let object = |segno: u64| remote_root.path().join(segment_path(tenant_id, timeline_id, segno, seg).as_str());
        let inodes: Vec<u64> = (first..end_segno).map(|s| std::fs::metadata(object(s)).unwrap().ino()).collect();
        assert!(!object(end_segno).exists(), "the open segment is not offloaded");

        // Crash after the uploads, before the control file recorded them: reload with the old
        // backup LSN. The next pass finds the objects and uploads nothing again.
        let mut state = crate::control_file::load(&tl.dir).unwrap();
        state.backup_lsn = wal.start_lsn;
        crate::control_file::save(&tl.dir, &state, false).unwrap();
        drop((tls, tl));
        let tls = Arc::new(GlobalTimelines::load(utils::NodeId(1), data.path(), false).unwrap());
        let tl = tls.list().pop().unwrap();
        assert_eq!(tl.status().backup_lsn, wal.start_lsn);
        backup_timeline(&tls, &backup, &tl).await.unwrap();
        assert_eq!(tl.status().backup_lsn, Lsn(end_segno * seg));
        let after: Vec<u64> = (first..end_segno).map(|s| std::fs::metadata(object(s)).unwrap().ino()).collect();
        assert_eq!(inodes, after, "objects were uploaded again");

        // The pageserver has everything but the last two segments durable: local WAL below the
        // segment holding that LSN goes; every byte still reads the same, the removed part from
        // remote storage.
        let remote_consistent = Lsn((end_segno - 2) * seg + 100);
        tl.update_remote_consistent_lsn(remote_consistent);
        backup_timeline(&tls, &backup, &tl).await.unwrap();
        assert_eq!(tl.status().wal_start_lsn, Lsn((end_segno - 2) * seg));
        assert!(tl.read_wal(wal.start_lsn, wal.start_lsn + 8).is_err(), "removed locally");
        assert!(read_all(&tl, &backup, wal.start_lsn, wal.end_lsn()).await.unwrap() == wal.bytes);
        // A restart finds the WAL end in what is left on disk.
        tl.persist();
        drop((tls, tl));
        let tls = Arc::new(GlobalTimelines::load(utils::NodeId(1), data.path(), false).unwrap());
        let tl = tls.list().pop().unwrap();
        let st = tl.status();
        assert_eq!(
            (st.flush_lsn, st.commit_lsn, st.wal_start_lsn),
            (wal.end_lsn(), wal.end_lsn(), Lsn((end_segno - 2) * seg))
        );
        assert!(read_all(&tl, &backup, wal.start_lsn, wal.end_lsn()).await.unwrap() == wal.bytes);

        // A damaged object is refused with its name, not served.
        let victim = first + 1;
        let mut bytes = std::fs::read(object(victim)).unwrap();
        bytes[0] ^= 0xff;
        std::fs::write(object(victim), bytes).unwrap();
        let err = read_all(&tl, &backup, Lsn(victim * seg), Lsn(victim * seg + 10)).await.unwrap_err().to_string();
        assert!(err.contains("000000010000000000000") && err.contains("damaged"), "{err}");
        // And a missing one says what to check.
        std::fs::remove_file(object(victim)).unwrap();
        let err = read_all(&tl, &backup, Lsn(victim * seg), Lsn(victim * seg + 10)).await.unwrap_err().to_string();
        assert!(err.contains("cannot read offloaded WAL segment") && err.contains("--remote-storage"), "{err}");
    }

    #[test]
    fn real_segments_verify_and_damage_is_caught() {
        let wal = real_wal();
        let seg = wal.seg_size_bytes;
        let first = wal.start_lsn.segment_number(seg);
        let last = wal.end_lsn().segment_number(seg);
        // The first segment, zeros before the start (as a safekeeper's file holds it).
        let mut bytes = vec![0u8; seg as usize];
        let off = wal.start_lsn.segment_offset(seg) as usize;
        bytes[off..].copy_from_slice(wal.slice(wal.start_lsn, Lsn((first + 1) * seg)));
        verify_segment(&bytes, first, seg, wal.start_lsn).unwrap();
        // Every whole segment, including the one ending with XLOG_SWITCH's padding.
        for segno in first + 1..last {
            let b = wal.slice(Lsn(segno * seg), Lsn((segno + 1) * seg));
            verify_segment(b, segno, seg, wal.start_lsn).unwrap_or_else(|e| panic!("segment {segno}: {e}"));
            // Under another name, short, or with a damaged header: refused.
            assert!(verify_segment(b, segno + 1, seg, wal.start_lsn).is_err());
            assert!(verify_segment(&b[..b.len() - 1], segno, seg, wal.start_lsn).is_err());
            let mut bad = b.to_vec();
            bad[(seg / 2) as usize] ^= 0xff; // a page header in the middle
            assert!(verify_segment(&bad, segno, seg, wal.start_lsn).is_err());
        }
    }
}
