//! The Postgres view of a timeline (Neon's "datadir mapping"): relations, databases, SLRUs,
//! two-phase state, the relation maps, `pg_control` and the checkpoint, each stored under the
//! keys of [`crate::key`].
//!
//! Read side: methods on [`Timeline`] (`get_rel_page_at_lsn`, `list_rels`, ...). Write side:
//! [`DatadirModification`], which batches the changes of one WAL record (or one import) and
//! writes them all at one LSN.
//!
//! Values:
//! - relation block, SLRU block: the 8 KiB page (an image or WAL records on top of one);
//! - relation size, SLRU segment size: `u32` little-endian, in blocks;
//! - relmapper file, twophase file, control file, checkpoint: the bytes Postgres keeps (a
//!   `pg_filenode.map`; a two-phase state file *without* its trailing crc32c, which is the body
//!   of the `PREPARE` record; `pg_control`; a `CheckPoint` struct);
//! - last commit: a [`LastCommit`] (timestamp and LSNs of the latest commit record), rewritten
//!   by ingest at every commit, so its versions index commit time by LSN (see
//!   [`Timeline::find_lsn_by_timestamp`]);
//! - directories, always stored as whole images:
//!
//! ```text
//!  u8 format version (1) | u8 kind | u32 count | count × entry        (big-endian, entries
//!  kind 1 databases      entry = u32 spcnode, u32 dbnode                 strictly ascending)
//!  kind 2 relations      entry = u32 relnode, u8 fork     (one directory per database)
//!  kind 3 SLRU segments  entry = u32 segno                (one directory per SLRU)
//!  kind 4 twophase       entry = u32 xid
//! ```
//!
//! A hand-written format (not serde) keeps the on-disk bytes ours, versioned, and checked on
//! decode. An **empty value is a tombstone**: the object was dropped. Dropping a relation or
//! SLRU segment tombstones its size key and removes it from its directory; its blocks stay in
//! older layers, unreachable, until GC and compaction remove them (the storage has no range
//! deletes).

use std::collections::{BTreeMap, BTreeSet};

use bytes::{BufMut, Bytes, BytesMut};
use postgres_ffi::reltag::MAX_FORKNUM;
use postgres_ffi::slru::SlruKind;
use postgres_ffi::{
    BlockNumber, Oid, RelTag, TimestampTz, TransactionId, BLCKSZ, DEFAULTTABLESPACE_OID, GLOBALTABLESPACE_OID,
    INVALID_BLOCK_NUMBER,
};
use utils::{Lsn, TimelineId};

use crate::key::Key;
use crate::tenant::timeline::{GetError, Timeline, TimelineError};
use crate::value::{Value, WalRecord};

static ZERO_PAGE_BYTES: [u8; BLCKSZ] = [0u8; BLCKSZ];

/// An all-zero page: what Postgres reads for a block past the end of a relation file or a
/// block that was extended but never written.
pub fn zero_page() -> Bytes {
    Bytes::from_static(&ZERO_PAGE_BYTES)
}

const DIR_FORMAT_VERSION: u8 = 1;
const DIR_HEADER_SIZE_BYTES: usize = 6;

/// Which directory an encoded directory value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum DirKind {
    Databases = 1,
    Relations = 2,
    SlruSegments = 3,
    TwoPhase = 4,
}

/// An entry of a directory and its fixed-size encoding.
trait DirEntry: Ord + Copy {
    const KIND: DirKind;
    const SIZE_BYTES: usize;
    fn put(&self, buf: &mut BytesMut);
    fn parse(b: &[u8]) -> Self;
}

/// (spcnode, dbnode) of a database, `(GLOBALTABLESPACE_OID, 0)` for the shared catalogs,
/// `(spcnode, 0)` for a user tablespace's own folder.
impl DirEntry for (Oid, Oid) {
    const KIND: DirKind = DirKind::Databases;
    const SIZE_BYTES: usize = 8;
    fn put(&self, buf: &mut BytesMut) {
        buf.put_u32(self.0);
        buf.put_u32(self.1);
    }
    fn parse(b: &[u8]) -> Self {
        (u32::from_be_bytes([b[0], b[1], b[2], b[3]]), u32::from_be_bytes([b[4], b[5], b[6], b[7]]))
    }
}

/// (relnode, fork) of a relation fork within its database.
impl DirEntry for (Oid, u8) {
    const KIND: DirKind = DirKind::Relations;
    const SIZE_BYTES: usize = 5;
    fn put(&self, buf: &mut BytesMut) {
        buf.put_u32(self.0);
        buf.put_u8(self.1);
    }
    fn parse(b: &[u8]) -> Self {
        (u32::from_be_bytes([b[0], b[1], b[2], b[3]]), b[4])
    }
}

/// A `u32` entry: an SLRU segment number or a prepared transaction's xid; the two directories
/// are told apart by their kind byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct SegNo(u32);
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Xid(u32);

impl DirEntry for SegNo {
    const KIND: DirKind = DirKind::SlruSegments;
    const SIZE_BYTES: usize = 4;
    fn put(&self, buf: &mut BytesMut) {
        buf.put_u32(self.0);
    }
    fn parse(b: &[u8]) -> Self {
        SegNo(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

impl DirEntry for Xid {
    const KIND: DirKind = DirKind::TwoPhase;
    const SIZE_BYTES: usize = 4;
    fn put(&self, buf: &mut BytesMut) {
        buf.put_u32(self.0);
    }
    fn parse(b: &[u8]) -> Self {
        Xid(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

fn encode_dir<T: DirEntry>(entries: &BTreeSet<T>) -> Bytes {
    let mut buf = BytesMut::with_capacity(DIR_HEADER_SIZE_BYTES + entries.len() * T::SIZE_BYTES);
    buf.put_u8(DIR_FORMAT_VERSION);
    buf.put_u8(T::KIND as u8);
    buf.put_u32(u32::try_from(entries.len()).expect("directory with more than 2^32 entries"));
    for e in entries {
        e.put(&mut buf);
    }
    buf.freeze()
}

/// Decodes a directory value; never panics on bad bytes.
fn decode_dir<T: DirEntry>(b: &[u8]) -> Result<BTreeSet<T>, String> {
    if b.len() < DIR_HEADER_SIZE_BYTES {
        return Err(format!("directory value of {} bytes is shorter than its header", b.len()));
    }
    if b[0] != DIR_FORMAT_VERSION {
        return Err(format!("directory format version {} is not supported (expected {DIR_FORMAT_VERSION})", b[0]));
    }
    if b[1] != T::KIND as u8 {
        return Err(format!("directory kind {} where kind {} was expected", b[1], T::KIND as u8));
    }
    let count = u32::from_be_bytes([b[2], b[3], b[4], b[5]]) as usize;
    let body = &b[DIR_HEADER_SIZE_BYTES..];
    if count.checked_mul(T::SIZE_BYTES) != Some(body.len()) {
        return Err(format!("directory says {count} entries but holds {} bytes of entries", body.len()));
    }
    let mut out = BTreeSet::new();
    let mut prev: Option<T> = None;
    for chunk in body.chunks_exact(T::SIZE_BYTES) {
        let e = T::parse(chunk);
        if prev.is_some_and(|p| p >= e) {
            return Err("directory entries are not strictly ascending".to_string());
        }
        prev = Some(e);
        out.insert(e);
    }
    Ok(out)
}

fn encode_size(nblocks: BlockNumber) -> Bytes {
    Bytes::copy_from_slice(&nblocks.to_le_bytes())
}

fn decode_size(b: &[u8]) -> Result<BlockNumber, String> {
    let arr: [u8; 4] = b.try_into().map_err(|_| format!("size value is {} bytes, expected 4", b.len()))?;
    Ok(u32::from_le_bytes(arr))
}

/// An error of the Postgres-level view: names the object, the LSN and the timeline.
#[derive(Debug, thiserror::Error)]
pub enum DatadirError {
    #[error(transparent)]
    Get(#[from] GetError),
    #[error("{what} does not exist at LSN {lsn} in timeline {timeline_id}")]
    NotFound { what: String, lsn: Lsn, timeline_id: TimelineId },
    #[error(
        "corrupt {what} (key {key}) at LSN {lsn} in timeline {timeline_id}: {detail}; the stored value cannot be \
         used (a bug or data corruption)"
    )]
    Corrupt { what: String, key: Key, lsn: Lsn, timeline_id: TimelineId, detail: String },
    /// A change that contradicts the current state (creating what exists, extending what is
    /// missing, ...): a bug in the caller or WAL that does not match the timeline.
    #[error("invalid change on timeline {timeline_id} (state at LSN {lsn}): {detail}")]
    InvalidChange { lsn: Lsn, timeline_id: TimelineId, detail: String },
    #[error(transparent)]
    Timeline(#[from] TimelineError),
}

impl DatadirError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, DatadirError::NotFound { .. })
    }

    /// True if the read failed because of the pageserver's own state (a damaged or unreadable
    /// layer file, a failed WAL redo, stored values that do not decode), not because of what
    /// was asked (an object that does not exist, history below the GC cutoff). Servers log
    /// these as errors: someone must look.
    pub fn is_server_fault(&self) -> bool {
        use crate::tenant::timeline::GetErrorReason;
        match self {
            DatadirError::Get(e) => !matches!(e.reason, GetErrorReason::Missing | GetErrorReason::BelowGcCutoff { .. }),
            DatadirError::Corrupt { .. } | DatadirError::Timeline(_) => true,
            DatadirError::NotFound { .. } | DatadirError::InvalidChange { .. } => false,
        }
    }
}

fn check_rel(rel: RelTag) -> Result<(), String> {
    if rel.relnode == 0 {
        return Err(format!("relation {rel} has relfilenode 0, which names no relation"));
    }
    if rel.forknum > MAX_FORKNUM {
        return Err(format!("relation {rel} has invalid fork number {}", rel.forknum));
    }
    Ok(())
}

/// The value under [`Key::standby_start`]: the latest `XLOG_RUNNING_XACTS` record at or below
/// the LSN it is read at.
///
/// ```text
///  u8 format version (1) | u64 start LSN (BE) | the record's bytes (xl_tot_len of them)
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandbyStart {
    /// Where the record starts: the LSN a standby started from it begins replay at.
    pub lsn: Lsn,
    /// The whole record as it is in the WAL, header included.
    pub record: Bytes,
}

impl StandbyStart {
    const VERSION: u8 = 1;

    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(9 + self.record.len());
        b.put_u8(Self::VERSION);
        b.put_u64(self.lsn.0);
        b.extend_from_slice(&self.record);
        b.freeze()
    }

    pub fn decode(b: &[u8]) -> Result<StandbyStart, String> {
        if b.len() < 9 + 24 || b[0] != Self::VERSION {
            return Err(format!(
                "{} bytes with format version {:?}, expected version 1 and a record",
                b.len(),
                b.first()
            ));
        }
        let lsn = Lsn(u64::from_be_bytes(b[1..9].try_into().expect("8 bytes")));
        Ok(StandbyStart { lsn, record: Bytes::copy_from_slice(&b[9..]) })
    }
}

/// The value under [`Key::last_commit`]: the latest transaction commit record (one that set
/// clog bits) at or below the LSN it is read at.
///
/// ```text
///  u8 format version (1) | i64 timestamp | i64 max_timestamp | u64 start LSN | u64 end LSN  (BE)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastCommit {
    /// The commit record's `xact_time`.
    pub timestamp: TimestampTz,
    /// The largest `xact_time` of this and every earlier commit: monotonic in LSN even when
    /// commit records reach the WAL slightly out of timestamp order.
    pub max_timestamp: TimestampTz,
    /// Where the commit record starts (the `xl_prev` of the record after it).
    pub start_lsn: Lsn,
    /// Where it ends: the LSN ingest wrote its changes at.
    pub end_lsn: Lsn,
}

const LAST_COMMIT_FORMAT_VERSION: u8 = 1;
const LAST_COMMIT_SIZE_BYTES: usize = 1 + 8 + 8 + 8 + 8;

impl LastCommit {
    pub fn encode(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(LAST_COMMIT_SIZE_BYTES);
        buf.put_u8(LAST_COMMIT_FORMAT_VERSION);
        buf.put_i64(self.timestamp);
        buf.put_i64(self.max_timestamp);
        buf.put_u64(self.start_lsn.0);
        buf.put_u64(self.end_lsn.0);
        buf.freeze()
    }

    /// Decodes a stored value; never panics on bad bytes.
    pub fn decode(b: &[u8]) -> Result<LastCommit, String> {
        if b.len() != LAST_COMMIT_SIZE_BYTES {
            return Err(format!("{} bytes, expected {LAST_COMMIT_SIZE_BYTES}", b.len()));
        }
        if b[0] != LAST_COMMIT_FORMAT_VERSION {
            return Err(format!("format version {}, expected {LAST_COMMIT_FORMAT_VERSION}", b[0]));
        }
        let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("length checked"));
        let c = LastCommit {
            timestamp: u64_at(1) as i64,
            max_timestamp: u64_at(9) as i64,
            start_lsn: Lsn(u64_at(17)),
            end_lsn: Lsn(u64_at(25)),
        };
        if c.start_lsn >= c.end_lsn || c.max_timestamp < c.timestamp {
            return Err(format!("inconsistent fields {c:?}"));
        }
        Ok(c)
    }
}

/// Answer of [`Timeline::find_lsn_by_timestamp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LsnForTimestamp {
    /// The end of the last commit at or before the time.
    Present(Lsn),
    /// The time is before the first commit: the initdb LSN (or the GC cutoff, if history
    /// before the time is gone).
    Past(Lsn),
    /// The time is after the last commit: the last record LSN.
    Future(Lsn),
    /// No commit at all: the last record LSN.
    NoData(Lsn),
}

impl LsnForTimestamp {
    pub fn lsn(&self) -> Lsn {
        match *self {
            LsnForTimestamp::Present(l)
            | LsnForTimestamp::Past(l)
            | LsnForTimestamp::Future(l)
            | LsnForTimestamp::NoData(l) => l,
        }
    }

    /// The `kind` of the HTTP answer.
    pub fn kind(&self) -> &'static str {
        match self {
            LsnForTimestamp::Present(_) => "present",
            LsnForTimestamp::Past(_) => "past",
            LsnForTimestamp::Future(_) => "future",
            LsnForTimestamp::NoData(_) => "nodata",
        }
    }
}

// --- read side

impl Timeline {
    /// The value of `key` at `lsn`, `None` if it does not exist or was dropped (tombstone).
    fn get_optional(&self, key: Key, lsn: Lsn) -> Result<Option<Bytes>, DatadirError> {
        match self.get(key, lsn) {
            Ok(v) if v.is_empty() => Ok(None),
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_missing() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn not_found(&self, what: String, lsn: Lsn) -> DatadirError {
        DatadirError::NotFound { what, lsn, timeline_id: self.timeline_id() }
    }

    fn corrupt(&self, what: &str, key: Key, lsn: Lsn, detail: String) -> DatadirError {
        DatadirError::Corrupt { what: what.to_string(), key, lsn, timeline_id: self.timeline_id(), detail }
    }

    fn invalid_request(&self, lsn: Lsn, detail: String) -> DatadirError {
        DatadirError::InvalidChange { lsn, timeline_id: self.timeline_id(), detail }
    }

    /// Block `blkno` of `rel` at `lsn`. A block at or beyond the relation's size, or inside it
    /// but never written (implicit extension), reads as a zero page, as in Postgres.
    pub fn get_rel_page_at_lsn(&self, rel: RelTag, blkno: BlockNumber, lsn: Lsn) -> Result<Bytes, DatadirError> {
        check_rel(rel).map_err(|d| self.invalid_request(lsn, d))?;
        let nblocks = self.get_rel_size(rel, lsn)?;
        if blkno >= nblocks {
            return Ok(zero_page());
        }
        match self.get(Key::rel_block(rel, blkno), lsn) {
            Ok(page) => Ok(page),
            Err(e) if e.is_missing() => Ok(zero_page()),
            Err(e) => Err(e.into()),
        }
    }

    /// Size of `rel` in blocks at `lsn`; `NotFound` if it does not exist.
    pub fn get_rel_size(&self, rel: RelTag, lsn: Lsn) -> Result<BlockNumber, DatadirError> {
        self.rel_size_opt(rel, lsn)?.ok_or_else(|| self.not_found(format!("relation {rel}"), lsn))
    }

    fn rel_size_opt(&self, rel: RelTag, lsn: Lsn) -> Result<Option<BlockNumber>, DatadirError> {
        check_rel(rel).map_err(|d| self.invalid_request(lsn, d))?;
        if let Some(cached) = self.cached_rel_size(rel, lsn) {
            return Ok(cached);
        }
        let key = Key::rel_size(rel);
        match self.get_optional(key, lsn)? {
            None => Ok(None),
            Some(v) => decode_size(&v).map(Some).map_err(|d| self.corrupt("relation size", key, lsn, d)),
        }
    }

    /// Whether `rel` exists at `lsn` (is listed in its database's relation directory).
    pub fn get_rel_exists(&self, rel: RelTag, lsn: Lsn) -> Result<bool, DatadirError> {
        check_rel(rel).map_err(|d| self.invalid_request(lsn, d))?;
        let dir = self.rel_dir(rel.spcnode, rel.dbnode, lsn)?;
        Ok(dir.is_some_and(|d| d.contains(&(rel.relnode, rel.forknum))))
    }

    fn rel_dir(&self, spcnode: Oid, dbnode: Oid, lsn: Lsn) -> Result<Option<BTreeSet<(Oid, u8)>>, DatadirError> {
        let key = Key::rel_dir(spcnode, dbnode);
        self.get_optional(key, lsn)?
            .map(|v| decode_dir(&v).map_err(|d| self.corrupt("relation directory", key, lsn, d)))
            .transpose()
    }

    /// Every relation fork of database (`spcnode`, `dbnode`) at `lsn`; empty if the database
    /// does not exist.
    pub fn list_rels(&self, spcnode: Oid, dbnode: Oid, lsn: Lsn) -> Result<BTreeSet<RelTag>, DatadirError> {
        let dir = self.rel_dir(spcnode, dbnode, lsn)?.unwrap_or_default();
        Ok(dir.into_iter().map(|(relnode, forknum)| RelTag { spcnode, dbnode, relnode, forknum }).collect())
    }

    /// Every database as (spcnode, dbnode), including `(1664, 0)` for the shared catalogs and
    /// `(spcnode, 0)` for each user tablespace.
    pub fn list_dbdirs(&self, lsn: Lsn) -> Result<BTreeSet<(Oid, Oid)>, DatadirError> {
        let key = Key::dbdir();
        match self.get_optional(key, lsn)? {
            None => Ok(BTreeSet::new()),
            Some(v) => decode_dir(&v).map_err(|d| self.corrupt("database directory", key, lsn, d)),
        }
    }

    /// Size in bytes of every relation fork of a database (`pg_database_size` without the
    /// non-relation files).
    pub fn get_db_size(&self, spcnode: Oid, dbnode: Oid, lsn: Lsn) -> Result<u64, DatadirError> {
        let mut total_blocks = 0u64;
        for rel in self.list_rels(spcnode, dbnode, lsn)? {
            total_blocks += u64::from(self.get_rel_size(rel, lsn)?);
        }
        Ok(total_blocks * BLCKSZ as u64)
    }

    /// The pages of SLRU segment `segno`, concatenated (what the segment file holds).
    pub fn get_slru_segment(&self, kind: SlruKind, segno: u32, lsn: Lsn) -> Result<Bytes, DatadirError> {
        let nblocks = self.get_slru_segment_size(kind, segno, lsn)?;
        let mut out = BytesMut::with_capacity(nblocks as usize * BLCKSZ);
        for blkno in 0..nblocks {
            out.extend_from_slice(&self.get_slru_page_at_lsn(kind, segno, blkno, lsn)?);
        }
        Ok(out.freeze())
    }

    /// Page `blkno` of SLRU segment `segno`; a page inside the segment that was never written
    /// reads as zeros.
    pub fn get_slru_page_at_lsn(
        &self,
        kind: SlruKind,
        segno: u32,
        blkno: BlockNumber,
        lsn: Lsn,
    ) -> Result<Bytes, DatadirError> {
        if blkno == INVALID_BLOCK_NUMBER {
            return Err(self.invalid_request(lsn, format!("SLRU page number {blkno} is invalid")));
        }
        match self.get(Key::slru_block(kind, segno, blkno), lsn) {
            Ok(page) => Ok(page),
            Err(e) if e.is_missing() => Ok(zero_page()),
            Err(e) => Err(e.into()),
        }
    }

    /// Number of pages in SLRU segment `segno`; `NotFound` if the segment does not exist.
    pub fn get_slru_segment_size(&self, kind: SlruKind, segno: u32, lsn: Lsn) -> Result<BlockNumber, DatadirError> {
        let key = Key::slru_segment_size(kind, segno);
        match self.get_optional(key, lsn)? {
            None => Err(self.not_found(format!("{} segment {segno:04X}", kind.dir_name()), lsn)),
            Some(v) => decode_size(&v).map_err(|d| self.corrupt("SLRU segment size", key, lsn, d)),
        }
    }

    /// Segment numbers of one SLRU.
    pub fn list_slru_segments(&self, kind: SlruKind, lsn: Lsn) -> Result<BTreeSet<u32>, DatadirError> {
        let key = Key::slru_dir(kind);
        match self.get_optional(key, lsn)? {
            None => Ok(BTreeSet::new()),
            Some(v) => Ok(decode_dir::<SegNo>(&v)
                .map_err(|d| self.corrupt("SLRU directory", key, lsn, d))?
                .into_iter()
                .map(|s| s.0)
                .collect()),
        }
    }

    /// Xids of the prepared transactions at `lsn`.
    pub fn list_twophase_files(&self, lsn: Lsn) -> Result<BTreeSet<TransactionId>, DatadirError> {
        let key = Key::twophase_dir();
        match self.get_optional(key, lsn)? {
            None => Ok(BTreeSet::new()),
            Some(v) => Ok(decode_dir::<Xid>(&v)
                .map_err(|d| self.corrupt("twophase directory", key, lsn, d))?
                .into_iter()
                .map(|x| x.0)
                .collect()),
        }
    }

    /// The two-phase state of prepared transaction `xid`, without the crc32c that the file in
    /// `pg_twophase/` carries at its end.
    pub fn get_twophase_file(&self, xid: TransactionId, lsn: Lsn) -> Result<Bytes, DatadirError> {
        self.get_optional(Key::twophase_file(xid), lsn)?
            .ok_or_else(|| self.not_found(format!("two-phase state of transaction {xid}"), lsn))
    }

    /// The `pg_filenode.map` of database (`spcnode`, `dbnode`); `(1664, 0)` for the shared map.
    pub fn get_relmap_file(&self, spcnode: Oid, dbnode: Oid, lsn: Lsn) -> Result<Bytes, DatadirError> {
        self.get_optional(Key::relmap_file(spcnode, dbnode), lsn)?
            .ok_or_else(|| self.not_found(format!("relation map of database {spcnode}/{dbnode}"), lsn))
    }

    /// `global/pg_control` as last imported or updated by ingest.
    pub fn get_control_file(&self, lsn: Lsn) -> Result<Bytes, DatadirError> {
        self.get_optional(Key::controlfile(), lsn)?.ok_or_else(|| self.not_found("pg_control".to_string(), lsn))
    }

    /// The encoded `CheckPoint` kept up to date by ingest (next xid, next oid, ...).
    pub fn get_checkpoint(&self, lsn: Lsn) -> Result<Bytes, DatadirError> {
        self.get_optional(Key::checkpoint(), lsn)?.ok_or_else(|| self.not_found("checkpoint".to_string(), lsn))
    }

    /// Every key that holds data at `lsn`, as sorted, non-overlapping key ranges (each one key,
    /// or blocks of one relation fork or SLRU segment): what an image
    /// layer at `lsn` must contain. Keys outside it (blocks of dropped or truncated relations,
    /// removed SLRU segments) are garbage: an image layer leaves them out and, once GC drops the
    /// older layers, they are gone. The ranges may include keys that were never written (a
    /// metadata key not set yet, an SLRU page never written); readers skip those.
    pub fn collect_keyspace(&self, lsn: Lsn) -> Result<Vec<crate::key::KeyRange>, DatadirError> {
        use crate::key::KeyRange;
        let mut ranges: Vec<KeyRange> = vec![KeyRange::single(Key::dbdir())];
        for (spcnode, dbnode) in self.list_dbdirs(lsn)? {
            ranges.push(KeyRange::single(Key::relmap_file(spcnode, dbnode)));
            ranges.push(KeyRange::single(Key::rel_dir(spcnode, dbnode)));
            for rel in self.list_rels(spcnode, dbnode, lsn)? {
                let nblocks = self.get_rel_size(rel, lsn)?;
                if nblocks > 0 {
                    ranges.push(KeyRange::new(Key::rel_block(rel, 0), Key::rel_block(rel, nblocks)));
                }
                ranges.push(KeyRange::single(Key::rel_size(rel)));
            }
        }
        for kind in [SlruKind::Clog, SlruKind::MultiXactOffsets, SlruKind::MultiXactMembers] {
            ranges.push(KeyRange::single(Key::slru_dir(kind)));
            for segno in self.list_slru_segments(kind, lsn)? {
                let nblocks = self.get_slru_segment_size(kind, segno, lsn)?;
                if nblocks > 0 {
                    ranges.push(KeyRange::new(Key::slru_block(kind, segno, 0), Key::slru_block(kind, segno, nblocks)));
                }
                ranges.push(KeyRange::single(Key::slru_segment_size(kind, segno)));
            }
        }
        ranges.push(KeyRange::single(Key::twophase_dir()));
        for xid in self.list_twophase_files(lsn)? {
            ranges.push(KeyRange::single(Key::twophase_file(xid)));
        }
        for key in [Key::controlfile(), Key::checkpoint(), Key::last_commit(), Key::standby_start()] {
            ranges.push(KeyRange::single(key));
        }
        // Each range is one key or a run of blocks of one relation fork or SLRU segment; they
        // are kept apart (not merged when adjacent) so every range stays within one key prefix.
        ranges.sort_by_key(|r| (r.start, r.end));
        ranges.dedup();
        Ok(ranges)
    }

    /// The latest commit at or below `lsn` (here or in an ancestor); `None` before any commit.
    /// The latest running-xacts record at or below `lsn`, where a hot standby can start.
    pub fn get_standby_start(&self, lsn: Lsn) -> Result<Option<StandbyStart>, DatadirError> {
        let key = Key::standby_start();
        self.get_optional(key, lsn)?
            .map(|v| StandbyStart::decode(&v).map_err(|d| self.corrupt("standby start", key, lsn, d)))
            .transpose()
    }

    pub fn get_last_commit(&self, lsn: Lsn) -> Result<Option<LastCommit>, DatadirError> {
        let key = Key::last_commit();
        self.get_optional(key, lsn)?
            .map(|v| LastCommit::decode(&v).map_err(|d| self.corrupt("last commit", key, lsn, d)))
            .transpose()
    }

    /// The start LSN of the record ending at `lsn` (the `xl_prev` a backup or branch starting
    /// at `lsn` needs), when the timeline knows it: at its last record, and at the end of any
    /// commit record (from [`LastCommit`]), which is where [`Timeline::find_lsn_by_timestamp`]
    /// points. `None` otherwise, or if the lookup fails.
    pub fn get_prev_record_lsn_at(&self, lsn: Lsn) -> Option<Lsn> {
        let record = self.last_record_lsn();
        if lsn == record.last && record.prev.is_some() {
            return record.prev;
        }
        match self.get_last_commit(lsn) {
            Ok(Some(c)) if c.end_lsn == lsn => Some(c.start_lsn),
            _ => None,
        }
    }

    /// The LSN at which the database looked as it did at time `timestamp`: the end of the last
    /// commit record whose (running maximum) commit timestamp is at or before it.
    ///
    /// How: every commit rewrites [`Key::last_commit`] at the commit record's end LSN, so
    /// reading that key at any LSN gives the latest commit at or below it, and its running
    /// maximum timestamp only grows with the LSN. A binary search over 8-byte-aligned LSNs
    /// between the initdb LSN (or GC cutoff) and the last record LSN finds the last LSN whose
    /// latest commit is not after `timestamp`: about log2(WAL bytes / 8) reads of one key.
    ///
    /// The maximum (not each commit's own timestamp) is what makes the search well defined:
    /// Postgres takes the commit time before inserting the commit record, so concurrent commits
    /// can reach the WAL slightly out of timestamp order. With it, the answer is the end of the
    /// longest WAL prefix whose commits all happened at or before `timestamp`.
    pub fn find_lsn_by_timestamp(&self, timestamp: TimestampTz) -> Result<LsnForTimestamp, DatadirError> {
        let last = self.get_last_record_lsn();
        let floor = self.initdb_lsn().max(self.get_latest_gc_cutoff_lsn());
        let Some(newest) = self.get_last_commit(last)? else {
            return Ok(LsnForTimestamp::NoData(last));
        };
        if newest.max_timestamp <= timestamp {
            return Ok(LsnForTimestamp::Future(last));
        }
        let not_after = |lsn: Lsn| -> Result<bool, DatadirError> {
            Ok(self.get_last_commit(lsn)?.is_none_or(|c| c.max_timestamp <= timestamp))
        };
        if floor >= last || !not_after(floor)? {
            return Ok(LsnForTimestamp::Past(floor));
        }
        // Invariant: not_after(lo) && !not_after(hi). Probes are 8-byte aligned (records are).
        let (mut lo, mut hi) = (floor.0, last.0);
        while hi - lo > 8 {
            let mut mid = (lo + (hi - lo) / 2) & !7;
            if mid <= lo {
                mid = (lo + 8) & !7;
            }
            debug_assert!(lo < mid && mid < hi);
            if not_after(Lsn(mid))? {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let lsn = Lsn(lo);
        Ok(match self.get_last_commit(lsn)? {
            None => LsnForTimestamp::Past(floor),
            Some(c) => LsnForTimestamp::Present(c.end_lsn),
        })
    }
}

// --- write side

/// The changes of one WAL record (or one import), written at one LSN by
/// [`DatadirModification::commit`]. Reads through the modification see its own pending
/// changes on top of the timeline at `last_record_lsn`, so read-modify-write of directories
/// works within one record. Metadata keys are always written as whole images.
pub struct DatadirModification<'a> {
    tl: &'a Timeline,
    pending: BTreeMap<Key, Value>,
}

impl<'a> DatadirModification<'a> {
    pub fn new(tl: &'a Timeline) -> DatadirModification<'a> {
        DatadirModification { tl, pending: BTreeMap::new() }
    }

    pub fn timeline(&self) -> &'a Timeline {
        self.tl
    }

    /// Number of pending changes.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Drops the pending changes (after a failure half-way through a record).
    pub fn discard(&mut self) {
        self.pending.clear();
    }

    /// The LSN reads see: the state before this modification.
    fn read_lsn(&self) -> Lsn {
        self.tl.get_last_record_lsn()
    }

    fn invalid(&self, detail: String) -> DatadirError {
        DatadirError::InvalidChange { lsn: self.read_lsn(), timeline_id: self.tl.timeline_id(), detail }
    }

    /// A metadata value, pending changes first; `None` if absent or dropped.
    fn get(&self, key: Key) -> Result<Option<Bytes>, DatadirError> {
        match self.pending.get(&key) {
            Some(Value::Image(img)) => Ok((!img.is_empty()).then(|| img.clone())),
            Some(Value::WalRecord(_)) => {
                Err(self.invalid(format!("key {key} has a pending WAL record; only images can be read back")))
            }
            None => self.tl.get_optional(key, self.read_lsn()),
        }
    }

    fn put(&mut self, key: Key, value: Value) -> Result<(), DatadirError> {
        match self.pending.get(&key) {
            Some(Value::WalRecord(_)) | Some(Value::Image(_)) if !value.is_image() => Err(self.invalid(format!(
                "two changes to key {key} in one modification, the second a WAL record; one record changes a key once"
            ))),
            Some(Value::WalRecord(_)) => Err(self.invalid(format!(
                "key {key} gets an image after a WAL record in one modification; one record changes a key once"
            ))),
            _ => {
                self.pending.insert(key, value);
                Ok(())
            }
        }
    }

    fn decode_pending_dir<T: DirEntry>(&self, key: Key, what: &str) -> Result<Option<BTreeSet<T>>, DatadirError> {
        let lsn = self.read_lsn();
        self.get(key)?.map(|v| decode_dir(&v).map_err(|d| self.tl.corrupt(what, key, lsn, d))).transpose()
    }

    /// Writes empty directories (databases, twophase, each SLRU): the state of a timeline
    /// before an import.
    pub fn init_empty(&mut self) -> Result<(), DatadirError> {
        self.put(Key::dbdir(), Value::Image(encode_dir::<(Oid, Oid)>(&BTreeSet::new())))?;
        self.put(Key::twophase_dir(), Value::Image(encode_dir::<Xid>(&BTreeSet::new())))?;
        for kind in [SlruKind::Clog, SlruKind::MultiXactOffsets, SlruKind::MultiXactMembers] {
            self.put(Key::slru_dir(kind), Value::Image(encode_dir::<SegNo>(&BTreeSet::new())))?;
        }
        Ok(())
    }

    // --- pending-aware reads for ingest

    /// Size of `rel` including pending changes; `None` if it does not exist.
    pub fn rel_size(&self, rel: RelTag) -> Result<Option<BlockNumber>, DatadirError> {
        check_rel(rel).map_err(|d| self.invalid(d))?;
        let key = Key::rel_size(rel);
        if let Some(Value::Image(img)) = self.pending.get(&key) {
            if img.is_empty() {
                return Ok(None);
            }
            return decode_size(img).map(Some).map_err(|d| self.tl.corrupt("relation size", key, self.read_lsn(), d));
        }
        self.tl.rel_size_opt(rel, self.read_lsn())
    }

    pub fn dbdir(&self) -> Result<BTreeSet<(Oid, Oid)>, DatadirError> {
        Ok(self.decode_pending_dir(Key::dbdir(), "database directory")?.unwrap_or_default())
    }

    /// Relation forks of a database, including pending changes.
    pub fn list_rels(&self, spcnode: Oid, dbnode: Oid) -> Result<BTreeSet<RelTag>, DatadirError> {
        let dir: BTreeSet<(Oid, u8)> =
            self.decode_pending_dir(Key::rel_dir(spcnode, dbnode), "relation directory")?.unwrap_or_default();
        Ok(dir.into_iter().map(|(relnode, forknum)| RelTag { spcnode, dbnode, relnode, forknum }).collect())
    }

    pub fn list_slru_segments(&self, kind: SlruKind) -> Result<BTreeSet<u32>, DatadirError> {
        let dir: BTreeSet<SegNo> = self.decode_pending_dir(Key::slru_dir(kind), "SLRU directory")?.unwrap_or_default();
        Ok(dir.into_iter().map(|s| s.0).collect())
    }

    /// Pages in SLRU segment `segno`, including pending changes; `None` if it does not exist.
    pub fn slru_segment_size(&self, kind: SlruKind, segno: u32) -> Result<Option<BlockNumber>, DatadirError> {
        let key = Key::slru_segment_size(kind, segno);
        let lsn = self.read_lsn();
        self.get(key)?
            .map(|v| decode_size(&v).map_err(|d| self.tl.corrupt("SLRU segment size", key, lsn, d)))
            .transpose()
    }

    pub fn list_twophase_files(&self) -> Result<BTreeSet<TransactionId>, DatadirError> {
        let dir: BTreeSet<Xid> =
            self.decode_pending_dir(Key::twophase_dir(), "twophase directory")?.unwrap_or_default();
        Ok(dir.into_iter().map(|x| x.0).collect())
    }

    // --- databases

    /// Adds database (`spcnode`, `dbnode`) with an empty relation directory; a no-op if it
    /// exists (redo of a database creation also tolerates an existing directory).
    pub fn put_db_creation(&mut self, spcnode: Oid, dbnode: Oid) -> Result<(), DatadirError> {
        let mut dbdir = self.dbdir()?;
        if !dbdir.insert((spcnode, dbnode)) {
            return Ok(());
        }
        self.put(Key::dbdir(), Value::Image(encode_dir(&dbdir)))?;
        self.put(Key::rel_dir(spcnode, dbnode), Value::Image(encode_dir::<(Oid, u8)>(&BTreeSet::new())))
    }

    /// Drops database (`spcnode`, `dbnode`): every relation in it, its relation directory, its
    /// relation map and its directory entry. A no-op if it does not exist.
    pub fn put_db_drop(&mut self, spcnode: Oid, dbnode: Oid) -> Result<(), DatadirError> {
        for rel in self.list_rels(spcnode, dbnode)? {
            self.put(Key::rel_size(rel), Value::Image(Bytes::new()))?;
        }
        let tombstone = || Value::Image(Bytes::new());
        if self.get(Key::rel_dir(spcnode, dbnode))?.is_some() {
            self.put(Key::rel_dir(spcnode, dbnode), tombstone())?;
        }
        if self.get(Key::relmap_file(spcnode, dbnode))?.is_some() {
            self.put(Key::relmap_file(spcnode, dbnode), tombstone())?;
        }
        let mut dbdir = self.dbdir()?;
        if dbdir.remove(&(spcnode, dbnode)) {
            self.put(Key::dbdir(), Value::Image(encode_dir(&dbdir)))?;
        }
        Ok(())
    }

    /// Adds user tablespace `spcnode`: the database directory entry (`spcnode`, 0), which says the
    /// tablespace's folder exists even while no database has a directory in it (as the global
    /// tablespace's entry (1664, 0) does). A no-op if it exists.
    pub fn put_tablespace_creation(&mut self, spcnode: Oid) -> Result<(), DatadirError> {
        if spcnode == GLOBALTABLESPACE_OID || spcnode == DEFAULTTABLESPACE_OID {
            return Err(self.invalid(format!("tablespace {spcnode} is created but is a built-in tablespace")));
        }
        let mut dbdir = self.dbdir()?;
        if dbdir.insert((spcnode, 0)) {
            self.put(Key::dbdir(), Value::Image(encode_dir(&dbdir)))?;
        }
        Ok(())
    }

    /// Drops user tablespace `spcnode` and every database directory left in it (Postgres drops a
    /// tablespace only when no relation is in it, and its redo removes the empty folders).
    pub fn put_tablespace_drop(&mut self, spcnode: Oid) -> Result<(), DatadirError> {
        let dbs: Vec<Oid> = self.dbdir()?.iter().filter(|(s, d)| *s == spcnode && *d != 0).map(|(_, d)| *d).collect();
        for dbnode in dbs {
            self.put_db_drop(spcnode, dbnode)?;
        }
        let mut dbdir = self.dbdir()?;
        if dbdir.remove(&(spcnode, 0)) {
            self.put(Key::dbdir(), Value::Image(encode_dir(&dbdir)))?;
        }
        Ok(())
    }

    /// Stores the `pg_filenode.map` of a database, creating the database entry if needed
    /// (a `WAL_LOG` database creation logs its map right after the creation record).
    pub fn put_relmap_file(&mut self, spcnode: Oid, dbnode: Oid, img: Bytes) -> Result<(), DatadirError> {
        if img.is_empty() {
            return Err(self.invalid(format!("empty relation map for database {spcnode}/{dbnode}")));
        }
        self.put_db_creation(spcnode, dbnode)?;
        self.put(Key::relmap_file(spcnode, dbnode), Value::Image(img))
    }

    // --- relations

    /// Creates relation fork `rel` with `nblocks` blocks (their contents come separately),
    /// creating its database entry if needed, as redo of `smgrcreate` creates the directory.
    pub fn put_rel_creation(&mut self, rel: RelTag, nblocks: BlockNumber) -> Result<(), DatadirError> {
        check_rel(rel).map_err(|d| self.invalid(d))?;
        self.put_db_creation(rel.spcnode, rel.dbnode)?;
        let dir_key = Key::rel_dir(rel.spcnode, rel.dbnode);
        let mut dir: BTreeSet<(Oid, u8)> = self.decode_pending_dir(dir_key, "relation directory")?.unwrap_or_default();
        if !dir.insert((rel.relnode, rel.forknum)) {
            return Err(self.invalid(format!("relation {rel} is created but already exists")));
        }
        self.put(dir_key, Value::Image(encode_dir(&dir)))?;
        self.put(Key::rel_size(rel), Value::Image(encode_size(nblocks)))
    }

    /// Grows `rel` to `nblocks` blocks.
    pub fn put_rel_extend(&mut self, rel: RelTag, nblocks: BlockNumber) -> Result<(), DatadirError> {
        let current = self
            .rel_size(rel)?
            .ok_or_else(|| self.invalid(format!("relation {rel} is extended but does not exist")))?;
        if nblocks < current {
            return Err(self.invalid(format!("relation {rel} is extended to {nblocks} blocks but has {current}")));
        }
        if nblocks > current {
            self.put(Key::rel_size(rel), Value::Image(encode_size(nblocks)))?;
        }
        Ok(())
    }

    /// Shrinks `rel` to `nblocks` blocks (a no-op if it is not larger). The blocks beyond stay
    /// in older layers but read as zeros (beyond the size) from now on.
    pub fn put_rel_truncation(&mut self, rel: RelTag, nblocks: BlockNumber) -> Result<(), DatadirError> {
        let current = self
            .rel_size(rel)?
            .ok_or_else(|| self.invalid(format!("relation {rel} is truncated but does not exist")))?;
        if nblocks < current {
            self.put(Key::rel_size(rel), Value::Image(encode_size(nblocks)))?;
        }
        Ok(())
    }

    /// Drops relation fork `rel`; a no-op if it does not exist.
    pub fn put_rel_drop(&mut self, rel: RelTag) -> Result<(), DatadirError> {
        check_rel(rel).map_err(|d| self.invalid(d))?;
        let dir_key = Key::rel_dir(rel.spcnode, rel.dbnode);
        let Some(mut dir) = self.decode_pending_dir::<(Oid, u8)>(dir_key, "relation directory")? else {
            return Ok(());
        };
        if dir.remove(&(rel.relnode, rel.forknum)) {
            self.put(dir_key, Value::Image(encode_dir(&dir)))?;
            self.put(Key::rel_size(rel), Value::Image(Bytes::new()))?;
        }
        Ok(())
    }

    /// A full 8 KiB image of block `blkno` of `rel`. Does not change the size: the caller
    /// extends first if needed.
    pub fn put_rel_page_image(&mut self, rel: RelTag, blkno: BlockNumber, img: Bytes) -> Result<(), DatadirError> {
        check_rel(rel).map_err(|d| self.invalid(d))?;
        if img.len() != BLCKSZ {
            return Err(
                self.invalid(format!("page image for block {blkno} of {rel} is {} bytes, not {BLCKSZ}", img.len()))
            );
        }
        if blkno == INVALID_BLOCK_NUMBER {
            return Err(self.invalid(format!("block number {blkno} of {rel} is invalid")));
        }
        self.put(Key::rel_block(rel, blkno), Value::Image(img))
    }

    /// A WAL record to apply to block `blkno` of `rel`.
    pub fn put_rel_wal_record(&mut self, rel: RelTag, blkno: BlockNumber, rec: WalRecord) -> Result<(), DatadirError> {
        check_rel(rel).map_err(|d| self.invalid(d))?;
        if blkno == INVALID_BLOCK_NUMBER {
            return Err(self.invalid(format!("block number {blkno} of {rel} is invalid")));
        }
        self.put(Key::rel_block(rel, blkno), Value::WalRecord(rec))
    }

    // --- SLRUs

    /// Creates SLRU segment `segno` with `nblocks` pages.
    pub fn put_slru_segment_creation(
        &mut self,
        kind: SlruKind,
        segno: u32,
        nblocks: BlockNumber,
    ) -> Result<(), DatadirError> {
        let dir_key = Key::slru_dir(kind);
        let mut dir: BTreeSet<SegNo> = self.decode_pending_dir(dir_key, "SLRU directory")?.unwrap_or_default();
        if !dir.insert(SegNo(segno)) {
            return Err(self.invalid(format!("{} segment {segno:04X} is created but already exists", kind.dir_name())));
        }
        self.put(dir_key, Value::Image(encode_dir(&dir)))?;
        self.put(Key::slru_segment_size(kind, segno), Value::Image(encode_size(nblocks)))
    }

    /// Grows SLRU segment `segno` to `nblocks` pages.
    pub fn put_slru_extend(&mut self, kind: SlruKind, segno: u32, nblocks: BlockNumber) -> Result<(), DatadirError> {
        let current = self.slru_segment_size(kind, segno)?.ok_or_else(|| {
            self.invalid(format!("{} segment {segno:04X} is extended but does not exist", kind.dir_name()))
        })?;
        if nblocks > current {
            self.put(Key::slru_segment_size(kind, segno), Value::Image(encode_size(nblocks)))?;
        }
        Ok(())
    }

    pub fn put_slru_page_image(
        &mut self,
        kind: SlruKind,
        segno: u32,
        blkno: BlockNumber,
        img: Bytes,
    ) -> Result<(), DatadirError> {
        if img.len() != BLCKSZ {
            return Err(self.invalid(format!(
                "{} segment {segno:04X} page {blkno}: image is {} bytes, not {BLCKSZ}",
                kind.dir_name(),
                img.len()
            )));
        }
        self.put(Key::slru_block(kind, segno, blkno), Value::Image(img))
    }

    pub fn put_slru_wal_record(
        &mut self,
        kind: SlruKind,
        segno: u32,
        blkno: BlockNumber,
        rec: WalRecord,
    ) -> Result<(), DatadirError> {
        self.put(Key::slru_block(kind, segno, blkno), Value::WalRecord(rec))
    }

    /// Drops SLRU segment `segno`; a no-op if it does not exist.
    pub fn drop_slru_segment(&mut self, kind: SlruKind, segno: u32) -> Result<(), DatadirError> {
        let dir_key = Key::slru_dir(kind);
        let mut dir: BTreeSet<SegNo> = self.decode_pending_dir(dir_key, "SLRU directory")?.unwrap_or_default();
        if dir.remove(&SegNo(segno)) {
            self.put(dir_key, Value::Image(encode_dir(&dir)))?;
            self.put(Key::slru_segment_size(kind, segno), Value::Image(Bytes::new()))?;
        }
        Ok(())
    }

    // --- twophase, control file, checkpoint

    /// Stores the two-phase state of prepared transaction `xid` (without the file's crc32c).
    pub fn put_twophase_file(&mut self, xid: TransactionId, img: Bytes) -> Result<(), DatadirError> {
        if img.is_empty() {
            return Err(self.invalid(format!("empty two-phase state for transaction {xid}")));
        }
        let mut dir: BTreeSet<Xid> =
            self.decode_pending_dir(Key::twophase_dir(), "twophase directory")?.unwrap_or_default();
        if dir.insert(Xid(xid)) {
            self.put(Key::twophase_dir(), Value::Image(encode_dir(&dir)))?;
        }
        self.put(Key::twophase_file(xid), Value::Image(img))
    }

    /// Removes the two-phase state of `xid`; a no-op if there is none.
    pub fn drop_twophase_file(&mut self, xid: TransactionId) -> Result<(), DatadirError> {
        let mut dir: BTreeSet<Xid> =
            self.decode_pending_dir(Key::twophase_dir(), "twophase directory")?.unwrap_or_default();
        if dir.remove(&Xid(xid)) {
            self.put(Key::twophase_dir(), Value::Image(encode_dir(&dir)))?;
            self.put(Key::twophase_file(xid), Value::Image(Bytes::new()))?;
        }
        Ok(())
    }

    pub fn put_control_file(&mut self, img: Bytes) -> Result<(), DatadirError> {
        if img.is_empty() {
            return Err(self.invalid("empty pg_control".to_string()));
        }
        self.put(Key::controlfile(), Value::Image(img))
    }

    pub fn put_checkpoint(&mut self, img: Bytes) -> Result<(), DatadirError> {
        if img.is_empty() {
            return Err(self.invalid("empty checkpoint".to_string()));
        }
        self.put(Key::checkpoint(), Value::Image(img))
    }

    /// Records `commit` as the latest commit (written at the commit record's end LSN).
    pub fn put_standby_start(&mut self, start: &StandbyStart) -> Result<(), DatadirError> {
        self.put(Key::standby_start(), Value::Image(start.encode()))
    }

    pub fn put_last_commit(&mut self, commit: &LastCommit) -> Result<(), DatadirError> {
        self.put(Key::last_commit(), Value::Image(commit.encode()))
    }

    // --- commit

    /// Writes every pending change at `lsn` and advances the timeline's `last_record_lsn` to it
    /// (the start of the record that ends there is unknown: see [`Self::commit_record`]).
    pub fn commit(&mut self, lsn: Lsn) -> Result<(), DatadirError> {
        self.commit_inner(lsn, None)
    }

    /// Like [`Self::commit`] for the WAL record spanning `start_lsn..end_lsn`, which becomes
    /// the timeline's `prev_record_lsn`.
    pub fn commit_record(&mut self, start_lsn: Lsn, end_lsn: Lsn) -> Result<(), DatadirError> {
        self.commit_inner(end_lsn, Some(start_lsn))
    }

    fn commit_inner(&mut self, lsn: Lsn, start_lsn: Option<Lsn>) -> Result<(), DatadirError> {
        let mut writer = self.tl.writer();
        // All puts share one LSN, so the first fails (LSN order) before anything is written.
        for (key, value) in std::mem::take(&mut self.pending) {
            writer.put(key, lsn, value)?;
        }
        writer.finish_write(lsn, start_lsn)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::timeline::tests::{resources, TENANT, TIMELINE};
    use postgres_ffi::reltag::{FSM_FORKNUM, MAIN_FORKNUM};
    use std::sync::Arc;

    fn rel(db: Oid, relnode: Oid, fork: u8) -> RelTag {
        RelTag { spcnode: 1663, dbnode: db, relnode, forknum: fork }
    }

    fn page(fill: u8) -> Bytes {
        Bytes::from(vec![fill; BLCKSZ])
    }

    fn timeline(dir: &std::path::Path) -> Arc<Timeline> {
        Timeline::create_empty(dir, TENANT, TIMELINE, Lsn(0x10), 15, resources(1 << 20)).expect("create")
    }

    #[test]
    fn directory_encoding() {
        let dbs: BTreeSet<(Oid, Oid)> = [(1663, 1), (1663, 5), (1664, 0)].into();
        let enc = encode_dir(&dbs);
        assert_eq!(decode_dir::<(Oid, Oid)>(&enc), Ok(dbs));
        let rels: BTreeSet<(Oid, u8)> = [(16384, 0), (16384, 1), (u32::MAX, 3)].into();
        assert_eq!(decode_dir::<(Oid, u8)>(&encode_dir(&rels)), Ok(rels));
        // Wrong kind, version, count, order; truncation: errors, never panics.
        assert!(decode_dir::<(Oid, u8)>(&enc).unwrap_err().contains("kind"));
        let mut v = enc.to_vec();
        v[0] = 9;
        assert!(decode_dir::<(Oid, Oid)>(&v).unwrap_err().contains("version"));
        for cut in 0..enc.len() {
            assert!(decode_dir::<(Oid, Oid)>(&enc[..cut]).is_err());
        }
        let mut unsorted = enc.to_vec();
        unsorted[6..14].copy_from_slice(&enc[14..22]);
        unsorted[14..22].copy_from_slice(&enc[6..14]);
        assert!(decode_dir::<(Oid, Oid)>(&unsorted).unwrap_err().contains("ascending"));
        assert!(decode_dir::<SegNo>(&encode_dir::<Xid>(&[Xid(1)].into())).is_err());
        assert_eq!(decode_size(&encode_size(77)), Ok(77));
        assert!(decode_size(&[1, 2, 3]).is_err());
    }

    #[test]
    fn relations_databases_and_friends() {
        let workdir = tempfile::tempdir().expect("tempdir");
        let tl = timeline(workdir.path());
        let r = rel(5, 16384, MAIN_FORKNUM);
        let fsm = rel(5, 16384, FSM_FORKNUM);

        let mut m = DatadirModification::new(&tl);
        m.init_empty().expect("init");
        m.put_relmap_file(1664, 0, Bytes::from_static(b"shared map")).expect("relmap");
        m.put_db_creation(1663, 5).expect("db");
        m.put_rel_creation(r, 2).expect("create");
        m.put_rel_page_image(r, 0, page(1)).expect("page");
        m.put_rel_page_image(r, 1, page(2)).expect("page");
        m.put_rel_creation(fsm, 0).expect("create fsm");
        assert!(m.put_rel_creation(r, 1).unwrap_err().to_string().contains("already exists"));
        m.put_slru_segment_creation(SlruKind::Clog, 0, 1).expect("slru");
        m.put_slru_page_image(SlruKind::Clog, 0, 0, page(3)).expect("slru page");
        m.put_twophase_file(700, Bytes::from_static(b"state")).expect("2pc");
        m.put_control_file(Bytes::from_static(b"control")).expect("control");
        m.put_checkpoint(Bytes::from_static(b"checkpoint")).expect("checkpoint");
        m.commit(Lsn(0x10)).expect("commit");
        let l1 = Lsn(0x10);

        assert_eq!(tl.list_dbdirs(l1).unwrap(), [(1663, 5), (1664, 0)].into());
        assert_eq!(tl.list_rels(1663, 5, l1).unwrap(), [r, fsm].into());
        assert!(tl.get_rel_exists(r, l1).unwrap() && !tl.get_rel_exists(rel(5, 1, 0), l1).unwrap());
        assert_eq!(tl.get_rel_size(r, l1).unwrap(), 2);
        assert_eq!(tl.get_rel_page_at_lsn(r, 1, l1).unwrap(), page(2));
        assert_eq!(tl.get_rel_page_at_lsn(r, 7, l1).unwrap(), zero_page(), "beyond the size: zeros");
        assert_eq!(tl.get_db_size(1663, 5, l1).unwrap(), 2 * BLCKSZ as u64);
        assert_eq!(tl.list_slru_segments(SlruKind::Clog, l1).unwrap(), [0].into());
        assert!(tl.list_slru_segments(SlruKind::MultiXactMembers, l1).unwrap().is_empty());
        assert_eq!(tl.get_slru_segment(SlruKind::Clog, 0, l1).unwrap(), page(3));
        assert_eq!(tl.list_twophase_files(l1).unwrap(), [700].into());
        assert_eq!(tl.get_twophase_file(700, l1).unwrap().as_ref(), b"state");
        assert_eq!(tl.get_relmap_file(1664, 0, l1).unwrap().as_ref(), b"shared map");
        assert_eq!(tl.get_control_file(l1).unwrap().as_ref(), b"control");
        assert_eq!(tl.get_checkpoint(l1).unwrap().as_ref(), b"checkpoint");
        let err = tl.get_rel_size(rel(5, 99, 0), l1).unwrap_err();
        assert!(err.is_not_found() && err.to_string().contains("1663/5/99"), "{err}");

        // Extend (implicitly: a block never written reads as zeros), truncate, 2PC end.
        let mut m = DatadirModification::new(&tl);
        m.put_rel_extend(r, 5).expect("extend");
        m.put_rel_page_image(r, 4, page(4)).expect("page");
        m.drop_twophase_file(700).expect("drop 2pc");
        m.put_slru_extend(SlruKind::Clog, 0, 3).expect("slru extend");
        m.commit(Lsn(0x20)).expect("commit");
        let l2 = Lsn(0x20);
        assert_eq!(tl.get_rel_size(r, l2).unwrap(), 5);
        assert_eq!(tl.get_rel_page_at_lsn(r, 3, l2).unwrap(), zero_page());
        assert_eq!(tl.get_rel_page_at_lsn(r, 4, l2).unwrap(), page(4));
        assert!(tl.list_twophase_files(l2).unwrap().is_empty());
        assert!(tl.get_twophase_file(700, l2).unwrap_err().is_not_found());
        assert_eq!(tl.get_slru_segment(SlruKind::Clog, 0, l2).unwrap().len(), 3 * BLCKSZ);

        let mut m = DatadirModification::new(&tl);
        m.put_rel_truncation(r, 1).expect("truncate");
        m.put_rel_drop(fsm).expect("drop fsm");
        m.drop_slru_segment(SlruKind::Clog, 0).expect("drop segment");
        m.commit(Lsn(0x30)).expect("commit");
        let l3 = Lsn(0x30);
        assert_eq!(tl.get_rel_size(r, l3).unwrap(), 1);
        assert_eq!(tl.get_rel_page_at_lsn(r, 1, l3).unwrap(), zero_page());
        assert_eq!(tl.list_rels(1663, 5, l3).unwrap(), [r].into());
        assert!(tl.get_rel_size(fsm, l3).unwrap_err().is_not_found());
        assert!(tl.list_slru_segments(SlruKind::Clog, l3).unwrap().is_empty());
        // History stays readable at older LSNs.
        assert_eq!(tl.get_rel_size(r, l2).unwrap(), 5);
        assert_eq!(tl.get_rel_size(fsm, l2).unwrap(), 0);

        let mut m = DatadirModification::new(&tl);
        m.put_db_drop(1663, 5).expect("drop db");
        m.commit(Lsn(0x40)).expect("commit");
        let l4 = Lsn(0x40);
        assert_eq!(tl.list_dbdirs(l4).unwrap(), [(1664, 0)].into());
        assert!(tl.list_rels(1663, 5, l4).unwrap().is_empty());
        assert!(tl.get_rel_size(r, l4).unwrap_err().is_not_found());
        assert_eq!(tl.get_db_size(1663, 5, l4).unwrap(), 0);
        assert_eq!(tl.list_rels(1663, 5, l3).unwrap(), [r].into());

        // The size cache agrees with the layers after a restart (where it starts empty).
        tl.checkpoint().expect("checkpoint");
        let dir = tl.dir().to_path_buf();
        drop(tl);
        let tl = Timeline::load(&dir, None, resources(1 << 20)).expect("reload");
        assert_eq!(tl.get_rel_size(r, l2).unwrap(), 5);
        assert!(tl.get_rel_size(r, l4).unwrap_err().is_not_found());
    }

    #[test]
    fn modification_rejects_contradictions() {
        let workdir = tempfile::tempdir().expect("tempdir");
        let tl = timeline(workdir.path());
        let mut m = DatadirModification::new(&tl);
        m.init_empty().expect("init");
        let r = rel(5, 16384, MAIN_FORKNUM);
        assert!(m.put_rel_extend(r, 3).unwrap_err().to_string().contains("does not exist"));
        assert!(m.put_rel_creation(rel(5, 0, 0), 0).unwrap_err().to_string().contains("relfilenode 0"));
        assert!(m.put_rel_page_image(r, 0, Bytes::from_static(b"short")).is_err());
        m.put_rel_creation(r, 3).expect("create");
        assert!(m.put_rel_extend(r, 2).is_err());
        let rec = WalRecord::Postgres { will_init: false, rec: Bytes::new() };
        m.put_rel_wal_record(r, 0, rec.clone()).expect("record");
        let err = m.put_rel_wal_record(r, 0, rec).unwrap_err();
        assert!(err.to_string().contains("one record changes a key once"), "{err}");
        assert!(m.put_rel_page_image(r, 0, page(1)).is_err());
    }
}
