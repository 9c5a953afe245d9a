//! Timelines held by this safekeeper: each is an acceptor on its own directory
//! (`<datadir>/<tenant>/<timeline>/`), behind a mutex, with watch channels that wake WAL
//! senders when the commit or flush LSN moves.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Instant;

use bytes::Bytes;
use safekeeper_api::models::{TimelineCreateRequest, TimelineStatus};
use safekeeper_api::proto::{AcceptorMessage, AppendRequest, ProposerMessage};
use safekeeper_api::Term;
use tokio::sync::watch;
use tracing::{info, warn};
use utils::{Lsn, NodeId, TenantId, TimelineId};

use crate::acceptor::{Acceptor, AcceptorError};
use crate::control_file;
use crate::state::{ServerInfo, TimelinePersistentState};
use crate::wal_backup::{BackupState, PeerInfo, WalBackup};
use crate::wal_storage::PhysicalStorage;

#[derive(Debug, thiserror::Error)]
pub enum TimelineError {
    #[error("timeline {tenant_id}/{timeline_id} not found on this safekeeper; create it with POST /v1/tenant/{tenant_id}/timeline")]
    NotFound { tenant_id: TenantId, timeline_id: TimelineId },
    #[error("timeline {tenant_id}/{timeline_id} already exists")]
    AlreadyExists { tenant_id: TenantId, timeline_id: TimelineId },
    #[error("{0}")]
    Invalid(String),
    #[error("timeline {0}: {1}")]
    Io(String, std::io::Error),
}

/// Positions that readers wait on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Positions {
    pub term: Term,
    pub flush_lsn: Lsn,
    pub commit_lsn: Lsn,
}

pub struct Timeline {
    pub tenant_id: TenantId,
    pub timeline_id: TimelineId,
    pub dir: PathBuf,
    acceptor: Mutex<Acceptor<PhysicalStorage>>,
    positions: watch::Sender<Positions>,
    /// Offload progress that is not persisted: peers seen, the last error, retry timing.
    /// Never locked together with `acceptor` (taken after it is released).
    backup: Mutex<BackupState>,
}

impl Timeline {
    fn open(node_id: NodeId, dir: PathBuf, sync: bool) -> Result<Arc<Timeline>, TimelineError> {
        let name = dir.display().to_string();
        let state = control_file::load(&dir).map_err(|e| TimelineError::Invalid(format!("{name}: {e}")))?;
        let storage = PhysicalStorage::open(&dir, &state, sync).map_err(|e| TimelineError::Io(name.clone(), e))?;
        let acceptor = Acceptor::new(node_id.0, state.clone(), storage);
        let positions =
            Positions { term: state.term, flush_lsn: acceptor.flush_lsn(), commit_lsn: acceptor.commit_lsn() };
        info!(
            "loaded timeline {}/{}: term {}, flush {}, commit {}",
            state.tenant_id, state.timeline_id, positions.term, positions.flush_lsn, positions.commit_lsn
        );
        Ok(Arc::new(Timeline {
            tenant_id: state.tenant_id,
            timeline_id: state.timeline_id,
            dir,
            acceptor: Mutex::new(acceptor),
            positions: watch::channel(positions).0,
            backup: Mutex::new(BackupState::default()),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Acceptor<PhysicalStorage>> {
        // A panic while holding the lock left the acceptor in an unknown state: fail loudly.
        self.acceptor.lock().expect("timeline acceptor mutex poisoned")
    }

    /// Handles one proposer message (blocking: writes and fsyncs). Call from a blocking task.
    pub fn process(&self, msg: &ProposerMessage) -> Result<Option<AcceptorMessage>, AcceptorError> {
        let mut a = self.lock();
        let r = a.process(msg);
        self.publish(&a);
        r
    }

    /// Handles a run of AppendRequests with one fsync (blocking).
    pub fn process_appends(&self, batch: &[AppendRequest]) -> Result<AcceptorMessage, AcceptorError> {
        let mut a = self.lock();
        let r = a.process_appends(batch);
        self.publish(&a);
        r
    }

    fn publish(&self, a: &Acceptor<PhysicalStorage>) {
        let p = Positions { term: a.state().term, flush_lsn: a.flush_lsn(), commit_lsn: a.commit_lsn() };
        self.positions.send_if_modified(|old| {
            let changed = *old != p;
            *old = p;
            changed
        });
    }

    pub fn positions(&self) -> watch::Receiver<Positions> {
        self.positions.subscribe()
    }

    /// Durable WAL `[from, to)`.
    pub fn read_wal(&self, from: Lsn, to: Lsn) -> std::io::Result<Bytes> {
        self.lock().storage().read_wal(from, to)
    }

    pub fn state(&self) -> TimelinePersistentState {
        self.lock().state().clone()
    }

    pub fn status(&self) -> TimelineStatus {
        let last_backup_error = self.backup_state().last_error.clone();
        let a = self.lock();
        let s = a.state();
        TimelineStatus {
            tenant_id: s.tenant_id,
            timeline_id: s.timeline_id,
            term: s.term,
            term_history: s.term_history.clone(),
            flush_lsn: a.flush_lsn(),
            commit_lsn: a.commit_lsn(),
            timeline_start_lsn: s.timeline_start_lsn,
            local_start_lsn: s.local_start_lsn,
            backup_lsn: s.backup_lsn,
            peer_horizon_lsn: s.peer_horizon_lsn,
            remote_consistent_lsn: s.remote_consistent_lsn,
            system_id: s.server.system_id,
            pg_version: s.server.pg_version,
            wal_start_lsn: a.storage().oldest_lsn(),
            last_backup_error,
        }
    }

    /// Offload bookkeeping (peers, last error); not persisted.
    pub fn backup_state(&self) -> std::sync::MutexGuard<'_, BackupState> {
        self.backup.lock().expect("timeline backup state mutex poisoned")
    }

    /// Lowest LSN held on local disk.
    pub fn wal_start_lsn(&self) -> Lsn {
        self.lock().storage().oldest_lsn()
    }

    /// Durably records that WAL below `lsn` is offloaded (blocking: writes the control file).
    pub fn update_backup_lsn(&self, lsn: Lsn) -> Result<(), AcceptorError> {
        self.lock().update_backup_lsn(lsn)
    }

    /// The file of complete segment `segno` if this safekeeper holds all of it (see
    /// [`PhysicalStorage::complete_segment_path`]).
    pub fn complete_segment_path(&self, segno: u64) -> Option<PathBuf> {
        let a = self.lock();
        a.storage().complete_segment_path(segno, a.state().timeline_start_lsn)
    }

    /// Removes local segments wholly below `lsn` (blocking). The caller has checked that they
    /// are offloaded and that the pageserver no longer needs them.
    pub fn remove_wal_below(&self, lsn: Lsn) -> std::io::Result<usize> {
        self.lock().storage_mut().remove_wal_below(lsn)
    }

    /// Records what a peer reported about this timeline; its remote-consistent LSN (the
    /// pageserver reports it to the one safekeeper it streams from) is adopted as ours.
    pub fn record_peer(&self, addr: &str, info: PeerInfo) {
        self.update_remote_consistent_lsn(info.remote_consistent_lsn);
        self.backup_state().peers.insert(addr.to_string(), (info, Instant::now()));
    }

    pub fn wal_seg_size_bytes(&self) -> u64 {
        u64::from(self.lock().state().server.wal_seg_size)
    }

    pub fn update_remote_consistent_lsn(&self, lsn: Lsn) {
        self.lock().update_remote_consistent_lsn(lsn);
    }

    /// Runs `f` on the acceptor under the lock (peer recovery), then wakes readers.
    pub fn with_acceptor<R>(&self, f: impl FnOnce(&mut Acceptor<PhysicalStorage>) -> R) -> R {
        let mut a = self.lock();
        let r = f(&mut a);
        self.publish(&a);
        r
    }

    /// Persists the commit LSN if it moved (called periodically).
    pub fn persist_if_dirty(&self) {
        if let Err(e) = self.lock().persist_if_dirty() {
            warn!("timeline {}/{}: cannot persist its state: {e}", self.tenant_id, self.timeline_id);
        }
    }

    /// Persists in-memory fields (commit LSN) before shutdown.
    pub fn persist(&self) {
        if let Err(e) = self.lock().persist_now() {
            warn!("timeline {}/{}: cannot persist its state on shutdown: {e}", self.tenant_id, self.timeline_id);
        }
    }
}

/// All timelines of this safekeeper.
pub struct GlobalTimelines {
    pub node_id: NodeId,
    pub datadir: PathBuf,
    pub sync: bool,
    map: RwLock<HashMap<(TenantId, TimelineId), Arc<Timeline>>>,
    /// Remote storage for offloaded WAL, if configured (set once at start).
    remote: OnceLock<Arc<WalBackup>>,
}

impl GlobalTimelines {
    /// Loads every timeline under `datadir`. A timeline that fails to load is reported and
    /// skipped, so one damaged directory does not take the others down.
    pub fn load(node_id: NodeId, datadir: &Path, sync: bool) -> anyhow::Result<GlobalTimelines> {
        std::fs::create_dir_all(datadir)
            .map_err(|e| anyhow::anyhow!("cannot create data directory {}: {e}", datadir.display()))?;
        let mut map = HashMap::new();
        for tenant in std::fs::read_dir(datadir)? {
            let tenant = tenant?;
            let Ok(tenant_id) = tenant.file_name().to_string_lossy().parse::<TenantId>() else { continue };
            for tl in std::fs::read_dir(tenant.path())? {
                let tl = tl?;
                let Ok(timeline_id) = tl.file_name().to_string_lossy().parse::<TimelineId>() else { continue };
                match Timeline::open(node_id, tl.path(), sync) {
                    Ok(t) => {
                        map.insert((tenant_id, timeline_id), t);
                    }
                    Err(e) => tracing::error!("cannot load timeline {tenant_id}/{timeline_id}: {e}"),
                }
            }
        }
        Ok(GlobalTimelines {
            node_id,
            datadir: datadir.to_path_buf(),
            sync,
            map: RwLock::new(map),
            remote: OnceLock::new(),
        })
    }

    /// Configures remote storage for offloaded WAL; the first call wins.
    pub fn set_remote(&self, remote: Arc<WalBackup>) {
        let _ = self.remote.set(remote);
    }

    /// Remote storage for offloaded WAL, if configured.
    pub fn remote(&self) -> Option<&Arc<WalBackup>> {
        self.remote.get()
    }

    pub fn get(&self, tenant_id: TenantId, timeline_id: TimelineId) -> Result<Arc<Timeline>, TimelineError> {
        self.map
            .read()
            .expect("timelines lock")
            .get(&(tenant_id, timeline_id))
            .cloned()
            .ok_or(TimelineError::NotFound { tenant_id, timeline_id })
    }

    pub fn list(&self) -> Vec<Arc<Timeline>> {
        self.map.read().expect("timelines lock").values().cloned().collect()
    }

    /// Creates a timeline (blocking: writes its control file).
    pub fn create(&self, tenant_id: TenantId, req: &TimelineCreateRequest) -> Result<Arc<Timeline>, TimelineError> {
        let key = (tenant_id, req.timeline_id);
        let mut map = self.map.write().expect("timelines lock");
        if map.contains_key(&key) {
            return Err(TimelineError::AlreadyExists { tenant_id, timeline_id: req.timeline_id });
        }
        if !req.start_lsn.is_valid() {
            return Err(TimelineError::Invalid("start_lsn must be a valid LSN, not 0/0".into()));
        }
        let wal_seg_size = req.wal_seg_size.unwrap_or(16 * 1024 * 1024);
        if !wal_seg_size.is_power_of_two() || !(1 << 20..=1 << 30).contains(&wal_seg_size) {
            return Err(TimelineError::Invalid(format!(
                "wal_seg_size {wal_seg_size} must be a power of two between 1 MiB and 1 GiB"
            )));
        }
        let pg_version = if req.pg_version < 100 { req.pg_version * 10000 } else { req.pg_version };
        if pg_version / 10000 != 15 {
            return Err(TimelineError::Invalid(format!(
                "Postgres version {} is not supported; use 15",
                req.pg_version
            )));
        }
        let dir = self.datadir.join(tenant_id.to_string()).join(req.timeline_id.to_string());
        let name = dir.display().to_string();
        // A directory left by a crash during an earlier create or delete is garbage.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| TimelineError::Io(name.clone(), e))?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| TimelineError::Io(name.clone(), e))?;
        let server = ServerInfo { pg_version, system_id: req.system_id.unwrap_or(0), wal_seg_size };
        let state = TimelinePersistentState::new(tenant_id, req.timeline_id, server, req.start_lsn);
        control_file::save(&dir, &state, self.sync).map_err(|e| TimelineError::Io(name.clone(), e))?;
        let tl = Timeline::open(self.node_id, dir, self.sync)?;
        info!("created timeline {tenant_id}/{} starting at {}", req.timeline_id, req.start_lsn);
        map.insert(key, tl.clone());
        Ok(tl)
    }

    /// Removes a timeline and its files. Returns false if it did not exist.
    pub fn delete(&self, tenant_id: TenantId, timeline_id: TimelineId) -> Result<bool, TimelineError> {
        let removed = self.map.write().expect("timelines lock").remove(&(tenant_id, timeline_id));
        let dir = self.datadir.join(tenant_id.to_string()).join(timeline_id.to_string());
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| TimelineError::Io(dir.display().to_string(), e))?;
        }
        if removed.is_some() {
            info!("deleted timeline {tenant_id}/{timeline_id}");
        }
        Ok(removed.is_some())
    }
}
