//! Bootstrapping a timeline from a Postgres data directory (the pageserver's `initdb` path,
//! DESIGN D6 "Bootstrap: initdb, import at the control file's checkpoint LSN").
//!
//! A cleanly shut down data directory is the state of the cluster at its last checkpoint: every
//! record ending at or before the checkpoint record's start LSN (in `pg_control`) is in the
//! files. [`import_datadir`] stores that state at that LSN:
//!
//! - every relation file (`global/` and `base/<db>/`: `<relnode>[_fsm|_vm|_init][.<segno>]`) →
//!   relation creation with its size, and a page image per block;
//! - `pg_filenode.map` of each database and of `global/` → relation maps (and database entries,
//!   `(1664, 0)` for the shared catalogs);
//! - `pg_xact`, `pg_multixact/offsets`, `pg_multixact/members` segments → SLRU pages;
//! - `pg_twophase/<xid>` files → two-phase state (stored without the file's trailing crc32c);
//! - `global/pg_control` → the control file, and its checkpoint copy → the checkpoint value.
//!
//! Everything else (configuration, `pg_wal`, `PG_VERSION`, relcache init files, SLRUs that
//! Postgres rebuilds at startup) is not part of a timeline. Tablespaces other than the two
//! built-in ones are not supported (`initdb` creates none).
//!
//! [`bootstrap_timeline`] runs `initdb` into a temp directory and imports it. Postgres refuses to
//! run as root, so as root `initdb` runs as an unprivileged OS user (see [`PgOsUser`]).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use postgres_ffi::controlfile::ControlFileData;
use postgres_ffi::reltag::{ForkNumber, MAIN_FORKNUM};
use postgres_ffi::slru::{parse_segment_file_name, SlruKind};
use postgres_ffi::xlog_file::xlog_file_name_for_lsn;
use postgres_ffi::{
    decode_record, BlockNumber, Oid, RelTag, WalDecoderConfig, WalStreamDecoder, BLCKSZ, DEFAULTTABLESPACE_OID,
    GLOBALTABLESPACE_OID, PG_MAJORVERSION,
};
use tracing::{info, warn};
use utils::{Lsn, TenantId, TimelineId};

use crate::pgdatadir_mapping::{DatadirError, DatadirModification};
use crate::tenant::timeline::{Timeline, TimelineError, TimelineResources};

/// Blocks per relation segment file (`RELSEG_SIZE`, 1 GiB of 8 KiB blocks).
pub const RELSEG_SIZE_BLOCKS: u32 = 131_072;
/// Environment variable naming the OS user to run Postgres programs as when running as root.
pub const PG_OS_USER_ENV: &str = "PG_OS_USER";
/// The OS user used when running as root and [`PG_OS_USER_ENV`] is not set.
pub const DEFAULT_PG_OS_USER: &str = "postgres";
/// The database superuser `initdb` creates for a new tenant (as in Neon's local setup).
pub const DEFAULT_SUPERUSER: &str = "cloud_admin";

/// An import or bootstrap failed; names the file or program involved.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{}: {context}: {source}", path.display())]
    Io {
        path: PathBuf,
        context: String,
        #[source]
        source: io::Error,
    },
    /// The data directory holds something the import cannot take.
    #[error("{}: {detail}", path.display())]
    Invalid { path: PathBuf, detail: String },
    #[error("importing into the timeline: {0}")]
    Datadir(Box<DatadirError>),
    #[error(transparent)]
    Timeline(#[from] TimelineError),
    /// `initdb` (or a helper program) could not run or failed.
    #[error("{0}")]
    Command(String),
}

impl From<DatadirError> for ImportError {
    fn from(e: DatadirError) -> Self {
        ImportError::Datadir(Box::new(e))
    }
}

fn io_err(path: &Path, context: impl Into<String>) -> impl FnOnce(io::Error) -> ImportError {
    let path = path.to_path_buf();
    let context = context.into();
    move |source| ImportError::Io { path, context, source }
}

fn invalid(path: &Path, detail: impl Into<String>) -> ImportError {
    ImportError::Invalid { path: path.to_path_buf(), detail: detail.into() }
}

/// Reads and validates `global/pg_control`: the decoded struct and the file's bytes.
pub fn read_control_file(datadir: &Path) -> Result<(ControlFileData, Bytes), ImportError> {
    let path = datadir.join("global/pg_control");
    let bytes = fs::read(&path).map_err(io_err(&path, "reading"))?;
    let cf = ControlFileData::decode(&bytes).map_err(|e| invalid(&path, e.what))?;
    Ok((cf, Bytes::from(bytes)))
}

/// Imports the cleanly shut down data directory `datadir` into `timeline` (which must be
/// empty) at its checkpoint LSN, then checkpoints the timeline so the data is durable.
/// Returns the LSN. All pages are held in memory until the commit, which is fine for `initdb`
/// output (tens of MiB); a large import would need to write in batches.
pub fn import_datadir(timeline: &Timeline, datadir: &Path) -> Result<Lsn, ImportError> {
    let (cf, cf_bytes) = read_control_file(datadir)?;
    let lsn = cf.checkpoint;
    let version_path = datadir.join("PG_VERSION");
    let version = fs::read_to_string(&version_path).map_err(io_err(&version_path, "reading"))?;
    if version.trim() != PG_MAJORVERSION.to_string() {
        return Err(invalid(
            &version_path,
            format!("Postgres {} data, but this build reads {PG_MAJORVERSION}", version.trim()),
        ));
    }
    let last = timeline.get_last_record_lsn();
    if last >= lsn {
        return Err(invalid(
            datadir,
            format!(
                "its checkpoint LSN {lsn} is not above the last record LSN {last} of timeline {}: import into a new, \
                 empty timeline",
                timeline.timeline_id()
            ),
        ));
    }

    let mut m = DatadirModification::new(timeline);
    m.init_empty()?;
    import_rel_dir(&mut m, &datadir.join("global"), GLOBALTABLESPACE_OID, 0)?;
    let base = datadir.join("base");
    for (name, path) in list_dir(&base)? {
        match name.parse::<Oid>() {
            Ok(dbnode) if dbnode != 0 && path.is_dir() => import_rel_dir(&mut m, &path, DEFAULTTABLESPACE_OID, dbnode)?,
            _ => warn!("import: ignoring {}", path.display()),
        }
    }
    let tblspc = datadir.join("pg_tblspc");
    if tblspc.exists() && !list_dir(&tblspc)?.is_empty() {
        return Err(invalid(&tblspc, "user-defined tablespaces are not supported by the import"));
    }
    for kind in [SlruKind::Clog, SlruKind::MultiXactOffsets, SlruKind::MultiXactMembers] {
        import_slru(&mut m, kind, &datadir.join(kind.dir_name()))?;
    }
    import_twophase(&mut m, &datadir.join("pg_twophase"))?;
    m.put_control_file(cf_bytes)?;
    m.put_checkpoint(Bytes::copy_from_slice(&cf.checkpoint_copy.encode()))?;

    // The record ending at the checkpoint LSN starts at the checkpoint record's xl_prev: known,
    // the next compute can start right here (DESIGN D4) and ingest can check the first xl_prev.
    match checkpoint_xl_prev(datadir, &cf) {
        Some(prev) => m.commit_record(prev, lsn)?,
        None => m.commit(lsn)?,
    }
    timeline.checkpoint()?;
    info!(timeline = %timeline.timeline_id(), "imported {} at {lsn}", datadir.display());
    Ok(lsn)
}

/// Name and path of every entry of `dir`, sorted by name.
fn list_dir(dir: &Path) -> Result<Vec<(String, PathBuf)>, ImportError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir, "listing"))? {
        let entry = entry.map_err(io_err(dir, "listing"))?;
        match entry.file_name().into_string() {
            Ok(name) => out.push((name, entry.path())),
            Err(name) => warn!("import: ignoring {name:?} in {}", dir.display()),
        }
    }
    out.sort();
    Ok(out)
}

/// `<relnode>[_fsm|_vm|_init][.<segno>]` → (relnode, fork, segno).
fn parse_rel_file_name(name: &str) -> Option<(Oid, u8, u32)> {
    let (stem, segno) = match name.split_once('.') {
        Some((stem, seg)) if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) => (stem, seg.parse().ok()?),
        Some(_) => return None,
        None => (name, 0),
    };
    let (relnode, fork) = match stem.split_once('_') {
        Some((rel, fork)) => match ForkNumber::from_name(fork) {
            Some(ForkNumber::Main) | None => return None,
            Some(f) => (rel, f as u8),
        },
        None => (stem, MAIN_FORKNUM),
    };
    if relnode.is_empty() || !relnode.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let relnode: Oid = relnode.parse().ok()?;
    (relnode != 0).then_some((relnode, fork, segno))
}

/// Imports a database directory (or `global/`): its relation map and every relation file.
fn import_rel_dir(m: &mut DatadirModification<'_>, dir: &Path, spcnode: Oid, dbnode: Oid) -> Result<(), ImportError> {
    m.put_db_creation(spcnode, dbnode)?;
    let mut rels: BTreeMap<RelTag, BTreeMap<u32, PathBuf>> = BTreeMap::new();
    for (name, path) in list_dir(dir)? {
        if name == "pg_filenode.map" {
            let map = fs::read(&path).map_err(io_err(&path, "reading"))?;
            m.put_relmap_file(spcnode, dbnode, Bytes::from(map))?;
        } else if let Some((relnode, forknum, segno)) = parse_rel_file_name(&name) {
            rels.entry(RelTag { spcnode, dbnode, relnode, forknum }).or_default().insert(segno, path);
        }
    }
    for (rel, segments) in rels {
        let mut pages: Vec<Bytes> = Vec::new();
        let last_segno = segments.keys().next_back().copied().unwrap_or(0);
        for (expected, (segno, path)) in segments.iter().enumerate() {
            if *segno != expected as u32 {
                return Err(invalid(path, format!("relation {rel}: segment {expected} is missing")));
            }
            let seg_pages = read_pages(path)?;
            if *segno != last_segno && seg_pages.len() != RELSEG_SIZE_BLOCKS as usize {
                return Err(invalid(
                    path,
                    format!("relation {rel}: a non-last segment must hold {RELSEG_SIZE_BLOCKS} blocks"),
                ));
            }
            pages.extend(seg_pages);
        }
        let nblocks =
            BlockNumber::try_from(pages.len()).map_err(|_| invalid(dir, format!("relation {rel} is too large")))?;
        m.put_rel_creation(rel, nblocks)?;
        for (blkno, page) in pages.into_iter().enumerate() {
            m.put_rel_page_image(rel, blkno as BlockNumber, page)?;
        }
    }
    Ok(())
}

/// The 8 KiB pages of a file; its size must be a multiple of the page size.
fn read_pages(path: &Path) -> Result<Vec<Bytes>, ImportError> {
    let mut f = File::open(path).map_err(io_err(path, "opening"))?;
    let len_bytes = f.metadata().map_err(io_err(path, "reading the size of"))?.len();
    if len_bytes % BLCKSZ as u64 != 0 {
        return Err(invalid(path, format!("{len_bytes} bytes is not a whole number of {BLCKSZ}-byte pages")));
    }
    let mut pages = Vec::with_capacity((len_bytes / BLCKSZ as u64) as usize);
    for _ in 0..len_bytes / BLCKSZ as u64 {
        let mut page = vec![0u8; BLCKSZ];
        f.read_exact(&mut page).map_err(io_err(path, "reading"))?;
        pages.push(Bytes::from(page));
    }
    Ok(pages)
}

fn import_slru(m: &mut DatadirModification<'_>, kind: SlruKind, dir: &Path) -> Result<(), ImportError> {
    if !dir.exists() {
        return Ok(());
    }
    for (name, path) in list_dir(dir)? {
        let Some(segno) = parse_segment_file_name(&name) else {
            warn!("import: ignoring {}", path.display());
            continue;
        };
        let pages = read_pages(&path)?;
        if pages.len() > postgres_ffi::slru::SLRU_PAGES_PER_SEGMENT as usize {
            return Err(invalid(&path, format!("{} pages is more than an SLRU segment holds", pages.len())));
        }
        m.put_slru_segment_creation(kind, segno, pages.len() as BlockNumber)?;
        for (blkno, page) in pages.into_iter().enumerate() {
            m.put_slru_page_image(kind, segno, blkno as BlockNumber, page)?;
        }
    }
    Ok(())
}

fn import_twophase(m: &mut DatadirModification<'_>, dir: &Path) -> Result<(), ImportError> {
    if !dir.exists() {
        return Ok(());
    }
    for (name, path) in list_dir(dir)? {
        let xid = match u32::from_str_radix(&name, 16) {
            Ok(xid) if name.len() == 8 => xid,
            _ => {
                warn!("import: ignoring {}", path.display());
                continue;
            }
        };
        let content = fs::read(&path).map_err(io_err(&path, "reading"))?;
        let Some(body_len) = content.len().checked_sub(4).filter(|n| *n > 0) else {
            return Err(invalid(&path, "two-phase state file too short to hold its checksum"));
        };
        let stored = u32::from_le_bytes([
            content[body_len],
            content[body_len + 1],
            content[body_len + 2],
            content[body_len + 3],
        ]);
        let computed = crc32c::crc32c(&content[..body_len]);
        if stored != computed {
            return Err(invalid(&path, format!("checksum mismatch: stored {stored:08X}, computed {computed:08X}")));
        }
        m.put_twophase_file(xid, Bytes::copy_from_slice(&content[..body_len]))?;
    }
    Ok(())
}

/// The `xl_prev` of the checkpoint record in `pg_wal`, if that segment is there and readable.
fn checkpoint_xl_prev(datadir: &Path, cf: &ControlFileData) -> Option<Lsn> {
    let seg_size = cf.xlog_seg_size as usize;
    let tli = cf.checkpoint_copy.this_timeline_id;
    let path = datadir.join("pg_wal").join(xlog_file_name_for_lsn(tli, cf.checkpoint, seg_size));
    let config = WalDecoderConfig { segment_size_bytes: seg_size, ..WalDecoderConfig::default() };
    let mut decoder = WalStreamDecoder::with_config(cf.checkpoint, config).ok()?;
    let segment = fs::read(&path).ok()?;
    let offset = cf.checkpoint.segment_offset(seg_size as u64) as usize;
    decoder.feed(segment.get(offset..)?);
    let record = decoder.poll_record().ok()??;
    let decoded = decode_record(record.record, record.start_lsn).ok()?;
    Some(decoded.header.xl_prev)
}

/// The unprivileged OS user Postgres programs run as when the pageserver runs as root
/// (Postgres refuses to run as root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgOsUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl PgOsUser {
    /// `None` unless running as root; then the user named by `$PG_OS_USER` (default
    /// `postgres`), which must exist.
    pub fn resolve() -> Result<Option<PgOsUser>, ImportError> {
        if run_id(&["-u"])? != 0 {
            return Ok(None);
        }
        let name = std::env::var(PG_OS_USER_ENV).unwrap_or_else(|_| DEFAULT_PG_OS_USER.to_string());
        let lookup = |flag: &str| {
            run_id(&[flag, &name]).map_err(|e| {
                ImportError::Command(format!(
                    "running as root, so Postgres programs must run as an unprivileged user, but user '{name}' cannot \
                     be used ({e}); create it or set {PG_OS_USER_ENV} to an existing user"
                ))
            })
        };
        Ok(Some(PgOsUser { uid: lookup("-u")?, gid: lookup("-g")?, name }))
    }

    /// Gives `path` to this user.
    pub fn chown(&self, path: &Path) -> Result<(), ImportError> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
            .map_err(io_err(path, format!("handing over to OS user {}", self.name)))
    }
}

/// A command running `program` as `os_user` (through `setpriv`), or directly when `None`.
pub fn postgres_command(os_user: Option<&PgOsUser>, program: &Path) -> Command {
    match os_user {
        Some(user) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={}", user.uid))
                .arg(format!("--regid={}", user.gid))
                .arg("--init-groups")
                .arg("--")
                .arg(program);
            c
        }
        None => Command::new(program),
    }
}

fn run_id(args: &[&str]) -> Result<u32, ImportError> {
    let out = Command::new("id").args(args).output().map_err(|e| ImportError::Command(format!("running id: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(ImportError::Command(format!(
            "id {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    text.trim().parse().map_err(|_| ImportError::Command(format!("id {} printed '{}'", args.join(" "), text.trim())))
}

/// Runs `<pg_install_dir>/bin/initdb` to create `datadir` (whose parent `os_user` must be able
/// to write) with superuser `superuser`, UTF-8, the C locale, trust authentication and no fsync
/// (the import reads it right away and the directory is thrown away).
pub fn run_initdb(
    pg_install_dir: &Path,
    superuser: &str,
    datadir: &Path,
    os_user: Option<&PgOsUser>,
) -> Result<(), ImportError> {
    let initdb = pg_install_dir.join("bin/initdb");
    if !initdb.exists() {
        return Err(ImportError::Command(format!(
            "{} not found: build Postgres with postgres/build.sh or point pg_install_dir at an installation",
            initdb.display()
        )));
    }
    let mut cmd = postgres_command(os_user, &initdb);
    cmd.arg("-D").arg(datadir).args([
        "-U",
        superuser,
        "-E",
        "UTF8",
        "--locale=C",
        "-A",
        "trust",
        "--no-instructions",
        "--no-sync",
    ]);
    let out = cmd.output().map_err(|e| ImportError::Command(format!("could not run {cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(ImportError::Command(format!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// The pageserver's bootstrap: `initdb` into a temp directory (as the unprivileged OS user when
/// running as root), a new root timeline with its initdb LSN at the checkpoint, and the import.
/// On failure the half-created timeline directory is removed.
pub fn bootstrap_timeline(
    workdir: &Path,
    tenant_id: TenantId,
    timeline_id: TimelineId,
    pg_install_dir: &Path,
    superuser: &str,
    resources: TimelineResources,
) -> Result<Arc<Timeline>, ImportError> {
    let os_user = PgOsUser::resolve()?;
    let tmp = tempfile::Builder::new()
        .prefix("pageserver-initdb-")
        .tempdir()
        .map_err(io_err(&std::env::temp_dir(), "creating a temp directory for initdb in"))?;
    if let Some(user) = &os_user {
        user.chown(tmp.path())?;
    }
    let datadir = tmp.path().join("pgdata");
    run_initdb(pg_install_dir, superuser, &datadir, os_user.as_ref())?;
    let (cf, _) = read_control_file(&datadir)?;
    let timeline = Timeline::create_empty(workdir, tenant_id, timeline_id, cf.checkpoint, PG_MAJORVERSION, resources)?;
    if let Err(e) = import_datadir(&timeline, &datadir) {
        let dir = timeline.dir().to_path_buf();
        drop(timeline);
        if let Err(rm) = fs::remove_dir_all(&dir) {
            warn!("could not remove the half-bootstrapped timeline {}: {rm}", dir.display());
        }
        return Err(e);
    }
    Ok(timeline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relation_file_names() {
        assert_eq!(parse_rel_file_name("16384"), Some((16384, 0, 0)));
        assert_eq!(parse_rel_file_name("16384_fsm"), Some((16384, 1, 0)));
        assert_eq!(parse_rel_file_name("16384_vm.2"), Some((16384, 2, 2)));
        assert_eq!(parse_rel_file_name("16384_init"), Some((16384, 3, 0)));
        assert_eq!(parse_rel_file_name("16384.1"), Some((16384, 0, 1)));
        for bad in ["pg_filenode.map", "PG_VERSION", "pg_internal.init", "t3_16384", "16384_main", "16384.", "0", "1_x"]
        {
            assert_eq!(parse_rel_file_name(bad), None, "{bad}");
        }
    }
}
