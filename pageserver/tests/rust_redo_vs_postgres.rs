//! The records the pageserver applies in Rust (`redo_applier::apply_rust_record`, DESIGN D5)
//! against Postgres itself, on real WAL.
//!
//! `initdb`, import, then a workload on the real cluster that sets visibility-map bits (VACUUM,
//! VACUUM FREEZE) and clears them in every way heap redo does (insert, COPY's multi-insert,
//! update to another page and HOT update, delete, row locks clearing all-frozen), commits and
//! aborts transactions with subtransactions, and creates multixacts. Its WAL is ingested into
//! the timeline.
//!
//! - **VM pages, Rust vs Postgres redo.** Ingest stores a heap record's VM-bit clear as
//!   `WalRecord::ClearVisibilityMapFlags` on the VM page (heap redo clears those bits inside
//!   `visibilitymap_clear`, on a page that is not among the record's block references). For
//!   every VM page with such records, and for every prefix of its history ending at one of them,
//!   the page is built twice: (a) as the read path does, the Rust record applied by
//!   `apply_rust_record` and Postgres records (`XLOG_HEAP2_VISIBLE`, FPIs) by the redo process
//!   (`PostgresRedoApplier`); (b) by Postgres alone: every Rust record replaced by the raw heap
//!   record it came from, the whole chain sent to the redo process with the VM block as the
//!   target (`WalRedoManager::request_redo`), so heap redo runs `visibilitymap_clear` on it
//!   while its own heap block references are filtered out. Both must be equal byte for byte;
//!   the final page must also equal the VM file block of the stopped cluster.
//! - **clog and multixact pages.** Postgres applies commits and aborts to clog pages (and
//!   multixact creation to the multixact SLRUs) through its SLRU buffers, which write files
//!   in `pg_xact` / `pg_multixact`; our redo process reconstructs relation blocks only and has
//!   no SLRU path, so Postgres redo of these pages cannot be asked for. Instead, every segment
//!   the timeline rebuilds at the final LSN (imported images plus the Rust-applied records) is
//!   compared with the segment file Postgres itself wrote, after `CHECKPOINT` and a clean stop.
//!   (`ingest_postgres.rs` makes the same SLRU comparison on its own workload.)

#[allow(dead_code)] // the shared helpers; this test decodes the WAL itself (it keeps raw records)
mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use common::{free_port, Cluster};
use pageserver::import_datadir::{import_datadir, read_control_file};
use pageserver::key::Key;
use pageserver::pgdatadir_mapping::DatadirModification;
use pageserver::redo_applier::RedoApplier;
use pageserver::tenant::timeline::{TenantConf, Timeline, TimelineResources};
use pageserver::value::WalRecord;
use pageserver::walingest::WalIngest;
use pageserver::walredo::BufferTag;
use postgres_ffi::records::heap::vm_bits_cleared;
use postgres_ffi::reltag::VISIBILITYMAP_FORKNUM;
use postgres_ffi::rmgr::RM_HEAP_ID;
use postgres_ffi::slru::{
    multixact_id_to_offsets_byte, multixact_id_to_offsets_page, parse_segment_file_name, SlruKind,
};
use postgres_ffi::xlog_file::parse_xlog_file_name;
use postgres_ffi::{decode_record, CheckPoint, WalStreamDecoder, BLCKSZ, WAL_SEGMENT_SIZE};
use utils::{Lsn, TenantId, TimelineId};

const TENANT: TenantId = TenantId([0x4E; 16]);
const TIMELINE: TimelineId = TimelineId([0x4F; 16]);

fn workload() -> String {
    let copy_rows: String = (30001..30200).map(|i| format!("{i}\tcopied {i}\n")).collect();
    format!(
        r#"
CREATE TABLE v (id int PRIMARY KEY, s text) WITH (autovacuum_enabled = off, fillfactor = 90);
INSERT INTO v SELECT g, md5(g::text) FROM generate_series(1, 20000) g;
VACUUM (FREEZE) v;
UPDATE v SET s = 'moved ' || s || repeat('m', 1500) WHERE id % 300 = 0;
DELETE FROM v WHERE id % 301 = 0;
VACUUM (FREEZE) v;
INSERT INTO v SELECT g, 'late' FROM generate_series(20001, 20040) g;
VACUUM (FREEZE) v;
BEGIN; SELECT count(*) FROM (SELECT id FROM v WHERE id % 400 = 1 FOR KEY SHARE) s; COMMIT;
BEGIN; SELECT id FROM v WHERE id = 5 FOR SHARE; SAVEPOINT a; UPDATE v SET s = 'mx' WHERE id = 5; COMMIT;
VACUUM (FREEZE) v;
COPY v FROM STDIN;
{copy_rows}\.
VACUUM (FREEZE) v;
UPDATE v SET s = 'hot' WHERE id BETWEEN 1000 AND 1010;
CREATE TABLE w (i int) WITH (autovacuum_enabled = off);
INSERT INTO w SELECT generate_series(1, 50000);
VACUUM (FREEZE) w;
DELETE FROM w WHERE i % 1000 = 0;
BEGIN; INSERT INTO w VALUES (-1); SAVEPOINT a; INSERT INTO w VALUES (-2); ROLLBACK;
BEGIN; INSERT INTO w VALUES (-3); SAVEPOINT a; INSERT INTO w VALUES (-4); RELEASE SAVEPOINT a; COMMIT;
DO $$ BEGIN FOR i IN 1..200 LOOP BEGIN INSERT INTO w VALUES (i); IF i % 3 = 0 THEN RAISE EXCEPTION 'x'; END IF; EXCEPTION WHEN others THEN NULL; END; END LOOP; END $$;
CHECKPOINT;
"#
    )
}

/// A heap record that clears VM bits: its raw bytes and what it is, by end LSN.
struct ClearingRecord {
    raw: Bytes,
    what: &'static str,
}

fn describe(rmid: u8, info: u8) -> &'static str {
    use postgres_ffi::records::heap::*;
    match (rmid == RM_HEAP_ID, info & XLOG_HEAP_OPMASK) {
        (true, XLOG_HEAP_INSERT) => "heap insert",
        (true, XLOG_HEAP_DELETE) => "heap delete",
        (true, XLOG_HEAP_UPDATE) => "heap update",
        (true, XLOG_HEAP_HOT_UPDATE) => "heap hot update",
        (true, XLOG_HEAP_LOCK) => "heap lock",
        (false, XLOG_HEAP2_MULTI_INSERT) => "heap2 multi-insert",
        (false, XLOG_HEAP2_LOCK_UPDATED) => "heap2 lock-updated",
        _ => "other",
    }
}

fn slru_files(dir: PathBuf) -> BTreeMap<u32, Vec<u8>> {
    fs::read_dir(dir)
        .expect("read slru dir")
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((parse_segment_file_name(&e.file_name().to_string_lossy())?, fs::read(e.path()).ok()?)))
        .collect()
}

#[test]
fn rust_applied_records_match_postgres() {
    let started = std::time::Instant::now();
    let install = common::pg_install_dir();
    let (dir, datadir, os_user) = common::initdb_in_tempdir(&install, "rust-redo-pg-");

    let real_redo = common::RealRedo::start(&install);
    let (runtime, manager) = (&real_redo.runtime, &real_redo.manager);
    let applier = real_redo.applier();
    let workdir = tempfile::tempdir().expect("workdir");
    let (cf, _) = read_control_file(&datadir).expect("pg_control");
    let import_lsn = cf.checkpoint;
    let resources = TimelineResources::new(
        TenantConf { checkpoint_distance_bytes: 8 << 20, ..TenantConf::default() },
        Arc::new(real_redo.applier()),
    );
    let tl = Timeline::create_empty(workdir.path(), TENANT, TIMELINE, import_lsn, 15, resources).expect("timeline");
    assert_eq!(import_datadir(&tl, &datadir).expect("import"), import_lsn);

    let mut pg = Cluster {
        install: install.clone(),
        os_user: os_user.clone(),
        dir: dir.path().to_path_buf(),
        datadir: datadir.clone(),
        log: dir.path().join("postgres.log"),
        port: free_port(),
        running: false,
    };
    pg.configure("wal_level = replica\nwal_keep_size = '1GB'\nmax_wal_size = '1GB'\nlog_min_messages = warning");
    pg.start();
    pg.psql("postgres", &workload());
    pg.stop("fast");
    let (final_cf, _) = read_control_file(&datadir).expect("pg_control after stop");

    // Ingest the WAL up to the shutdown checkpoint, keeping every heap record that clears VM bits.
    let mut segments: Vec<(u64, PathBuf)> = fs::read_dir(datadir.join("pg_wal"))
        .expect("pg_wal")
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((parse_xlog_file_name(&e.file_name().to_string_lossy(), WAL_SEGMENT_SIZE)?.0, e.path())))
        .collect();
    segments.sort();
    let first_segno = import_lsn.segment_number(WAL_SEGMENT_SIZE as u64);
    let mut decoder = WalStreamDecoder::new(import_lsn);
    let mut ingest = WalIngest::new(Arc::clone(&tl)).expect("walingest");
    let mut m = DatadirModification::new(&tl);
    let mut clearing: HashMap<Lsn, ClearingRecord> = HashMap::new();
    let mut final_lsn = None;
    'segments: for (i, (segno, path)) in segments.iter().filter(|(s, _)| *s >= first_segno).enumerate() {
        assert_eq!(*segno, first_segno + i as u64, "pg_wal must hold every segment since the import");
        let bytes = fs::read(path).expect("read segment");
        let from = if i == 0 { import_lsn.segment_offset(WAL_SEGMENT_SIZE as u64) as usize } else { 0 };
        decoder.feed(&bytes[from..]);
        while let Some(r) = decoder.poll_record().expect("decode WAL") {
            let rec = decode_record(r.record, r.start_lsn).expect("decode record");
            if vm_bits_cleared(&rec).expect("heap flags").is_some() {
                let what = describe(rec.rmid(), rec.rmgr_info());
                clearing.insert(r.end_lsn, ClearingRecord { raw: rec.raw.clone(), what });
            }
            ingest.ingest_record(&rec, r.end_lsn, &mut m).unwrap_or_else(|e| panic!("{e}"));
            if r.start_lsn == final_cf.checkpoint {
                final_lsn = Some(r.end_lsn);
                break 'segments;
            }
        }
    }
    let lsn = final_lsn.expect("the WAL must reach the shutdown checkpoint");

    // VM pages: Rust-applied clears vs Postgres's heap redo, at every clear.
    let mut compared = 0usize;
    let mut changed = 0usize;
    let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    let mut vm_pages = 0usize;
    for (spc, db) in tl.list_dbdirs(lsn).expect("dbdirs") {
        for rel in tl.list_rels(spc, db, lsn).expect("rels") {
            if rel.forknum != VISIBILITYMAP_FORKNUM {
                continue;
            }
            for blkno in 0..tl.get_rel_size(rel, lsn).expect("size") {
                let key = Key::rel_block(rel, blkno);
                let state = tl.get_reconstruct_state(key, lsn).expect("reconstruct state");
                let mut records = state.records.clone();
                records.reverse(); // oldest first
                if !records.iter().any(|(_, r)| matches!(r, WalRecord::ClearVisibilityMapFlags { .. })) {
                    continue;
                }
                vm_pages += 1;
                for end in 0..records.len() {
                    let (rec_lsn, rec) = &records[end];
                    if !matches!(rec, WalRecord::ClearVisibilityMapFlags { .. }) {
                        continue;
                    }
                    let prefix = records[..=end].to_vec();
                    let rust = applier.apply(key, *rec_lsn, state.img.clone(), prefix.clone()).unwrap_or_else(|e| {
                        panic!("{rel} block {blkno} at {rec_lsn}: the read path's redo failed: {e}")
                    });
                    let raw: Vec<(Lsn, Bytes)> = prefix
                        .iter()
                        .map(|(l, r)| match r {
                            WalRecord::Postgres { rec, .. } => (*l, rec.clone()),
                            WalRecord::ClearVisibilityMapFlags { .. } => {
                                let c =
                                    clearing.get(l).unwrap_or_else(|| panic!("no heap record clears VM bits at {l}"));
                                (*l, c.raw.clone())
                            }
                            other => panic!("{rel} block {blkno}: unexpected record {other:?} on a VM page"),
                        })
                        .collect();
                    let postgres = runtime
                        .block_on(manager.request_redo(BufferTag::new(rel, blkno), state.img.clone(), &raw))
                        .unwrap_or_else(|e| panic!("{rel} block {blkno} at {rec_lsn}: Postgres redo failed: {e}"));
                    if rust != postgres {
                        let first = rust.iter().zip(postgres.iter()).position(|(a, b)| a != b).unwrap_or(0);
                        panic!(
                            "{rel} block {blkno} at {rec_lsn} ({}, {} records): Rust and Postgres differ at byte {first}: \
                             {:02x?} vs {:02x?}",
                            clearing[rec_lsn].what,
                            prefix.len(),
                            &rust[first..(first + 8).min(BLCKSZ)],
                            &postgres[first..(first + 8).min(BLCKSZ)]
                        );
                    }
                    compared += 1;
                    // The clear did something (the page before it differs), so equality means
                    // both sides cleared the same bits, not that neither cleared any.
                    let before = match (end, &state.img) {
                        (0, Some((_, img))) => Some(img.clone()),
                        (0, None) => None,
                        _ => Some(
                            applier
                                .apply(key, records[end - 1].0, state.img.clone(), records[..end].to_vec())
                                .expect("redo"),
                        ),
                    };
                    if before.is_some_and(|b| b != rust) {
                        changed += 1;
                    }
                    *by_kind.entry(clearing[rec_lsn].what).or_default() += 1;
                }
                // The newest version also equals what Postgres wrote to the VM file.
                let ours = tl.get(key, lsn).expect("read VM page");
                let file = fs::read(datadir.join("base").join(db.to_string()).join(rel.file_name())).expect("VM file");
                let on_disk = &file[blkno as usize * BLCKSZ..(blkno as usize + 1) * BLCKSZ];
                assert!(ours.as_ref() == on_disk, "{rel} block {blkno}: the timeline's VM page differs from the file");
            }
        }
    }
    eprintln!("VM pages: {vm_pages}, clears compared: {compared} ({changed} changed the page) {by_kind:?}");
    assert!(changed * 2 > compared, "most clears must change the page: {changed} of {compared}");
    assert!(vm_pages >= 2, "both tables' VM pages have clears");
    for kind in ["heap update", "heap hot update", "heap delete", "heap lock", "heap insert", "heap2 multi-insert"] {
        assert!(by_kind.get(kind).is_some_and(|n| *n > 0), "no {kind} clearing VM bits was compared: {by_kind:?}");
    }

    // clog and multixact pages: Rust-built vs the segment files Postgres wrote.
    let cp = CheckPoint::decode(&tl.get_checkpoint(lsn).expect("checkpoint"), lsn).expect("decode checkpoint");
    let mut pages_compared = 0usize;
    for kind in [SlruKind::Clog, SlruKind::MultiXactOffsets, SlruKind::MultiXactMembers] {
        let files = slru_files(datadir.join(kind.dir_name()));
        assert!(!files.is_empty(), "{} has segments", kind.dir_name());
        for (segno, content) in files {
            let mut ours = tl.get_slru_segment(kind, segno, lsn).expect("slru segment").to_vec();
            if kind == SlruKind::MultiXactOffsets {
                // Postgres 15.9+ writes the next multixact's starting offset eagerly; ingest
                // leaves it to that multixact's own record (walingest.rs): only that entry may
                // differ, holding nextOffset on disk.
                let (page, byte) =
                    (multixact_id_to_offsets_page(cp.next_multi), multixact_id_to_offsets_byte(cp.next_multi));
                let at = (page % 32) as usize * BLCKSZ + byte;
                if page / 32 == segno && ours[at..at + 4] == [0; 4] {
                    ours[at..at + 4].copy_from_slice(&content[at..at + 4]);
                }
            }
            assert_eq!(ours.len(), content.len(), "{} segment {segno:04X} length", kind.dir_name());
            if let Some(at) = ours.iter().zip(&content).position(|(a, b)| a != b) {
                panic!("{} segment {segno:04X} differs from the file at byte {at}", kind.dir_name());
            }
            pages_compared += content.len() / BLCKSZ;
        }
    }
    eprintln!("SLRU pages compared with the files: {pages_compared}; took {:?}", started.elapsed());
}
