//! Helpers for tests that run our Postgres build: where it is installed, a cluster run as the
//! unprivileged OS user when we are root, and ingest of the WAL a cluster wrote.
//!
//! `ingest_postgres.rs` still has its own `Cluster` (a different shape); it shares the rest.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use pageserver::import_datadir::{postgres_command, run_initdb, PgOsUser};
use pageserver::pgdatadir_mapping::DatadirModification;
use pageserver::redo_applier::PostgresRedoApplier;
use pageserver::tenant::timeline::Timeline;
use pageserver::walingest::WalIngest;
use pageserver::walredo::{WalRedoConfig, WalRedoManager};
use postgres_ffi::xlog_file::parse_xlog_file_name;
use postgres_ffi::{decode_record, WalStreamDecoder, WAL_SEGMENT_SIZE};
use utils::Lsn;

/// `pg_install` of the workspace (or `$PG_INSTALL_DIR`); panics with what to do if missing.
pub fn pg_install_dir() -> PathBuf {
    let dir = match std::env::var_os("PG_INSTALL_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../pg_install"),
    };
    assert!(
        dir.join("bin/postgres").exists(),
        "Postgres 15 build not found at {}: run postgres/build.sh in the workspace root (or set PG_INSTALL_DIR)",
        dir.display()
    );
    dir
}
/// A fresh `initdb` data directory (`<tempdir>/data`, cluster superuser `cloud_admin`) in a
/// /tmp folder the Postgres OS user owns when running as root; keep the `TempDir` alive.
pub fn initdb_in_tempdir(install: &Path, prefix: &str) -> (tempfile::TempDir, PathBuf, Option<PgOsUser>) {
    let os_user = PgOsUser::resolve().expect("resolve the OS user for Postgres");
    let dir = tempfile::Builder::new().prefix(prefix).tempdir_in("/tmp").expect("tempdir");
    if let Some(u) = &os_user {
        u.chown(dir.path()).expect("chown");
    }
    let datadir = dir.path().join("data");
    run_initdb(install, "cloud_admin", &datadir, os_user.as_ref()).expect("initdb");
    (dir, datadir, os_user)
}

pub fn output(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// A Postgres cluster in `datadir`, its socket and log in `dir`; dropping it stops Postgres
/// (`-m immediate`) if still running.
pub struct Cluster {
    pub install: PathBuf,
    pub os_user: Option<PgOsUser>,
    /// Socket directory, SQL files; owned by the OS user.
    pub dir: PathBuf,
    pub datadir: PathBuf,
    pub log: PathBuf,
    pub port: u16,
    pub running: bool,
}

impl Cluster {
    /// Appends the test settings (port, socket, no TCP, 2PC, no autovacuum or fsync) and
    /// `extra` to `postgresql.conf`.
    pub fn configure(&self, extra: &str) {
        let conf_path = self.datadir.join("postgresql.conf");
        let mut conf = fs::read_to_string(&conf_path).expect("read postgresql.conf");
        conf.push_str(&format!(
            "\nport = {}\nlisten_addresses = ''\nunix_socket_directories = '{}'\nmax_prepared_transactions = 5\n\
             autovacuum = off\nfsync = off\n{extra}\n",
            self.port,
            self.dir.display()
        ));
        fs::write(&conf_path, conf).expect("write postgresql.conf");
        self.chown(&conf_path);
    }

    pub fn chown(&self, path: &Path) {
        if let Some(u) = &self.os_user {
            u.chown(path).expect("chown");
        }
    }

    pub fn cmd(&self, prog: &str) -> Command {
        postgres_command(self.os_user.as_ref(), &self.install.join("bin").join(prog))
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `cmd`, panicking with its output and the server log if it fails; its stdout.
    pub fn run(&self, mut cmd: Command) -> String {
        let out = output(cmd.stdin(Stdio::null()));
        assert!(
            out.status.success(),
            "{cmd:?} failed ({}):\n{}\n{}\nlog:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn pg_ctl(&mut self, args: &[&str]) {
        let mut cmd = self.cmd("pg_ctl");
        cmd.arg("-D").arg(&self.datadir).args(args);
        self.run(cmd);
    }

    pub fn start(&mut self) {
        let log = self.log.to_str().expect("utf-8 path").to_string();
        self.running = true;
        self.pg_ctl(&["-l", &log, "-w", "-t", "60", "start"]);
    }

    /// Stops with `mode` (`fast` for a clean shutdown, `immediate` for a crash).
    pub fn stop(&mut self, mode: &str) {
        self.pg_ctl(&["-m", mode, "-w", "stop"]);
        self.running = false;
    }

    /// Runs `sql` with psql in database `db`: unaligned, tuples only, stop on error.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let path = self.dir.join(format!("query-{}.sql", sql.len()));
        fs::write(&path, sql).expect("write sql");
        self.chown(&path);
        let mut cmd = self.cmd("psql");
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-U", "cloud_admin", "-d", db, "-f"])
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

/// Decodes the WAL in `datadir/pg_wal` from `start_lsn` and ingests every record into `tl`,
/// up to and including the record starting at `last_record_start` (the shutdown checkpoint
/// of a stopped cluster). Returns the end LSN of that record and the number of records.
pub fn ingest_wal(tl: &Arc<Timeline>, datadir: &Path, start_lsn: Lsn, last_record_start: Lsn) -> (Lsn, usize) {
    let mut segments: Vec<(u64, PathBuf)> = fs::read_dir(datadir.join("pg_wal"))
        .expect("pg_wal")
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((parse_xlog_file_name(&e.file_name().to_string_lossy(), WAL_SEGMENT_SIZE)?.0, e.path())))
        .collect();
    segments.sort();
    let first_segno = start_lsn.segment_number(WAL_SEGMENT_SIZE as u64);
    let mut decoder = WalStreamDecoder::new(start_lsn);
    let mut ingest = WalIngest::new(Arc::clone(tl)).expect("walingest");
    let mut m = DatadirModification::new(tl);
    let mut record_count = 0;
    for (i, (segno, path)) in segments.iter().filter(|(s, _)| *s >= first_segno).enumerate() {
        assert_eq!(*segno, first_segno + i as u64, "pg_wal must hold every segment since {start_lsn}");
        let bytes = fs::read(path).expect("read segment");
        let from = if i == 0 { start_lsn.segment_offset(WAL_SEGMENT_SIZE as u64) as usize } else { 0 };
        decoder.feed(&bytes[from..]);
        while let Some(r) = decoder.poll_record().expect("decode WAL") {
            let rec = decode_record(r.record, r.start_lsn).expect("decode record");
            ingest.ingest_record(&rec, r.end_lsn, &mut m).unwrap_or_else(|e| panic!("{e}"));
            record_count += 1;
            if r.start_lsn == last_record_start {
                return (r.end_lsn, record_count);
            }
        }
    }
    panic!("the WAL does not reach the record at {last_record_start}");
}

/// The real Postgres WAL redo for a test: a pool of two redo processes and the runtime it runs on.
pub struct RealRedo {
    pub runtime: tokio::runtime::Runtime,
    pub manager: Arc<WalRedoManager>,
}

impl RealRedo {
    pub fn start(install: &Path) -> RealRedo {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let mut redo_config = WalRedoConfig::new(install);
        redo_config.process_count = 2;
        let manager = Arc::new(WalRedoManager::new(redo_config).unwrap_or_else(|e| panic!("{e}")));
        RealRedo { runtime, manager }
    }

    /// A `RedoApplier` for a timeline's read path.
    pub fn applier(&self) -> PostgresRedoApplier {
        PostgresRedoApplier::new(Arc::clone(&self.manager), self.runtime.handle().clone())
    }
}
