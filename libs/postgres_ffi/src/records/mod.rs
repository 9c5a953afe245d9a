//! Typed bodies of the records the pageserver interprets, parsed from a record's main data.
//!
//! One module per resource manager, each with its `XLOG_*` info constants and parse
//! functions; [`parse_record_body`] dispatches on (rmgr, info) for callers that want one
//! entry point. Every parser is bounds-checked: counts in the data are checked against the
//! bytes present before anything is allocated.

pub mod clog;
pub mod dbase;
pub mod heap;
pub mod multixact;
pub mod relmap;
pub mod smgr;
pub mod standby;
pub mod tblspc;
pub mod xact;
pub mod xlog;

use crate::error::DecodeError;
use crate::record::DecodedXLogRecord;
use crate::rmgr::*;

/// A record body this crate knows how to interpret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordBody {
    /// `XLOG_CHECKPOINT_SHUTDOWN` (`shutdown = true`) or `XLOG_CHECKPOINT_ONLINE`.
    Checkpoint {
        shutdown: bool,
        checkpoint: crate::checkpoint::CheckPoint,
    },
    NextOid(crate::Oid),
    /// `XLOG_SWITCH`: the rest of the segment is unused.
    Switch,
    /// Commit, abort, commit-prepared or abort-prepared.
    XactCompletion(xact::XactCompletion),
    XactPrepare(xact::XactPrepare),
    XactAssignment(xact::XactAssignment),
    SmgrCreate(smgr::SmgrCreate),
    SmgrTruncate(smgr::SmgrTruncate),
    DbaseCreateFileCopy(dbase::DbaseCreateFileCopy),
    DbaseCreateWalLog(dbase::DbaseCreateWalLog),
    DbaseDrop(dbase::DbaseDrop),
    /// `CREATE TABLESPACE`: the tablespace's OID.
    TblspcCreate(crate::Oid),
    /// `DROP TABLESPACE`: the tablespace's OID.
    TblspcDrop(crate::Oid),
    ClogZeroPage {
        pageno: u32,
    },
    ClogTruncate(clog::ClogTruncate),
    MultiXactZeroOffsetsPage {
        pageno: u32,
    },
    MultiXactZeroMembersPage {
        pageno: u32,
    },
    MultiXactCreate(multixact::MultiXactCreate),
    MultiXactTruncate(multixact::MultiXactTruncate),
    RelmapUpdate(relmap::RelmapUpdate),
    RunningXacts(standby::RunningXacts),
    StandbyLocks(standby::StandbyLocks),
    /// A heap or heap2 record; says which heap blocks' visibility-map bits it clears.
    Heap(heap::VmBitsCleared),
}

/// Parses the body of `rec` if it is one of the kinds above; `Ok(None)` for every other
/// record (index records, FPIs, ...), whose effect lies entirely in their block references.
pub fn parse_record_body(rec: &DecodedXLogRecord) -> Result<Option<RecordBody>, DecodeError> {
    let info = rec.rmgr_info();
    let lsn = rec.lsn;
    let data = &rec.main_data[..];
    Ok(Some(match rec.rmid() {
        RM_XLOG_ID => match info {
            xlog::XLOG_CHECKPOINT_SHUTDOWN | xlog::XLOG_CHECKPOINT_ONLINE => RecordBody::Checkpoint {
                shutdown: info == xlog::XLOG_CHECKPOINT_SHUTDOWN,
                checkpoint: xlog::parse_checkpoint(data, lsn)?,
            },
            xlog::XLOG_NEXTOID => RecordBody::NextOid(xlog::parse_next_oid(data, lsn)?),
            xlog::XLOG_SWITCH => RecordBody::Switch,
            _ => return Ok(None),
        },
        RM_XACT_ID => match info & xact::XLOG_XACT_OPMASK {
            xact::XLOG_XACT_COMMIT
            | xact::XLOG_XACT_ABORT
            | xact::XLOG_XACT_COMMIT_PREPARED
            | xact::XLOG_XACT_ABORT_PREPARED => RecordBody::XactCompletion(xact::parse_completion(rec)?),
            xact::XLOG_XACT_PREPARE => RecordBody::XactPrepare(xact::parse_prepare(data, lsn)?),
            xact::XLOG_XACT_ASSIGNMENT => RecordBody::XactAssignment(xact::parse_assignment(data, lsn)?),
            _ => return Ok(None),
        },
        RM_SMGR_ID => match info {
            smgr::XLOG_SMGR_CREATE => RecordBody::SmgrCreate(smgr::parse_create(data, lsn)?),
            smgr::XLOG_SMGR_TRUNCATE => RecordBody::SmgrTruncate(smgr::parse_truncate(data, lsn)?),
            _ => return Ok(None),
        },
        RM_DBASE_ID => match info {
            dbase::XLOG_DBASE_CREATE_FILE_COPY => {
                RecordBody::DbaseCreateFileCopy(dbase::parse_create_file_copy(data, lsn)?)
            }
            dbase::XLOG_DBASE_CREATE_WAL_LOG => RecordBody::DbaseCreateWalLog(dbase::parse_create_wal_log(data, lsn)?),
            dbase::XLOG_DBASE_DROP => RecordBody::DbaseDrop(dbase::parse_drop(data, lsn)?),
            _ => return Ok(None),
        },
        RM_TBLSPC_ID => match info {
            tblspc::XLOG_TBLSPC_CREATE => {
                RecordBody::TblspcCreate(tblspc::parse_tablespace_id(data, lsn, "xl_tblspc_create_rec")?)
            }
            tblspc::XLOG_TBLSPC_DROP => {
                RecordBody::TblspcDrop(tblspc::parse_tablespace_id(data, lsn, "xl_tblspc_drop_rec")?)
            }
            _ => return Ok(None),
        },
        RM_CLOG_ID => match info {
            clog::CLOG_ZEROPAGE => RecordBody::ClogZeroPage { pageno: clog::parse_zero_page(data, lsn)? },
            clog::CLOG_TRUNCATE => RecordBody::ClogTruncate(clog::parse_truncate(data, lsn)?),
            _ => return Ok(None),
        },
        RM_MULTIXACT_ID => match info {
            multixact::XLOG_MULTIXACT_ZERO_OFF_PAGE => {
                RecordBody::MultiXactZeroOffsetsPage { pageno: multixact::parse_zero_page(data, lsn)? }
            }
            multixact::XLOG_MULTIXACT_ZERO_MEM_PAGE => {
                RecordBody::MultiXactZeroMembersPage { pageno: multixact::parse_zero_page(data, lsn)? }
            }
            multixact::XLOG_MULTIXACT_CREATE_ID => RecordBody::MultiXactCreate(multixact::parse_create(data, lsn)?),
            multixact::XLOG_MULTIXACT_TRUNCATE_ID => {
                RecordBody::MultiXactTruncate(multixact::parse_truncate(data, lsn)?)
            }
            _ => return Ok(None),
        },
        RM_RELMAP_ID => match info {
            relmap::XLOG_RELMAP_UPDATE => RecordBody::RelmapUpdate(relmap::parse_update(&rec.main_data, lsn)?),
            _ => return Ok(None),
        },
        RM_STANDBY_ID => match info {
            standby::XLOG_RUNNING_XACTS => RecordBody::RunningXacts(standby::parse_running_xacts(data, lsn)?),
            standby::XLOG_STANDBY_LOCK => RecordBody::StandbyLocks(standby::parse_locks(data, lsn)?),
            _ => return Ok(None),
        },
        RM_HEAP_ID | RM_HEAP2_ID => match heap::vm_bits_cleared(rec)? {
            Some(v) => RecordBody::Heap(v),
            None => return Ok(None),
        },
        _ => return Ok(None),
    }))
}
