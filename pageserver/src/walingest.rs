//! WAL ingest: each decoded Postgres WAL record becomes changes to the timeline's keys, written
//! at the record's **end LSN** (Postgres's `EndRecPtr`, the LSN redo stamps on the pages it
//! touches).
//!
//! What a record turns into:
//! - **Block references.** The full-page image of an `XLOG_FPI` / `XLOG_FPI_FOR_HINT` record
//!   (with the apply flag) becomes a page image: the hole restored and `pd_lsn` set to the
//!   record's end LSN unless the page is new (all zeros) — exactly what
//!   `XLogReadBufferForRedoExtended` does when it restores a block. Any other block reference
//!   stores the whole raw record ([`WalRecord::Postgres`]) for the redo process, even when it
//!   carries an applicable image: hash and GiST redo change a page after restoring its image
//!   (docs/decisions.md, "only XLOG_FPI images become stored images"); such a record needs no
//!   older version (`will_init`), nor does one with `BKPBLOCK_WILL_INIT`. Touching a block at or
//!   past the relation's size extends it (and touching a missing fork creates it), as redo's
//!   `XLogReadBufferExtended` does.
//! - **Heap VM-bit clears.** Heap redo clears visibility-map bits of pages that are not among the
//!   record's block references; ingest stores [`WalRecord::ClearVisibilityMapFlags`] on the VM
//!   page so it is rebuilt without Postgres. Skipped when the VM page does not exist (there are
//!   no bits to clear).
//! - **Storage manager.** Create → relation creation; truncate → the main fork shrinks, and the
//!   FSM and VM shrink to the blocks Postgres keeps (`FreeSpaceMapPrepareTruncateRel`,
//!   `visibilitymap_prepare_truncate`). Postgres also clears the entries of the truncated heap
//!   blocks on the last kept FSM/VM page. For the VM, ingest does exactly that: it reads the
//!   page as of the previous record and stores the result as an image (a recovered standby's VM
//!   is byte-identical; the page oracle checks it). The FSM page is zeroed whole instead
//!   (conservative: "no free space known"; the FSM is not WAL-logged and vacuum rebuilds it).
//! - **Databases.** `FILE_COPY` create copies the template's relations (every fork, size and
//!   page, read at the previous record's LSN) and relation map; `WAL_LOG` create adds the
//!   directory (relation map and contents follow as their own records); drop removes every
//!   relation, the map and the directory entry.
//! - **Transactions.** Commit/abort set clog bits through [`WalRecord::ClogSetCommitted`] /
//!   [`WalRecord::ClogSetAborted`] on each clog page involved and drop the relations the record
//!   lists; prepare stores the two-phase state (the record's main data); commit/abort prepared
//!   removes it. A commit with an xid also rewrites the last-commit key (its timestamp and
//!   LSNs), the index behind LSN-by-timestamp lookups.
//! - **SLRUs.** Zero-page records create pages (and segments); truncations drop segments;
//!   multixact creation stores offsets and members as Rust-applied records.
//! - **Checkpoint state.** Checkpoint, next-OID and running-xacts records, and every record's
//!   xid, keep the stored `CheckPoint` current the way `xlog_redo` and
//!   `ProcArrayApplyRecoveryInfo` keep shared memory current; checkpoint records also update
//!   the stored `pg_control` (its checkpoint location and copy).
//!
//! Not yet handled: `COPY FREEZE` sets VM bits in redo without a VM block reference
//! (`XLH_INSERT_ALL_FROZEN_SET`), so the VM page misses those bits (conservative); and logical
//! replication, commit-timestamp and replication-origin state are not stored.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use postgres_ffi::controlfile::ControlFileData;
use postgres_ffi::fpi::restore_block_image;
use postgres_ffi::page::{page_is_new, page_set_lsn, vm_bit_location, VM_HEAPBLOCKS_PER_PAGE};
use postgres_ffi::records::dbase::{DbaseCreateFileCopy, DbaseCreateWalLog, DbaseDrop};
use postgres_ffi::records::heap::VmBitsCleared;
use postgres_ffi::records::multixact::{MultiXactCreate, MultiXactTruncate};
use postgres_ffi::records::smgr::{SmgrTruncate, SMGR_TRUNCATE_FSM, SMGR_TRUNCATE_HEAP, SMGR_TRUNCATE_VM};
use postgres_ffi::records::xact::{XactCompletion, XactKind, XactPrepare};
use postgres_ffi::records::xlog::{XLOG_FPI, XLOG_FPI_FOR_HINT};
use postgres_ffi::records::{parse_record_body, RecordBody};
use postgres_ffi::reltag::{FSM_FORKNUM, MAIN_FORKNUM, MAX_FORKNUM, VISIBILITYMAP_FORKNUM};
use postgres_ffi::rmgr::RM_XLOG_ID;
use postgres_ffi::slru::{
    clog_xid_to_page, multixact_id_to_offsets_page, mx_offset_to_member_page, page_to_segment, SlruKind,
    CLOG_XACTS_PER_PAGE, MULTIXACT_MEMBERS_PER_PAGE, MULTIXACT_OFFSETS_PER_PAGE, SLRU_PAGES_PER_SEGMENT,
};
use postgres_ffi::xlog_page::{SIZE_OF_XLOG_LONG_PHD, SIZE_OF_XLOG_SHORT_PHD};
use postgres_ffi::{
    BlockNumber, BlockRef, CheckPoint, DecodeError, DecodedXLogRecord, RelTag, TransactionId, BLCKSZ,
    FIRST_NORMAL_TRANSACTION_ID, WAL_SEGMENT_SIZE_MIN, XLOG_BLCKSZ,
};
use utils::{Lsn, TimelineId};

use crate::pgdatadir_mapping::{zero_page, DatadirError, DatadirModification, LastCommit, StandbyStart};
use crate::tenant::timeline::Timeline;
use crate::value::{MultiXactMember, WalRecord};

/// `nextXid` in the stored checkpoint is rounded up to a multiple of this, so it is written
/// once per 1024 transactions rather than on every record. A compute started from it skips at
/// most that many xids, which is harmless.
const XID_CHECKPOINT_INTERVAL: u32 = 1024;
/// FSM geometry for 8 KiB pages (`fsm_internals.h`): leaf slots per FSM page and tree depth.
const FSM_SLOTS_PER_PAGE: u32 = 4069;
const FSM_TREE_DEPTH: u32 = 3;
/// Largest multixact member offset (`MaxMultiXactOffset`).
const MAX_MULTIXACT_OFFSET: u32 = u32::MAX;

/// A record that could not be ingested: which one, into which timeline, and why.
#[derive(Debug, thiserror::Error)]
#[error("ingesting the WAL record at {lsn} (ending at {end_lsn}) into timeline {timeline_id}: {kind}")]
pub struct IngestError {
    pub lsn: Lsn,
    pub end_lsn: Lsn,
    pub timeline_id: TimelineId,
    pub kind: IngestErrorKind,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestErrorKind {
    /// The caller skipped or repeated WAL.
    #[error("it does not continue the ingested WAL: {0}; feed records in order, without gaps, from last_record_lsn")]
    NotContiguous(String),
    #[error("{0}")]
    Decode(#[from] DecodeError),
    #[error("{0}")]
    Datadir(Box<DatadirError>),
    #[error("{0}")]
    Invalid(String),
}

impl From<DatadirError> for IngestErrorKind {
    fn from(e: DatadirError) -> Self {
        IngestErrorKind::Datadir(Box::new(e))
    }
}

/// Turns WAL records into timeline changes. One per timeline, used by its single writer.
///
/// Keeps a copy of the stored checkpoint (and `pg_control`) to update as records pass; after an
/// error the copy may be ahead of the timeline, so make a new `WalIngest` before continuing.
pub struct WalIngest {
    timeline: Arc<Timeline>,
    checkpoint: CheckPoint,
    checkpoint_modified: bool,
    control_file: Option<ControlFileData>,
    /// The latest commit ingested (what [`Key::last_commit`](crate::key::Key::last_commit) holds).
    last_commit: Option<LastCommit>,
}

impl WalIngest {
    /// Starts ingesting after `last_record_lsn`. The timeline must hold a checkpoint (written by
    /// the import that bootstrapped it).
    pub fn new(timeline: Arc<Timeline>) -> Result<WalIngest, DatadirError> {
        let lsn = timeline.get_last_record_lsn();
        let bytes = timeline.get_checkpoint(lsn)?;
        let corrupt = |what: &str, key, detail: String| DatadirError::Corrupt {
            what: what.to_string(),
            key,
            lsn,
            timeline_id: timeline.timeline_id(),
            detail,
        };
        let checkpoint = CheckPoint::decode(&bytes, lsn)
            .map_err(|e| corrupt("checkpoint", crate::key::Key::checkpoint(), e.what))?;
        let control_file = match timeline.get_control_file(lsn) {
            Ok(bytes) => Some(
                ControlFileData::decode(&bytes)
                    .map_err(|e| corrupt("pg_control", crate::key::Key::controlfile(), e.what))?,
            ),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(e),
        };
        let last_commit = timeline.get_last_commit(lsn)?;
        Ok(WalIngest { timeline, checkpoint, checkpoint_modified: false, control_file, last_commit })
    }

    pub fn timeline(&self) -> &Arc<Timeline> {
        &self.timeline
    }

    /// The checkpoint as ingest has it now (what the next commit stores).
    pub fn checkpoint(&self) -> &CheckPoint {
        &self.checkpoint
    }

    /// Ingests `rec` (decoded with its start LSN), which ends at `end_lsn`, and commits the
    /// changes through `modification` (which must belong to this timeline and be empty): on
    /// success `last_record_lsn == end_lsn`. The record must start where the last ingested one
    /// ended (after a page header, if that end was a page boundary), and its `xl_prev` must be
    /// the last record's start when that is known.
    pub fn ingest_record(
        &mut self,
        rec: &DecodedXLogRecord,
        end_lsn: Lsn,
        modification: &mut DatadirModification<'_>,
    ) -> Result<(), IngestError> {
        assert!(
            std::ptr::eq(modification.timeline(), Arc::as_ptr(&self.timeline)),
            "the modification belongs to another timeline"
        );
        assert_eq!(modification.pending_count(), 0, "the modification has changes from elsewhere");
        let timeline_id = self.timeline.timeline_id();
        let err = |kind: IngestErrorKind| IngestError { lsn: rec.lsn, end_lsn, timeline_id, kind };
        self.check_continuity(rec, end_lsn).map_err(err)?;
        let result = self.ingest_changes(rec, end_lsn, modification).and_then(|()| {
            if self.checkpoint_modified {
                modification.put_checkpoint(Bytes::copy_from_slice(&self.checkpoint.encode()))?;
                self.checkpoint_modified = false;
            }
            modification.commit_record(rec.lsn, end_lsn)?;
            Ok(())
        });
        result.map_err(|kind| {
            modification.discard();
            err(kind)
        })
    }

    fn check_continuity(&self, rec: &DecodedXLogRecord, end_lsn: Lsn) -> Result<(), IngestErrorKind> {
        let last = self.timeline.last_record_lsn();
        if end_lsn <= rec.lsn {
            return Err(IngestErrorKind::Invalid(format!("end LSN {end_lsn} is not after the start {}", rec.lsn)));
        }
        let gap = rec.lsn.0.checked_sub(last.last.0);
        let at_page_boundary = last.last.0.is_multiple_of(XLOG_BLCKSZ as u64);
        let contiguous = match gap {
            Some(0) => true,
            Some(g) if at_page_boundary && g == SIZE_OF_XLOG_SHORT_PHD as u64 => true,
            Some(g) => {
                at_page_boundary
                    && g == SIZE_OF_XLOG_LONG_PHD as u64
                    && last.last.0.is_multiple_of(WAL_SEGMENT_SIZE_MIN as u64)
            }
            None => false,
        };
        if !contiguous {
            return Err(IngestErrorKind::NotContiguous(format!(
                "it starts at {} but the last ingested record ends at {}",
                rec.lsn, last.last
            )));
        }
        if let Some(prev) = last.prev {
            if rec.header.xl_prev != prev {
                return Err(IngestErrorKind::NotContiguous(format!(
                    "its xl_prev {} is not the start {prev} of the last ingested record",
                    rec.header.xl_prev
                )));
            }
        }
        Ok(())
    }

    fn ingest_changes(
        &mut self,
        rec: &DecodedXLogRecord,
        end_lsn: Lsn,
        m: &mut DatadirModification<'_>,
    ) -> Result<(), IngestErrorKind> {
        self.update_next_xid(rec.xid());
        if let Some(top) = rec.toplevel_xid {
            self.update_next_xid(top);
        }
        if let Some(body) = parse_record_body(rec)? {
            self.ingest_body(rec, body, end_lsn, m)?;
        }
        for blk in &rec.blocks {
            self.ingest_block(rec, blk, end_lsn, m)?;
        }
        Ok(())
    }

    fn ingest_body(
        &mut self,
        rec: &DecodedXLogRecord,
        body: RecordBody,
        end_lsn: Lsn,
        m: &mut DatadirModification<'_>,
    ) -> Result<(), IngestErrorKind> {
        match body {
            RecordBody::Checkpoint { shutdown, checkpoint } => self.ingest_checkpoint(rec, shutdown, checkpoint, m)?,
            RecordBody::NextOid(oid) => {
                // xlog_redo: nextOid is taken as is.
                self.checkpoint.next_oid = oid;
                self.checkpoint_modified = true;
            }
            RecordBody::Switch | RecordBody::StandbyLocks(_) | RecordBody::XactAssignment(_) => {}
            RecordBody::XactCompletion(c) => self.ingest_xact_completion(rec, end_lsn, &c, m)?,
            RecordBody::XactPrepare(p) => self.ingest_xact_prepare(rec, &p, m)?,
            RecordBody::SmgrCreate(c) => {
                let rel = c.rnode.with_fork(c.forknum);
                if m.rel_size(rel)?.is_none() {
                    m.put_rel_creation(rel, 0)?;
                }
            }
            RecordBody::SmgrTruncate(t) => self.ingest_smgr_truncate(&t, m)?,
            RecordBody::DbaseCreateFileCopy(c) => self.ingest_dbase_create_file_copy(&c, m)?,
            RecordBody::DbaseCreateWalLog(DbaseCreateWalLog { db_id, tablespace_id }) => {
                m.put_db_creation(tablespace_id, db_id)?;
            }
            RecordBody::DbaseDrop(DbaseDrop { db_id, tablespace_ids }) => {
                for spc in tablespace_ids {
                    m.put_db_drop(spc, db_id)?;
                }
            }
            RecordBody::TblspcCreate(spc) => m.put_tablespace_creation(spc)?,
            RecordBody::TblspcDrop(spc) => m.put_tablespace_drop(spc)?,
            RecordBody::ClogZeroPage { pageno } => put_slru_zero_page(m, SlruKind::Clog, pageno)?,
            RecordBody::ClogTruncate(t) => {
                // clog_redo → SimpleLruTruncate: the cutoff is rounded down to a segment start,
                // then every segment wholly before it goes.
                let cutoff = t.pageno - t.pageno % SLRU_PAGES_PER_SEGMENT;
                for segno in m.list_slru_segments(SlruKind::Clog)? {
                    let segpage = segno * SLRU_PAGES_PER_SEGMENT;
                    if clog_page_precedes(segpage, cutoff)
                        && clog_page_precedes(segpage + SLRU_PAGES_PER_SEGMENT - 1, cutoff)
                    {
                        m.drop_slru_segment(SlruKind::Clog, segno)?;
                    }
                }
            }
            RecordBody::MultiXactZeroOffsetsPage { pageno } => {
                put_slru_zero_page(m, SlruKind::MultiXactOffsets, pageno)?
            }
            RecordBody::MultiXactZeroMembersPage { pageno } => {
                put_slru_zero_page(m, SlruKind::MultiXactMembers, pageno)?
            }
            RecordBody::MultiXactCreate(c) => self.ingest_multixact_create(&c, m)?,
            RecordBody::MultiXactTruncate(t) => self.ingest_multixact_truncate(&t, m)?,
            RecordBody::RelmapUpdate(u) => m.put_relmap_file(u.tsid, u.dbid, u.data)?,
            RecordBody::RunningXacts(rx) => {
                // What a standby learns from it (ProcArrayApplyRecoveryInfo): the oldest running
                // xid, and that every xid below nextXid is taken.
                self.checkpoint.oldest_active_xid = rx.oldest_running_xid;
                self.advance_next_xid_to(rx.next_xid);
                self.checkpoint_modified = true;
                // A hot standby can start replay here (basebackup's standby flavour).
                m.put_standby_start(&StandbyStart { lsn: rec.lsn, record: rec.raw.clone() })?;
            }
            RecordBody::Heap(v) => self.ingest_vm_clear(&v, m)?,
        }
        Ok(())
    }

    /// One block reference: an applied full-page image becomes an image, anything else the raw
    /// record; the relation grows to include the block.
    fn ingest_block(
        &mut self,
        rec: &DecodedXLogRecord,
        blk: &BlockRef,
        end_lsn: Lsn,
        m: &mut DatadirModification<'_>,
    ) -> Result<(), IngestErrorKind> {
        let rel = blk.rel_tag();
        if rel.relnode == 0 || rel.forknum > MAX_FORKNUM {
            return Err(IngestErrorKind::Invalid(format!(
                "block reference {} names relation {rel}, which cannot exist",
                blk.block_id
            )));
        }
        let is_fpi_record = rec.rmid() == RM_XLOG_ID && matches!(rec.rmgr_info(), XLOG_FPI | XLOG_FPI_FOR_HINT);
        if blk.apply_image() && is_fpi_record {
            let mut page = restore_block_image(blk, rec.lsn)?;
            // As XLogReadBufferForRedoExtended: the restored page gets the record's end LSN,
            // unless it is new (stamping an all-zero page would make it look initialised).
            if !page_is_new(&page) {
                page_set_lsn(&mut page, end_lsn);
            }
            m.put_rel_page_image(rel, blk.blkno, Bytes::from(page))?;
        } else {
            // Redo restores an applicable image itself: no base image needed then either.
            let will_init = blk.will_init || blk.apply_image();
            let record = WalRecord::Postgres { will_init, rec: rec.raw.clone() };
            m.put_rel_wal_record(rel, blk.blkno, record)?;
        }
        extend_rel_to_include(m, rel, blk.blkno)?;
        Ok(())
    }

    fn ingest_checkpoint(
        &mut self,
        rec: &DecodedXLogRecord,
        shutdown: bool,
        cp: CheckPoint,
        m: &mut DatadirModification<'_>,
    ) -> Result<(), IngestErrorKind> {
        if shutdown {
            // Nothing runs across a shutdown checkpoint: its values are exact.
            self.checkpoint = cp;
        } else {
            // xlog_redo for an online checkpoint: counters only move forward, and nextOid is
            // not taken (it may be older than a later XLOG_NEXTOID).
            let c = &mut self.checkpoint;
            c.next_xid = c.next_xid.max(cp.next_xid);
            if multixact_precedes(c.next_multi, cp.next_multi) {
                c.next_multi = cp.next_multi;
            }
            if multixact_precedes(c.next_multi_offset, cp.next_multi_offset) {
                c.next_multi_offset = cp.next_multi_offset;
            }
            if multixact_precedes(c.oldest_multi, cp.oldest_multi) {
                c.oldest_multi = cp.oldest_multi;
                c.oldest_multi_db = cp.oldest_multi_db;
            }
            if xid_precedes(c.oldest_xid, cp.oldest_xid) {
                c.oldest_xid = cp.oldest_xid;
                c.oldest_xid_db = cp.oldest_xid_db;
            }
            c.redo = cp.redo;
            c.this_timeline_id = cp.this_timeline_id;
            c.prev_timeline_id = cp.prev_timeline_id;
            c.full_page_writes = cp.full_page_writes;
            c.time = cp.time;
            c.oldest_commit_ts_xid = cp.oldest_commit_ts_xid;
            c.newest_commit_ts_xid = cp.newest_commit_ts_xid;
            c.oldest_active_xid = cp.oldest_active_xid;
        }
        self.checkpoint_modified = true;
        // pg_control points at the latest checkpoint record and holds its copy, as after
        // CreateCheckPoint / CreateRestartPoint.
        if let Some(cf) = &mut self.control_file {
            cf.checkpoint = rec.lsn;
            cf.checkpoint_copy = cp;
            cf.time = cp.time;
            m.put_control_file(Bytes::from(cf.encode()))?;
        }
        Ok(())
    }

    fn ingest_xact_completion(
        &mut self,
        rec: &DecodedXLogRecord,
        end_lsn: Lsn,
        c: &XactCompletion,
        m: &mut DatadirModification<'_>,
    ) -> Result<(), IngestErrorKind> {
        let xid = c.effective_xid();
        let mut by_page: BTreeMap<u32, Vec<TransactionId>> = BTreeMap::new();
        for x in std::iter::once(xid).chain(c.subxacts.iter().copied()) {
            // A commit without an xid (only invalidations or dropped files) sets no bits.
            if x >= FIRST_NORMAL_TRANSACTION_ID {
                by_page.entry(clog_xid_to_page(x)).or_default().push(x);
                self.update_next_xid(x);
            }
        }
        // The commit-time index: a commit that made something visible becomes the latest commit
        // (see `LastCommit` and `Timeline::find_lsn_by_timestamp`).
        if c.kind.is_commit() && !by_page.is_empty() {
            let max_timestamp = self.last_commit.map_or(c.xact_time, |l| l.max_timestamp.max(c.xact_time));
            let commit = LastCommit { timestamp: c.xact_time, max_timestamp, start_lsn: rec.lsn, end_lsn };
            m.put_last_commit(&commit)?;
            self.last_commit = Some(commit);
        }
        for (pageno, xids) in by_page {
            let (segno, rpageno) = page_to_segment(pageno);
            let rec = if c.kind.is_commit() {
                WalRecord::ClogSetCommitted { xids, timestamp: c.xact_time }
            } else {
                WalRecord::ClogSetAborted { xids }
            };
            m.put_slru_wal_record(SlruKind::Clog, segno, rpageno, rec)?;
        }
        for rnode in &c.dropped_rels {
            for forknum in 0..=MAX_FORKNUM {
                let rel = rnode.with_fork(forknum);
                if m.rel_size(rel)?.is_some() {
                    m.put_rel_drop(rel)?;
                }
            }
        }
        if matches!(c.kind, XactKind::CommitPrepared | XactKind::AbortPrepared) {
            m.drop_twophase_file(xid)?;
        }
        Ok(())
    }

    fn ingest_xact_prepare(
        &mut self,
        rec: &DecodedXLogRecord,
        p: &XactPrepare,
        m: &mut DatadirModification<'_>,
    ) -> Result<(), IngestErrorKind> {
        // The record's main data is the state file's content (the file adds a crc32c).
        m.put_twophase_file(p.xid, rec.main_data.clone())?;
        self.update_next_xid(p.xid);
        for sub in &p.subxacts {
            self.update_next_xid(*sub);
        }
        Ok(())
    }

    fn ingest_smgr_truncate(
        &mut self,
        t: &SmgrTruncate,
        m: &mut DatadirModification<'_>,
    ) -> Result<(), IngestErrorKind> {
        if t.flags & SMGR_TRUNCATE_HEAP != 0 {
            let main = t.rnode.with_fork(MAIN_FORKNUM);
            if m.rel_size(main)?.is_some() {
                m.put_rel_truncation(main, t.blkno)?;
            }
        }
        if t.flags & SMGR_TRUNCATE_FSM != 0 {
            // FreeSpaceMapPrepareTruncateRel.
            let fsm = t.rnode.with_fork(FSM_FORKNUM);
            if let Some(fsm_size) = m.rel_size(fsm)? {
                let logical_page = t.blkno / FSM_SLOTS_PER_PAGE;
                let first_removed_slot = t.blkno % FSM_SLOTS_PER_PAGE;
                let new_size = if first_removed_slot > 0 {
                    let last_kept = fsm_logical_to_physical(logical_page);
                    (last_kept < fsm_size).then(|| -> Result<BlockNumber, DatadirError> {
                        m.put_rel_page_image(fsm, last_kept, zero_page())?;
                        Ok(last_kept + 1)
                    })
                } else {
                    Some(Ok(fsm_logical_to_physical(logical_page)))
                };
                if let Some(new_size) = new_size.transpose()? {
                    m.put_rel_truncation(fsm, new_size)?;
                }
            }
        }
        if t.flags & SMGR_TRUNCATE_VM != 0 {
            // visibilitymap_prepare_truncate.
            let vm = t.rnode.with_fork(VISIBILITYMAP_FORKNUM);
            if let Some(vm_size) = m.rel_size(vm)? {
                let (trunc_block, _, _) = vm_bit_location(t.blkno);
                let new_size = if !t.blkno.is_multiple_of(VM_HEAPBLOCKS_PER_PAGE) {
                    (trunc_block < vm_size).then(|| -> Result<BlockNumber, DatadirError> {
                        // Clear only the truncated heap blocks' bits, keeping the others (zeroing
                        // the whole page lost the all-visible/all-frozen bits of the kept blocks).
                        let read_lsn = self.timeline.get_last_record_lsn();
                        let mut page = self.timeline.get_rel_page_at_lsn(vm, trunc_block, read_lsn)?.to_vec();
                        vm_truncate_page(&mut page, t.blkno);
                        m.put_rel_page_image(vm, trunc_block, Bytes::from(page))?;
                        Ok(trunc_block + 1)
                    })
                } else {
                    Some(Ok(trunc_block))
                };
                if let Some(new_size) = new_size.transpose()? {
                    m.put_rel_truncation(vm, new_size)?;
                }
            }
        }
        Ok(())
    }

    /// dbase_redo for `XLOG_DBASE_CREATE_FILE_COPY`: the new database is a copy of the template
    /// as of this record (an existing target directory is removed first, as redo does).
    fn ingest_dbase_create_file_copy(
        &mut self,
        c: &DbaseCreateFileCopy,
        m: &mut DatadirModification<'_>,
    ) -> Result<(), IngestErrorKind> {
        let read_lsn = self.timeline.get_last_record_lsn();
        let (src_spc, src_db, dst_spc, dst_db) = (c.src_tablespace_id, c.src_db_id, c.tablespace_id, c.db_id);
        if m.dbdir()?.contains(&(dst_spc, dst_db)) {
            m.put_db_drop(dst_spc, dst_db)?;
        }
        let src_rels = m.list_rels(src_spc, src_db)?;
        m.put_db_creation(dst_spc, dst_db)?;
        match self.timeline.get_relmap_file(src_spc, src_db, read_lsn) {
            Ok(map) => m.put_relmap_file(dst_spc, dst_db, map)?,
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        for src_rel in src_rels {
            let nblocks = self.timeline.get_rel_size(src_rel, read_lsn)?;
            let dst_rel = RelTag { spcnode: dst_spc, dbnode: dst_db, ..src_rel };
            m.put_rel_creation(dst_rel, nblocks)?;
            for blkno in 0..nblocks {
                let page = self.timeline.get_rel_page_at_lsn(src_rel, blkno, read_lsn)?;
                m.put_rel_page_image(dst_rel, blkno, page)?;
            }
        }
        Ok(())
    }

    fn ingest_multixact_create(
        &mut self,
        c: &MultiXactCreate,
        m: &mut DatadirModification<'_>,
    ) -> Result<(), IngestErrorKind> {
        // The multixact's starting offset on its offsets page.
        let (segno, rpageno) = page_to_segment(multixact_id_to_offsets_page(c.mid));
        m.put_slru_wal_record(
            SlruKind::MultiXactOffsets,
            segno,
            rpageno,
            WalRecord::MultixactOffsetCreate { mid: c.mid, moff: c.moff },
        )?;
        // Its members, one record per members page they land on.
        let mut i = 0usize;
        while i < c.members.len() {
            let offset = c.moff.wrapping_add(i as u32);
            let pageno = mx_offset_to_member_page(offset);
            let room_on_page = (MULTIXACT_MEMBERS_PER_PAGE - offset % MULTIXACT_MEMBERS_PER_PAGE) as usize;
            let n = room_on_page.min(c.members.len() - i);
            let members =
                c.members[i..i + n].iter().map(|mm| MultiXactMember { xid: mm.xid, status: mm.status }).collect();
            let (segno, rpageno) = page_to_segment(pageno);
            m.put_slru_wal_record(
                SlruKind::MultiXactMembers,
                segno,
                rpageno,
                WalRecord::MultixactMembersCreate { moff: offset, members },
            )?;
            i += n;
        }
        // Postgres 15.9+ RecordNewMultiXact also writes the *next* multixact's starting offset
        // (moff + members) right away. That entry usually shares the page with `mid`'s, and a key
        // takes one change per record, so ingest leaves it to the next multixact's own record,
        // which writes the same value. Until then only the latest multixact lacks it, and
        // GetMultiXactIdMembers takes the latest one's end from nextOffset (the checkpoint),
        // so readers never need the entry early.
        // multixact_redo: advance nextMulti / nextOffset past this one, and nextXid past its members.
        let next_multi = c.mid.wrapping_add(1).max(1);
        if multixact_precedes(self.checkpoint.next_multi, next_multi) {
            self.checkpoint.next_multi = next_multi;
            self.checkpoint_modified = true;
        }
        let next_offset = c.moff.wrapping_add(c.members.len() as u32);
        if multixact_precedes(self.checkpoint.next_multi_offset, next_offset) {
            self.checkpoint.next_multi_offset = next_offset;
            self.checkpoint_modified = true;
        }
        for mm in &c.members {
            self.update_next_xid(mm.xid);
        }
        Ok(())
    }

    fn ingest_multixact_truncate(
        &mut self,
        t: &MultiXactTruncate,
        m: &mut DatadirModification<'_>,
    ) -> Result<(), IngestErrorKind> {
        self.checkpoint.oldest_multi = t.end_trunc_off;
        self.checkpoint.oldest_multi_db = t.oldest_multi_db;
        self.checkpoint_modified = true;
        // PerformMembersTruncation: every members segment from the old start up to (not
        // including) the new start's segment, wrapping around.
        let segment = |offset: u32| mx_offset_to_member_page(offset) / SLRU_PAGES_PER_SEGMENT;
        let max_segment = segment(MAX_MULTIXACT_OFFSET);
        let end_segment = segment(t.end_trunc_memb);
        let mut s = segment(t.start_trunc_memb);
        while s != end_segment {
            m.drop_slru_segment(SlruKind::MultiXactMembers, s)?;
            s = if s == max_segment { 0 } else { s + 1 };
        }
        // PerformOffsetsTruncation: SimpleLruTruncate at the page of the multixact before the new
        // oldest one.
        let previous = if t.end_trunc_off <= 1 { u32::MAX } else { t.end_trunc_off - 1 };
        let cutoff_page = multixact_id_to_offsets_page(previous);
        let cutoff = cutoff_page - cutoff_page % SLRU_PAGES_PER_SEGMENT;
        for segno in m.list_slru_segments(SlruKind::MultiXactOffsets)? {
            let segpage = segno * SLRU_PAGES_PER_SEGMENT;
            if multixact_offset_page_precedes(segpage, cutoff)
                && multixact_offset_page_precedes(segpage + SLRU_PAGES_PER_SEGMENT - 1, cutoff)
            {
                m.drop_slru_segment(SlruKind::MultiXactOffsets, segno)?;
            }
        }
        Ok(())
    }

    /// Heap redo clears these VM bits via `visibilitymap_clear`; store that on the VM page(s).
    fn ingest_vm_clear(&mut self, v: &VmBitsCleared, m: &mut DatadirModification<'_>) -> Result<(), IngestErrorKind> {
        let vm = v.rel.with_fork(VISIBILITYMAP_FORKNUM);
        let Some(vm_size) = m.rel_size(vm)? else {
            // No VM: no bits are set, so there is nothing to clear.
            return Ok(());
        };
        let new = v.new_heap_blkno.map(|heap| (vm_bit_location(heap).0, heap));
        let old = v.old_heap_blkno.map(|heap| (vm_bit_location(heap).0, heap));
        let mut per_vm_block: BTreeMap<BlockNumber, (Option<BlockNumber>, Option<BlockNumber>)> = BTreeMap::new();
        if let Some((vm_blk, heap)) = new {
            per_vm_block.entry(vm_blk).or_default().0 = Some(heap);
        }
        if let Some((vm_blk, heap)) = old {
            per_vm_block.entry(vm_blk).or_default().1 = Some(heap);
        }
        for (vm_blk, (new_heap_blkno, old_heap_blkno)) in per_vm_block {
            // A VM page that was never created has no bits to clear (Postgres sometimes logs the
            // flag anyway); storing a record there would leave it with no base image.
            if vm_blk < vm_size {
                let rec = WalRecord::ClearVisibilityMapFlags { new_heap_blkno, old_heap_blkno, flags: v.bits };
                m.put_rel_wal_record(vm, vm_blk, rec)?;
            }
        }
        Ok(())
    }

    /// Makes sure the stored nextXid is past `xid`, rounding up (see
    /// [`XID_CHECKPOINT_INTERVAL`]).
    fn update_next_xid(&mut self, xid: TransactionId) {
        if xid < FIRST_NORMAL_TRANSACTION_ID {
            return;
        }
        let rounded = xid.wrapping_add(XID_CHECKPOINT_INTERVAL) & !(XID_CHECKPOINT_INTERVAL - 1);
        if xid_precedes_or_equals(self.checkpoint.next_xid_32(), xid) {
            self.advance_next_xid_to(rounded.max(FIRST_NORMAL_TRANSACTION_ID));
        }
    }

    /// Moves the 64-bit nextXid forward to the 32-bit `next` (crossing into the next epoch if
    /// `next` wrapped); never moves it back.
    fn advance_next_xid_to(&mut self, next: TransactionId) {
        let current = self.checkpoint.next_xid_32();
        let delta = next.wrapping_sub(current) as i32;
        if delta > 0 {
            self.checkpoint.next_xid += delta as u64;
            self.checkpoint_modified = true;
        }
    }
}

/// Extends `rel` so that it includes `blkno`, creating it if it does not exist (redo's
/// `XLogReadBufferExtended` does both; the blocks in between read as zeros).
fn extend_rel_to_include(m: &mut DatadirModification<'_>, rel: RelTag, blkno: BlockNumber) -> Result<(), DatadirError> {
    match m.rel_size(rel)? {
        None => m.put_rel_creation(rel, blkno + 1),
        Some(n) if blkno >= n => m.put_rel_extend(rel, blkno + 1),
        Some(_) => Ok(()),
    }
}

/// `visibilitymap_prepare_truncate` on the VM page holding heap block `heap_blocks`, the first
/// removed one: clears the bits of every heap block from it to the end of the page. The page LSN
/// stays (redo does not set it). An all-zero page stays all zeros.
fn vm_truncate_page(page: &mut [u8], heap_blocks: BlockNumber) {
    let (_, byte, shift) = vm_bit_location(heap_blocks);
    page[byte + 1..].fill(0);
    page[byte] &= (1u8 << shift) - 1;
}

/// A zeroed SLRU page (`SimpleLruZeroPage` + write): the segment is created or extended to hold it.
fn put_slru_zero_page(m: &mut DatadirModification<'_>, kind: SlruKind, pageno: u32) -> Result<(), DatadirError> {
    let (segno, rpageno) = page_to_segment(pageno);
    match m.slru_segment_size(kind, segno)? {
        None => m.put_slru_segment_creation(kind, segno, rpageno + 1)?,
        Some(n) if rpageno >= n => m.put_slru_extend(kind, segno, rpageno + 1)?,
        Some(_) => {}
    }
    m.put_slru_page_image(kind, segno, rpageno, zero_page())
}

/// `fsm_logical_to_physical` for a leaf (level 0) page: the block number of FSM leaf page
/// `logical_page`, counting the upper-level pages interleaved before it.
fn fsm_logical_to_physical(logical_page: u32) -> BlockNumber {
    let mut leafno = u64::from(logical_page);
    let mut pages = 0u64;
    for _ in 0..FSM_TREE_DEPTH {
        pages += leafno + 1;
        leafno /= u64::from(FSM_SLOTS_PER_PAGE);
    }
    (pages - 1) as BlockNumber
}

/// `TransactionIdPrecedes`: circular comparison for normal xids, plain for special ones.
fn xid_precedes(a: TransactionId, b: TransactionId) -> bool {
    if a < FIRST_NORMAL_TRANSACTION_ID || b < FIRST_NORMAL_TRANSACTION_ID {
        return a < b;
    }
    (a.wrapping_sub(b) as i32) < 0
}

fn xid_precedes_or_equals(a: TransactionId, b: TransactionId) -> bool {
    a == b || xid_precedes(a, b)
}

/// `MultiXactIdPrecedes` (also used for member offsets, as `MultiXactOffsetPrecedes`).
fn multixact_precedes(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// `CLOGPagePrecedes`.
fn clog_page_precedes(page1: u32, page2: u32) -> bool {
    let xid1 = page1.wrapping_mul(CLOG_XACTS_PER_PAGE).wrapping_add(FIRST_NORMAL_TRANSACTION_ID + 1);
    let xid2 = page2.wrapping_mul(CLOG_XACTS_PER_PAGE).wrapping_add(FIRST_NORMAL_TRANSACTION_ID + 1);
    xid_precedes(xid1, xid2) && xid_precedes(xid1, xid2.wrapping_add(CLOG_XACTS_PER_PAGE - 1))
}

/// `MultiXactOffsetPagePrecedes`.
fn multixact_offset_page_precedes(page1: u32, page2: u32) -> bool {
    let m1 = page1.wrapping_mul(MULTIXACT_OFFSETS_PER_PAGE).wrapping_add(2);
    let m2 = page2.wrapping_mul(MULTIXACT_OFFSETS_PER_PAGE).wrapping_add(2);
    multixact_precedes(m1, m2) && multixact_precedes(m1, m2.wrapping_add(MULTIXACT_OFFSETS_PER_PAGE - 1))
}

const _: () = assert!(BLCKSZ == 8192, "the FSM constants above are for 8 KiB pages");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redo_applier::RustRedoApplier;
    use crate::tenant::timeline::tests::{TENANT, TIMELINE};
    use crate::tenant::timeline::{TenantConf, TimelineResources};
    use postgres_ffi::records::xact::{XACT_XINFO_HAS_SUBXACTS, XLOG_XACT_COMMIT, XLOG_XACT_HAS_INFO};
    use postgres_ffi::records::xlog::{XLOG_NEXTOID, XLOG_NOOP};
    use postgres_ffi::rmgr::{RM_HEAP_ID, RM_XACT_ID};
    use postgres_ffi::slru::{clog_get_status, TRANSACTION_STATUS_COMMITTED};
    use postgres_ffi::wal_writer::{BlockSpec, ImageSpec, RecordSpec, WalBuilder};
    use postgres_ffi::{decode_record, page::page_get_lsn, RelFileNode, WalStreamDecoder, WAL_SEGMENT_SIZE};

    const START: Lsn = Lsn(0x0100_0028);

    fn setup(dir: &std::path::Path) -> Arc<Timeline> {
        let resources = TimelineResources::new(TenantConf::default(), Arc::new(RustRedoApplier));
        let tl = Timeline::create_empty(dir, TENANT, TIMELINE, START, 15, resources).expect("create");
        let mut m = DatadirModification::new(&tl);
        m.init_empty().expect("init");
        m.put_slru_segment_creation(SlruKind::Clog, 0, 1).expect("clog");
        m.put_slru_page_image(SlruKind::Clog, 0, 0, zero_page()).expect("clog page");
        let cp = CheckPoint { next_xid: 700, next_oid: 16384, next_multi: 1, ..Default::default() };
        m.put_checkpoint(Bytes::copy_from_slice(&cp.encode())).expect("checkpoint");
        m.put_db_creation(1663, 5).expect("db");
        m.commit(START).expect("commit");
        tl
    }

    /// Records built as real WAL, decoded by the stream decoder, ingested in order.
    fn ingest_all(ingest: &mut WalIngest, specs: &[RecordSpec]) -> Vec<(Lsn, Lsn)> {
        let mut wal = WalBuilder::new(START, Lsn(0x0100_0000), 1, 1, WAL_SEGMENT_SIZE).expect("builder");
        for spec in specs {
            wal.append(spec).expect("append");
        }
        let mut decoder = WalStreamDecoder::new(START);
        decoder.feed(wal.bytes());
        let tl = Arc::clone(ingest.timeline());
        let mut m = DatadirModification::new(&tl);
        let mut out = Vec::new();
        while let Some(r) = decoder.poll_record().expect("decode") {
            let rec = decode_record(r.record, r.start_lsn).expect("decode record");
            ingest.ingest_record(&rec, r.end_lsn, &mut m).expect("ingest");
            out.push((r.start_lsn, r.end_lsn));
        }
        out
    }

    #[test]
    fn blocks_commits_and_continuity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tl = setup(dir.path());
        let mut ingest = WalIngest::new(Arc::clone(&tl)).expect("ingest");
        let rnode = RelFileNode { spcnode: 1663, dbnode: 5, relnode: 16384 };
        let rel = rnode.with_fork(MAIN_FORKNUM);
        let mut page = postgres_ffi::page::page_init(0);
        page[8000] = 0xAB;
        let fpi = RecordSpec {
            rmid: RM_XLOG_ID,
            info: XLOG_FPI,
            blocks: vec![BlockSpec {
                block_id: 0,
                rel: rnode,
                forknum: MAIN_FORKNUM,
                blkno: 3,
                will_init: false,
                image: Some(ImageSpec::uncompressed(&page, 24, 8192 - 24 - 200)),
                data: vec![],
            }],
            ..Default::default()
        };
        let heap = RecordSpec {
            rmid: RM_HEAP_ID,
            info: 0,
            xid: 800,
            blocks: vec![BlockSpec {
                block_id: 0,
                rel: rnode,
                forknum: MAIN_FORKNUM,
                blkno: 3,
                will_init: false,
                image: None,
                data: vec![1, 2, 3],
            }],
            main_data: vec![1, 0, 0],
            ..Default::default()
        };
        let mut commit_data = 42i64.to_le_bytes().to_vec();
        commit_data.extend_from_slice(&XACT_XINFO_HAS_SUBXACTS.to_le_bytes());
        commit_data.extend_from_slice(&2u32.to_le_bytes());
        commit_data.extend_from_slice(&801u32.to_le_bytes());
        commit_data.extend_from_slice(&802u32.to_le_bytes());
        let commit = RecordSpec::main_data_only(RM_XACT_ID, XLOG_XACT_COMMIT | XLOG_XACT_HAS_INFO, 800, &commit_data);
        let next_oid = RecordSpec::main_data_only(RM_XLOG_ID, XLOG_NEXTOID, 0, &30000u32.to_le_bytes());
        let lsns = ingest_all(&mut ingest, &[fpi, heap, commit, next_oid]);
        let (fpi_end, heap_end, commit_end) = (lsns[0].1, lsns[1].1, lsns[2].1);
        assert_eq!(tl.get_last_record_lsn(), lsns[3].1);
        assert_eq!(tl.get_prev_record_lsn(), Some(lsns[3].0));

        // The FPI is an image with the hole restored and the record's end LSN stamped on it.
        assert_eq!(tl.get_rel_size(rel, fpi_end).expect("size"), 4, "touching block 3 extends the relation");
        let restored = tl.get_rel_page_at_lsn(rel, 3, fpi_end).expect("page");
        assert_eq!(page_get_lsn(&restored), Some(fpi_end));
        assert_eq!(restored[8000], 0xAB);
        assert_eq!(tl.get_rel_page_at_lsn(rel, 1, fpi_end).expect("gap block"), zero_page());
        // The heap record is stored raw on top of it: this applier cannot apply it.
        let state = tl.get_reconstruct_state(crate::key::Key::rel_block(rel, 3), heap_end).expect("state");
        assert_eq!(state.records.len(), 1);
        assert!(matches!(&state.records[0].1, WalRecord::Postgres { will_init: false, .. }));
        let err = tl.get_rel_page_at_lsn(rel, 3, heap_end).expect_err("needs Postgres");
        assert!(err.to_string().contains("Postgres WAL redo"), "{err}");
        // The commit set the clog bits of the xact and its subtransactions.
        let clog = tl.get_slru_page_at_lsn(SlruKind::Clog, 0, 0, commit_end).expect("clog");
        for xid in [800, 801, 802] {
            assert_eq!(clog_get_status(&clog, xid), Some(TRANSACTION_STATUS_COMMITTED), "xid {xid}");
        }
        assert_eq!(clog_get_status(&clog, 803), Some(0));
        let cp = CheckPoint::decode(&tl.get_checkpoint(tl.get_last_record_lsn()).expect("cp"), Lsn(0)).expect("decode");
        assert_eq!(cp.next_oid, 30000);
        assert_eq!(cp.next_xid, 1024, "nextXid moves past 802, rounded up");

        // A gap is refused, and so is a record whose xl_prev does not match.
        let noop = RecordSpec::main_data_only(RM_XLOG_ID, XLOG_NOOP, 0, &[]);
        let raw = postgres_ffi::wal_writer::encode_record(&noop, lsns[3].0).expect("encode");
        let start = Lsn(tl.get_last_record_lsn().0 + 64);
        let end = Lsn(start.0 + 24);
        let rec = decode_record(Bytes::from(raw), start).expect("decode");
        let mut m = DatadirModification::new(&tl);
        let err = ingest.ingest_record(&rec, end, &mut m).expect_err("gap");
        assert!(matches!(err.kind, IngestErrorKind::NotContiguous(_)), "{err}");
        let mut wrong_prev = rec.clone();
        wrong_prev.lsn = tl.get_last_record_lsn();
        wrong_prev.header.xl_prev = Lsn(8);
        let err = ingest.ingest_record(&wrong_prev, Lsn(wrong_prev.lsn.0 + 24), &mut m).expect_err("xl_prev");
        assert!(err.to_string().contains("xl_prev"), "{err}");
    }

    #[test]
    fn commit_times_index_lsns() {
        use crate::pgdatadir_mapping::LsnForTimestamp::{Future, NoData, Past, Present};
        use postgres_ffi::records::xact::XLOG_XACT_ABORT;
        let dir = tempfile::tempdir().expect("tempdir");
        let tl = setup(dir.path());
        let mut ingest = WalIngest::new(Arc::clone(&tl)).expect("ingest");
        assert_eq!(tl.find_lsn_by_timestamp(1000).expect("lookup"), NoData(START));
        let commit = |xid, ts: i64| RecordSpec::main_data_only(RM_XACT_ID, XLOG_XACT_COMMIT, xid, &ts.to_le_bytes());
        let noop = || RecordSpec::main_data_only(RM_XLOG_ID, XLOG_NOOP, 0, &[]);
        let specs = [
            noop(),
            commit(800, 1000),
            noop(),
            commit(801, 2000),
            RecordSpec::main_data_only(RM_XACT_ID, XLOG_XACT_ABORT, 804, &2500i64.to_le_bytes()),
            commit(802, 3000),
            // Took its commit time before 802 did, but reached the WAL after it.
            commit(803, 2900),
            commit(0, 3100), // no xid: sets no clog bit, makes nothing visible
            noop(),
            commit(805, 4000),
            noop(),
        ];
        let lsns = ingest_all(&mut ingest, &specs);
        let end = |i: usize| lsns[i].1;
        let last = tl.get_last_record_lsn();
        let find = |ts| tl.find_lsn_by_timestamp(ts).expect("lookup");
        assert_eq!(find(i64::MIN), Past(START));
        assert_eq!(find(999), Past(START));
        assert_eq!(find(1000), Present(end(1)));
        assert_eq!(find(1999), Present(end(1)));
        assert_eq!(find(2000), Present(end(3)));
        assert_eq!(find(2600), Present(end(3)), "an abort is no commit");
        assert_eq!(find(2950), Present(end(3)), "803 (2900) is behind 802 (3000) in the WAL");
        assert_eq!(find(3000), Present(end(6)));
        assert_eq!(find(3999), Present(end(6)), "the commit without xid is not indexed");
        assert_eq!(find(4000), Future(last));
        assert_eq!(find(i64::MAX), Future(last));
        // What a backup or branch at such an LSN needs: the commit record's start.
        assert_eq!(tl.get_prev_record_lsn_at(end(3)), Some(lsns[3].0));
        assert_eq!(tl.get_prev_record_lsn_at(end(9)), Some(lsns[9].0));
        assert_eq!(tl.get_prev_record_lsn_at(end(2)), None, "not a commit end, not the last record");
        assert_eq!(tl.get_prev_record_lsn_at(last), Some(lsns[10].0));
        let c = tl.get_last_commit(end(8)).expect("read").expect("a commit");
        assert_eq!(c, LastCommit { timestamp: 2900, max_timestamp: 3000, start_lsn: lsns[6].0, end_lsn: end(6) });
        assert_eq!(LastCommit::decode(&c.encode()), Ok(c));
        assert!(LastCommit::decode(&c.encode()[1..]).is_err());
        let mut bad_version = c.encode().to_vec();
        bad_version[0] = 9;
        assert!(LastCommit::decode(&bad_version).is_err());
        // A new ingest (after a restart) continues the running maximum.
        assert_eq!(WalIngest::new(Arc::clone(&tl)).expect("ingest").last_commit.map(|c| c.max_timestamp), Some(4000));
    }

    #[test]
    fn postgres_predicates() {
        assert!(xid_precedes(5, 6) && !xid_precedes(6, 5));
        assert!(xid_precedes(u32::MAX - 5, 10), "circular for normal xids");
        assert!(xid_precedes(2, 3), "plain for special xids");
        assert!(clog_page_precedes(0, 32) && !clog_page_precedes(32, 0));
        assert!(multixact_offset_page_precedes(0, 64) && !multixact_offset_page_precedes(64, 0));
        // fsm_logical_to_physical: leaf 0 is block 2 (root, level-1 page, then the leaf).
        assert_eq!(fsm_logical_to_physical(0), 2);
        assert_eq!(fsm_logical_to_physical(1), 3);
        assert_eq!(fsm_logical_to_physical(FSM_SLOTS_PER_PAGE), FSM_SLOTS_PER_PAGE + 3);
    }

    #[test]
    fn vm_truncation_keeps_the_kept_blocks_bits() {
        let mut page = vec![0xFFu8; BLCKSZ];
        // Heap truncated to 6 blocks: blocks 0..=5 keep their bits, 6 and later lose them.
        vm_truncate_page(&mut page, 6);
        let (_, byte, _) = vm_bit_location(6);
        assert_eq!(page[byte - 1], 0xFF, "heap blocks 0..=3");
        assert_eq!(page[byte], 0b0000_1111, "heap blocks 4 and 5 kept, 6 and 7 cleared");
        assert!(page[byte + 1..].iter().all(|b| *b == 0));
        assert_eq!(&page[..24], &[0xFF; 24], "the page header (LSN included) is left alone");
        // On the second VM page.
        let mut page = vec![0xFFu8; BLCKSZ];
        vm_truncate_page(&mut page, VM_HEAPBLOCKS_PER_PAGE + 1);
        assert_eq!(page[24], 0b0000_0011);
        assert!(page[25..].iter().all(|b| *b == 0));
    }
}
