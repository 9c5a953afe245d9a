//! Real Postgres 15 WAL for tests, generated once per test process.
//!
//! Synthetic WAL only exercises what its writer thought of; real WAL has records of every size,
//! full-page images, headers split across pages, a 2.5 MB record spanning three segments and an
//! `XLOG_SWITCH`. We `initdb` a throwaway cluster with 1 MiB segments (so ~11 MB of WAL crosses
//! many segment boundaries), run a small workload in single-user mode (no server, no port) and
//! keep the WAL from initdb's last checkpoint record to the end of the last record.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use postgres_ffi::wal_decoder::{WalDecoderConfig, WalStreamDecoder};
use postgres_ffi::xlog_file::xlog_file_name;
use utils::Lsn;

pub const TEST_SEG_SIZE_BYTES: u64 = 1024 * 1024;

const WORKLOAD_SQL: &str = "\
create table t as select g, repeat('x', 100) as s from generate_series(1, 20000) g;
checkpoint;
update t set s = repeat('y', 120) where g % 3 = 0;
select pg_logical_emit_message(false, 'sk-test', repeat('m', 2500000));
select pg_switch_wal();
insert into t select g, repeat('z', 5000) from generate_series(1, 200) g;
create index on t(g);
";

pub struct RealWal {
    pub seg_size_bytes: u64,
    pub system_id: u64,
    /// Where `bytes` begins: initdb's last checkpoint record.
    pub start_lsn: Lsn,
    /// The WAL from `start_lsn` to the end of the last record.
    pub bytes: Vec<u8>,
    /// `(start, end)` of every record, in order; `end` as the decoder reports it.
    pub records: Vec<(Lsn, Lsn)>,
}

impl RealWal {
    pub fn end_lsn(&self) -> Lsn {
        self.start_lsn + self.bytes.len() as u64
    }

    pub fn slice(&self, from: Lsn, to: Lsn) -> &[u8] {
        &self.bytes[(from.0 - self.start_lsn.0) as usize..(to.0 - self.start_lsn.0) as usize]
    }

    /// Whether a record ends exactly at `lsn` (or `lsn` is the start).
    pub fn is_record_end(&self, lsn: Lsn) -> bool {
        lsn == self.start_lsn || self.records.binary_search_by_key(&lsn, |r| r.1).is_ok()
    }

    /// The end of the last record ending at or before `lsn`.
    pub fn record_end_at_or_before(&self, lsn: Lsn) -> Lsn {
        self.records.iter().rev().map(|r| r.1).find(|&e| e <= lsn).unwrap_or(self.start_lsn)
    }
}

/// The WAL, generated on first use; panics with instructions if Postgres is not built.
pub fn real_wal() -> &'static RealWal {
    static WAL: OnceLock<RealWal> = OnceLock::new();
    WAL.get_or_init(generate)
}

fn output(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"))
}

fn stdout_of(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Pg {
    bin: PathBuf,
    /// `(uid, gid)` to drop to when running as root: Postgres refuses to run as root.
    drop_to: Option<(String, String)>,
}

impl Pg {
    fn find() -> Pg {
        let install = match std::env::var_os("PG_INSTALL_DIR") {
            Some(d) => PathBuf::from(d),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../pg_install"),
        };
        let bin = install.join("bin");
        assert!(
            bin.join("initdb").exists() && bin.join("postgres").exists(),
            "Postgres 15 build not found in {}: run `postgres/build.sh` in the workspace root (or point \
             PG_INSTALL_DIR at an installation) before running these tests",
            bin.display()
        );
        let uid = stdout_of(Command::new("id").arg("-u")).trim().to_string();
        let drop_to = (uid == "0").then(|| {
            let user = std::env::var("PG_OS_USER").unwrap_or_else(|_| "postgres".to_string());
            let out = output(Command::new("id").args(["-u", &user]));
            assert!(
                out.status.success(),
                "running as root, but the user '{user}' to run Postgres as does not exist (create it, or set \
                 PG_OS_USER to another unprivileged user)"
            );
            let gid = stdout_of(Command::new("id").args(["-g", &user])).trim().to_string();
            (String::from_utf8_lossy(&out.stdout).trim().to_string(), gid)
        });
        Pg { bin, drop_to }
    }

    fn cmd(&self, prog: &str) -> Command {
        match &self.drop_to {
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--init-groups")
                    .arg(self.bin.join(prog));
                c
            }
            None => Command::new(self.bin.join(prog)),
        }
    }
}

fn controldata_field<'a>(text: &'a str, field: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| v.trim_start_matches(':').trim())
        .unwrap_or_else(|| panic!("pg_controldata output has no '{field}':\n{text}"))
}

fn generate() -> RealWal {
    let pg = Pg::find();
    let tmp = tempfile::Builder::new().prefix("sk-test-wal-").tempdir().expect("create a temp dir");
    if let Some((uid, gid)) = &pg.drop_to {
        stdout_of(Command::new("chown").arg(format!("{uid}:{gid}")).arg(tmp.path()));
    }
    let data = tmp.path().join("data");
    let data_str = data.to_str().expect("temp dir path is UTF-8");
    stdout_of(pg.cmd("initdb").args([
        "-D",
        data_str,
        "-N",
        "-A",
        "trust",
        "-U",
        "postgres",
        "-E",
        "UTF8",
        "--locale=C",
        &format!("--wal-segsize={}", TEST_SEG_SIZE_BYTES >> 20),
    ]));
    let control = stdout_of(Command::new(pg.bin.join("pg_controldata")).arg(&data));
    let start_lsn: Lsn = controldata_field(&control, "Latest checkpoint location").parse().expect("checkpoint LSN");
    let system_id: u64 = controldata_field(&control, "Database system identifier").parse().expect("system id");
    // Keep every segment (initdb's checkpoints would recycle them) and skip fsyncs.
    let conf = data.join("postgresql.conf");
    let mut text = fs::read_to_string(&conf).expect("read postgresql.conf");
    text.push_str("\nwal_keep_size = '1GB'\nfsync = off\n");
    fs::write(&conf, text).expect("write postgresql.conf");

    let mut child = pg
        .cmd("postgres")
        .args(["--single", "-D", data_str, "postgres"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start postgres --single");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        stdin.write_all(WORKLOAD_SQL.as_bytes()).expect("feed the workload to postgres --single");
    }
    let out = child.wait_with_output().expect("wait for postgres --single");
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !log.contains("ERROR"), "postgres --single failed ({}):\n{log}", out.status);

    // Concatenate the segments from the one holding start_lsn, then keep whole records only.
    let seg = TEST_SEG_SIZE_BYTES;
    let mut bytes = Vec::new();
    let mut segno = start_lsn.segment_number(seg);
    loop {
        let path = data.join("pg_wal").join(xlog_file_name(1, segno, seg as usize));
        let Ok(file_bytes) = fs::read(&path) else { break };
        let from = if bytes.is_empty() { start_lsn.segment_offset(seg) as usize } else { 0 };
        bytes.extend_from_slice(&file_bytes[from..]);
        segno += 1;
    }
    let cfg = WalDecoderConfig { segment_size_bytes: seg as usize, system_id: Some(system_id), prev_record_lsn: None };
    let mut decoder = WalStreamDecoder::with_config(start_lsn, cfg).expect("decoder at the checkpoint record");
    decoder.feed(&bytes);
    let mut records = Vec::new();
    while let Ok(Some(r)) = decoder.poll_record() {
        records.push((r.start_lsn, r.end_lsn));
    }
    let end = records.last().expect("decoded some records").1;
    bytes.truncate((end.0 - start_lsn.0) as usize);
    let wal = RealWal { seg_size_bytes: seg, system_id, start_lsn, bytes, records };
    assert!(wal.records.len() > 10_000, "only {} records", wal.records.len());
    assert!(wal.end_lsn().segment_number(seg) >= start_lsn.segment_number(seg) + 8, "WAL ends at {end}");
    assert!(wal.records.iter().any(|r| r.1 .0 - r.0 .0 > 2 * seg), "no record spans several segments");
    wal
}
