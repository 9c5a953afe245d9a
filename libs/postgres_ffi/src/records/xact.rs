//! Transaction records (access/xact.h, xactdesc.c `ParseCommitRecord`/`ParseAbortRecord`/
//! `ParsePrepareRecord`): what a commit or abort did (subtransactions, dropped relations,
//! two-phase identity) so the pageserver can update CLOG and drop relations.

use utils::Lsn;

use crate::error::DecodeError;
use crate::reader::Reader;
use crate::record::DecodedXLogRecord;
use crate::records::smgr::read_rnode;
use crate::reltag::RelFileNode;
use crate::{Oid, TimestampTz, TransactionId};

pub const XLOG_XACT_COMMIT: u8 = 0x00;
pub const XLOG_XACT_PREPARE: u8 = 0x10;
pub const XLOG_XACT_ABORT: u8 = 0x20;
pub const XLOG_XACT_COMMIT_PREPARED: u8 = 0x30;
pub const XLOG_XACT_ABORT_PREPARED: u8 = 0x40;
pub const XLOG_XACT_ASSIGNMENT: u8 = 0x50;
pub const XLOG_XACT_INVALIDATIONS: u8 = 0x60;
pub const XLOG_XACT_OPMASK: u8 = 0x70;
/// Set in `xl_info` when an `xl_xact_xinfo` word follows the timestamp.
pub const XLOG_XACT_HAS_INFO: u8 = 0x80;

pub const XACT_XINFO_HAS_DBINFO: u32 = 1 << 0;
pub const XACT_XINFO_HAS_SUBXACTS: u32 = 1 << 1;
pub const XACT_XINFO_HAS_RELFILENODES: u32 = 1 << 2;
pub const XACT_XINFO_HAS_INVALS: u32 = 1 << 3;
pub const XACT_XINFO_HAS_TWOPHASE: u32 = 1 << 4;
pub const XACT_XINFO_HAS_ORIGIN: u32 = 1 << 5;
pub const XACT_XINFO_HAS_AE_LOCKS: u32 = 1 << 6;
pub const XACT_XINFO_HAS_GID: u32 = 1 << 7;
pub const XACT_XINFO_HAS_DROPPED_STATS: u32 = 1 << 8;
pub const XACT_COMPLETION_APPLY_FEEDBACK: u32 = 1 << 29;
pub const XACT_COMPLETION_UPDATE_RELCACHE_FILE: u32 = 1 << 30;
pub const XACT_COMPLETION_FORCE_SYNC_COMMIT: u32 = 1 << 31;

/// `GIDSIZE`: longest two-phase identifier plus its NUL.
pub const GIDSIZE: usize = 200;
/// `sizeof(SharedInvalidationMessage)`, `sizeof(xl_xact_stats_item)`.
pub const SIZEOF_SHARED_INVALIDATION_MESSAGE: usize = 16;
pub const SIZEOF_XACT_STATS_ITEM: usize = 12;
/// `TWOPHASE_MAGIC`: first word of a prepare record's body (the 2PC state file header).
pub const TWOPHASE_MAGIC: u32 = 0x57F9_4534;
/// `sizeof(xl_xact_prepare)`.
pub const SIZEOF_XACT_PREPARE: usize = 72;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XactKind {
    Commit,
    Abort,
    CommitPrepared,
    AbortPrepared,
}

impl XactKind {
    pub fn is_commit(self) -> bool {
        matches!(self, XactKind::Commit | XactKind::CommitPrepared)
    }
}

/// `xl_xact_stats_item`: statistics to drop with a dropped object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XactStatsItem {
    pub kind: i32,
    pub dboid: Oid,
    pub objoid: Oid,
}

/// A parsed commit or abort (`xl_xact_parsed_commit` / `xl_xact_parsed_abort`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XactCompletion {
    pub kind: XactKind,
    /// The record's `xl_xid`: the transaction that ended (0 for a prepared one, see
    /// [`XactCompletion::twophase_xid`]).
    pub xid: TransactionId,
    pub xact_time: TimestampTz,
    pub xinfo: u32,
    pub db_id: Oid,
    pub ts_id: Oid,
    pub subxacts: Vec<TransactionId>,
    /// Relations whose files are dropped by this commit or abort.
    pub dropped_rels: Vec<RelFileNode>,
    pub dropped_stats: Vec<XactStatsItem>,
    /// Number of shared invalidation messages (commits only).
    pub n_inval_msgs: usize,
    /// For COMMIT/ABORT PREPARED: the xid of the prepared transaction.
    pub twophase_xid: Option<TransactionId>,
    pub twophase_gid: Option<String>,
    /// Replication origin LSN and timestamp.
    pub origin: Option<(Lsn, TimestampTz)>,
}

impl XactCompletion {
    /// The xid whose status changes: the prepared xid for 2PC, the record's xid otherwise.
    pub fn effective_xid(&self) -> TransactionId {
        self.twophase_xid.unwrap_or(self.xid)
    }
}

/// Parses a commit, abort, commit-prepared or abort-prepared record.
pub fn parse_completion(rec: &DecodedXLogRecord) -> Result<XactCompletion, DecodeError> {
    let info = rec.header.xl_info;
    let kind = match info & XLOG_XACT_OPMASK {
        XLOG_XACT_COMMIT => XactKind::Commit,
        XLOG_XACT_ABORT => XactKind::Abort,
        XLOG_XACT_COMMIT_PREPARED => XactKind::CommitPrepared,
        XLOG_XACT_ABORT_PREPARED => XactKind::AbortPrepared,
        other => {
            return Err(DecodeError::new(rec.lsn, format!("xact record kind {other:#04x} is not a commit or abort")))
        }
    };
    parse_completion_data(kind, info, rec.header.xl_xid, &rec.main_data, rec.lsn)
}

/// The body parser behind [`parse_completion`], for callers holding only the main data.
pub fn parse_completion_data(
    kind: XactKind,
    info: u8,
    xid: TransactionId,
    data: &[u8],
    lsn: Lsn,
) -> Result<XactCompletion, DecodeError> {
    let what = if kind.is_commit() { "xl_xact_commit" } else { "xl_xact_abort" };
    let mut r = Reader::new(data, lsn, what);
    let xact_time = r.i64("xact_time")?;
    let xinfo = if info & XLOG_XACT_HAS_INFO != 0 { r.u32("xinfo")? } else { 0 };
    let mut out = XactCompletion {
        kind,
        xid,
        xact_time,
        xinfo,
        db_id: 0,
        ts_id: 0,
        subxacts: Vec::new(),
        dropped_rels: Vec::new(),
        dropped_stats: Vec::new(),
        n_inval_msgs: 0,
        twophase_xid: None,
        twophase_gid: None,
        origin: None,
    };
    if xinfo & XACT_XINFO_HAS_DBINFO != 0 {
        out.db_id = r.u32("dbId")?;
        out.ts_id = r.u32("tsId")?;
    }
    if xinfo & XACT_XINFO_HAS_SUBXACTS != 0 {
        let n = r.count("nsubxacts", 4)?;
        out.subxacts = r.u32_array(n, "subxacts")?;
    }
    if xinfo & XACT_XINFO_HAS_RELFILENODES != 0 {
        let n = r.count("nrels", 12)?;
        out.dropped_rels = (0..n).map(|_| read_rnode(&mut r)).collect::<Result<_, _>>()?;
    }
    if xinfo & XACT_XINFO_HAS_DROPPED_STATS != 0 {
        let n = r.count("nitems", SIZEOF_XACT_STATS_ITEM)?;
        out.dropped_stats = read_stats(&mut r, n)?;
    }
    // Abort records never carry invalidations, whatever the flag says (ParseAbortRecord).
    if kind.is_commit() && xinfo & XACT_XINFO_HAS_INVALS != 0 {
        out.n_inval_msgs = r.count("nmsgs", SIZEOF_SHARED_INVALIDATION_MESSAGE)?;
        r.skip(out.n_inval_msgs * SIZEOF_SHARED_INVALIDATION_MESSAGE, "msgs")?;
    }
    if xinfo & XACT_XINFO_HAS_TWOPHASE != 0 {
        out.twophase_xid = Some(r.u32("twophase xid")?);
        if xinfo & XACT_XINFO_HAS_GID != 0 {
            out.twophase_gid = Some(r.cstring(GIDSIZE - 1, "twophase_gid")?);
        }
    }
    if xinfo & XACT_XINFO_HAS_ORIGIN != 0 {
        // Stored unaligned after the variable-length parts.
        out.origin = Some((r.lsn("origin_lsn")?, r.i64("origin_timestamp")?));
    }
    Ok(out)
}

fn read_stats(r: &mut Reader<'_>, n: usize) -> Result<Vec<XactStatsItem>, DecodeError> {
    (0..n)
        .map(|_| {
            Ok(XactStatsItem {
                kind: r.i32("stats.kind")?,
                dboid: r.u32("stats.dboid")?,
                objoid: r.u32("stats.objoid")?,
            })
        })
        .collect()
}

/// The header and variable parts of a `PREPARE TRANSACTION` record (the 2PC state file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XactPrepare {
    /// `total_len`: size of the whole state file the record carries.
    pub total_len: u32,
    pub xid: TransactionId,
    pub database: Oid,
    pub prepared_at: TimestampTz,
    pub owner: Oid,
    pub gid: String,
    pub subxacts: Vec<TransactionId>,
    /// Relations dropped if the prepared transaction commits / aborts.
    pub commit_rels: Vec<RelFileNode>,
    pub abort_rels: Vec<RelFileNode>,
    pub n_commit_stats: usize,
    pub n_abort_stats: usize,
    pub n_inval_msgs: usize,
    pub initfileinval: bool,
    pub origin_lsn: Lsn,
    pub origin_timestamp: TimestampTz,
}

pub fn parse_prepare(data: &[u8], lsn: Lsn) -> Result<XactPrepare, DecodeError> {
    let mut r = Reader::new(data, lsn, "xl_xact_prepare");
    let magic = r.u32("magic")?;
    if magic != TWOPHASE_MAGIC {
        return Err(r.error(format_args!("magic {magic:08X} is not TWOPHASE_MAGIC {TWOPHASE_MAGIC:08X}")));
    }
    let total_len = r.u32("total_len")?;
    let xid = r.u32("xid")?;
    let database = r.u32("database")?;
    let prepared_at = r.i64("prepared_at")?;
    let owner = r.u32("owner")?;
    let nsubxacts = r.i32("nsubxacts")?;
    let ncommitrels = r.i32("ncommitrels")?;
    let nabortrels = r.i32("nabortrels")?;
    let ncommitstats = r.i32("ncommitstats")?;
    let nabortstats = r.i32("nabortstats")?;
    let ninvalmsgs = r.i32("ninvalmsgs")?;
    let initfileinval = r.bool("initfileinval")?;
    r.align(2, "padding before gidlen")?;
    let gidlen = r.u16("gidlen")? as usize;
    let origin_lsn = r.lsn("origin_lsn")?;
    let origin_timestamp = r.i64("origin_timestamp")?;
    debug_assert_eq!(r.pos(), SIZEOF_XACT_PREPARE);

    if gidlen > GIDSIZE {
        return Err(r.error(format_args!("gidlen {gidlen} exceeds GIDSIZE {GIDSIZE}")));
    }
    let gid_bytes = r.bytes(gidlen, "gid")?;
    let gid_end = gid_bytes.iter().position(|&b| b == 0).unwrap_or(gid_bytes.len());
    let gid = String::from_utf8_lossy(&gid_bytes[..gid_end]).into_owned();
    r.align(8, "padding after gid")?;

    let n = r.check_count(nsubxacts as i64, "nsubxacts", 4)?;
    let subxacts = r.u32_array(n, "subxacts")?;
    r.align(8, "padding after subxacts")?;
    let n = r.check_count(ncommitrels as i64, "ncommitrels", 12)?;
    let commit_rels = (0..n).map(|_| read_rnode(&mut r)).collect::<Result<Vec<_>, _>>()?;
    r.align(8, "padding after commit rels")?;
    let n = r.check_count(nabortrels as i64, "nabortrels", 12)?;
    let abort_rels = (0..n).map(|_| read_rnode(&mut r)).collect::<Result<Vec<_>, _>>()?;
    r.align(8, "padding after abort rels")?;
    let n_commit_stats = r.check_count(ncommitstats as i64, "ncommitstats", SIZEOF_XACT_STATS_ITEM)?;
    r.skip(n_commit_stats * SIZEOF_XACT_STATS_ITEM, "commit stats")?;
    r.align(8, "padding after commit stats")?;
    let n_abort_stats = r.check_count(nabortstats as i64, "nabortstats", SIZEOF_XACT_STATS_ITEM)?;
    r.skip(n_abort_stats * SIZEOF_XACT_STATS_ITEM, "abort stats")?;
    r.align(8, "padding after abort stats")?;
    let n_inval_msgs = r.check_count(ninvalmsgs as i64, "ninvalmsgs", SIZEOF_SHARED_INVALIDATION_MESSAGE)?;
    r.skip(n_inval_msgs * SIZEOF_SHARED_INVALIDATION_MESSAGE, "invalidation messages")?;

    Ok(XactPrepare {
        total_len,
        xid,
        database,
        prepared_at,
        owner,
        gid,
        subxacts,
        commit_rels,
        abort_rels,
        n_commit_stats,
        n_abort_stats,
        n_inval_msgs,
        initfileinval,
        origin_lsn,
        origin_timestamp,
    })
}

/// `xl_xact_assignment`: subtransaction xids assigned to a top-level xid (logged when more
/// than `PGPROC_MAX_CACHED_SUBXIDS` are open, so standbys can track them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XactAssignment {
    pub xtop: TransactionId,
    pub xsub: Vec<TransactionId>,
}

pub fn parse_assignment(data: &[u8], lsn: Lsn) -> Result<XactAssignment, DecodeError> {
    let mut r = Reader::new(data, lsn, "xl_xact_assignment");
    let xtop = r.u32("xtop")?;
    let n = r.count("nsubxacts", 4)?;
    Ok(XactAssignment { xtop, xsub: r.u32_array(n, "xsub")? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_with_everything() {
        let mut d = Vec::new();
        d.extend_from_slice(&1234i64.to_le_bytes());
        let xinfo = XACT_XINFO_HAS_DBINFO
            | XACT_XINFO_HAS_SUBXACTS
            | XACT_XINFO_HAS_RELFILENODES
            | XACT_XINFO_HAS_INVALS
            | XACT_XINFO_HAS_TWOPHASE
            | XACT_XINFO_HAS_GID
            | XACT_XINFO_HAS_ORIGIN;
        d.extend_from_slice(&xinfo.to_le_bytes());
        for v in [5u32, 1663, 2, 801, 802, 1, 1663, 5, 16384, 1] {
            d.extend_from_slice(&v.to_le_bytes());
        }
        d.extend_from_slice(&[9u8; 16]);
        d.extend_from_slice(&777u32.to_le_bytes());
        d.extend_from_slice(b"my-gid\0");
        d.extend_from_slice(&0x1234u64.to_le_bytes());
        d.extend_from_slice(&99i64.to_le_bytes());
        let info = XLOG_XACT_COMMIT_PREPARED | XLOG_XACT_HAS_INFO;
        let c = parse_completion_data(XactKind::CommitPrepared, info, 0, &d, Lsn(1)).unwrap();
        assert_eq!(c.subxacts, vec![801, 802]);
        assert_eq!(c.dropped_rels, vec![RelFileNode { spcnode: 1663, dbnode: 5, relnode: 16384 }]);
        assert_eq!(c.n_inval_msgs, 1);
        assert_eq!(c.twophase_gid.as_deref(), Some("my-gid"));
        assert_eq!(c.effective_xid(), 777);
        assert_eq!(c.origin, Some((Lsn(0x1234), 99)));
        for cut in 0..d.len() {
            assert!(parse_completion_data(XactKind::CommitPrepared, info, 0, &d[..cut], Lsn(1)).is_err(), "{cut}");
        }
        let plain = parse_completion_data(XactKind::Commit, XLOG_XACT_COMMIT, 700, &d[..8], Lsn(1)).unwrap();
        assert_eq!((plain.xid, plain.xinfo, plain.xact_time), (700, 0, 1234));
    }
}
