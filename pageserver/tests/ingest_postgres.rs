//! Ingest of real Postgres 15 WAL, checked against the cluster that wrote it.
//!
//! `initdb` (through [`run_initdb`], as the unprivileged OS user when running as root), import
//! of the data directory at its checkpoint LSN ([`import_datadir`]), then Postgres runs on that
//! same directory: a workload covering every record kind ingest interprets, `CHECKPOINT`, clean
//! stop. Its WAL is decoded from the import LSN and every record ingested. Then, at the final
//! LSN, the timeline must agree with the stopped cluster's files:
//!
//! - databases, relations per database and their sizes (file size / 8192), except FSM forks:
//!   stock Postgres 15 creates and extends the FSM without WAL (a compute on our storage keeps
//!   it locally, DESIGN D3), so an FSM may exist, or be larger, on disk only. (VACUUM can do the
//!   same to a VM page it ends up setting no bit on; the workload does not hit that case.)
//! - SLRU segment lists, and every clog and multixact page (rebuilt in Rust from the imported
//!   images plus the clog/multixact records ingest stored);
//! - two-phase state files, relation maps, the checkpoint and `pg_control`'s checkpoint fields;
//! - every relation page whose newest version in the timeline is a single image (an FPI, an
//!   imported page, a page copied by `CREATE DATABASE ... FILE_COPY`) equals the data file's
//!   block after masking what Postgres changes without WAL (hint bits, see [`mask_page`]).
//!
//! Next step, once the WAL redo manager implements `RedoApplier`: compare *every* page
//! through redo (the DESIGN §5 datadir oracle); here pages that need Postgres redo are skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use pageserver::import_datadir::{bootstrap_timeline, import_datadir, postgres_command, read_control_file, PgOsUser};
use pageserver::key::Key;
use pageserver::pgdatadir_mapping::DatadirModification;
use pageserver::redo_applier::RustRedoApplier;
use pageserver::tenant::timeline::{TenantConf, Timeline, TimelineResources};
use pageserver::walingest::WalIngest;
use postgres_ffi::controlfile::ControlFileData;
use postgres_ffi::page::page_is_new;
use postgres_ffi::reltag::FSM_FORKNUM;
use postgres_ffi::slru::{
    multixact_id_to_offsets_byte, multixact_id_to_offsets_page, parse_segment_file_name, SlruKind,
};
use postgres_ffi::xlog_file::parse_xlog_file_name;
use postgres_ffi::{
    decode_record, CheckPoint, RelTag, WalStreamDecoder, BLCKSZ, DEFAULTTABLESPACE_OID, GLOBALTABLESPACE_OID,
    WAL_SEGMENT_SIZE,
};
use utils::{Lsn, TenantId, TimelineId};

// Its own `Cluster` differs in shape from `common::Cluster`; the rest is shared.
#[allow(dead_code)]
mod common;
use common::{free_port, initdb_in_tempdir, output, pg_install_dir};

const TENANT: TenantId = TenantId([0x7E; 16]);
const TIMELINE: TimelineId = TimelineId([0x71; 16]);

/// The cluster under test; dropping it stops Postgres (`-m immediate`) if still running.
struct Cluster {
    install: PathBuf,
    os_user: Option<PgOsUser>,
    dir: tempfile::TempDir,
    datadir: PathBuf,
    port: u16,
    running: bool,
}

impl Cluster {
    fn cmd(&self, prog: &str) -> Command {
        postgres_command(self.os_user.as_ref(), &self.install.join("bin").join(prog))
    }

    fn run(&self, mut cmd: Command) -> String {
        let out = output(cmd.stdin(Stdio::null()));
        assert!(
            out.status.success(),
            "{cmd:?} failed ({}):\n{}\n{}\nlog:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn pg_ctl(&mut self, args: &[&str]) {
        let mut cmd = self.cmd("pg_ctl");
        cmd.arg("-D").arg(&self.datadir).args(args);
        self.run(cmd);
    }

    fn start(&mut self) {
        let log = self.dir.path().join("postgres.log");
        self.running = true;
        self.pg_ctl(&["-l", log.to_str().expect("utf-8 path"), "-w", "-t", "60", "start"]);
    }

    fn stop(&mut self) {
        self.pg_ctl(&["-m", "fast", "-w", "stop"]);
        self.running = false;
    }

    fn psql_file(&self, name: &str, sql: &str) -> String {
        let path = self.dir.path().join(name);
        fs::write(&path, sql).expect("write sql");
        if let Some(u) = &self.os_user {
            u.chown(&path).expect("chown sql");
        }
        let mut cmd = self.cmd("psql");
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-U", "cloud_admin", "-d", "postgres", "-f"])
            .arg(&path);
        self.run(cmd)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running {
            let _ = self
                .cmd("pg_ctl")
                .arg("-D")
                .arg(&self.datadir)
                .args(["-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

const WORKLOAD: &str = r#"
CREATE TABLE t (id int PRIMARY KEY, v text);
INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 5000) g;
CREATE INDEX t_v ON t (v);
UPDATE t SET v = v || 'x' WHERE id % 7 = 0;
DELETE FROM t WHERE id % 13 = 0;
VACUUM t;
INSERT INTO t SELECT g, 'new' FROM generate_series(5001, 5300) g;
UPDATE t SET v = 'after vacuum' WHERE id IN (10, 2000, 4000);
DELETE FROM t WHERE id = 3000;
CREATE TABLE vt AS SELECT g FROM generate_series(1, 5000) g;
DELETE FROM vt WHERE g > 100;
VACUUM vt;
CREATE TABLE tr (i int);
INSERT INTO tr SELECT generate_series(1, 1000);
TRUNCATE tr;
INSERT INTO tr VALUES (1);
CREATE TABLE sub (i int);
BEGIN;
INSERT INTO sub VALUES (0);
SAVEPOINT a; INSERT INTO sub VALUES (1);
SAVEPOINT b; INSERT INTO sub VALUES (2); ROLLBACK TO SAVEPOINT b;
RELEASE SAVEPOINT a;
DO $$ BEGIN FOR i IN 1..70 LOOP BEGIN INSERT INTO sub VALUES (i); EXCEPTION WHEN others THEN NULL; END; END LOOP; END $$;
COMMIT;
BEGIN; SELECT id FROM t WHERE id <= 5 FOR KEY SHARE; SAVEPOINT s; UPDATE t SET v = 'mx' WHERE id <= 5; COMMIT;
BEGIN; SELECT id FROM t WHERE id = 6 FOR SHARE; SAVEPOINT s; SELECT id FROM t WHERE id = 6 FOR UPDATE; COMMIT;
BEGIN; INSERT INTO sub VALUES (100); PREPARE TRANSACTION 'p1';
COMMIT PREPARED 'p1';
BEGIN; INSERT INTO sub VALUES (101); CREATE TABLE tp_drop (i int); PREPARE TRANSACTION 'p2';
ROLLBACK PREPARED 'p2';
BEGIN; CREATE TABLE aborted_t (i int); INSERT INTO aborted_t VALUES (1); ROLLBACK;
CREATE DATABASE db_wal STRATEGY wal_log;
CREATE DATABASE db_copy STRATEGY file_copy;
CREATE DATABASE db_gone;
DROP DATABASE db_gone;
CREATE DATABASE db_gone_copy STRATEGY file_copy;
DROP DATABASE db_gone_copy;
VACUUM FULL pg_class;
\c db_wal
CREATE TABLE in_wal (i int PRIMARY KEY);
INSERT INTO in_wal SELECT generate_series(1, 300);
\c db_copy
CREATE TABLE in_copy (i int);
INSERT INTO in_copy VALUES (1), (2);
\c postgres
BEGIN; INSERT INTO sub VALUES (102); PREPARE TRANSACTION 'left_prepared';
CHECKPOINT;
"#;

/// (relnode, fork) → size in blocks, from the files of one database directory. Temp
/// relations and non-relation files are skipped; segments are summed.
fn rel_files(dir: &Path) -> BTreeMap<(u32, u8), u32> {
    let mut out: BTreeMap<(u32, u8), u32> = BTreeMap::new();
    for entry in fs::read_dir(dir).expect("read db dir") {
        let entry = entry.expect("entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        let (stem, _seg) = name.split_once('.').unwrap_or((&name, ""));
        let (rel, fork) = match stem.split_once('_') {
            Some((rel, "fsm")) => (rel, 1),
            Some((rel, "vm")) => (rel, 2),
            Some((rel, "init")) => (rel, 3),
            Some(_) => continue,
            None => (stem, 0),
        };
        let Ok(relnode) = rel.parse::<u32>() else { continue };
        let len = entry.metadata().expect("metadata").len();
        assert_eq!(len % BLCKSZ as u64, 0, "{name}");
        *out.entry((relnode, fork)).or_default() += (len / BLCKSZ as u64) as u32;
    }
    out
}

fn db_path(datadir: &Path, spc: u32, db: u32) -> PathBuf {
    if spc == GLOBALTABLESPACE_OID {
        datadir.join("global")
    } else {
        assert_eq!(spc, DEFAULTTABLESPACE_OID);
        datadir.join("base").join(db.to_string())
    }
}

fn read_block(datadir: &Path, rel: RelTag, blkno: u32) -> Vec<u8> {
    let seg = blkno / 131_072;
    let mut name = rel.file_name();
    if seg > 0 {
        name = format!("{name}.{seg}");
    }
    let data = fs::read(db_path(datadir, rel.spcnode, rel.dbnode).join(name)).expect("read relation file");
    let off = (blkno % 131_072) as usize * BLCKSZ;
    data[off..off + BLCKSZ].to_vec()
}

/// Masks what Postgres changes on a page without writing WAL, as its `bufmask.c` does for
/// `wal_consistency_checking`: the checksum, hint flags in the header (`PD_PAGE_FULL`,
/// `PD_HAS_FREE_LINES`) and `pd_prune_xid`, the free space between `pd_lower` and `pd_upper`
/// (compaction leaves garbage there on the primary, an FPI restores zeros), heap tuple hint bits
/// (`HEAP_XMIN/XMAX_COMMITTED/INVALID`), and on index pages the line pointer flags (`LP_DEAD`
/// hints) and B-tree `BTP_HAS_GARBAGE`/`BTP_SPLIT_END` flags and cycle id. `pd_lsn` is kept: a
/// restored FPI must carry the LSN Postgres gave the page.
fn mask_page(page: &mut [u8]) {
    if page_is_new(page) {
        return;
    }
    let u16_at = |p: &[u8], i: usize| u16::from_le_bytes([p[i], p[i + 1]]);
    page[8..10].fill(0); // pd_checksum
    let flags = u16_at(page, 10) & !0x0003;
    page[10..12].copy_from_slice(&flags.to_le_bytes());
    page[20..24].fill(0); // pd_prune_xid
    let (lower, upper, special) = (u16_at(page, 12) as usize, u16_at(page, 14) as usize, u16_at(page, 16) as usize);
    if !(24 <= lower && lower <= upper && upper <= special && special <= BLCKSZ) {
        return; // not a standard page layout (e.g. an SLRU-like page): compare raw
    }
    page[lower..upper].fill(0);
    let is_heap = special == BLCKSZ;
    for lp in (24..lower).step_by(4) {
        let word = u32::from_le_bytes([page[lp], page[lp + 1], page[lp + 2], page[lp + 3]]);
        let (off, flags) = ((word & 0x7FFF) as usize, (word >> 15) & 0x3);
        if is_heap {
            if flags == 1 && off + 24 <= BLCKSZ {
                let infomask = u16_at(page, off + 20) & !0x0F00;
                page[off + 20..off + 22].copy_from_slice(&infomask.to_le_bytes());
            }
        } else if flags != 0 {
            let masked = word & !(0x3 << 15);
            page[lp..lp + 4].copy_from_slice(&masked.to_le_bytes());
        }
    }
    if BLCKSZ - special == 16 {
        // B-tree special space: btpo_flags at +12, btpo_cycleid at +14.
        let flags = u16_at(page, special + 12) & !((1 << 6) | (1 << 5));
        page[special + 12..special + 14].copy_from_slice(&flags.to_le_bytes());
        page[special + 14..special + 16].fill(0);
    }
}

fn slru_files(dir: &Path) -> BTreeMap<u32, Vec<u8>> {
    fs::read_dir(dir)
        .expect("read slru dir")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let segno = parse_segment_file_name(&e.file_name().to_string_lossy())?;
            Some((segno, fs::read(e.path()).expect("read segment")))
        })
        .collect()
}

#[test]
fn ingest_matches_postgres() {
    let started = std::time::Instant::now();
    let install = pg_install_dir();
    let (dir, datadir, os_user) = initdb_in_tempdir(&install, "ingest-pg-");

    // Bootstrap the timeline from the fresh data directory.
    let workdir = tempfile::tempdir().expect("workdir");
    let (cf, _) = read_control_file(&datadir).expect("pg_control");
    let import_lsn = cf.checkpoint;
    // GC settings for the compaction/GC check at the end: keep nothing below the last LSN.
    let conf = TenantConf {
        checkpoint_distance_bytes: 8 << 20,
        gc_horizon_bytes: 0,
        pitr_interval: Duration::ZERO,
        lsn_lease_length: Duration::ZERO,
        ..TenantConf::default()
    };
    // Ingest reads pages too (a VM page it rebuilds on truncation): the real redo behind it.
    let real_redo = common::RealRedo::start(&install);
    let resources = TimelineResources::new(conf, Arc::new(real_redo.applier()));
    let tl = Timeline::create_empty(workdir.path(), TENANT, TIMELINE, import_lsn, 15, resources.clone())
        .expect("create timeline");
    assert_eq!(import_datadir(&tl, &datadir).expect("import"), import_lsn);
    assert_eq!(tl.get_disk_consistent_lsn(), import_lsn);
    assert!(tl.get_prev_record_lsn().is_some(), "the import finds the checkpoint record's xl_prev");

    // Run the workload on the same directory.
    let port = free_port();
    let conf_path = datadir.join("postgresql.conf");
    let mut pg_conf = fs::read_to_string(&conf_path).expect("read postgresql.conf");
    pg_conf.push_str(&format!(
        "\nport = {port}\nlisten_addresses = ''\nunix_socket_directories = '{}'\nwal_level = replica\n\
         max_prepared_transactions = 5\nwal_keep_size = '1GB'\nmax_wal_size = '1GB'\nautovacuum = off\nfsync = off\n\
         full_page_writes = on\nlog_min_messages = warning\n",
        dir.path().display()
    ));
    fs::write(&conf_path, pg_conf).expect("write postgresql.conf");
    let mut pg = Cluster { install, os_user, dir, datadir: datadir.clone(), port, running: false };
    pg.start();
    pg.psql_file("workload.sql", WORKLOAD);
    pg.stop();
    let (final_cf, _) = read_control_file(&datadir).expect("pg_control after stop");

    // Decode the WAL from the import LSN and ingest every record, up to the shutdown checkpoint.
    let pg_wal = datadir.join("pg_wal");
    let mut segments: Vec<(u64, PathBuf)> = fs::read_dir(&pg_wal)
        .expect("pg_wal")
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((parse_xlog_file_name(&e.file_name().to_string_lossy(), WAL_SEGMENT_SIZE)?.0, e.path())))
        .collect();
    segments.sort();
    let first_segno = import_lsn.segment_number(WAL_SEGMENT_SIZE as u64);
    let mut decoder = WalStreamDecoder::new(import_lsn);
    let mut ingest = WalIngest::new(Arc::clone(&tl)).expect("walingest");
    let mut m = DatadirModification::new(&tl);
    // (rel, blkno) → end LSNs of records that carried an applied FPI of the block, and LSNs at
    // which whole pages were copied (FILE_COPY database creation).
    let mut image_lsns: BTreeMap<(RelTag, u32), BTreeSet<Lsn>> = BTreeMap::new();
    let mut copy_lsns: BTreeSet<Lsn> = BTreeSet::new();
    let mut record_count = 0usize;
    let mut final_lsn = None;
    'segments: for (i, (segno, path)) in segments.iter().filter(|(s, _)| *s >= first_segno).enumerate() {
        assert_eq!(*segno, first_segno + i as u64, "pg_wal must hold every segment since the import");
        let bytes = fs::read(path).expect("read segment");
        let from = if i == 0 { import_lsn.segment_offset(WAL_SEGMENT_SIZE as u64) as usize } else { 0 };
        decoder.feed(&bytes[from..]);
        while let Some(r) = decoder.poll_record().expect("decode WAL") {
            let rec = decode_record(r.record, r.start_lsn).expect("decode record");
            for blk in rec.blocks.iter().filter(|b| b.apply_image()) {
                image_lsns.entry((blk.rel_tag(), blk.blkno)).or_default().insert(r.end_lsn);
            }
            let is_file_copy = rec.rmid() == postgres_ffi::rmgr::RM_DBASE_ID
                && rec.rmgr_info() == postgres_ffi::records::dbase::XLOG_DBASE_CREATE_FILE_COPY;
            if is_file_copy {
                copy_lsns.insert(r.end_lsn);
            }
            ingest.ingest_record(&rec, r.end_lsn, &mut m).unwrap_or_else(|e| panic!("{e}"));
            record_count += 1;
            if r.start_lsn == final_cf.checkpoint {
                final_lsn = Some(r.end_lsn);
                break 'segments;
            }
        }
    }
    let lsn = final_lsn.expect("the WAL must reach the shutdown checkpoint");
    assert_eq!(tl.get_last_record_lsn(), lsn);
    assert!(tl.historic_layers().len() >= 2, "ingest should have flushed layers");
    assert_eq!(copy_lsns.len(), 2, "the workload creates two FILE_COPY databases");
    tl.checkpoint().expect("checkpoint");
    // Check a reloaded timeline: everything must be on disk.
    let timeline_dir = tl.dir().to_path_buf();
    drop(m);
    drop(ingest);
    drop(tl);
    let tl = Timeline::load(&timeline_dir, None, resources).expect("reload");
    assert_eq!(tl.get_last_record_lsn(), lsn);

    // Databases.
    let dbs = tl.list_dbdirs(lsn).expect("dbdirs");
    let mut disk_dbs: BTreeSet<(u32, u32)> = [(GLOBALTABLESPACE_OID, 0)].into();
    for e in fs::read_dir(datadir.join("base")).expect("base") {
        let name = e.expect("entry").file_name().to_string_lossy().into_owned();
        if let Ok(db) = name.parse::<u32>() {
            disk_dbs.insert((DEFAULTTABLESPACE_OID, db));
        }
    }
    assert_eq!(dbs, disk_dbs, "databases");
    assert!(dbs.len() >= 6, "template0/1, postgres, db_wal, db_copy and global: {dbs:?}");

    // Relations and sizes, relation maps.
    let mut rels_checked = 0;
    let mut rel_diffs = Vec::new();
    let mut exceptions = 0;
    for &(spc, db) in &dbs {
        let dir = db_path(&datadir, spc, db);
        let on_disk = rel_files(&dir);
        let in_timeline: BTreeMap<(u32, u8), u32> = tl
            .list_rels(spc, db, lsn)
            .expect("list_rels")
            .into_iter()
            .map(|r| ((r.relnode, r.forknum), tl.get_rel_size(r, lsn).expect("rel size")))
            .collect();
        let keys: BTreeSet<(u32, u8)> = on_disk.keys().chain(in_timeline.keys()).copied().collect();
        for k in keys {
            let (disk, ours) = (on_disk.get(&k).copied(), in_timeline.get(&k).copied());
            rels_checked += 1;
            if disk == ours {
                continue;
            }
            match disk {
                Some(_) if k.1 == FSM_FORKNUM => exceptions += 1,
                _ => rel_diffs.push(format!("{spc}/{db}/{}_{}: disk {disk:?} timeline {ours:?}", k.0, k.1)),
            }
        }
        // The relnodes themselves (any fork) must match exactly.
        let disk_relnodes: BTreeSet<u32> = on_disk.keys().map(|k| k.0).collect();
        let our_relnodes: BTreeSet<u32> = in_timeline.keys().map(|k| k.0).collect();
        assert_eq!(our_relnodes, disk_relnodes, "relfilenodes of database {spc}/{db}");
        let map = fs::read(dir.join("pg_filenode.map")).expect("pg_filenode.map");
        assert_eq!(tl.get_relmap_file(spc, db, lsn).expect("relmap").as_ref(), &map[..], "relmap of {spc}/{db}");
    }
    assert!(rel_diffs.is_empty(), "relation size differences:\n{}", rel_diffs.join("\n"));
    assert!(rels_checked > 1000, "checked {rels_checked} relation forks");

    let cp = CheckPoint::decode(&tl.get_checkpoint(lsn).expect("checkpoint"), lsn).expect("decode checkpoint");

    // SLRUs: segment lists, and every page rebuilt from images + Rust-applied records.
    for kind in [SlruKind::Clog, SlruKind::MultiXactOffsets, SlruKind::MultiXactMembers] {
        let files = slru_files(&datadir.join(kind.dir_name()));
        let segs = tl.list_slru_segments(kind, lsn).expect("slru segments");
        assert_eq!(segs, files.keys().copied().collect::<BTreeSet<_>>(), "{} segments", kind.dir_name());
        for (segno, content) in files {
            let mut ours = tl.get_slru_segment(kind, segno, lsn).expect("slru segment").to_vec();
            if kind == SlruKind::MultiXactOffsets {
                // Postgres 15.9+ writes the next multixact's starting offset eagerly; ingest leaves
                // it to that multixact's own record (see walingest.rs). Only the entry after the
                // latest multixact can differ, and must then hold nextOffset on disk.
                let (page, byte) =
                    (multixact_id_to_offsets_page(cp.next_multi), multixact_id_to_offsets_byte(cp.next_multi));
                let at = (page % 32) as usize * BLCKSZ + byte;
                if page / 32 == segno
                    && ours[at..at + 4] == [0; 4]
                    && content[at..at + 4] == cp.next_multi_offset.to_le_bytes()
                {
                    ours[at..at + 4].copy_from_slice(&content[at..at + 4]);
                }
            }
            if ours != content {
                let diffs: Vec<(usize, u8, u8)> = ours
                    .iter()
                    .zip(&content)
                    .enumerate()
                    .filter(|(_, (a, b))| a != b)
                    .map(|(i, (a, b))| (i, *a, *b))
                    .take(20)
                    .collect();
                panic!(
                    "{} segment {segno:04X} differs (len {} vs {}): {diffs:?}",
                    kind.dir_name(),
                    ours.len(),
                    content.len()
                );
            }
        }
    }

    // Two-phase state: the left-prepared transaction, file = state ++ crc32c.
    let twophase = tl.list_twophase_files(lsn).expect("twophase");
    let mut disk_twophase = BTreeSet::new();
    for e in fs::read_dir(datadir.join("pg_twophase")).expect("pg_twophase") {
        let e = e.expect("entry");
        let xid = u32::from_str_radix(&e.file_name().to_string_lossy(), 16).expect("xid file name");
        let content = fs::read(e.path()).expect("read");
        let mut ours = tl.get_twophase_file(xid, lsn).expect("twophase file").to_vec();
        ours.extend_from_slice(&crc32c::crc32c(&ours).to_le_bytes());
        assert!(ours == content, "two-phase state of {xid}");
        disk_twophase.insert(xid);
    }
    assert_eq!(twophase, disk_twophase);
    assert_eq!(twophase.len(), 1);

    // Checkpoint and pg_control.
    assert_eq!(cp, final_cf.checkpoint_copy, "checkpoint after the shutdown checkpoint record");
    let our_cf = ControlFileData::decode(&tl.get_control_file(lsn).expect("pg_control")).expect("decode pg_control");
    assert_eq!((our_cf.checkpoint, our_cf.checkpoint_copy), (final_cf.checkpoint, final_cf.checkpoint_copy));
    assert_eq!(our_cf.system_identifier, final_cf.system_identifier);

    // Pages whose newest version is a single image equal the data file block (masked).
    let mut compared = 0;
    let mut raw_equal = 0;
    let mut skipped_not_image = 0;
    let mut skipped_other_image = 0;
    let mut page_diffs = Vec::new();
    for &(spc, db) in &dbs {
        for rel in tl.list_rels(spc, db, lsn).expect("list_rels") {
            if rel.forknum == FSM_FORKNUM {
                continue; // not WAL-logged
            }
            let nblocks = tl.get_rel_size(rel, lsn).expect("size");
            for blkno in 0..nblocks {
                let state = match tl.get_reconstruct_state(Key::rel_block(rel, blkno), lsn) {
                    Ok(s) => s,
                    Err(e) if e.is_missing() => continue,
                    Err(e) => panic!("{e}"),
                };
                let Some((img_lsn, img)) = state.img.filter(|_| state.records.is_empty()) else {
                    skipped_not_image += 1;
                    continue;
                };
                let from_fpi = image_lsns.get(&(rel, blkno)).is_some_and(|l| l.contains(&img_lsn));
                if !(from_fpi || img_lsn == import_lsn || copy_lsns.contains(&img_lsn)) {
                    skipped_other_image += 1; // e.g. the zeroed VM/FSM tail page of a truncation
                    continue;
                }
                let mut ours: Vec<u8> = img.to_vec();
                let mut disk = read_block(&datadir, rel, blkno);
                if ours == disk {
                    raw_equal += 1;
                }
                mask_page(&mut ours);
                mask_page(&mut disk);
                compared += 1;
                if ours != disk {
                    let first = ours.iter().zip(&disk).position(|(a, b)| a != b).unwrap_or(0);
                    page_diffs
                        .push(format!("{rel} block {blkno} (image at {img_lsn}): first difference at byte {first}"));
                }
            }
        }
    }
    assert!(
        page_diffs.is_empty(),
        "{} of {compared} pages differ:\n{}",
        page_diffs.len(),
        page_diffs.iter().take(40).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(compared > 1000, "compared only {compared} pages");
    eprintln!(
        "ingested {record_count} records ({} FPI blocks) up to {lsn}; {rels_checked} relation forks \
         ({exceptions} FSM-only differences); {compared} pages compared ({raw_equal} equal before masking), {skipped_not_image} need redo, \
         {skipped_other_image} other images; {:?}",
        image_lsns.len(),
        started.elapsed()
    );

    compaction_and_gc_keep_every_value(&tl, lsn, *copy_lsns.iter().next().expect("a FILE_COPY record"));
}

/// Compaction and GC must not change any value at or above the cutoff, nor at a child's branch
/// point: fingerprint every key of the key space (at the last LSN, and at `mid` through a branch
/// there), compact (forced: L0s into L1s, images everywhere), collect with the cutoff at the
/// last LSN, and compare; then reads below the cutoff fail, and a reload sees the same values.
fn compaction_and_gc_keep_every_value(tl: &Arc<Timeline>, lsn: Lsn, mid: Lsn) {
    use pageserver::key::Key;
    let started = std::time::Instant::now();
    let fingerprint = |tl: &Timeline, at: Lsn| -> BTreeMap<Key, bytes::Bytes> {
        let mut out = BTreeMap::new();
        for range in tl.collect_keyspace(at).expect("keyspace") {
            let mut key = range.start;
            while key < range.end {
                match tl.get(key, at) {
                    Ok(v) => {
                        out.insert(key, v);
                    }
                    Err(e) if e.is_missing() => {}
                    Err(e) => panic!("{e}"),
                }
                key = key.next();
            }
        }
        out
    };
    let before = fingerprint(tl, lsn);
    let before_mid = fingerprint(tl, mid);
    assert!(before.len() > 1000, "only {} keys", before.len());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let child_id = utils::TimelineId([0x33; 16]);
    let child = rt.block_on(tl.branch(child_id, mid, Duration::from_secs(5))).expect("branch at mid");
    let layers_before = tl.historic_layers();
    let bytes_before: u64 = layers_before.iter().map(|l| l.file_size_bytes).sum();

    let c = tl.compact(true).expect("compact");
    assert!(c.l0_compacted >= 2 && c.l1_created >= 1, "{c:?}");
    assert!(c.images_created >= 1 && c.image_keys >= before.len() as u64 / 2, "{c:?}");
    // The merged L0s are gone (a database smaller than compaction_target_size becomes one delta
    // over the whole key space, itself an L0 for the next compaction).
    let deltas = |layers: &[pageserver::layer::PersistentLayerDesc]| layers.iter().filter(|l| l.is_delta()).count();
    assert_eq!(deltas(&tl.historic_layers()), deltas(&layers_before) - c.l0_compacted + c.l1_created);
    let names: Vec<_> = tl.historic_layers().iter().map(|l| (l.layer_name(), true)).collect();
    assert!(pageserver::tenant::timeline::redundant_layers(&names).is_empty(), "compaction left redundant layers");
    assert!(fingerprint(tl, lsn) == before, "compaction changed a value");

    // The branch at `mid` needs the history below the image at the cutoff: GC keeps it.
    let g = tl.gc(std::time::SystemTime::now()).expect("gc");
    assert_eq!(g.cutoff, lsn, "{g:?}");
    assert_eq!(g.retained_branch_points, [mid]);
    assert!(fingerprint(tl, lsn) == before, "GC changed a value at the cutoff");
    assert!(fingerprint(&child, mid) == before_mid, "GC changed a value at a branch point");
    let below = tl.get(Key::checkpoint(), Lsn(lsn.0 - 8)).expect_err("a read below the cutoff");
    assert!(below.to_string().contains("garbage-collection cutoff"), "{below}");

    // Without the branch, the deltas below the image at the cutoff go.
    tl.forget_child(child_id);
    drop(child);
    let g = tl.gc(std::time::SystemTime::now()).expect("gc without the branch");
    assert!(g.retained_branch_points.is_empty() && g.layers_removed >= 1, "{g:?}");
    let layers_after = tl.historic_layers();
    let bytes_after: u64 = layers_after.iter().map(|l| l.file_size_bytes).sum();
    assert!(layers_after.iter().all(|l| !l.is_delta()), "only images remain: {layers_after:?}");
    assert!(fingerprint(tl, lsn) == before, "GC changed a value at the cutoff");
    let again = tl.gc(std::time::SystemTime::now()).expect("second gc");
    assert_eq!(again.layers_removed, 0, "a second GC finds nothing new: {again:?}");

    // Everything is on disk as the layer map says.
    let dir = tl.dir().to_path_buf();
    let resources = tl.resources().clone();
    let reloaded = Timeline::load(&dir, None, resources).expect("reload");
    assert_eq!(reloaded.historic_layers().len(), layers_after.len());
    assert!(fingerprint(&reloaded, lsn) == before, "values differ after a reload");
    eprintln!(
        "compaction + gc: {} → {} layers, {bytes_before} → {bytes_after} bytes; {} keys at the cutoff and {} at the \
         branch point unchanged; {:?}",
        layers_before.len(),
        layers_after.len(),
        before.len(),
        before_mid.len(),
        started.elapsed()
    );
}

/// The pageserver's bootstrap path end to end: initdb (as the OS user when root) + import.
#[test]
fn bootstrap_runs_initdb_and_imports() {
    let install = pg_install_dir();
    let workdir = tempfile::tempdir().expect("workdir");
    let resources = TimelineResources::new(TenantConf::default(), Arc::new(RustRedoApplier));
    let tl = bootstrap_timeline(workdir.path(), TENANT, TIMELINE, &install, "cloud_admin", resources.clone())
        .expect("bootstrap");
    let lsn = tl.get_last_record_lsn();
    assert_eq!(lsn, tl.initdb_lsn());
    assert_eq!(tl.get_disk_consistent_lsn(), lsn, "the import is durable");
    let dbs = tl.list_dbdirs(lsn).expect("dbdirs");
    assert_eq!(dbs.len(), 4, "global, template1, template0, postgres: {dbs:?}");
    let pg_class = RelTag { spcnode: DEFAULTTABLESPACE_OID, dbnode: 1, relnode: 1259, forknum: 0 };
    assert!(tl.get_rel_size(pg_class, lsn).expect("pg_class of template1") > 0);
    let page = tl.get_rel_page_at_lsn(pg_class, 0, lsn).expect("page");
    assert!(!page_is_new(&page));
    let dir = tl.dir().to_path_buf();
    drop(tl);
    let tl = Timeline::load(&dir, None, resources).expect("reload");
    assert_eq!(tl.list_dbdirs(lsn).expect("dbdirs"), dbs);
    // A second bootstrap of the same timeline id is refused.
    let again = bootstrap_timeline(
        workdir.path(),
        TENANT,
        TIMELINE,
        &install,
        "cloud_admin",
        TimelineResources::new(TenantConf::default(), Arc::new(RustRedoApplier)),
    );
    assert!(again.is_err());
    assert!(dir.join("metadata").exists(), "a failed bootstrap must not remove the existing timeline");
}
