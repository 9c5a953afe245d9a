//! Basebackups of a timeline built from a real cluster's WAL, checked with stock Postgres.
//!
//! `initdb`, import, a workload on the real cluster (tables, indexes, updates and deletes, a
//! ~15 MB table, a second database, a multixact, an unlogged table, a prepared transaction left
//! open), `CHECKPOINT`, more changes, clean stop; the cluster's WAL is ingested into the
//! timeline, whose pages are rebuilt by the real Postgres redo ([`PostgresRedoApplier`]).
//! Then, at the last record LSN:
//!
//! - bad LSNs are refused with clear errors;
//! - a compute backup is under 1 MB, holds no relation data but unlogged init forks (and their
//!   main-fork copies), has the same non-relation files as the full backup, a `pg_control`
//!   pointing at the LSN, and a WAL segment `pg_waldump` reads the checkpoint record from;
//! - a full backup, extracted to a fresh directory, starts stock Postgres with no recovery and
//!   gives the same query answers as the original cluster; the prepared transaction can be
//!   committed, the unlogged table is empty, inserts work, `amcheck` passes; after a crash,
//!   recovery replays from our checkpoint record.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use common::{free_port, Cluster};
use pageserver::basebackup::{write_basebackup, BackupKind, BasebackupError};
use pageserver::import_datadir::{import_datadir, read_control_file, PgOsUser};
use pageserver::key::Key;
use pageserver::tenant::timeline::{TenantConf, Timeline, TimelineResources};
use postgres_ffi::controlfile::ControlFileData;
use postgres_ffi::xlog_page::skip_page_header;
use postgres_ffi::{DbState, RelTag, DEFAULTTABLESPACE_OID, WAL_SEGMENT_SIZE};
use utils::{Lsn, TenantId, TimelineId};

const TENANT: TenantId = TenantId([0xBB; 16]);
const TIMELINE: TimelineId = TimelineId([0xB1; 16]);
const COMPUTE_BACKUP_SIZE_BYTES_MAX: usize = 1_000_000;

const WORKLOAD: &str = r#"
CREATE TABLE t (id int PRIMARY KEY, v text);
INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 20000) g;
CREATE INDEX t_v ON t (v);
UPDATE t SET v = v || 'x' WHERE id % 7 = 0;
DELETE FROM t WHERE id % 13 = 0;
VACUUM t;
CREATE TABLE big (id int, payload text);
INSERT INTO big SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 80000) g;
CREATE UNLOGGED TABLE u (i int PRIMARY KEY, s text);
INSERT INTO u SELECT g, 'unlogged' FROM generate_series(1, 1000) g;
CREATE TABLE p (i int);
INSERT INTO p VALUES (1);
BEGIN; SELECT id FROM t WHERE id <= 5 FOR KEY SHARE; SAVEPOINT s; UPDATE t SET v = 'mx' WHERE id <= 5; COMMIT;
CREATE DATABASE db2;
\c db2
CREATE TABLE t2 (i int PRIMARY KEY, s text);
INSERT INTO t2 SELECT g, g::text FROM generate_series(1, 3000) g;
UPDATE t2 SET s = 'u' WHERE i % 10 = 0;
\c postgres
CHECKPOINT;
INSERT INTO t SELECT g, 'after checkpoint' FROM generate_series(30001, 30500) g;
UPDATE big SET payload = 'changed' WHERE id % 1000 = 0;
DELETE FROM t WHERE id BETWEEN 100 AND 200;
BEGIN; INSERT INTO p VALUES (2); PREPARE TRANSACTION 'left_prepared';
"#;

/// Answers compared between the original cluster and the one started from the full backup.
const QUERIES_POSTGRES: &str = r#"
SELECT 't', count(*), sum(id), sum(length(v)), md5(string_agg(v, ',' ORDER BY id)) FROM t;
SET enable_seqscan = off;
SELECT 't by index', count(*), sum(id) FROM t WHERE v > '';
RESET enable_seqscan;
SELECT 'big', count(*), sum(id), sum(length(payload)) FROM big;
SELECT 'p', count(*), sum(i) FROM p;
"#;
const QUERIES_DB2: &str = "SELECT 't2', count(*), sum(i), md5(string_agg(s, ',' ORDER BY i)) FROM t2;";

/// `<relnode>[_fsm|_vm|_init][.<segno>]`: (relnode, fork suffix).
fn parse_rel_file(name: &str) -> Option<(u32, &str)> {
    let stem = name.split_once('.').map_or(name, |(stem, _)| stem);
    let (rel, fork) = stem.split_once('_').unwrap_or((stem, ""));
    let relnode = rel.parse::<u32>().ok()?;
    matches!(fork, "" | "fsm" | "vm" | "init").then_some((relnode, fork))
}

/// Path → content of every regular file of a tar archive.
fn tar_files(tar_bytes: impl Read) -> BTreeMap<String, Vec<u8>> {
    let mut archive = tar::Archive::new(tar_bytes);
    let mut out = BTreeMap::new();
    for entry in archive.entries().expect("tar entries") {
        let mut entry = entry.expect("tar entry");
        if entry.header().entry_type().is_dir() {
            continue;
        }
        let path = entry.path().expect("path").to_string_lossy().into_owned();
        let mut content = Vec::new();
        entry.read_to_end(&mut content).expect("read tar entry");
        out.insert(path, content);
    }
    out
}

fn is_relation_file(path: &str) -> bool {
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    (dir == "global" || dir.starts_with("base/")) && parse_rel_file(name).is_some()
}

/// Unpacks a tar into `datadir` and hands everything to the OS user Postgres runs as.
fn extract(tar_path: &Path, datadir: &Path, os_user: Option<&PgOsUser>) {
    fs::create_dir(datadir).expect("create datadir");
    let mut archive = tar::Archive::new(fs::File::open(tar_path).expect("open tar"));
    archive.set_preserve_permissions(true);
    archive.unpack(datadir).expect("unpack");
    fn walk(path: &Path, os_user: Option<&PgOsUser>) {
        if let Some(u) = os_user {
            u.chown(path).expect("chown");
        }
        if path.is_dir() {
            for e in fs::read_dir(path).expect("read_dir") {
                walk(&e.expect("entry").path(), os_user);
            }
        }
    }
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(datadir, fs::Permissions::from_mode(0o700)).expect("chmod datadir");
    walk(datadir, os_user);
}

#[test]
fn basebackup_full_and_compute_with_postgres() {
    let started = std::time::Instant::now();
    let install = common::pg_install_dir();
    let (dir, datadir, os_user) = common::initdb_in_tempdir(&install, "basebackup-pg-");

    // The timeline, with the real Postgres redo behind its read path.
    let real_redo = common::RealRedo::start(&install);
    let (runtime, manager) = (&real_redo.runtime, &real_redo.manager);
    let redo = Arc::new(real_redo.applier());
    let conf = TenantConf { checkpoint_distance_bytes: 8 << 20, ..TenantConf::default() };
    let workdir = tempfile::tempdir().expect("workdir");
    let (cf, _) = read_control_file(&datadir).expect("pg_control");
    let import_lsn = cf.checkpoint;
    let tl =
        Timeline::create_empty(workdir.path(), TENANT, TIMELINE, import_lsn, 15, TimelineResources::new(conf, redo))
            .expect("create timeline");
    assert_eq!(import_datadir(&tl, &datadir).expect("import"), import_lsn);

    // The workload on the real cluster, and the answers to compare with later.
    let mut pg = Cluster {
        install: install.clone(),
        os_user: os_user.clone(),
        dir: dir.path().to_path_buf(),
        datadir: datadir.clone(),
        log: dir.path().join("original.log"),
        port: free_port(),
        running: false,
    };
    pg.configure("wal_level = replica\nwal_keep_size = '1GB'\nmax_wal_size = '1GB'\nlog_min_messages = warning");
    pg.start();
    pg.psql("postgres", WORKLOAD);
    let answers = pg.psql("postgres", QUERIES_POSTGRES);
    let answers_db2 = pg.psql("db2", QUERIES_DB2);
    let big =
        pg.psql("postgres", "SELECT pg_relation_filenode('big'), oid FROM pg_database WHERE datname = 'postgres'");
    let (big_relnode, postgres_db) = big.trim().split_once('|').expect("filenode|oid");
    let big_rel = RelTag {
        spcnode: DEFAULTTABLESPACE_OID,
        dbnode: postgres_db.parse().expect("oid"),
        relnode: big_relnode.parse().expect("filenode"),
        forknum: 0,
    };
    pg.stop("fast");
    let (final_cf, _) = read_control_file(&datadir).expect("pg_control after stop");
    let (lsn, record_count) = common::ingest_wal(&tl, &datadir, import_lsn, final_cf.checkpoint);
    assert_eq!(tl.get_last_record_lsn(), lsn);
    assert_eq!(tl.get_prev_record_lsn(), Some(final_cf.checkpoint));
    let big_bytes = u64::from(tl.get_rel_size(big_rel, lsn).expect("size of big")) * 8192;
    assert!(big_bytes >= 10 << 20, "the big table has {big_bytes} bytes");
    // Most of the big table's pages are WAL records on the timeline, not images: the full
    // backup's copy of them comes through Postgres redo.
    let big_blocks = tl.get_rel_size(big_rel, lsn).expect("size of big");
    let needs_redo = (0..big_blocks)
        .filter(|&blkno| {
            let state = tl.get_reconstruct_state(Key::rel_block(big_rel, blkno), lsn).expect("reconstruct state");
            !state.records.is_empty()
        })
        .count();
    assert!(needs_redo * 2 > big_blocks as usize, "{needs_redo} of {big_blocks} blocks need redo");
    eprintln!(
        "ingested {record_count} records up to {lsn}; big table {big_bytes} bytes, {needs_redo} of its blocks need \
         redo ({:?})",
        started.elapsed()
    );

    // 3. Bad input.
    let refused = |lsn: Lsn| {
        let err = write_basebackup(Vec::new(), &tl, lsn, None, BackupKind::Compute).expect_err("must be refused");
        assert!(matches!(err, BasebackupError::InvalidRequest { .. }), "{err}");
        err.to_string()
    };
    let err = refused(Lsn(lsn.0 + 8));
    assert!(err.contains("above the last ingested record LSN"), "{err}");
    let err = refused(Lsn(import_lsn.0 - 8));
    assert!(err.contains("below the initdb LSN"), "{err}");

    // 2. Compute backup.
    let mut compute_tar = Vec::new();
    let stats =
        write_basebackup(&mut compute_tar, &tl, lsn, None, BackupKind::Compute).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("compute backup: {stats:?}");
    assert_eq!(stats.tar_size_bytes, compute_tar.len() as u64);
    assert!(compute_tar.len() < COMPUTE_BACKUP_SIZE_BYTES_MAX, "compute backup is {} bytes", compute_tar.len());
    let start_lsn = skip_page_header(lsn, WAL_SEGMENT_SIZE);
    assert_eq!(stats.checkpoint_lsn, start_lsn);
    let compute_files = tar_files(&compute_tar[..]);
    let mut unlogged_files = BTreeSet::new();
    for path in compute_files.keys().filter(|p| is_relation_file(p)) {
        let (dir, name) = path.rsplit_once('/').expect("dir/name");
        let (relnode, fork) = parse_rel_file(name).expect("relation file");
        assert!(fork == "init" || fork.is_empty(), "{path}: only init forks and their main copies");
        assert!(compute_files.contains_key(&format!("{dir}/{relnode}_init")), "{path} is not an unlogged relation");
        unlogged_files.insert(path.clone());
    }
    assert!(unlogged_files.len() >= 4, "u and its index, init and main each: {unlogged_files:?}");
    let cf = ControlFileData::decode(&compute_files["global/pg_control"]).expect("decode pg_control");
    assert_eq!((cf.checkpoint, cf.checkpoint_copy.redo, cf.state), (start_lsn, start_lsn, DbState::Shutdowned));
    assert_eq!(cf.system_identifier, final_cf.system_identifier);
    // pg_waldump reads the checkpoint record at the LSN from the extracted pg_wal.
    let wal_dir = dir.path().join("compute_wal");
    fs::create_dir(&wal_dir).expect("mkdir");
    for (path, content) in compute_files.iter().filter(|(p, _)| p.starts_with("pg_wal/")) {
        fs::write(wal_dir.join(path.trim_start_matches("pg_wal/")), content).expect("write segment");
    }
    let mut waldump = std::process::Command::new(install.join("bin/pg_waldump"));
    waldump.arg("-p").arg(&wal_dir).args(["-s", &start_lsn.to_string(), "-n", "1"]);
    let out = common::output(&mut waldump);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pg_waldump failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    // pg_waldump prints record LSNs as %X/%08X, the redo pointer as %X/%X.
    let padded = |l: Lsn| format!("{:X}/{:08X}", l.0 >> 32, l.0 & 0xFFFF_FFFF);
    let want = format!("lsn: {}, prev {}", padded(start_lsn), padded(final_cf.checkpoint));
    assert!(text.contains(&want), "{want}: {text}");
    assert!(text.contains(&format!("desc: CHECKPOINT_SHUTDOWN redo {start_lsn}")), "{text}");
    eprintln!("pg_waldump: {}", text.trim());

    // 1. Full backup, started with stock Postgres.
    let full_path = dir.path().join("full.tar");
    let full_stats =
        write_basebackup(fs::File::create(&full_path).expect("create tar"), &tl, lsn, None, BackupKind::Full)
            .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("full backup: {full_stats:?} ({:?})", started.elapsed());
    let full_files = tar_files(fs::File::open(&full_path).expect("open tar"));
    assert_eq!(
        full_files.get(&format!("base/{}/{}", big_rel.dbnode, big_rel.relnode)).map(Vec::len),
        Some(big_bytes as usize)
    );
    // Both kinds carry the same non-relation files (and the same unlogged relations).
    let non_relation = |files: &BTreeMap<String, Vec<u8>>| -> BTreeMap<String, Vec<u8>> {
        files
            .iter()
            .filter(|(p, _)| !is_relation_file(p) || unlogged_files.contains(*p))
            .map(|(p, c)| (p.clone(), c.clone()))
            .collect()
    };
    assert!(
        non_relation(&full_files) == non_relation(&compute_files),
        "compute and full backups differ outside relation data"
    );

    let restored = dir.path().join("restored");
    extract(&full_path, &restored, os_user.as_ref());
    let mut pg2 = Cluster {
        install: install.clone(),
        os_user: os_user.clone(),
        dir: dir.path().to_path_buf(),
        datadir: restored.clone(),
        log: dir.path().join("restored.log"),
        port: free_port(),
        running: false,
    };
    pg2.configure("");
    pg2.start();
    let log = pg2.log_text();
    assert!(log.contains("database system was shut down at"), "{log}");
    for bad in ["redo starts", "not properly shut down", "automatic recovery"] {
        assert!(!log.contains(bad), "{bad}: {log}");
    }
    assert_eq!(pg2.psql("postgres", QUERIES_POSTGRES), answers);
    assert_eq!(pg2.psql("db2", QUERIES_DB2), answers_db2);
    assert_eq!(pg2.psql("postgres", "SELECT gid FROM pg_prepared_xacts").trim(), "left_prepared");
    pg2.psql("postgres", "COMMIT PREPARED 'left_prepared'");
    assert_eq!(pg2.psql("postgres", "SELECT count(*), sum(i) FROM p").trim(), "2|3");
    assert_eq!(pg2.psql("postgres", "SELECT count(*) FROM u").trim(), "0");
    pg2.psql("postgres", "INSERT INTO u VALUES (1, 'again'); INSERT INTO t VALUES (100000, 'new')");
    assert_eq!(pg2.psql("postgres", "SELECT count(*) FROM u").trim(), "1");
    let checks = pg2.psql(
        "postgres",
        "CREATE EXTENSION amcheck;\n\
         SELECT bt_index_check('t_v'::regclass, true);\n\
         SELECT bt_index_check('t_pkey'::regclass, true);\n\
         SELECT bt_index_check('u_pkey'::regclass, true);\n\
         SELECT count(*) FROM t WHERE id = 100000;",
    );
    assert_eq!(checks.trim().lines().last(), Some("1"), "{checks}");
    pg2.psql("db2", "CREATE EXTENSION amcheck; SELECT bt_index_check('t2_pkey'::regclass, true)");
    // A crash now: recovery starts at our checkpoint record and replays what came after it.
    pg2.stop("immediate");
    pg2.start();
    let log = pg2.log_text();
    // Redo starts at the first record after our checkpoint, which the restored cluster wrote.
    assert!(log.contains(&format!("redo starts at {}", stats.next_record_lsn)), "{log}");
    assert_eq!(pg2.psql("postgres", "SELECT count(*) FROM t WHERE id = 100000").trim(), "1");
    pg2.stop("fast");

    assert!(manager.processes_started() >= 1, "the full backup used the Postgres redo processes");
    runtime.block_on(manager.shut_down());
    eprintln!(
        "compute backup {} bytes ({} files), full backup {} bytes ({} relation bytes); {:?}",
        stats.tar_size_bytes,
        stats.file_count,
        full_stats.tar_size_bytes,
        full_stats.relation_size_bytes,
        started.elapsed()
    );
}
