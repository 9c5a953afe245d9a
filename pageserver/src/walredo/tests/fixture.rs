//! Real WAL for the redo tests: run our Postgres build on a workload, stop it, decode its WAL
//! with `postgres_ffi`, and turn it into one redo request per block, paired with the block as
//! the stopped cluster wrote it to its data file.
//!
//! Built once per test binary (the first test that needs it pays for initdb and the workload)
//! and kept in memory; the cluster's directory is deleted as soon as everything is read.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use bytes::Bytes;
use postgres_ffi::fpi::restore_block_image;
use postgres_ffi::page::{page_is_new, page_set_lsn};
use postgres_ffi::record::ImageCompression;
use postgres_ffi::reltag::MAIN_FORKNUM;
use postgres_ffi::{decode_record, RelTag, WalStreamDecoder, BLCKSZ, DEFAULTTABLESPACE_OID, WAL_SEGMENT_SIZE};
use utils::Lsn;

use crate::walredo::BufferTag;

/// Which masking rules apply to a page (see `mask_page` in the tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    Heap,
    Btree,
}

/// One block to reconstruct and what it must come out as.
#[derive(Debug, Clone)]
pub struct RedoCase {
    pub tag: BufferTag,
    pub kind: PageKind,
    /// The last full-page image of the block (restored, page LSN = its record's end LSN), or
    /// `None` when the chain starts at a will-init record.
    pub base: Option<(Lsn, Bytes)>,
    /// The record that carried `base`, to check that redo of the image itself gives the same.
    pub base_record: Option<(Lsn, Bytes)>,
    pub base_compression: Option<ImageCompression>,
    /// Records after the base, oldest first, as (end LSN, raw record).
    pub records: Vec<(Lsn, Bytes)>,
    /// Some record in `records` also references another block (update old/new, btree split).
    pub has_multi_block_record: bool,
    /// The block as the stopped cluster wrote it to its data file.
    pub expected: Bytes,
}

pub struct Fixture {
    pub install_dir: PathBuf,
    pub cases: Vec<RedoCase>,
}

/// The shared fixture; panics (failing the test) with the reason when it cannot be built.
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(build_fixture)
}

/// Where our Postgres build is: `$PG_INSTALL_DIR`, else `pg_install` at the workspace root.
pub fn pg_install_dir() -> PathBuf {
    match std::env::var_os("PG_INSTALL_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("pg_install"),
    }
}

/// The workload: a table with a primary key and a second btree index; inserts onto new pages
/// (will-init records), a checkpoint so later changes start with full-page images, updates
/// (HOT and non-HOT: old and new block in one record), deletes, vacuum (prune, freeze,
/// visibility), more inserts into freed space and new pages, index page splits, and a second
/// phase whose full-page images are pglz-compressed.
const WORKLOAD_SQL: &str = "
CREATE TABLE redo_t (id int PRIMARY KEY, n int NOT NULL, pad text) WITH (autovacuum_enabled = off);
CREATE INDEX redo_t_n ON redo_t (n);
INSERT INTO redo_t SELECT g, g % 97, repeat('p', 40) FROM generate_series(1, 3000) g;
CHECKPOINT;
UPDATE redo_t SET n = n + 1 WHERE id % 5 = 0;
DELETE FROM redo_t WHERE id % 7 = 0;
UPDATE redo_t SET pad = repeat('q', 30) WHERE id % 11 = 0;
VACUUM redo_t;
INSERT INTO redo_t SELECT g, g % 13, repeat('r', 20) FROM generate_series(3001, 4500) g;
CHECKPOINT;
SET wal_compression = pglz;
UPDATE redo_t SET n = -n WHERE id BETWEEN 100 AND 700;
DELETE FROM redo_t WHERE id BETWEEN 2000 AND 2100;
VACUUM redo_t;
INSERT INTO redo_t SELECT g, g, 'tail' FROM generate_series(4501, 5000) g;
CHECKPOINT;
";

fn build_fixture() -> Fixture {
    let install_dir = pg_install_dir();
    let env = PgEnv::find(&install_dir);
    let mut cluster = Cluster::init(&env);
    cluster.start();
    cluster.psql_script(WORKLOAD_SQL);
    let db_oid: u32 = parse(&cluster.psql("SELECT oid FROM pg_database WHERE datname = 'postgres'"));
    let rels: Vec<(u32, PageKind)> = ["redo_t", "redo_t_pkey", "redo_t_n"]
        .iter()
        .map(|name| {
            let relfilenode: u32 = parse(&cluster.psql(&format!("SELECT pg_relation_filenode('{name}')")));
            let kind = if *name == "redo_t" { PageKind::Heap } else { PageKind::Btree };
            (relfilenode, kind)
        })
        .collect();
    let wal_end: Lsn = parse(&cluster.psql("SELECT pg_current_wal_insert_lsn()"));
    cluster.stop();

    let records = read_wal(&cluster.datadir, wal_end);
    let mut cases = Vec::new();
    for (relnode, kind) in rels {
        let rel = RelTag { spcnode: DEFAULTTABLESPACE_OID, dbnode: db_oid, relnode, forknum: MAIN_FORKNUM };
        let file = cluster.datadir.join("base").join(db_oid.to_string()).join(relnode.to_string());
        let data = fs::read(&file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        for (blkno, chain) in chains_for(&records, rel) {
            let offset = blkno as usize * BLCKSZ;
            // Blocks VACUUM truncated away are not in the file any more.
            let Some(expected) = data.get(offset..offset + BLCKSZ) else { continue };
            cases.push(RedoCase {
                tag: BufferTag::new(rel, blkno),
                kind,
                base: chain.base,
                base_record: chain.base_record,
                base_compression: chain.base_compression,
                records: chain.records,
                has_multi_block_record: chain.has_multi_block_record,
                expected: Bytes::copy_from_slice(expected),
            });
        }
    }
    drop(cluster);
    Fixture { install_dir, cases }
}

struct DecodedWal {
    end_lsn: Lsn,
    raw: Bytes,
    record: postgres_ffi::DecodedXLogRecord,
}

#[derive(Default)]
struct Chain {
    base: Option<(Lsn, Bytes)>,
    base_record: Option<(Lsn, Bytes)>,
    base_compression: Option<ImageCompression>,
    records: Vec<(Lsn, Bytes)>,
    has_multi_block_record: bool,
    /// A record touched the block before anything initialised it (not expected for relations
    /// created by the workload): the chain cannot be replayed and is left out.
    broken: bool,
}

/// For every main-fork block of `rel` in the WAL: the last full-page image or will-init
/// record, and the records after it.
fn chains_for(wal: &[DecodedWal], rel: RelTag) -> BTreeMap<u32, Chain> {
    let mut chains: BTreeMap<u32, Chain> = BTreeMap::new();
    for rec in wal {
        let mut seen = Vec::new();
        for blk in &rec.record.blocks {
            if blk.rel_tag() != rel || seen.contains(&blk.blkno) {
                continue;
            }
            seen.push(blk.blkno);
            let chain = chains.entry(blk.blkno).or_default();
            if blk.apply_image() {
                let mut page = restore_block_image(blk, rec.end_lsn)
                    .unwrap_or_else(|e| panic!("restore image of {rel} block {} at {}: {e}", blk.blkno, rec.end_lsn));
                if !page_is_new(&page) {
                    page_set_lsn(&mut page, rec.end_lsn);
                }
                *chain = Chain {
                    base: Some((rec.end_lsn, Bytes::from(page))),
                    base_record: Some((rec.end_lsn, rec.raw.clone())),
                    base_compression: blk.image.as_ref().map(|i| i.compression),
                    ..Chain::default()
                };
            } else if blk.will_init {
                *chain = Chain { records: vec![(rec.end_lsn, rec.raw.clone())], ..Chain::default() };
            } else if chain.base.is_some() || !chain.records.is_empty() {
                chain.records.push((rec.end_lsn, rec.raw.clone()));
                if rec.record.blocks.len() > 1 {
                    chain.has_multi_block_record = true;
                }
            } else {
                chain.broken = true;
            }
        }
    }
    chains.retain(|_, c| !c.broken);
    chains
}

/// Decodes every record from the start of the oldest segment in `pg_wal` to the end of WAL,
/// which must lie at or beyond `wal_end`.
fn read_wal(datadir: &Path, wal_end: Lsn) -> Vec<DecodedWal> {
    let wal_dir = datadir.join("pg_wal");
    let mut segments: Vec<(u64, PathBuf)> = fs::read_dir(&wal_dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", wal_dir.display()))
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let name = path.file_name()?.to_str()?.to_string();
            if name.len() != 24 || !name.chars().all(|c| c.is_ascii_hexdigit()) {
                return None;
            }
            let log = u64::from_str_radix(&name[8..16], 16).ok()?;
            let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
            Some((log * (0x1_0000_0000 / WAL_SEGMENT_SIZE as u64) + seg, path))
        })
        .collect();
    segments.sort();
    let first = segments.first().unwrap_or_else(|| panic!("no WAL segments in {}", wal_dir.display())).0;
    let mut decoder = WalStreamDecoder::new(Lsn(first * WAL_SEGMENT_SIZE as u64));
    let mut out = Vec::new();
    'segments: for (i, (segno, path)) in segments.iter().enumerate() {
        if *segno != first + i as u64 {
            break;
        }
        decoder.feed(&fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())));
        loop {
            match decoder.poll_record() {
                Ok(Some(r)) => {
                    let record = decode_record(r.record.clone(), r.start_lsn)
                        .unwrap_or_else(|e| panic!("decode record at {}: {e}", r.start_lsn));
                    out.push(DecodedWal { end_lsn: r.end_lsn, raw: r.record, record });
                }
                Ok(None) => break,
                Err(e) => {
                    let reached = out.last().map_or(Lsn(0), |r| r.end_lsn);
                    assert!(reached >= wal_end, "WAL decoding stopped at {reached} before {wal_end}: {e}");
                    break 'segments;
                }
            }
        }
    }
    out
}

fn parse<T: std::str::FromStr>(s: &str) -> T {
    s.trim().parse().unwrap_or_else(|_| panic!("unexpected psql output {s:?}"))
}

fn command_output(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"))
}

/// The Postgres build and the OS user to run it as (Postgres refuses to run as root).
pub struct PgEnv {
    install_dir: PathBuf,
    os_user: Option<String>,
}

impl PgEnv {
    pub fn find(install_dir: &Path) -> PgEnv {
        assert!(
            install_dir.join("bin/postgres").exists() && install_dir.join("lib/postgresql/neon_walredo.so").exists(),
            "our Postgres build with neon_walredo is not at {}: run postgres/build.sh in the workspace root \
             (or point PG_INSTALL_DIR at an installation)",
            install_dir.display()
        );
        let uid = String::from_utf8_lossy(&command_output(Command::new("id").arg("-u")).stdout).trim().to_string();
        let os_user = (uid == "0").then(|| std::env::var("PG_OS_USER").unwrap_or_else(|_| "postgres".to_string()));
        PgEnv { install_dir: install_dir.to_path_buf(), os_user }
    }

    fn cmd(&self, prog: &str) -> Command {
        let bin = self.install_dir.join("bin").join(prog);
        match &self.os_user {
            Some(user) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={user}")).arg(format!("--regid={user}")).arg("--init-groups").arg(bin);
                c
            }
            None => Command::new(bin),
        }
    }

    fn run(&self, prog: &str, args: &[&str]) -> String {
        let out = command_output(self.cmd(prog).args(args));
        assert!(
            out.status.success(),
            "{prog} {args:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn give_to_user(&self, path: &Path) {
        if let Some(user) = &self.os_user {
            let out = command_output(Command::new("chown").arg("-R").arg(format!("{user}:")).arg(path));
            assert!(out.status.success(), "chown {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// An initdb'd cluster in a temp dir; dropping it stops Postgres (`-m immediate`) and removes
/// the directory, so a failing test leaves no server behind.
struct Cluster<'a> {
    env: &'a PgEnv,
    dir: tempfile::TempDir,
    datadir: PathBuf,
    running: bool,
}

impl<'a> Cluster<'a> {
    fn init(env: &'a PgEnv) -> Cluster<'a> {
        let dir = tempfile::Builder::new().prefix("walredo-test-").tempdir_in("/tmp").expect("create temp dir in /tmp");
        env.give_to_user(dir.path());
        let datadir = dir.path().join("data");
        let datadir_str = datadir.to_str().expect("temp dir path is UTF-8");
        env.run("initdb", &["-D", datadir_str, "-A", "trust", "-U", "postgres", "-N", "-E", "UTF8", "--locale=C"]);
        // No TCP listener: psql comes in over the socket in our temp dir.
        let conf = format!(
            "\nlisten_addresses = ''\nunix_socket_directories = '{}'\nfull_page_writes = on\nautovacuum = off\n\
             fsync = off\nwal_keep_size = '1GB'\nmax_wal_size = '1GB'\ncheckpoint_timeout = '1h'\n",
            dir.path().display()
        );
        let conf_path = datadir.join("postgresql.conf");
        let mut all = fs::read_to_string(&conf_path).expect("read postgresql.conf");
        all.push_str(&conf);
        fs::write(&conf_path, all).expect("write postgresql.conf");
        Cluster { env, dir, datadir, running: false }
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        let datadir = self.datadir.to_str().expect("temp dir path is UTF-8");
        command_output(self.env.cmd("pg_ctl").args(["-D", datadir]).args(args))
    }

    fn start(&mut self) {
        let log = self.dir.path().join("postgres.log");
        let out = self.pg_ctl(&["-l", log.to_str().expect("UTF-8 path"), "-w", "-t", "60", "start"]);
        self.running = true;
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            fs::read_to_string(&log).unwrap_or_default()
        );
    }

    fn stop(&mut self) {
        if self.running {
            let out = self.pg_ctl(&["-m", "fast", "-w", "stop"]);
            assert!(out.status.success(), "pg_ctl stop failed: {}", String::from_utf8_lossy(&out.stderr));
            self.running = false;
        }
    }

    fn psql_cmd(&self) -> Command {
        let mut c = self.env.cmd("psql");
        c.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-d", "postgres", "-h"])
            .arg(self.dir.path());
        c
    }

    fn psql(&self, sql: &str) -> String {
        let out = command_output(self.psql_cmd().args(["-c", sql]));
        assert!(out.status.success(), "psql -c {sql:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs statements one by one in one session (VACUUM and CHECKPOINT cannot run in a
    /// transaction block; SET stays in effect for the statements after it).
    fn psql_script(&self, sql: &str) {
        let path = self.dir.path().join("workload.sql");
        fs::write(&path, sql).expect("write workload.sql");
        self.env.give_to_user(&path);
        let out = command_output(self.psql_cmd().arg("-f").arg(&path));
        assert!(out.status.success(), "workload failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Cluster<'_> {
    fn drop(&mut self) {
        if self.running {
            let _ = self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
        }
    }
}
