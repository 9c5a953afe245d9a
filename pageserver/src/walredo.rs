//! WAL redo (DESIGN D5): turning a base image and the WAL records after it into the page at a
//! later LSN, by letting Postgres itself apply the records.
//!
//! [`WalRedoManager`] keeps a pool of `postgres --wal-redo` child processes (our patched build
//! with `pgxn/neon_walredo`), each speaking the pipe protocol in [`protocol`] over its
//! stdin/stdout. A request takes one idle process (starting it on first use), sends the block,
//! base image and records, and reads back 8192 bytes. Concurrent requests use different
//! processes; beyond the pool size they wait for one.
//!
//! Failure model: a redo process is disposable. If a request fails for any reason on the
//! process side (redo error, crash, kill, timeout), that process is killed and only that request
//! gets an error, which carries the process's last stderr lines; the next request on that pool
//! slot starts a fresh process. A request that is cancelled (its future dropped) kills its
//! process the same way, since the pipes are then in an unknown state.
//!
//! Postgres refuses to run as root: when we are root, processes run as an unprivileged user
//! (`WalRedoConfig::os_user`, else `$PG_OS_USER`, else `postgres`).

mod process;
pub mod protocol;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use postgres_ffi::record::{XLogRecordHeader, SIZE_OF_XLOG_RECORD};
use postgres_ffi::BLCKSZ;
use tokio::sync::Semaphore;
use tracing::warn;
use utils::Lsn;

pub use protocol::BufferTag;

use process::{Launch, RedoProcess};

/// Pool sizes we accept: at least one process, and not so many that a typo exhausts the host.
pub const PROCESS_COUNT_MAX: usize = 128;

/// How the pool runs its processes.
#[derive(Debug, Clone)]
pub struct WalRedoConfig {
    /// Installation of our patched Postgres (`postgres/build.sh`'s `pg_install`): the pool runs
    /// `<pg_install_dir>/bin/postgres --wal-redo`.
    pub pg_install_dir: PathBuf,
    /// Redo processes in the pool, the number of requests served at once.
    pub process_count: usize,
    /// How long one request may take on its process (waiting for a free process not counted).
    /// A request that takes longer fails and its process is killed.
    pub request_timeout: Duration,
    /// How long a new process may take to start and answer its first ping.
    pub startup_timeout: Duration,
    /// OS user to run Postgres as when we are root; `None`: `$PG_OS_USER`, else `postgres`.
    pub os_user: Option<String>,
}

impl WalRedoConfig {
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
    pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

    /// Defaults: one process per CPU, 60 s per request.
    pub fn new(pg_install_dir: impl Into<PathBuf>) -> WalRedoConfig {
        WalRedoConfig {
            pg_install_dir: pg_install_dir.into(),
            process_count: std::thread::available_parallelism().map_or(2, |n| n.get()),
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            startup_timeout: Self::DEFAULT_STARTUP_TIMEOUT,
            os_user: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WalRedoError {
    /// The pool cannot be set up as configured.
    #[error("WAL redo configuration: {0}")]
    Config(String),
    /// The request itself is wrong (caller's bug); no process was involved.
    #[error("invalid WAL redo request for {tag}: {reason}")]
    InvalidRequest { tag: BufferTag, reason: String },
    /// A redo process could not be started or did not come up.
    #[error(
        "could not start a WAL redo process ({bin} --wal-redo) for {tag}: {reason}. Check that \
         postgres/build.sh has built Postgres with pgxn/neon_walredo into that installation"
    )]
    Startup { tag: BufferTag, bin: String, reason: String },
    /// The process failed while applying the records: a record Postgres could not apply, a
    /// crash, or a kill. The process was replaced; retrying the same input fails the same way.
    #[error("WAL redo of {tag} ({record_count} records, {base}) failed: {reason}; {process}")]
    Redo { tag: BufferTag, record_count: usize, base: String, reason: String, process: String },
    /// The request took longer than the configured timeout; its process was killed.
    #[error(
        "WAL redo of {tag} ({record_count} records) took longer than {timeout_ms} ms; {process}. \
         Raise the request timeout if the input is legitimately that large"
    )]
    Timeout { tag: BufferTag, record_count: usize, timeout_ms: u64, process: String },
    /// The manager was shut down.
    #[error("WAL redo of {tag} refused: the redo process pool is shut down")]
    ShutDown { tag: BufferTag },
}

/// The pool of redo processes. Cheap to share (`Arc`); all methods take `&self`.
pub struct WalRedoManager {
    launch: Launch,
    process_count: usize,
    request_timeout_ms: AtomicU64,
    startup_timeout: Duration,
    /// Idle pool slots: a running process, or `None` where one must be started. A request pops
    /// a slot and always pushes one back, so busy + idle slots = `process_count`.
    idle: Mutex<Vec<Option<RedoProcess>>>,
    /// One permit per slot: a request holding a permit is guaranteed an idle slot.
    permits: Semaphore,
    next_process_id: AtomicU64,
}

impl WalRedoManager {
    /// Checks the configuration and, when we are root, resolves the unprivileged user. Starts
    /// no process: they start on first use.
    pub fn new(config: WalRedoConfig) -> Result<WalRedoManager, WalRedoError> {
        if config.process_count == 0 || config.process_count > PROCESS_COUNT_MAX {
            return Err(WalRedoError::Config(format!(
                "process_count is {}, it must be between 1 and {PROCESS_COUNT_MAX}",
                config.process_count
            )));
        }
        let postgres_bin = config.pg_install_dir.join("bin").join("postgres");
        if !postgres_bin.is_file() {
            return Err(WalRedoError::Config(format!(
                "{} does not exist; build Postgres with postgres/build.sh (it links pg_install) \
                 or point pg_install_dir at an installation",
                postgres_bin.display()
            )));
        }
        let run_as = resolve_run_as(config.os_user.as_deref())?;
        let mut idle = Vec::with_capacity(config.process_count);
        idle.resize_with(config.process_count, || None);
        Ok(WalRedoManager {
            launch: Launch { postgres_bin, run_as },
            process_count: config.process_count,
            request_timeout_ms: AtomicU64::new(duration_ms(config.request_timeout)),
            startup_timeout: config.startup_timeout,
            idle: Mutex::new(idle),
            permits: Semaphore::new(config.process_count),
            next_process_id: AtomicU64::new(1),
        })
    }

    pub fn process_count(&self) -> usize {
        self.process_count
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms.load(Ordering::Relaxed))
    }

    /// Changes the timeout of requests that start from now on.
    pub fn set_request_timeout(&self, timeout: Duration) {
        self.request_timeout_ms.store(duration_ms(timeout), Ordering::Relaxed);
    }

    /// Processes started so far (restarts included).
    pub fn processes_started(&self) -> u64 {
        self.next_process_id.load(Ordering::Relaxed) - 1
    }

    /// Reconstructs block `tag`: `base_img` (its LSN and 8192 bytes) with `records` applied in
    /// order. Each record is `(end LSN, raw XLogRecord as stored in WAL)`; the end LSN (where the
    /// next record starts, Postgres's `EndRecPtr`) becomes the page LSN as in recovery. Records
    /// must be in ascending LSN order and newer than the base image. Without a base image the
    /// first record must initialise the page (will-init, or a full-page image to apply).
    pub async fn request_redo(
        &self,
        tag: BufferTag,
        base_img: Option<(Lsn, Bytes)>,
        records: &[(Lsn, Bytes)],
    ) -> Result<Bytes, WalRedoError> {
        validate_request(&tag, base_img.as_ref(), records)?;
        if records.is_empty() {
            if let Some((_, page)) = base_img {
                return Ok(page);
            }
        }

        let permit = self.permits.acquire().await.map_err(|_| WalRedoError::ShutDown { tag })?;
        let mut slot = Slot { manager: self, process: self.pop_idle(), _permit: permit };
        let mut process = match slot.process.take() {
            Some(mut p) => {
                if p.has_exited() {
                    let how = p.kill().await;
                    warn!("WAL redo {how} while idle; starting a new one");
                    self.start_process(&tag).await?
                } else {
                    p
                }
            }
            None => self.start_process(&tag).await?,
        };

        let timeout = self.request_timeout();
        let base_page = base_img.as_ref().map(|(_, page)| &page[..]);
        match tokio::time::timeout(timeout, process.apply(&tag, base_page, records)).await {
            Ok(Ok(page)) => {
                slot.process = Some(process);
                Ok(page)
            }
            Ok(Err(io_error)) => Err(WalRedoError::Redo {
                tag,
                record_count: records.len(),
                base: match &base_img {
                    Some((lsn, _)) => format!("base image at {lsn}"),
                    None => "no base image".to_string(),
                },
                reason: format!("lost the redo process mid-request ({io_error})"),
                process: process.kill().await,
            }),
            Err(_elapsed) => Err(WalRedoError::Timeout {
                tag,
                record_count: records.len(),
                timeout_ms: duration_ms(timeout),
                process: process.kill().await,
            }),
        }
    }

    /// Stops taking requests, waits for running ones, and ends every process (closing its
    /// stdin, which makes it exit normally).
    pub async fn shut_down(&self) {
        // Holding every permit means no request is running; then refuse new ones.
        let all = u32::try_from(self.process_count).unwrap_or(u32::MAX);
        let permits = self.permits.acquire_many(all).await;
        self.permits.close();
        let processes: Vec<RedoProcess> = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.iter_mut().filter_map(Option::take).collect()
        };
        for p in processes {
            p.shut_down().await;
        }
        drop(permits);
    }

    fn pop_idle(&self) -> Option<RedoProcess> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        // Holding a permit guarantees a slot; an empty list would be a bookkeeping bug, and
        // starting a process is the safe answer to it.
        idle.pop().flatten()
    }

    async fn start_process(&self, tag: &BufferTag) -> Result<RedoProcess, WalRedoError> {
        let id = self.next_process_id.fetch_add(1, Ordering::Relaxed);
        let startup_error = |reason: String| WalRedoError::Startup {
            tag: *tag,
            bin: self.launch.postgres_bin.display().to_string(),
            reason,
        };
        let mut process = RedoProcess::spawn(&self.launch, id).map_err(|e| startup_error(e.to_string()))?;
        match tokio::time::timeout(self.startup_timeout, process.ping()).await {
            Ok(Ok(())) => Ok(process),
            Ok(Err(e)) => Err(startup_error(format!("no answer to the first ping ({e}); {}", process.kill().await))),
            Err(_) => Err(startup_error(format!(
                "no answer to the first ping within {} ms; {}",
                duration_ms(self.startup_timeout),
                process.kill().await
            ))),
        }
    }

    /// Pids of the idle processes (tests kill them to simulate crashes).
    #[cfg(test)]
    fn idle_pids(&self) -> Vec<u32> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.iter().flatten().map(|p| p.pid).collect()
    }
}

/// A pool slot taken by one request. Dropping it (request done, failed or cancelled) puts the
/// slot back: with the process if the request left it usable, else empty.
struct Slot<'a> {
    manager: &'a WalRedoManager,
    process: Option<RedoProcess>,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        // Runs before the permit is released (fields drop after `drop`), so the next request
        // holding a permit always finds a slot.
        let mut idle = self.manager.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.push(self.process.take());
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Rejects what would only crash a redo process or hang the protocol, so a caller's bug is
/// reported as such: page size, LSN order, record framing and size.
fn validate_request(
    tag: &BufferTag,
    base_img: Option<&(Lsn, Bytes)>,
    records: &[(Lsn, Bytes)],
) -> Result<(), WalRedoError> {
    let invalid = |reason: String| WalRedoError::InvalidRequest { tag: *tag, reason };
    if tag.rel.forknum > postgres_ffi::reltag::MAX_FORKNUM {
        return Err(invalid(format!("fork number {} does not exist", tag.rel.forknum)));
    }
    if tag.blkno == postgres_ffi::INVALID_BLOCK_NUMBER {
        return Err(invalid("block number is InvalidBlockNumber".to_string()));
    }
    let mut prev_lsn = None;
    if let Some((lsn, page)) = base_img {
        if page.len() != BLCKSZ {
            return Err(invalid(format!("base image at {lsn} is {} bytes, expected {BLCKSZ}", page.len())));
        }
        prev_lsn = Some(*lsn);
    } else if records.is_empty() {
        return Err(invalid("neither a base image nor records: nothing to reconstruct from".to_string()));
    }
    for (end_lsn, record) in records {
        if let Some(prev) = prev_lsn {
            if *end_lsn <= prev {
                return Err(invalid(format!(
                    "record ending at {end_lsn} is not newer than the record or base image at {prev}; \
                     records must be newer than the base image and in ascending LSN order"
                )));
            }
        }
        prev_lsn = Some(*end_lsn);
        let header = XLogRecordHeader::decode(record).ok_or_else(|| {
            invalid(format!(
                "record ending at {end_lsn} is {} bytes, shorter than its {SIZE_OF_XLOG_RECORD}-byte header",
                record.len()
            ))
        })?;
        if header.xl_tot_len as usize != record.len() {
            return Err(invalid(format!(
                "record ending at {end_lsn} says it is {} bytes (xl_tot_len) but {} bytes were given",
                header.xl_tot_len,
                record.len()
            )));
        }
        if record.len() > protocol::RECORD_SIZE_BYTES_MAX {
            return Err(invalid(format!(
                "record ending at {end_lsn} is {} bytes, larger than the {} bytes the redo process accepts",
                record.len(),
                protocol::RECORD_SIZE_BYTES_MAX
            )));
        }
    }
    Ok(())
}

/// `(uid, gid)` to run Postgres as, when we are root; `None` otherwise.
fn resolve_run_as(os_user: Option<&str>) -> Result<Option<(u32, u32)>, WalRedoError> {
    if run_id(&["-u"])? != 0 {
        return Ok(None);
    }
    let user = match os_user {
        Some(u) => u.to_string(),
        None => std::env::var("PG_OS_USER").unwrap_or_else(|_| "postgres".to_string()),
    };
    let uid = run_id(&["-u", &user])?;
    let gid = run_id(&["-g", &user])?;
    if uid == 0 {
        return Err(WalRedoError::Config(format!(
            "OS user '{user}' to run Postgres as is root; Postgres refuses to run as root. Set \
             PG_OS_USER (or os_user) to an unprivileged user"
        )));
    }
    Ok(Some((uid, gid)))
}

/// Runs `id <args>` and parses the number it prints.
fn run_id(args: &[&str]) -> Result<u32, WalRedoError> {
    let describe = || format!("id {}", args.join(" "));
    let out = std::process::Command::new("id")
        .args(args)
        .output()
        .map_err(|e| WalRedoError::Config(format!("could not run `{}`: {e}", describe())))?;
    if !out.status.success() {
        return Err(WalRedoError::Config(format!(
            "`{}` failed ({}): {}. When the pageserver runs as root, Postgres runs as an \
             unprivileged user (PG_OS_USER, default 'postgres'); create it or set PG_OS_USER",
            describe(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse::<u32>()
        .map_err(|_| WalRedoError::Config(format!("`{}` printed {:?}, not a number", describe(), text.trim())))
}
