//! Real WAL from Postgres 15, decoded by us and by `pg_waldump`, compared record by record.
//!
//! A workload touching every record kind the pageserver cares about runs three times, with
//! `wal_compression` = pglz, lz4 and zstd (a CHECKPOINT first, so full-page images appear).
//! Then every segment in `pg_wal` goes through our stream decoder and record decoder, and
//! through `pg_waldump --bkp-details`; LSN, rmgr, lengths, xid, prev-link and every block
//! reference must agree, every FPI must restore to a sane page, and every typed body must
//! parse. Minimum counts make the test fail if the workload silently stops covering a case.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::time::Duration;

use common::{wal_segment_files, PgCluster, PgEnv};
use postgres_ffi::fpi::{decompress_image, restore_block_image};
use postgres_ffi::page::{page_get_lsn, page_is_new, PageHeaderData};
use postgres_ffi::record::decode_record;
use postgres_ffi::records::{parse_record_body, RecordBody};
use postgres_ffi::reltag::fork_name;
use postgres_ffi::xlog_file::parse_xlog_file_name;
use postgres_ffi::{ImageCompression, WalDecoderConfig, WalStreamDecoder, BLCKSZ, WAL_SEGMENT_SIZE};
use utils::Lsn;

const CONF: &str = "
wal_level = replica
full_page_writes = on
max_prepared_transactions = 10
wal_keep_size = '4GB'
max_wal_size = '4GB'
autovacuum = off
fsync = off
log_min_messages = warning
";

fn workload(m: &str, first: bool) -> String {
    let relmap = if first { "VACUUM FULL pg_class;" } else { "" };
    format!(
        r#"
SET wal_compression = '{m}';
CHECKPOINT;
CREATE TABLE heap_{m} (id int PRIMARY KEY, v text, arr int[], pt point, tsv tsvector);
INSERT INTO heap_{m} SELECT g, md5(g::text), ARRAY[g % 10, g % 7], point(g % 100, g / 100),
    to_tsvector('simple', 'w' || (g % 50)) FROM generate_series(1, 3000) g;
CREATE INDEX heap_{m}_gin ON heap_{m} USING gin (arr);
CREATE INDEX heap_{m}_tsv ON heap_{m} USING gin (tsv);
CREATE INDEX heap_{m}_gist ON heap_{m} USING gist (pt);
CREATE INDEX heap_{m}_hash ON heap_{m} USING hash (v);
CREATE INDEX heap_{m}_brin ON heap_{m} USING brin (id);
CREATE INDEX heap_{m}_spg ON heap_{m} USING spgist (pt);
VACUUM (FREEZE) heap_{m};
CHECKPOINT;
BEGIN; SELECT id FROM heap_{m} WHERE id IN (1, 2, 3, 700) FOR UPDATE; COMMIT;
UPDATE heap_{m} SET v = v || 'u' WHERE id % 5 = 0;
DELETE FROM heap_{m} WHERE id % 11 = 0;
INSERT INTO heap_{m} SELECT g, md5(g::text), ARRAY[g], point(g, g), to_tsvector('simple', 'x')
    FROM generate_series(3001, 3500) g;
COPY (SELECT 1) TO STDOUT;
CREATE SEQUENCE seq_{m};
SELECT count(nextval('seq_{m}')) FROM generate_series(1, 200);
CREATE TABLE toast_{m} (id int, big text);
INSERT INTO toast_{m} SELECT g, (SELECT string_agg(md5((g * 1000 + i)::text), '') FROM generate_series(1, 400) i)
    FROM generate_series(1, 20) g;
CREATE TABLE trunc_{m} AS SELECT g FROM generate_series(1, 1000) g;
TRUNCATE trunc_{m};
DELETE FROM heap_{m} WHERE id > 3300;
VACUUM heap_{m};
CREATE TABLE vt_{m} AS SELECT g FROM generate_series(1, 5000) g;
DELETE FROM vt_{m} WHERE g > 100;
VACUUM vt_{m};
CREATE TABLE sub_{m} (i int);
BEGIN;
SAVEPOINT a; INSERT INTO sub_{m} VALUES (-1);
SAVEPOINT b; INSERT INTO sub_{m} VALUES (-2); ROLLBACK TO SAVEPOINT b;
RELEASE SAVEPOINT a;
DO $$ BEGIN FOR i IN 1..100 LOOP BEGIN INSERT INTO sub_{m} VALUES (i); EXCEPTION WHEN others THEN NULL; END; END LOOP; END $$;
COMMIT;
CREATE TABLE tp_{m} (i int);
BEGIN; INSERT INTO tp_{m} VALUES (1); SAVEPOINT s; INSERT INTO tp_{m} VALUES (2); PREPARE TRANSACTION 'commit_{m}';
COMMIT PREPARED 'commit_{m}';
BEGIN; INSERT INTO tp_{m} VALUES (3); CREATE TABLE tp_drop_{m} (i int); PREPARE TRANSACTION 'abort_{m}';
ROLLBACK PREPARED 'abort_{m}';
CREATE TABLE mx_{m} (id int PRIMARY KEY, v int);
INSERT INTO mx_{m} SELECT g, 0 FROM generate_series(1, 20) g;
BEGIN; SELECT id FROM mx_{m} WHERE id <= 5 FOR KEY SHARE; SAVEPOINT s; UPDATE mx_{m} SET v = 1 WHERE id <= 5; COMMIT;
CREATE DATABASE db_wal_{m} STRATEGY wal_log;
CREATE DATABASE db_copy_{m} STRATEGY file_copy;
DROP DATABASE db_copy_{m};
{relmap}
"#
    )
}

/// Two sessions lock the same rows FOR KEY SHARE while both are open: a multixact.
fn concurrent_key_share(pg: &PgCluster, m: &str) {
    let holder = pg.spawn_psql(&format!(
        "BEGIN; SELECT id FROM mx_{m} WHERE id > 10 FOR KEY SHARE; SELECT pg_sleep(1.5) AS holder_{m}; COMMIT;"
    ));
    pg.wait_for(
        &format!("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(1.5) AS holder_{m}%' AND state = 'active' AND pid <> pg_backend_pid()"),
        "1",
        Duration::from_secs(20),
    );
    pg.psql_script(
        &format!("keyshare_{m}"),
        &format!("BEGIN; SELECT id FROM mx_{m} WHERE id > 10 FOR KEY SHARE; COMMIT;"),
    );
    let out = holder.wait_with_output().expect("wait for holder psql");
    assert!(out.status.success(), "holder session failed: {}", String::from_utf8_lossy(&out.stderr));
}

#[derive(Debug, Clone, PartialEq)]
struct DumpBlock {
    id: u8,
    rel: String,
    fork: String,
    blk: u32,
    /// (apply, hole offset, hole length, method) when an image is present.
    fpw: Option<(bool, u16, u16, String)>,
}

#[derive(Debug, Clone)]
struct DumpRecord {
    rmgr: String,
    rec_len: u32,
    tot_len: u32,
    xid: u32,
    lsn: Lsn,
    prev: Lsn,
    desc: String,
    blocks: Vec<DumpBlock>,
}

fn field<'a>(line: &'a str, name: &str) -> &'a str {
    let start = line.find(name).unwrap_or_else(|| panic!("no {name:?} in pg_waldump line {line:?}")) + name.len();
    let rest = &line[start..];
    rest[..rest.find(',').unwrap_or(rest.len())].trim()
}

fn parse_waldump(out: &str) -> Vec<DumpRecord> {
    let mut recs: Vec<DumpRecord> = Vec::new();
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("rmgr: ") {
            let rmgr = rest[..rest.find("len (rec/tot)").expect("len field")].trim().to_string();
            let (rec_len, tot_len) = field(line, "len (rec/tot):").split_once('/').expect("rec/tot");
            recs.push(DumpRecord {
                rmgr,
                rec_len: rec_len.trim().parse().expect("rec len"),
                tot_len: tot_len.trim().parse().expect("tot len"),
                xid: field(line, "tx:").parse().expect("tx"),
                lsn: field(line, "lsn:").parse().expect("lsn"),
                prev: field(line, "prev").parse().expect("prev"),
                desc: line[line.find("desc: ").map(|i| i + 6).unwrap_or(line.len())..].to_string(),
                blocks: Vec::new(),
            });
        } else if let Some(rest) = line.strip_prefix("\tblkref #") {
            let t: Vec<&str> = rest.split_whitespace().collect();
            // ["0:", "rel", "S/D/R", "fork", "main", "blk", "7", ...]
            let fpw = if t.len() > 7 {
                let apply = t[7] == "(FPW);";
                let i = t.iter().position(|x| *x == "offset:").expect("hole offset");
                let method = t
                    .iter()
                    .position(|x| *x == "method:")
                    .map(|j| t[j + 1].to_string())
                    .unwrap_or_else(|| "none".into());
                Some((
                    apply,
                    t[i + 1].trim_end_matches(',').parse().expect("hole offset"),
                    t[i + 3].trim_end_matches(',').parse().expect("hole length"),
                    method,
                ))
            } else {
                None
            };
            let block = DumpBlock {
                id: t[0].trim_end_matches(':').parse().expect("block id"),
                rel: t[2].to_string(),
                fork: t[4].to_string(),
                blk: t[6].parse().expect("blk"),
                fpw,
            };
            recs.last_mut().expect("blkref before any record").blocks.push(block);
        }
    }
    recs
}

#[derive(Default, Debug)]
struct Coverage {
    records: usize,
    fpis: BTreeMap<&'static str, usize>,
    commits_with_subxacts: usize,
    aborts: usize,
    prepares: usize,
    commit_prepared: usize,
    abort_prepared: usize,
    multixact_creates: usize,
    dbase_create_wal_log: usize,
    dbase_create_file_copy: usize,
    dbase_drops: usize,
    smgr_creates: usize,
    smgr_truncates: usize,
    relmap_updates: usize,
    checkpoints: usize,
    running_xacts: usize,
    vm_clears: usize,
    rmgrs: BTreeMap<String, usize>,
}

#[test]
fn our_decoder_agrees_with_pg_waldump() {
    let env = PgEnv::find();
    let mut methods = vec!["pglz"];
    for (m, flag) in [("lz4", "--with-lz4"), ("zstd", "--with-zstd")] {
        if env.supports(flag) {
            methods.push(m);
        } else {
            eprintln!("NOTE: this Postgres build lacks {flag}; {m} FPIs are not covered");
        }
    }

    let mut pg = PgCluster::init(&env, CONF);
    pg.start();
    for (i, m) in methods.iter().enumerate() {
        pg.psql(&format!("ALTER SYSTEM SET wal_compression = '{m}'"));
        pg.psql("SELECT pg_reload_conf()");
        pg.psql_script(&format!("workload_{m}"), &workload(m, i == 0));
        concurrent_key_share(&pg, m);
        pg.psql("CHECKPOINT");
    }
    pg.stop();

    let pg_wal = pg.datadir.join("pg_wal");
    let files = wal_segment_files(&pg_wal);
    assert!(!files.is_empty(), "no WAL segments in {}", pg_wal.display());

    // Our side: every segment, in order, through one stream decoder.
    let seg = WAL_SEGMENT_SIZE;
    let first_segno = parse_xlog_file_name(&files[0], seg).expect("segment name").0;
    let start = Lsn(first_segno * seg as u64);
    let cfg = WalDecoderConfig { segment_size_bytes: seg, system_id: None, prev_record_lsn: None };
    let mut decoder = WalStreamDecoder::with_config(start, cfg).expect("decoder");
    let mut ours = Vec::new();
    let mut end_of_wal = None;
    'files: for (i, name) in files.iter().enumerate() {
        let segno = parse_xlog_file_name(name, seg).expect("segment name").0;
        assert_eq!(segno, first_segno + i as u64, "pg_wal has a gap before {name}");
        let bytes = fs::read(pg_wal.join(name)).expect("read segment");
        assert_eq!(bytes.len(), seg, "{name} is not a whole segment");
        decoder.feed(&bytes);
        loop {
            match decoder.poll_record() {
                Ok(Some(r)) => ours.push(r),
                Ok(None) => break,
                Err(e) if e.is_end_of_wal() => {
                    end_of_wal = Some(e.lsn());
                    break 'files;
                }
                Err(e) => panic!("our decoder failed on real WAL: {e}"),
            }
        }
    }
    let end_of_wal = end_of_wal.expect("WAL should end with zeros after the shutdown checkpoint");

    // pg_waldump's side.
    let out = env
        .cmd("pg_waldump")
        .args(["--bkp-details", "-p"])
        .arg(&pg_wal)
        .arg(&files[0])
        .arg(files.last().unwrap())
        .output()
        .expect("run pg_waldump");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let expected_end = stderr.contains(&format!("invalid record length at {end_of_wal}: wanted 24, got 0"))
            || stderr.contains("invalid magic number 0000");
        assert!(expected_end, "pg_waldump failed other than at the end of WAL ({end_of_wal}):\n{stderr}");
    }
    let theirs = parse_waldump(&String::from_utf8_lossy(&out.stdout));

    // The last record is the shutdown checkpoint pg_control points at.
    let controldata = env.run("pg_controldata", &["-D", pg.datadir.to_str().unwrap()]);
    let latest = controldata
        .lines()
        .find_map(|l| l.strip_prefix("Latest checkpoint location:"))
        .expect("latest checkpoint line")
        .trim()
        .parse::<Lsn>()
        .expect("checkpoint lsn");
    assert_eq!(ours.last().map(|r| r.start_lsn), Some(latest));

    let mut mismatches = Vec::new();
    if ours.len() != theirs.len() {
        mismatches.push(format!("record count: ours {} vs pg_waldump {}", ours.len(), theirs.len()));
    }
    let mut cov = Coverage::default();
    for (r, d) in ours.iter().zip(theirs.iter()) {
        let rec = decode_record(r.record.clone(), r.start_lsn).unwrap_or_else(|e| panic!("record decode failed: {e}"));
        let h = &rec.header;
        let ours_line =
            (h.rmgr_name(), h.xl_tot_len - rec.fpi_len() as u32, h.xl_tot_len, h.xl_xid, r.start_lsn, h.xl_prev);
        let their_line = (d.rmgr.clone(), d.rec_len, d.tot_len, d.xid, d.lsn, d.prev);
        if ours_line != their_line {
            mismatches.push(format!("at {}: ours {ours_line:?} vs pg_waldump {their_line:?}", r.start_lsn));
        }
        let our_blocks: Vec<DumpBlock> = rec
            .blocks
            .iter()
            .map(|b| DumpBlock {
                id: b.block_id,
                rel: b.rel.to_string(),
                fork: fork_name(b.forknum).unwrap_or("?").to_string(),
                blk: b.blkno,
                fpw: b
                    .image
                    .as_ref()
                    .map(|i| (i.apply, i.hole_offset, i.hole_length, i.compression.name().to_string())),
            })
            .collect();
        if our_blocks != d.blocks {
            mismatches.push(format!("block refs at {}: ours {our_blocks:?} vs pg_waldump {:?}", r.start_lsn, d.blocks));
        }

        // Every image restores to a sane page.
        for b in &rec.blocks {
            let Some(img) = &b.image else { continue };
            let stored = decompress_image(img, r.start_lsn).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(stored.len(), BLCKSZ - img.hole_length as usize);
            let page = restore_block_image(b, r.start_lsn).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(page.len(), BLCKSZ);
            let pd_lsn = page_get_lsn(&page).unwrap();
            assert!(
                pd_lsn <= r.start_lsn,
                "FPI at {} of {} has pd_lsn {pd_lsn} from the future",
                r.start_lsn,
                b.rel_tag()
            );
            if !page_is_new(&page) {
                let hdr = PageHeaderData::decode(&page).unwrap();
                assert_eq!(
                    hdr.pd_pagesize_version,
                    8192 | 4,
                    "FPI at {} of {}: bad page header {hdr:?}",
                    r.start_lsn,
                    b.rel_tag()
                );
                assert!(
                    hdr.pd_lower <= hdr.pd_upper && hdr.pd_upper <= hdr.pd_special,
                    "FPI at {}: {hdr:?}",
                    r.start_lsn
                );
            }
            *cov.fpis.entry(img.compression.name()).or_default() += 1;
        }

        // Every typed body parses.
        let body = parse_record_body(&rec)
            .unwrap_or_else(|e| panic!("body of {} record ({}) failed to parse: {e}", d.rmgr, d.desc));
        match body {
            Some(RecordBody::XactCompletion(x)) => {
                use postgres_ffi::records::xact::XactKind::*;
                match x.kind {
                    Commit if !x.subxacts.is_empty() => cov.commits_with_subxacts += 1,
                    Commit => {}
                    Abort => cov.aborts += 1,
                    CommitPrepared => cov.commit_prepared += 1,
                    AbortPrepared => cov.abort_prepared += 1,
                }
                if x.twophase_gid.is_some() {
                    assert!(d.desc.contains(x.twophase_gid.as_deref().unwrap()), "gid not in {:?}", d.desc);
                }
            }
            Some(RecordBody::XactPrepare(p)) => {
                assert!(d.desc.contains(&p.gid), "prepare gid {} not in {:?}", p.gid, d.desc);
                cov.prepares += 1;
            }
            Some(RecordBody::MultiXactCreate(c)) => {
                assert!(c.members.len() >= 2);
                cov.multixact_creates += 1;
            }
            Some(RecordBody::DbaseCreateWalLog(_)) => cov.dbase_create_wal_log += 1,
            Some(RecordBody::DbaseCreateFileCopy(_)) => cov.dbase_create_file_copy += 1,
            Some(RecordBody::DbaseDrop(_)) => cov.dbase_drops += 1,
            Some(RecordBody::SmgrCreate(_)) => cov.smgr_creates += 1,
            Some(RecordBody::SmgrTruncate(_)) => cov.smgr_truncates += 1,
            Some(RecordBody::RelmapUpdate(u)) => {
                assert_eq!(u.data.len(), postgres_ffi::records::relmap::RELMAP_FILE_SIZE);
                cov.relmap_updates += 1;
            }
            Some(RecordBody::Checkpoint { checkpoint, .. }) => {
                assert!(d.desc.contains(&format!("redo {}", checkpoint.redo)), "{:?}", d.desc);
                cov.checkpoints += 1;
            }
            Some(RecordBody::RunningXacts(_)) => cov.running_xacts += 1,
            Some(RecordBody::Heap(_)) => cov.vm_clears += 1,
            _ => {}
        }
        *cov.rmgrs.entry(d.rmgr.clone()).or_default() += 1;
        cov.records += 1;
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches, first ones:\n{}",
        mismatches.len(),
        mismatches[..mismatches.len().min(20)].join("\n")
    );
    eprintln!("compared {} records up to {end_of_wal}; coverage: {cov:?}", cov.records);

    // The workload must keep covering what the pageserver depends on.
    for m in &methods {
        let n = cov.fpis.get(*m).copied().unwrap_or(0);
        assert!(n >= 20, "only {n} FPIs compressed with {m}");
    }
    assert!(cov.fpis.get(ImageCompression::None.name()).copied().unwrap_or(0) >= 1, "no uncompressed FPIs");
    assert!(cov.commits_with_subxacts >= methods.len(), "{cov:?}");
    assert!(cov.prepares >= 2 * methods.len(), "{cov:?}");
    assert!(cov.commit_prepared >= methods.len() && cov.abort_prepared >= methods.len(), "{cov:?}");
    assert!(cov.multixact_creates >= 2 * methods.len(), "{cov:?}");
    assert!(cov.dbase_create_wal_log >= methods.len() && cov.dbase_create_file_copy >= methods.len(), "{cov:?}");
    assert!(cov.dbase_drops >= methods.len(), "{cov:?}");
    assert!(cov.smgr_creates > 0 && cov.smgr_truncates > 0 && cov.relmap_updates > 0, "{cov:?}");
    assert!(cov.checkpoints > methods.len() && cov.running_xacts > 0 && cov.vm_clears > 0, "{cov:?}");
    for rmgr in ["Heap", "Heap2", "Btree", "Gin", "Gist", "Hash", "SPGist", "BRIN", "Sequence", "Standby", "MultiXact"]
    {
        assert!(cov.rmgrs.contains_key(rmgr), "no {rmgr} records: {:?}", cov.rmgrs);
    }
}
