//! The start-at-an-LSN WAL of DESIGN D4, checked with the real tools: `pg_waldump` reads our
//! synthetic shutdown checkpoint, `pg_controldata` reads our `pg_control`, and a real
//! Postgres starts from them, takes writes and shuts down again.

mod common;

use std::fs;
use std::path::Path;

use common::{wal_segment_files, PgCluster, PgEnv};
use postgres_ffi::checkpoint::CheckPoint;
use postgres_ffi::controlfile::{ControlFileData, DbState};
use postgres_ffi::record::decode_record;
use postgres_ffi::records::{parse_record_body, RecordBody};
use postgres_ffi::wal_writer::shutdown_checkpoint_segments;
use postgres_ffi::xlog_file::{xlog_file_name, xlog_file_name_for_lsn};
use postgres_ffi::{WalDecoderConfig, WalStreamDecoder, WAL_SEGMENT_SIZE};
use utils::Lsn;

const SEG: usize = WAL_SEGMENT_SIZE;

fn write_segments(pg_wal: &Path, lsn: Lsn, prev: Lsn, cp: &CheckPoint, sysid: u64) -> Lsn {
    let out = shutdown_checkpoint_segments(lsn, prev, cp, sysid, SEG).expect("build segment");
    for (segno, bytes) in &out.segments {
        fs::write(pg_wal.join(xlog_file_name(cp.this_timeline_id, *segno, SEG)), bytes).expect("write segment");
    }
    out.end_lsn
}

fn controldata_field(out: &str, name: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name:?} in pg_controldata output:\n{out}"))
        .trim()
        .to_string()
}

/// Runs pg_waldump from `start`; it ends with an error at the end of WAL, which is expected.
fn waldump_from(env: &PgEnv, pg_wal: &Path, start: Lsn) -> String {
    let out =
        env.cmd("pg_waldump").arg("-p").arg(pg_wal).args(["-s", &start.to_string()]).output().expect("run pg_waldump");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || stderr.contains("invalid record length") || stderr.contains("invalid magic number"),
        "pg_waldump failed:\n{stderr}"
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn tools_read_our_checkpoint_segment_and_control_file() {
    let env = PgEnv::find();
    let dir = env.tempdir("pgffi-ckpt-");
    let pg_wal = dir.path().join("pg_wal");
    let global = dir.path().join("global");
    fs::create_dir_all(&pg_wal).unwrap();
    fs::create_dir_all(&global).unwrap();

    let sysid = 7_400_000_000_000_000_123;
    let lsn = Lsn(5 * SEG as u64 + 3 * 8192 + 0x1A8); // mid-page, mid-segment
    let prev = Lsn(5 * SEG as u64 - 0x60);
    let cp = CheckPoint {
        this_timeline_id: 1,
        prev_timeline_id: 1,
        full_page_writes: true,
        next_xid: 750,
        next_oid: 16400,
        next_multi: 1,
        oldest_xid: 716,
        oldest_xid_db: 1,
        oldest_multi: 1,
        oldest_multi_db: 1,
        time: 1_700_000_000,
        ..Default::default()
    };
    write_segments(&pg_wal, lsn, prev, &cp, sysid);
    let cp = CheckPoint { redo: lsn, ..cp };
    let control = ControlFileData::new_shut_down(sysid, lsn, cp, SEG as u32);
    fs::write(global.join("pg_control"), control.encode()).unwrap();
    env.give_to_user(dir.path());

    let dump = waldump_from(&env, &pg_wal, lsn);
    let line = dump.lines().next().unwrap_or_else(|| panic!("pg_waldump printed nothing"));
    assert!(line.starts_with("rmgr: XLOG"), "{line}");
    assert!(line.contains("len (rec/tot):    114/   114"), "{line}");
    assert!(
        line.contains(&format!(
            "lsn: {:X}/{:08X}, prev {:X}/{:08X}",
            lsn.0 >> 32,
            lsn.0 as u32,
            prev.0 >> 32,
            prev.0 as u32
        )),
        "{line}"
    );
    assert!(line.contains(&format!("desc: CHECKPOINT_SHUTDOWN redo {lsn};")), "{line}");
    assert!(line.contains("xid 0:750; oid 16400;"), "{line}");

    let cd = env.run("pg_controldata", &["-D", dir.path().to_str().unwrap()]);
    assert!(!cd.contains("WARNING"), "{cd}");
    assert_eq!(controldata_field(&cd, "Database cluster state:"), "shut down");
    assert_eq!(controldata_field(&cd, "Latest checkpoint location:"), lsn.to_string());
    assert_eq!(controldata_field(&cd, "Latest checkpoint's REDO location:"), lsn.to_string());
    assert_eq!(controldata_field(&cd, "Latest checkpoint's REDO WAL file:"), xlog_file_name_for_lsn(1, lsn, SEG));
    assert_eq!(controldata_field(&cd, "Database system identifier:"), sysid.to_string());
    assert_eq!(controldata_field(&cd, "Latest checkpoint's NextXID:"), "0:750");
}

#[test]
fn postgres_starts_from_our_checkpoint_segment() {
    let env = PgEnv::find();
    let mut pg = PgCluster::init(&env, "wal_level = replica\nfsync = off\n");
    pg.start();
    pg.psql("CREATE TABLE before_start (i int); INSERT INTO before_start SELECT generate_series(1, 100);");
    pg.stop();

    // Our reading of the real pg_control agrees with pg_controldata.
    let control_path = pg.datadir.join("global/pg_control");
    let real = ControlFileData::decode(&fs::read(&control_path).unwrap()).expect("decode real pg_control");
    let cd = env.run("pg_controldata", &["-D", pg.datadir.to_str().unwrap()]);
    assert_eq!(real.state, DbState::Shutdowned);
    assert_eq!(controldata_field(&cd, "Latest checkpoint location:"), real.checkpoint.to_string());
    assert_eq!(controldata_field(&cd, "Database system identifier:"), real.system_identifier.to_string());
    assert_eq!(controldata_field(&cd, "Latest checkpoint's NextOID:"), real.checkpoint_copy.next_oid.to_string());
    assert_eq!(real.checkpoint_copy.redo, real.checkpoint);

    // Start two segments past the real WAL, mid-page, with xl_prev = the real checkpoint.
    let real_end = Lsn((real.checkpoint.0 / SEG as u64 + 2) * SEG as u64);
    let lsn = Lsn(real_end.0 + 2 * 8192 + 512);
    let pg_wal = pg.datadir.join("pg_wal");
    for name in wal_segment_files(&pg_wal) {
        fs::remove_file(pg_wal.join(name)).unwrap();
    }
    let cp = CheckPoint { time: real.checkpoint_copy.time + 1, ..real.checkpoint_copy };
    write_segments(&pg_wal, lsn, real.checkpoint, &cp, real.system_identifier);
    let mut control = real.clone();
    control.checkpoint = lsn;
    control.checkpoint_copy = CheckPoint { redo: lsn, ..cp };
    control.time = cp.time;
    fs::write(&control_path, control.encode()).unwrap();
    env.give_to_user(&pg.datadir);

    pg.start();
    let log = fs::read_to_string(pg.log_path()).unwrap_or_default();
    assert!(log.contains("database system was shut down at"), "unexpected startup log:\n{log}");
    assert_eq!(pg.psql("SELECT count(*) FROM before_start").trim(), "100");
    pg.psql("CREATE TABLE after_start (i int); INSERT INTO after_start SELECT generate_series(1, 1000);");
    let current: Lsn = pg.psql("SELECT pg_current_wal_lsn()").trim().parse().unwrap();
    assert!(current > lsn, "insert position {current} should be past {lsn}");
    pg.stop();

    // pg_waldump reads our record followed by the new ones...
    let dump = waldump_from(&env, &pg_wal, lsn);
    let lines: Vec<&str> = dump.lines().filter(|l| l.starts_with("rmgr: ")).collect();
    assert!(lines[0].contains(&format!("desc: CHECKPOINT_SHUTDOWN redo {lsn};")), "{}", lines[0]);
    assert!(lines.len() > 10, "{dump}");
    assert!(dump.contains("COMMIT"), "{dump}");

    // ... and so does our decoder, chaining every xl_prev from the real checkpoint on.
    let first_seg = lsn.0 / SEG as u64;
    let cfg = WalDecoderConfig {
        segment_size_bytes: SEG,
        system_id: Some(real.system_identifier),
        prev_record_lsn: Some(real.checkpoint),
    };
    let mut d = WalStreamDecoder::with_config(lsn, cfg).unwrap();
    let mut n = 0;
    let mut last_body = None;
    let mut segno = first_seg;
    'segments: while let Ok(bytes) = fs::read(pg_wal.join(xlog_file_name(1, segno, SEG))) {
        let skip = if segno == first_seg { (lsn.0 % SEG as u64) as usize } else { 0 };
        d.feed(&bytes[skip..]);
        loop {
            match d.poll_record() {
                Ok(Some(r)) => {
                    if n == 0 {
                        assert_eq!(r.start_lsn, lsn);
                    }
                    let rec = decode_record(r.record, r.start_lsn).unwrap();
                    last_body = parse_record_body(&rec).unwrap();
                    n += 1;
                }
                Ok(None) => break,
                Err(e) if e.is_end_of_wal() => break 'segments,
                Err(e) => panic!("{e}"),
            }
        }
        segno += 1;
    }
    assert_eq!(n, lines.len(), "our decoder and pg_waldump see the same number of records");
    assert!(matches!(last_body, Some(RecordBody::Checkpoint { shutdown: true, .. })), "{last_body:?}");
}
