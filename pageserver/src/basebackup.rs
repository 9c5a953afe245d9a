//! Basebackup: a timeline at an LSN as a tar stream of a Postgres data directory, from which
//! stock Postgres starts with no WAL replay (DESIGN D4).
//!
//! Two kinds ([`BackupKind`]):
//! - **Compute**: everything but relation data, which the compute reads page by page from the
//!   pageserver. Its size does not grow with the database (a few hundred KiB at most).
//! - **Full**: the same plus every relation fork with all its blocks (1 GiB segment files as
//!   Postgres names them), read at the LSN through the timeline's redo. Stock Postgres starts
//!   from it on its own: for tests, exports and the DESIGN §5 datadir oracle.
//!
//! Contents, in stream order:
//! - the directory skeleton Postgres needs, `PG_VERSION`, an empty `postgresql.conf`, a
//!   `pg_hba.conf` trusting local and loopback connections (replication included) and an empty
//!   `pg_ident.conf` — the compute's manager overwrites the configuration;
//! - per database: `base/<db>/` with `PG_VERSION` and `pg_filenode.map`; `global/pg_filenode.map`;
//! - unlogged relations: the init fork `<relnode>_init` and, as the main fork `<relnode>`, a
//!   copy of it. Postgres resets unlogged relations from their init forks only after crash
//!   recovery, and we start without one; the copy is what that reset would produce, so the
//!   relation starts empty. Their other forks are never shipped (their contents are not
//!   WAL-logged). Full backups add every other relation fork;
//! - SLRU segments (`pg_xact`, `pg_multixact/offsets`, `pg_multixact/members`) as stored, the
//!   segment holding the next xid / multixact / member offset padded with zero pages up to that
//!   page: `TrimCLOG` and `TrimMultiXact` read it at startup, and ingest rounds the stored
//!   `nextXid` up (walingest's `XID_CHECKPOINT_INTERVAL`), possibly onto a page Postgres never
//!   zeroed;
//! - `pg_twophase/<XID>` files (stored state + crc32c);
//! - `pg_wal/<segment>`: a zeroed segment holding one `CHECKPOINT_SHUTDOWN` record at the start
//!   LSN whose `xl_prev` is the record before it ([`shutdown_checkpoint_segments`]). Only the
//!   segment's first page (a plain long header) and the page(s) holding the record are
//!   non-zero: pages in between are left zero, as in D4's experiment and in Neon, because
//!   nothing reads them (Postgres and `pg_waldump -s` read the first page of the segment and
//!   the page holding the record). The segment is a GNU sparse tar entry, so the 16 MiB cost a
//!   few 512-byte blocks;
//! - `global/pg_control` last, so a cut-off stream never yields a startable directory:
//!   checkpoint location = the start LSN, `checkPointCopy` = the stored checkpoint with
//!   `redo` = the start LSN, timelines 1, no `oldestActiveXid` (as in every shutdown
//!   checkpoint), state shut down, no minimum recovery point, no backup fields, crc recomputed.
//!
//! The start LSN is the requested `lsn`, or just past the page header when `lsn` is at a page
//! boundary (where Postgres reports a record as ending). `prev_lsn` (the start of the record
//! ending at `lsn`) is known to the timeline only at its last record LSN; below that the caller
//! must pass it. Storing it per LSN is a possible extension.
//!
//! Not included: logical replication state (slots, origins, snapshots) and commit timestamps
//! (not stored by ingest), relcache init files and statistics (Postgres rebuilds them).
//! User tablespaces are folders under `pg_tblspc/` (Postgres's in-place
//! tablespaces), holding their databases' folders and relation maps.
//!
//! The stream is deterministic for a given timeline and LSN: entries in a fixed order, uid and
//! gid 0, files 0600, directories 0700, mtime = the stored checkpoint's time.

use std::collections::BTreeSet;
use std::io::{self, Read, Write};

use bytes::Bytes;
use postgres_ffi::controlfile::{ControlFileData, CATALOG_VERSION_NO};
use postgres_ffi::reltag::{INIT_FORKNUM, MAIN_FORKNUM};
use postgres_ffi::slru::{
    clog_xid_to_page, multixact_id_to_offsets_page, mx_offset_to_member_page, page_to_segment, segment_file_name,
    SlruKind,
};
use postgres_ffi::wal_writer::{shutdown_checkpoint_segments, standby_start_segments};
use postgres_ffi::xlog_file::xlog_file_name;
use postgres_ffi::xlog_page::{skip_page_header, XLogPageHeader};
use postgres_ffi::{
    BlockNumber, CheckPoint, DbState, Oid, RelTag, BLCKSZ, DEFAULTTABLESPACE_OID, GLOBALTABLESPACE_OID,
    PG_MAJORVERSION, WAL_SEGMENT_SIZE_MAX, WAL_SEGMENT_SIZE_MIN, XLOG_BLCKSZ,
};
use tar::{EntryType, GnuExtSparseHeader, Header};
use utils::{Lsn, TimelineId};

use crate::import_datadir::RELSEG_SIZE_BLOCKS;
use crate::pgdatadir_mapping::DatadirError;
use crate::tenant::timeline::Timeline;

/// What a basebackup carries besides the non-relation files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupKind {
    /// No relation data but the init forks of unlogged relations (DESIGN D4): a compute on our
    /// storage reads pages from the pageserver.
    Compute,
    /// Every relation fork with all its blocks: stock Postgres starts from it alone.
    Full,
}

/// What [`write_basebackup`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BasebackupStats {
    /// Bytes of the tar stream: headers, data, padding and the end-of-archive blocks.
    pub tar_size_bytes: u64,
    /// Regular files in the archive.
    pub file_count: u64,
    /// Directories in the archive.
    pub dir_count: u64,
    /// Apparent size of the relation files (unlogged init forks and their main-fork copies for
    /// a compute backup).
    pub relation_size_bytes: u64,
    /// Where `pg_control` points: the checkpoint record's start (the requested LSN, or just past
    /// the page header when that LSN is at a page boundary).
    pub checkpoint_lsn: Lsn,
    /// End of the checkpoint record: where the started Postgres writes its first record.
    pub next_record_lsn: Lsn,
}

/// Why no basebackup could be written. Every variant names the timeline and the LSN.
#[derive(Debug, thiserror::Error)]
pub enum BasebackupError {
    /// The request cannot be served as asked (LSN out of range, unknown previous record, ...).
    #[error("cannot take a basebackup of timeline {timeline_id} at LSN {lsn}: {reason}")]
    InvalidRequest { timeline_id: TimelineId, lsn: Lsn, reason: String },
    /// Reading the timeline failed.
    #[error("basebackup of timeline {timeline_id} at LSN {lsn}: reading {what}: {source}")]
    Read {
        timeline_id: TimelineId,
        lsn: Lsn,
        what: String,
        #[source]
        source: Box<DatadirError>,
    },
    /// The stored state cannot be turned into a data directory (a bug or corruption).
    #[error("basebackup of timeline {timeline_id} at LSN {lsn}: {what} cannot be used: {detail}")]
    Corrupt { timeline_id: TimelineId, lsn: Lsn, what: String, detail: String },
    /// Writing the stream failed (the receiver went away, disk full, ...).
    #[error("basebackup of timeline {timeline_id} at LSN {lsn}: writing the tar stream: {source}")]
    Io {
        timeline_id: TimelineId,
        lsn: Lsn,
        #[source]
        source: io::Error,
    },
}

/// Directories of a Postgres 15 data directory that must exist at startup, parents first.
const PGDATA_SUBDIRS: &[&str] = &[
    "global",
    "base",
    "pg_wal",
    "pg_wal/archive_status",
    "pg_xact",
    "pg_multixact",
    "pg_multixact/offsets",
    "pg_multixact/members",
    "pg_twophase",
    "pg_subtrans",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_stat",
    "pg_stat_tmp",
    "pg_tblspc",
    "pg_replslot",
    "pg_dynshmem",
    "pg_logical",
    "pg_logical/snapshots",
    "pg_logical/mappings",
    "pg_commit_ts",
];

const PG_HBA_CONF: &str = "\
# Written by the pageserver's basebackup; the compute's manager replaces it.
# TYPE  DATABASE        USER            ADDRESS                 METHOD
local   all             all                                     trust
host    all             all             127.0.0.1/32            trust
host    all             all             ::1/128                 trust
local   replication     all                                     trust
host    replication     all             127.0.0.1/32            trust
host    replication     all             ::1/128                 trust
";

const FILE_MODE: u32 = 0o600;
const DIR_MODE: u32 = 0o700;
/// Granularity of tar data, and of the holes of a sparse entry.
const TAR_BLOCK_SIZE_BYTES: usize = 512;

/// Writes a basebackup of `timeline` at `lsn` to `out` as a tar stream (see the module docs).
///
/// `lsn` must be a record boundary the timeline has reached (waiting for it, `wait_lsn`, is the
/// caller's job), at or above the initdb LSN and the GC cutoff. `prev_lsn` is the start LSN of
/// the record that ends at `lsn` (the new checkpoint record's `xl_prev`); `None` takes the
/// timeline's when `lsn` is its last record LSN (0/0 when the timeline does not know it: a branch
/// made at an LSN that ends no commit, before its own WAL), and is an error below it.
///
/// On error, part of the stream may have been written; the receiver must discard it (a
/// stream without `global/pg_control`, which comes last, cannot start Postgres).
pub fn write_basebackup<W: Write>(
    out: W,
    timeline: &Timeline,
    lsn: Lsn,
    prev_lsn: Option<Lsn>,
    kind: BackupKind,
) -> Result<BasebackupStats, BasebackupError> {
    let ctx = Ctx { timeline_id: timeline.timeline_id(), lsn };
    let prev_lsn = check_request(&ctx, timeline, lsn, prev_lsn)?;
    let (cf, cp) = read_control(&ctx, timeline)?;
    let seg_size_bytes = cf.xlog_seg_size as usize;
    let start_lsn = skip_page_header(lsn, seg_size_bytes);
    let mut checkpoint = cp;
    checkpoint.this_timeline_id = 1;
    checkpoint.prev_timeline_id = 1;
    checkpoint.oldest_active_xid = 0;
    let wal = shutdown_checkpoint_segments(start_lsn, prev_lsn, &checkpoint, cf.system_identifier, seg_size_bytes)
        .map_err(|e| ctx.invalid(format!("cannot write the checkpoint record at {start_lsn}: {e}")))?;
    let mut control = cf.clone();
    control.state = DbState::Shutdowned;
    control.checkpoint = start_lsn;
    control.checkpoint_copy = wal.checkpoint;
    let mut stats = write_tar(out, &ctx, timeline, kind, control, &cp, wal.segments, start_lsn)?;
    stats.checkpoint_lsn = start_lsn;
    stats.next_record_lsn = wal.end_lsn;
    Ok(stats)
}

/// Writes a basebackup for a hot standby (`standby.signal`, streaming from the safekeepers) to
/// `out`: the timeline's state just before its latest `XLOG_RUNNING_XACTS` record, that record,
/// and an online checkpoint whose redo pointer is the record (see
/// [`postgres_ffi::wal_writer::standby_start_segments`]). The standby's first replayed record
/// is the running-xacts record, so it takes queries at once; `stats.next_record_lsn` is where its
/// replay starts.
pub fn write_standby_basebackup<W: Write>(
    out: W,
    timeline: &Timeline,
    kind: BackupKind,
) -> Result<BasebackupStats, BasebackupError> {
    let last = timeline.get_last_record_lsn();
    let last_ctx = Ctx { timeline_id: timeline.timeline_id(), lsn: last };
    let start = timeline.get_standby_start(last).map_err(last_ctx.read("the standby start"))?.ok_or_else(|| {
        last_ctx.invalid(
            "the timeline has no running-transactions record yet, where a hot standby starts; a primary logs one at \
             every checkpoint and every 15 s while it writes: start (or wait for) the primary"
                .to_string(),
        )
    })?;
    let lsn = start.lsn;
    let ctx = Ctx { timeline_id: timeline.timeline_id(), lsn };
    check_request(&ctx, timeline, lsn, Some(Lsn::INVALID))?;
    let (cf, cp) = read_control(&ctx, timeline)?;
    let rx = postgres_ffi::record::decode_record(start.record.clone(), lsn)
        .and_then(|r| postgres_ffi::records::standby::parse_running_xacts(&r.main_data, lsn))
        .map_err(|e| ctx.corrupt("the stored running-xacts record", e.to_string()))?;
    let mut checkpoint = cp;
    checkpoint.this_timeline_id = 1;
    checkpoint.prev_timeline_id = 1;
    checkpoint.oldest_active_xid = rx.oldest_running_xid;
    let wal = standby_start_segments(lsn, &start.record, &checkpoint, cf.system_identifier, cf.xlog_seg_size as usize)
        .map_err(|e| ctx.corrupt("the stored running-xacts record", e.to_string()))?;
    let mut control = cf.clone();
    control.state = DbState::ShutdownedInRecovery;
    control.checkpoint = wal.checkpoint_lsn;
    control.checkpoint_copy = wal.checkpoint;
    let mut stats = write_tar(out, &ctx, timeline, kind, control, &cp, wal.segments, lsn)?;
    stats.checkpoint_lsn = wal.checkpoint_lsn;
    stats.next_record_lsn = lsn;
    Ok(stats)
}

/// The stored pg_control and checkpoint at the request's LSN, checked.
fn read_control(ctx: &Ctx, timeline: &Timeline) -> Result<(ControlFileData, CheckPoint), BasebackupError> {
    let lsn = ctx.lsn;
    let cf_bytes = timeline.get_control_file(lsn).map_err(ctx.read("pg_control"))?;
    let cf = ControlFileData::decode(&cf_bytes).map_err(|e| ctx.corrupt("the stored pg_control", e.to_string()))?;
    let cp_bytes = timeline.get_checkpoint(lsn).map_err(ctx.read("the checkpoint"))?;
    let cp = CheckPoint::decode(&cp_bytes, lsn).map_err(|e| ctx.corrupt("the stored checkpoint", e.to_string()))?;
    let seg_size_bytes = cf.xlog_seg_size as usize;
    if !seg_size_bytes.is_power_of_two() || !(WAL_SEGMENT_SIZE_MIN..=WAL_SEGMENT_SIZE_MAX).contains(&seg_size_bytes) {
        return Err(ctx.corrupt("the stored pg_control", format!("WAL segment size {seg_size_bytes} is not valid")));
    }
    Ok((cf, cp))
}

/// The archive: everything but the WAL and pg_control from the timeline at `ctx.lsn`, then the
/// given WAL segments (pages before the one holding `first_record_lsn` cleared) and `control` (last, so a cut-off stream never yields a startable
/// directory). `cp` is the stored checkpoint (its time is the files' mtime).
#[allow(clippy::too_many_arguments)]
fn write_tar<W: Write>(
    out: W,
    ctx: &Ctx,
    timeline: &Timeline,
    kind: BackupKind,
    mut control: ControlFileData,
    cp: &CheckPoint,
    wal_segments: Vec<(u64, Vec<u8>)>,
    first_record_lsn: Lsn,
) -> Result<BasebackupStats, BasebackupError> {
    let lsn = ctx.lsn;
    control.min_recovery_point = Lsn::INVALID;
    control.min_recovery_point_tli = 0;
    control.backup_start_point = Lsn::INVALID;
    control.backup_end_point = Lsn::INVALID;
    control.backup_end_required = false;
    let seg_size_bytes = control.xlog_seg_size as usize;
    let mtime = u64::try_from(cp.time).unwrap_or(0);
    let mut tar = TarWriter::new(out, mtime);
    let io_err = |e: io::Error| BasebackupError::Io { timeline_id: ctx.timeline_id, lsn, source: e };

    for dir in PGDATA_SUBDIRS {
        tar.dir(dir).map_err(io_err)?;
    }
    let version = format!("{PG_MAJORVERSION}\n");
    tar.file("PG_VERSION", version.as_bytes()).map_err(io_err)?;
    tar.file("postgresql.conf", b"").map_err(io_err)?;
    tar.file("pg_hba.conf", PG_HBA_CONF.as_bytes()).map_err(io_err)?;
    tar.file("pg_ident.conf", b"").map_err(io_err)?;

    // Databases and their relations.
    let dbs = timeline.list_dbdirs(lsn).map_err(ctx.read("the database directory"))?;
    if !dbs.contains(&(GLOBALTABLESPACE_OID, 0)) {
        return Err(ctx.corrupt("the database directory", "it has no entry for the shared catalogs".to_string()));
    }
    let mut tablespace_dirs = BTreeSet::new();
    for &(spcnode, dbnode) in &dbs {
        let dir = match spcnode {
            GLOBALTABLESPACE_OID if dbnode == 0 => "global".to_string(),
            DEFAULTTABLESPACE_OID => {
                let dir = format!("base/{dbnode}");
                tar.dir(&dir).map_err(io_err)?;
                tar.file(&format!("{dir}/PG_VERSION"), version.as_bytes()).map_err(io_err)?;
                dir
            }
            _ => {
                // A user tablespace, laid out in place (`allow_in_place_tablespaces`): a folder
                // under pg_tblspc instead of a symlink to its location, which a stateless
                // compute does not have.
                let spc_dir = format!("pg_tblspc/{spcnode}");
                let version_dir = format!("{spc_dir}/PG_{PG_MAJORVERSION}_{CATALOG_VERSION_NO}");
                if tablespace_dirs.insert(spcnode) {
                    tar.dir(&spc_dir).map_err(io_err)?;
                    tar.dir(&version_dir).map_err(io_err)?;
                }
                if dbnode == 0 {
                    continue; // the tablespace's own entry: no database in it
                }
                let dir = format!("{version_dir}/{dbnode}");
                tar.dir(&dir).map_err(io_err)?;
                dir
            }
        };
        match timeline.get_relmap_file(spcnode, dbnode, lsn) {
            Ok(map) => tar.file(&format!("{dir}/pg_filenode.map"), &map).map_err(io_err)?,
            // A database created with WAL_LOG gets its map in a later record; at an LSN in
            // between there is none yet (and nothing can connect to it).
            Err(e) if e.is_not_found() && dir != "global" => {}
            Err(e) => return Err(ctx.read(&format!("the relation map of {dir}"))(e)),
        }
        write_relations(ctx, &mut tar, timeline, spcnode, dbnode, &dir, kind)?;
    }

    // SLRUs, each with the page of its next id present.
    let next_pages = [
        (SlruKind::Clog, clog_xid_to_page(cp.next_xid_32())),
        (SlruKind::MultiXactOffsets, multixact_id_to_offsets_page(cp.next_multi)),
        (SlruKind::MultiXactMembers, mx_offset_to_member_page(cp.next_multi_offset)),
    ];
    for (kind, next_page) in next_pages {
        let (next_segno, next_blkno) = page_to_segment(next_page);
        let mut segnos = timeline.list_slru_segments(kind, lsn).map_err(ctx.read(kind.dir_name()))?;
        segnos.insert(next_segno);
        for segno in segnos {
            let mut content = match timeline.get_slru_segment(kind, segno, lsn) {
                Ok(c) => c.to_vec(),
                Err(e) if e.is_not_found() && segno == next_segno => Vec::new(),
                Err(e) => return Err(ctx.read(&format!("{} segment {segno:04X}", kind.dir_name()))(e)),
            };
            if segno == next_segno {
                let need = (next_blkno as usize + 1) * BLCKSZ;
                if content.len() < need {
                    content.resize(need, 0);
                }
            }
            tar.file(&format!("{}/{}", kind.dir_name(), segment_file_name(segno)), &content).map_err(io_err)?;
        }
    }

    // Prepared transactions: the stored state with the file's trailing crc32c.
    for xid in timeline.list_twophase_files(lsn).map_err(ctx.read("the two-phase directory"))? {
        let state = timeline.get_twophase_file(xid, lsn).map_err(ctx.read(&format!("two-phase state of {xid}")))?;
        let mut content = state.to_vec();
        content.extend_from_slice(&crc32c::crc32c(&state).to_le_bytes());
        tar.file(&format!("pg_twophase/{xid:08X}"), &content).map_err(io_err)?;
    }

    // The WAL segment(s) with the checkpoint record, then pg_control.
    let tli = control.checkpoint_copy.this_timeline_id;
    for (i, (segno, mut bytes)) in wal_segments.into_iter().enumerate() {
        if i == 0 {
            clear_pages_before(&mut bytes, first_record_lsn, tli, control.system_identifier, seg_size_bytes);
        }
        tar.sparse_file(&format!("pg_wal/{}", xlog_file_name(tli, segno, seg_size_bytes)), &bytes).map_err(io_err)?;
    }
    tar.file("global/pg_control", &control.encode()).map_err(io_err)?;

    tar.finish().map_err(io_err)
}

/// Checks `lsn` against the timeline and resolves the previous record's LSN.
fn check_request(ctx: &Ctx, timeline: &Timeline, lsn: Lsn, prev_lsn: Option<Lsn>) -> Result<Lsn, BasebackupError> {
    let record = timeline.last_record_lsn();
    if lsn > record.last {
        return Err(ctx.invalid(format!(
            "it is above the last ingested record LSN {}; wait for the WAL to arrive (wait_lsn) first",
            record.last
        )));
    }
    let initdb_lsn = timeline.initdb_lsn();
    if lsn < initdb_lsn {
        return Err(ctx.invalid(format!(
            "it is below the initdb LSN {initdb_lsn}, where the timeline's data begins; ask for an LSN at or above it"
        )));
    }
    let gc_cutoff = timeline.get_latest_gc_cutoff_lsn();
    if lsn < gc_cutoff {
        return Err(ctx.invalid(format!(
            "it is below the garbage-collection cutoff {gc_cutoff}: that history is no longer kept; ask for an LSN \
             at or above it"
        )));
    }
    if !lsn.0.is_multiple_of(8) {
        return Err(ctx.invalid("it is not a record boundary (WAL records start 8-byte aligned)".to_string()));
    }
    let prev = match prev_lsn {
        Some(prev) => prev,
        // Unknown at the last record only on a branch made at an LSN that ends no commit and
        // before any WAL of its own: its first compute's checkpoint gets xl_prev 0/0. Nothing
        // checks it: Postgres reads a checkpoint record without the prev-link check, and the
        // timeline's ingest checks xl_prev only against a previous record it knows.
        None if lsn == record.last => record.prev.unwrap_or(Lsn::INVALID),
        None => {
            return Err(ctx.invalid(format!(
                "it is below the last record LSN {}, and the timeline only knows the start of the record ending at \
                 its last record LSN; pass prev_lsn (the start LSN of the record that ends at {lsn})",
                record.last
            )))
        }
    };
    if prev >= lsn {
        return Err(ctx.invalid(format!("the previous record's LSN {prev} is not below it")));
    }
    Ok(prev)
}

/// The relation files of one database directory (`dir` is `global` or `base/<db>`).
fn write_relations<W: Write>(
    ctx: &Ctx,
    tar: &mut TarWriter<W>,
    timeline: &Timeline,
    spcnode: Oid,
    dbnode: Oid,
    dir: &str,
    kind: BackupKind,
) -> Result<(), BasebackupError> {
    let lsn = ctx.lsn;
    let rels = timeline.list_rels(spcnode, dbnode, lsn).map_err(ctx.read(&format!("the relations of {dir}")))?;
    let unlogged: BTreeSet<Oid> = rels.iter().filter(|r| r.forknum == INIT_FORKNUM).map(|r| r.relnode).collect();
    for rel in rels {
        if unlogged.contains(&rel.relnode) {
            if rel.forknum != INIT_FORKNUM {
                continue; // not WAL-logged: replaced by the init fork below
            }
            let nblocks = rel_size(ctx, timeline, rel)?;
            // An init fork is a few blocks (empty heap, index metapage): held in memory.
            if nblocks > RELSEG_SIZE_BLOCKS {
                return Err(ctx.corrupt(&format!("init fork {rel}"), format!("{nblocks} blocks is implausibly large")));
            }
            let mut content = Vec::with_capacity(nblocks as usize * BLCKSZ);
            for blkno in 0..nblocks {
                let page = timeline
                    .get_rel_page_at_lsn(rel, blkno, lsn)
                    .map_err(ctx.read(&format!("block {blkno} of {rel}")))?;
                if page.len() != BLCKSZ {
                    let detail = format!("block {blkno} is {} bytes, not {BLCKSZ}", page.len());
                    return Err(ctx.corrupt(&format!("init fork {rel}"), detail));
                }
                content.extend_from_slice(&page);
            }
            for fork in [INIT_FORKNUM, MAIN_FORKNUM] {
                let path = format!("{dir}/{}", rel.rel_file_node().with_fork(fork).file_name());
                tar.file(&path, &content).map_err(|e| ctx.io(e))?;
                tar.stats.relation_size_bytes += content.len() as u64;
            }
            continue;
        }
        if kind == BackupKind::Compute {
            continue;
        }
        let nblocks = rel_size(ctx, timeline, rel)?;
        for (segno, start, end) in rel_segments(nblocks) {
            let mut path = format!("{dir}/{}", rel.file_name());
            if segno > 0 {
                path.push_str(&format!(".{segno}"));
            }
            let size_bytes = u64::from(end - start) * BLCKSZ as u64;
            let mut reader = RelSegmentReader::new(ctx, timeline, rel, start, end);
            if let Err(e) = tar.file_from_reader(&path, size_bytes, &mut reader) {
                return Err(reader.error.take().unwrap_or_else(|| ctx.io(e)));
            }
            tar.stats.relation_size_bytes += size_bytes;
        }
    }
    Ok(())
}

fn rel_size(ctx: &Ctx, timeline: &Timeline, rel: RelTag) -> Result<BlockNumber, BasebackupError> {
    timeline.get_rel_size(rel, ctx.lsn).map_err(ctx.read(&format!("the size of {rel}")))
}

/// Segment files of a relation of `nblocks` blocks: (segment number, first block, end block).
/// An empty relation is one empty file, as in Postgres.
fn rel_segments(nblocks: BlockNumber) -> Vec<(u32, BlockNumber, BlockNumber)> {
    let count = nblocks.div_ceil(RELSEG_SIZE_BLOCKS).max(1);
    (0..count)
        .map(|segno| {
            let start = segno * RELSEG_SIZE_BLOCKS;
            (segno, start, nblocks.min(start + RELSEG_SIZE_BLOCKS))
        })
        .collect()
}

/// Zeroes the pages of the first checkpoint segment between its first page and the page
/// holding `start_lsn`, and gives the first page a plain long header (no continuation), as in
/// D4's experiment: see the module docs. A no-op when `start_lsn` is on the first page.
fn clear_pages_before(segment: &mut [u8], start_lsn: Lsn, tli: u32, system_id: u64, seg_size_bytes: usize) {
    let seg_start = start_lsn.0 - start_lsn.segment_offset(seg_size_bytes as u64);
    let lsn_page_offset = (start_lsn.page_start().0 - seg_start) as usize;
    if lsn_page_offset == 0 {
        return;
    }
    segment[XLOG_BLCKSZ..lsn_page_offset].fill(0);
    let header = XLogPageHeader::long(tli, Lsn(seg_start), 0, system_id, seg_size_bytes as u32).encode();
    segment[..XLOG_BLCKSZ].fill(0);
    segment[..header.len()].copy_from_slice(&header);
}

/// Names the timeline and LSN in every error.
struct Ctx {
    timeline_id: TimelineId,
    lsn: Lsn,
}

impl Ctx {
    fn invalid(&self, reason: String) -> BasebackupError {
        BasebackupError::InvalidRequest { timeline_id: self.timeline_id, lsn: self.lsn, reason }
    }

    fn corrupt(&self, what: &str, detail: String) -> BasebackupError {
        BasebackupError::Corrupt { timeline_id: self.timeline_id, lsn: self.lsn, what: what.to_string(), detail }
    }

    fn read(&self, what: &str) -> impl FnOnce(DatadirError) -> BasebackupError {
        let (timeline_id, lsn, what) = (self.timeline_id, self.lsn, what.to_string());
        move |source| BasebackupError::Read { timeline_id, lsn, what, source: Box::new(source) }
    }

    fn io(&self, source: io::Error) -> BasebackupError {
        BasebackupError::Io { timeline_id: self.timeline_id, lsn: self.lsn, source }
    }
}

/// Reads blocks `start..end` of a relation fork at the backup's LSN as one byte stream, for
/// the tar builder. A failure is kept in `error` (the `io::Error` handed to the builder only
/// carries its text).
struct RelSegmentReader<'a> {
    ctx: &'a Ctx,
    timeline: &'a Timeline,
    rel: RelTag,
    next_blkno: BlockNumber,
    end_blkno: BlockNumber,
    page: Bytes,
    pos: usize,
    error: Option<BasebackupError>,
}

impl<'a> RelSegmentReader<'a> {
    fn new(ctx: &'a Ctx, timeline: &'a Timeline, rel: RelTag, start: BlockNumber, end: BlockNumber) -> Self {
        RelSegmentReader {
            ctx,
            timeline,
            rel,
            next_blkno: start,
            end_blkno: end,
            page: Bytes::new(),
            pos: 0,
            error: None,
        }
    }

    fn next_page(&mut self) -> Result<Bytes, BasebackupError> {
        let (rel, blkno) = (self.rel, self.next_blkno);
        let page = self
            .timeline
            .get_rel_page_at_lsn(rel, blkno, self.ctx.lsn)
            .map_err(self.ctx.read(&format!("block {blkno} of {rel}")))?;
        if page.len() != BLCKSZ {
            let detail = format!("the page is {} bytes, not {BLCKSZ}", page.len());
            return Err(self.ctx.corrupt(&format!("block {blkno} of {rel}"), detail));
        }
        Ok(page)
    }
}

impl Read for RelSegmentReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.page.len() {
            if self.next_blkno >= self.end_blkno {
                return Ok(0);
            }
            match self.next_page() {
                Ok(page) => {
                    self.page = page;
                    self.pos = 0;
                    self.next_blkno += 1;
                }
                Err(e) => {
                    let text = e.to_string();
                    self.error = Some(e);
                    return Err(io::Error::other(text));
                }
            }
        }
        let n = buf.len().min(self.page.len() - self.pos);
        buf[..n].copy_from_slice(&self.page[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Counts the bytes that reach the inner writer.
struct CountingWriter<W> {
    inner: W,
    written_bytes: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written_bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Tar entries with fixed metadata, counted into [`BasebackupStats`].
struct TarWriter<W: Write> {
    builder: tar::Builder<CountingWriter<W>>,
    mtime: u64,
    stats: BasebackupStats,
}

impl<W: Write> TarWriter<W> {
    fn new(out: W, mtime: u64) -> Self {
        TarWriter {
            builder: tar::Builder::new(CountingWriter { inner: out, written_bytes: 0 }),
            mtime,
            stats: BasebackupStats::default(),
        }
    }

    fn header(&self, entry_type: EntryType, mode: u32, size_bytes: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(entry_type);
        h.set_mode(mode);
        h.set_size(size_bytes);
        h.set_mtime(self.mtime);
        h.set_uid(0);
        h.set_gid(0);
        h
    }

    fn dir(&mut self, path: &str) -> io::Result<()> {
        let mut h = self.header(EntryType::Directory, DIR_MODE, 0);
        self.builder.append_data(&mut h, path, io::empty())?;
        self.stats.dir_count += 1;
        Ok(())
    }

    fn file(&mut self, path: &str, data: &[u8]) -> io::Result<()> {
        self.file_from_reader(path, data.len() as u64, data)
    }

    /// A regular file whose content `data` yields exactly `size_bytes` bytes.
    fn file_from_reader(&mut self, path: &str, size_bytes: u64, data: impl Read) -> io::Result<()> {
        let mut h = self.header(EntryType::Regular, FILE_MODE, size_bytes);
        let mut counted = CountingReader { inner: data, read_bytes: 0 };
        self.builder.append_data(&mut h, path, &mut counted)?;
        if counted.read_bytes != size_bytes {
            // The archive is now corrupt; only a bug in this module gets here.
            return Err(io::Error::other(format!(
                "{path}: {} bytes of content for a {size_bytes}-byte entry",
                counted.read_bytes
            )));
        }
        self.stats.file_count += 1;
        Ok(())
    }

    /// A regular file stored as an old-GNU sparse entry: only the 512-byte blocks of `data`
    /// holding a non-zero byte are stored, the rest are holes.
    fn sparse_file(&mut self, path: &str, data: &[u8]) -> io::Result<()> {
        // (offset, length) of the stored runs; every run but the last ends on a block boundary.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (i, block) in data.chunks(TAR_BLOCK_SIZE_BYTES).enumerate() {
            if block.iter().all(|b| *b == 0) {
                continue;
            }
            let offset = (i * TAR_BLOCK_SIZE_BYTES) as u64;
            match runs.last_mut() {
                Some((o, l)) if *o + *l == offset => *l += block.len() as u64,
                _ => runs.push((offset, block.len() as u64)),
            }
        }
        // A final empty run at the end gives the real size when the file ends in a hole.
        let real_size = data.len() as u64;
        if runs.last().is_none_or(|(o, l)| o + l < real_size) {
            runs.push((real_size, 0));
        }
        let stored_bytes: u64 = runs.iter().map(|(_, l)| l).sum();

        let mut h = self.header(EntryType::GNUSparse, FILE_MODE, stored_bytes);
        h.set_path(path)?;
        let gnu = h.as_gnu_mut().expect("a GNU header");
        gnu.set_real_size(real_size);
        let in_header = gnu.sparse.len();
        for (slot, (offset, len)) in gnu.sparse.iter_mut().zip(&runs) {
            slot.set_offset(*offset);
            slot.set_length(*len);
        }
        gnu.set_is_extended(runs.len() > in_header);
        h.set_cksum();
        let dst = self.builder.get_mut();
        dst.write_all(h.as_bytes())?;
        let mut rest = runs.iter().skip(in_header).peekable();
        while rest.peek().is_some() {
            let mut ext = GnuExtSparseHeader::new();
            for (slot, (offset, len)) in ext.sparse.iter_mut().zip(rest.by_ref()) {
                slot.set_offset(*offset);
                slot.set_length(*len);
            }
            ext.set_is_extended(rest.peek().is_some());
            dst.write_all(ext.as_bytes())?;
        }
        for (offset, len) in &runs {
            dst.write_all(&data[*offset as usize..(*offset + *len) as usize])?;
        }
        let padding = (TAR_BLOCK_SIZE_BYTES - stored_bytes as usize % TAR_BLOCK_SIZE_BYTES) % TAR_BLOCK_SIZE_BYTES;
        dst.write_all(&[0u8; TAR_BLOCK_SIZE_BYTES][..padding])?;
        self.stats.file_count += 1;
        Ok(())
    }

    /// Writes the end-of-archive blocks and flushes.
    fn finish(self) -> io::Result<BasebackupStats> {
        let mut stats = self.stats;
        let mut counting = self.builder.into_inner()?;
        counting.flush()?;
        stats.tar_size_bytes = counting.written_bytes;
        Ok(stats)
    }
}

struct CountingReader<R> {
    inner: R,
    read_bytes: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read_bytes += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use postgres_ffi::records::xlog::XLOG_CHECKPOINT_SHUTDOWN;
    use postgres_ffi::{decode_record, WalStreamDecoder, WAL_SEGMENT_SIZE};

    use super::*;
    use crate::pgdatadir_mapping::DatadirModification;
    use crate::redo_applier::RustRedoApplier;
    use crate::tenant::timeline::{TenantConf, TimelineResources};
    use utils::TenantId;

    const SYSID: u64 = 7_400_000_000_000_000_042;
    /// Mid-page, several pages into segment 1: exercises the cleared pages before it.
    const LSN1: Lsn = Lsn(0x0169_5F28);
    const PREV1: Lsn = Lsn(0x0169_5E00);
    /// A page boundary: the checkpoint goes just past the short page header.
    const LSN2: Lsn = Lsn(0x016A_0000);
    const PREV2: Lsn = Lsn(0x0169_FF80);

    fn rel(db: Oid, relnode: Oid, fork: u8) -> RelTag {
        RelTag {
            spcnode: if db == 0 { GLOBALTABLESPACE_OID } else { DEFAULTTABLESPACE_OID },
            dbnode: db,
            relnode,
            forknum: fork,
        }
    }

    fn page(fill: u8) -> Bytes {
        Bytes::from(vec![fill; BLCKSZ])
    }

    fn checkpoint() -> CheckPoint {
        CheckPoint {
            redo: Lsn(0x0100_0028),
            this_timeline_id: 1,
            prev_timeline_id: 1,
            full_page_writes: true,
            next_xid: 40_000, // clog page 1: not stored, must be padded in
            next_oid: 24576,
            next_multi: 1,
            oldest_xid: 716,
            oldest_xid_db: 1,
            oldest_multi: 1,
            oldest_multi_db: 1,
            time: 1_700_000_000,
            oldest_active_xid: 900,
            ..Default::default()
        }
    }

    /// A small timeline imported at LSN1 (a shared catalog, database 5 with a logged table of
    /// two blocks, an unlogged relation, clog, a prepared transaction), then a change at LSN2.
    fn timeline(dir: &std::path::Path) -> Arc<Timeline> {
        let resources = TimelineResources::new(TenantConf::default(), Arc::new(RustRedoApplier));
        let tl = Timeline::create_empty(dir, TenantId([1; 16]), TimelineId([2; 16]), LSN1, 15, resources)
            .expect("create timeline");
        let mut m = DatadirModification::new(&tl);
        m.init_empty().expect("init");
        m.put_relmap_file(GLOBALTABLESPACE_OID, 0, Bytes::from(vec![0x11; 512])).expect("relmap");
        m.put_rel_creation(rel(0, 1262, MAIN_FORKNUM), 1).expect("rel");
        m.put_rel_page_image(rel(0, 1262, MAIN_FORKNUM), 0, page(0x12)).expect("page");
        m.put_db_creation(DEFAULTTABLESPACE_OID, 5).expect("db");
        m.put_relmap_file(DEFAULTTABLESPACE_OID, 5, Bytes::from(vec![0x55; 512])).expect("relmap");
        m.put_rel_creation(rel(5, 16384, MAIN_FORKNUM), 2).expect("rel");
        m.put_rel_page_image(rel(5, 16384, MAIN_FORKNUM), 0, page(1)).expect("page");
        m.put_rel_page_image(rel(5, 16384, MAIN_FORKNUM), 1, page(2)).expect("page");
        m.put_rel_creation(rel(5, 16384, 1), 0).expect("fsm");
        m.put_rel_creation(rel(5, 16390, INIT_FORKNUM), 1).expect("init fork");
        m.put_rel_page_image(rel(5, 16390, INIT_FORKNUM), 0, page(7)).expect("page");
        m.put_rel_creation(rel(5, 16390, 1), 1).expect("fsm of the unlogged relation");
        m.put_rel_page_image(rel(5, 16390, 1), 0, page(8)).expect("page");
        m.put_slru_segment_creation(SlruKind::Clog, 0, 1).expect("clog");
        m.put_slru_page_image(SlruKind::Clog, 0, 0, page(3)).expect("clog page");
        m.put_twophase_file(700, Bytes::from_static(b"two-phase state")).expect("2pc");
        let cp = checkpoint();
        let cf = ControlFileData::new_shut_down(SYSID, Lsn(0x0100_0028), cp, WAL_SEGMENT_SIZE as u32);
        m.put_control_file(Bytes::from(cf.encode())).expect("control file");
        m.put_checkpoint(Bytes::copy_from_slice(&cp.encode())).expect("checkpoint");
        m.commit_record(PREV1, LSN1).expect("commit");
        let mut m = DatadirModification::new(&tl);
        m.put_rel_page_image(rel(5, 16384, MAIN_FORKNUM), 1, page(9)).expect("page");
        m.commit_record(PREV2, LSN2).expect("commit");
        tl
    }

    struct Entry {
        kind: EntryType,
        mode: u32,
        content: Vec<u8>,
    }

    fn entries(tar_bytes: &[u8]) -> BTreeMap<String, Entry> {
        let mut archive = tar::Archive::new(tar_bytes);
        let mut out = BTreeMap::new();
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let path = entry.path().expect("path").to_string_lossy().into_owned();
            let (kind, mode) = (entry.header().entry_type(), entry.header().mode().expect("mode"));
            assert_eq!(entry.header().mtime().expect("mtime"), 1_700_000_000, "{path}");
            let mut content = Vec::new();
            entry.read_to_end(&mut content).expect("content");
            assert!(out.insert(path.clone(), Entry { kind, mode, content }).is_none(), "{path} twice");
        }
        out
    }

    fn backup(tl: &Timeline, lsn: Lsn, prev: Option<Lsn>, kind: BackupKind) -> (Vec<u8>, BasebackupStats) {
        let mut out = Vec::new();
        let stats = write_basebackup(&mut out, tl, lsn, prev, kind).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(stats.tar_size_bytes, out.len() as u64);
        (out, stats)
    }

    /// The one record of the checkpoint segment, read from `from` with our decoder.
    fn read_checkpoint_record(segment: &[u8], from: Lsn) -> (Lsn, Lsn, Lsn, CheckPoint) {
        let mut decoder = WalStreamDecoder::new(from);
        decoder.feed(&segment[from.segment_offset(WAL_SEGMENT_SIZE as u64) as usize..]);
        let r = decoder.poll_record().expect("decode").expect("a record");
        let rec = decode_record(r.record, r.start_lsn).expect("record");
        assert_eq!((rec.header.xl_rmid, rec.header.xl_info), (0, XLOG_CHECKPOINT_SHUTDOWN));
        let cp = CheckPoint::decode(&rec.main_data, r.start_lsn).expect("checkpoint");
        (r.start_lsn, r.end_lsn, rec.header.xl_prev, cp)
    }

    #[test]
    fn compute_backup_contents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tl = timeline(dir.path());
        let (tar_bytes, stats) = backup(&tl, LSN1, Some(PREV1), BackupKind::Compute);
        let e = entries(&tar_bytes);
        for d in PGDATA_SUBDIRS.iter().copied().chain(["base/5"]) {
            let entry = e.get(d).unwrap_or_else(|| panic!("{d} missing"));
            assert_eq!((entry.kind, entry.mode), (EntryType::Directory, DIR_MODE), "{d}");
        }
        assert!(e.values().filter(|x| x.kind != EntryType::Directory).all(|x| x.mode == FILE_MODE));
        assert_eq!(e["PG_VERSION"].content, b"15\n");
        assert_eq!(e["base/5/PG_VERSION"].content, b"15\n");
        assert!(e["postgresql.conf"].content.is_empty() && e["pg_ident.conf"].content.is_empty());
        assert!(String::from_utf8_lossy(&e["pg_hba.conf"].content).contains("replication"));
        assert_eq!(e["global/pg_filenode.map"].content, vec![0x11; 512]);
        assert_eq!(e["base/5/pg_filenode.map"].content, vec![0x55; 512]);
        // Relations: only the unlogged one, init fork and main copy; nothing else of it.
        let rel_files: Vec<&str> =
            e.keys().filter(|p| p.starts_with("base/5/1") || p.starts_with("global/1")).map(|p| p.as_str()).collect();
        assert_eq!(rel_files, ["base/5/16390", "base/5/16390_init"]);
        assert_eq!(e["base/5/16390"].content, page(7).to_vec());
        assert_eq!(e["base/5/16390_init"].content, page(7).to_vec());
        assert_eq!(stats.relation_size_bytes, 2 * BLCKSZ as u64);
        // Clog: the stored page, then zeros up to the next xid's page (40000 is on page 1).
        let clog = &e["pg_xact/0000"].content;
        assert_eq!(clog.len(), 2 * BLCKSZ);
        assert_eq!((&clog[..BLCKSZ], &clog[BLCKSZ..]), (&page(3)[..], &[0u8; BLCKSZ][..]));
        assert_eq!(e["pg_multixact/offsets/0000"].content, vec![0u8; BLCKSZ], "next multi's page");
        assert_eq!(e["pg_multixact/members/0000"].content, vec![0u8; BLCKSZ], "next offset's page");
        let mut twophase = b"two-phase state".to_vec();
        twophase.extend_from_slice(&crc32c::crc32c(b"two-phase state").to_le_bytes());
        assert_eq!(e["pg_twophase/000002BC"].content, twophase);

        // pg_control points at the checkpoint record, which is the only thing in pg_wal.
        let cf = ControlFileData::decode(&e["global/pg_control"].content).expect("pg_control");
        assert_eq!((cf.checkpoint, cf.state), (LSN1, DbState::Shutdowned));
        let mut want_cp = checkpoint();
        want_cp.redo = LSN1;
        want_cp.oldest_active_xid = 0;
        assert_eq!(cf.checkpoint_copy, want_cp);
        assert_eq!((cf.min_recovery_point, cf.backup_start_point, cf.backup_end_point), (Lsn(0), Lsn(0), Lsn(0)));
        let wal = &e["pg_wal/000000010000000000000001"];
        assert_eq!(wal.content.len(), WAL_SEGMENT_SIZE);
        let (start, end, prev, cp) = read_checkpoint_record(&wal.content, LSN1);
        assert_eq!((start, end, prev, cp), (LSN1, stats.next_record_lsn, PREV1, want_cp));
        assert_eq!(stats.checkpoint_lsn, LSN1);
        // Only the first page and the record's page are non-zero; the first page is a plain long header.
        let first = XLogPageHeader::decode(&wal.content).expect("first page header");
        assert!(first.long.is_some() && !first.is_contrecord() && first.xlp_rem_len == 0);
        let lsn_page = LSN1.page_start().0 as usize - 0x0100_0000;
        assert!(wal.content[XLOG_BLCKSZ..lsn_page].iter().all(|b| *b == 0));
        let header = XLogPageHeader::decode(&wal.content[lsn_page..]).expect("page header");
        assert_eq!(header.xlp_rem_len as u64, LSN1.0 - LSN1.page_start().0 - 24);
        // Sparse: the 16 MiB segment costs a few blocks.
        assert!(tar_bytes.len() < 128 * 1024, "{} bytes", tar_bytes.len());
        assert_eq!(stats.file_count as usize, e.values().filter(|x| x.kind != EntryType::Directory).count());
        assert_eq!(stats.dir_count as usize, e.values().filter(|x| x.kind == EntryType::Directory).count());
        // pg_control is the last entry.
        let mut archive = tar::Archive::new(&tar_bytes[..]);
        let paths: Vec<String> = archive
            .entries()
            .expect("entries")
            .map(|e| e.expect("entry").path().expect("path").to_string_lossy().into_owned())
            .collect();
        assert_eq!(paths.last().map(String::as_str), Some("global/pg_control"));

        // Deterministic.
        assert_eq!(backup(&tl, LSN1, Some(PREV1), BackupKind::Compute).0, tar_bytes);
    }

    #[test]
    fn full_backup_and_page_boundary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tl = timeline(dir.path());
        // At the last record LSN the timeline knows the previous record.
        let (tar_bytes, stats) = backup(&tl, LSN2, None, BackupKind::Full);
        let e = entries(&tar_bytes);
        let mut main = page(1).to_vec();
        main.extend_from_slice(&page(9));
        assert_eq!(e["base/5/16384"].content, main);
        assert!(e["base/5/16384_fsm"].content.is_empty());
        assert_eq!(e["global/1262"].content, page(0x12).to_vec());
        assert!(!e.contains_key("base/5/16390_fsm"), "forks of unlogged relations other than init are not shipped");
        assert_eq!(e["base/5/16390"].content, page(7).to_vec());
        assert_eq!(stats.relation_size_bytes, 5 * BLCKSZ as u64);
        // LSN2 is a page boundary: the record starts after the short header.
        let start = Lsn(LSN2.0 + 24);
        assert_eq!(stats.checkpoint_lsn, start);
        let cf = ControlFileData::decode(&e["global/pg_control"].content).expect("pg_control");
        assert_eq!((cf.checkpoint, cf.checkpoint_copy.redo), (start, start));
        let wal = &e["pg_wal/000000010000000000000001"].content;
        assert_eq!(read_checkpoint_record(wal, start).2, PREV2);

        // The older LSN with its previous record: the old page.
        let (tar_bytes, _) = backup(&tl, LSN1, Some(PREV1), BackupKind::Full);
        assert_eq!(entries(&tar_bytes)["base/5/16384"].content[BLCKSZ..], page(2)[..]);
    }

    #[test]
    fn checkpoint_record_crossing_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tl = timeline(dir.path());
        let (lsn3, prev3) = (Lsn(0x01FF_FFD8), Lsn(0x01FF_FF00));
        let mut m = DatadirModification::new(&tl);
        m.put_rel_page_image(rel(5, 16384, MAIN_FORKNUM), 0, page(4)).expect("page");
        m.commit_record(prev3, lsn3).expect("commit");
        let (tar_bytes, stats) = backup(&tl, lsn3, None, BackupKind::Compute);
        let e = entries(&tar_bytes);
        let (seg1, seg2) = (&e["pg_wal/000000010000000000000001"], &e["pg_wal/000000010000000000000002"]);
        assert_eq!((seg1.content.len(), seg2.content.len()), (WAL_SEGMENT_SIZE, WAL_SEGMENT_SIZE));
        let mut both = seg1.content.clone();
        both.extend_from_slice(&seg2.content);
        let (start, end, prev, _) = read_checkpoint_record(&both, lsn3);
        assert_eq!((start, end, prev), (lsn3, stats.next_record_lsn, prev3));
        assert!(end.0 > 0x0200_0028, "the record ends in the second segment: {end}");
        assert!(tar_bytes.len() < 128 * 1024, "{} bytes", tar_bytes.len());
    }

    #[test]
    fn bad_requests_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tl = timeline(dir.path());
        let err = |lsn: Lsn, prev: Option<Lsn>| {
            let e = write_basebackup(Vec::new(), &tl, lsn, prev, BackupKind::Compute).expect_err("must fail");
            assert!(matches!(e, BasebackupError::InvalidRequest { .. }), "{e}");
            e.to_string()
        };
        let e = err(Lsn(LSN2.0 + 8), None);
        assert!(e.contains("above the last ingested record LSN 0/16A0000"), "{e}");
        let e = err(Lsn(LSN1.0 - 8), Some(PREV1));
        assert!(e.contains("below the initdb LSN"), "{e}");
        let e = err(LSN1, None);
        assert!(e.contains("pass prev_lsn"), "{e}");
        let e = err(Lsn(LSN1.0 + 4), Some(PREV1));
        assert!(e.contains("not a record boundary"), "{e}");
        let e = err(LSN1, Some(LSN1));
        assert!(e.contains("not below"), "{e}");
        assert!(e.contains(&tl.timeline_id().to_string()), "errors name the timeline: {e}");
    }

    #[test]
    fn relation_segments() {
        assert_eq!(rel_segments(0), [(0, 0, 0)]);
        assert_eq!(rel_segments(5), [(0, 0, 5)]);
        assert_eq!(rel_segments(RELSEG_SIZE_BLOCKS), [(0, 0, RELSEG_SIZE_BLOCKS)]);
        assert_eq!(
            rel_segments(2 * RELSEG_SIZE_BLOCKS + 3),
            [
                (0, 0, RELSEG_SIZE_BLOCKS),
                (1, RELSEG_SIZE_BLOCKS, 2 * RELSEG_SIZE_BLOCKS),
                (2, 2 * RELSEG_SIZE_BLOCKS, 2 * RELSEG_SIZE_BLOCKS + 3)
            ]
        );
    }

    #[test]
    fn sparse_entries_read_back() {
        // Many runs (extended sparse headers), a trailing hole, and a file that ends in data.
        let mut data = vec![0u8; 64 * 1024];
        for i in 0..30 {
            data[i * 2048 + 7] = i as u8 + 1;
        }
        let mut dense_end = vec![0u8; 4096];
        dense_end[4095] = 1;
        let mut tar = TarWriter::new(Vec::new(), 5);
        tar.sparse_file("a", &data).expect("sparse");
        tar.sparse_file("b", &dense_end).expect("sparse");
        tar.sparse_file("c", &[0u8; 1024]).expect("sparse");
        let mut stats_out = Vec::new();
        let stats = {
            let stats = tar.stats;
            stats_out.extend(tar.builder.into_inner().expect("finish").inner);
            stats
        };
        assert_eq!(stats.file_count, 3);
        let mut archive = tar::Archive::new(&stats_out[..]);
        let got: Vec<Vec<u8>> = archive
            .entries()
            .expect("entries")
            .map(|e| {
                let mut v = Vec::new();
                e.expect("entry").read_to_end(&mut v).expect("read");
                v
            })
            .collect();
        assert_eq!(got, [data, dense_end, vec![0u8; 1024]]);
    }
}
