//! All tenants of this pageserver and their timelines: loading them at start (ancestors before
//! children), creating tenants (with their settings) and deleting them, bootstrapping timelines
//! with initdb, branching, deleting timelines, starting a WAL receiver for every timeline, and
//! the background compaction and GC loop.
//!
//! **Deletion** is resumable: a `deleted` marker file is written (fsync'd) into the timeline's
//! (or tenant's) directory first; then the remote index goes (so no attach or restore brings
//! the timeline back), then every other remote object under its prefix, then the local
//! directory. A start that finds a marker finishes the deletion instead of loading.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use utils::{Lsn, TenantId, TimelineId};

use crate::config::PageServerConf;
use crate::import_datadir::bootstrap_timeline;
use crate::tenant::config::{TenantConf, TENANT_CONFIG_FILE_NAME};
use crate::tenant::metadata::load_metadata;
use crate::tenant::remote::{download, remote_tenant_path, remote_timeline_path, IndexPart};
use crate::tenant::timeline::{SharedTenantConf, Timeline, TimelineResources, TENANTS_DIR_NAME, TIMELINES_DIR_NAME};
use crate::walreceiver;

#[derive(Debug, thiserror::Error)]
pub enum TenantMgrError {
    #[error("tenant {0} not found; create it with POST /v1/tenant")]
    TenantNotFound(TenantId),
    #[error("timeline {1} not found on tenant {0}; see GET /v1/tenant/{0}/timeline")]
    TimelineNotFound(TenantId, TimelineId),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Internal(String),
}

/// How often local layer bytes are checked against `max_local_layer_bytes`.
const EVICTION_PERIOD: Duration = Duration::from_secs(5);

/// Marker file of a timeline or tenant directory whose deletion has begun.
pub const DELETED_MARKER_FILE_NAME: &str = "deleted";

pub struct Tenant {
    pub id: TenantId,
    timelines: RwLock<BTreeMap<TimelineId, Arc<Timeline>>>,
    /// The effective settings, shared with every timeline of the tenant.
    conf: SharedTenantConf,
    /// The settings this tenant overrides (what `config.json` holds).
    overrides: Mutex<BTreeMap<String, String>>,
}

impl Tenant {
    pub fn timelines(&self) -> Vec<Arc<Timeline>> {
        self.timelines.read().expect("lock").values().cloned().collect()
    }

    pub fn conf(&self) -> TenantConf {
        self.conf.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn overrides(&self) -> BTreeMap<String, String> {
        self.overrides.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

pub struct TenantManager {
    pub conf: PageServerConf,
    resources: TimelineResources,
    tenants: RwLock<HashMap<TenantId, Arc<Tenant>>>,
    shutdown: CancellationToken,
    /// Stops the WAL receiver of a timeline (when it is deleted).
    walreceivers: Mutex<HashMap<(TenantId, TimelineId), CancellationToken>>,
    /// Serialises timeline and tenant creation and deletion.
    lifecycle: tokio::sync::Mutex<()>,
    /// Where every timeline's WAL receiver gets WAL from (addresses, TLS, token): one for all.
    wal_sources: Arc<walreceiver::WalSources>,
    /// The compaction/GC loop; awaited at shutdown so no compaction (which applies WAL records
    /// through the runtime) still runs while the runtime goes away.
    background: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl TenantManager {
    fn tenants_dir(&self) -> PathBuf {
        self.conf.workdir.join(TENANTS_DIR_NAME)
    }

    /// Loads everything under `<workdir>/tenants` and starts WAL receivers. With remote
    /// storage, first restores every remote timeline that is missing locally (a pageserver that
    /// lost its disk comes back with all its tenants).
    pub async fn load(
        conf: PageServerConf,
        resources: TimelineResources,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let wal_sources = Arc::new(walreceiver::WalSources {
            safekeepers: conf.safekeepers.clone(),
            tls: conf.ssl_ca.clone(),
            token: conf.safekeeper_auth_token.clone(),
        });
        let mgr = Arc::new(TenantManager {
            wal_sources,
            conf,
            resources,
            tenants: RwLock::new(HashMap::new()),
            shutdown,
            walreceivers: Mutex::new(HashMap::new()),
            lifecycle: tokio::sync::Mutex::new(()),
            background: std::sync::Mutex::new(None),
        });
        let dir = mgr.tenants_dir();
        std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        if let Some(storage) = &mgr.resources.remote_storage {
            let tenants = download::list_remote_tenants(storage)
                .await
                .map_err(|e| anyhow::anyhow!("listing tenants in remote storage: {e:#}"))?;
            // One broken tenant must not keep the others from being served: it is logged and left
            // out (its timelines that were restored before the failure are loaded).
            for tenant_id in tenants {
                match download::restore_tenant(storage, &mgr.conf.workdir, tenant_id).await {
                    Ok(0) => {}
                    Ok(restored) => info!("restored {restored} timelines of tenant {tenant_id} from remote storage"),
                    Err(e) => tracing::error!("restoring tenant {tenant_id} from remote storage failed: {e:#}"),
                }
            }
        }
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let Ok(tenant_id) = entry.file_name().to_string_lossy().parse::<TenantId>() else { continue };
            if entry.path().join(DELETED_MARKER_FILE_NAME).exists() {
                info!("tenant {tenant_id}: finishing a deletion that was interrupted");
                if let Err(e) = mgr.finish_tenant_deletion(tenant_id).await {
                    tracing::error!("{e}");
                }
                continue;
            }
            mgr.finish_timeline_deletions(tenant_id, &entry.path()).await;
            let indexes = mgr.remote_indexes(tenant_id).await;
            match mgr.load_tenant(tenant_id, &entry.path(), &indexes) {
                Ok(tenant) => {
                    mgr.tenants.write().expect("lock").insert(tenant_id, tenant);
                }
                Err(e) => tracing::error!("tenant {tenant_id} not loaded: {e:#}"),
            }
        }
        for tenant in mgr.list_tenants() {
            for tl in tenant.timelines() {
                mgr.start_walreceiver(&tl);
            }
        }
        let background = tokio::spawn(Arc::clone(&mgr).background_jobs());
        *mgr.background.lock().expect("lock") = Some(background);
        Ok(mgr)
    }

    /// The tenant's overrides from `config.json` (none if the file is missing).
    fn read_overrides(tenant_dir: &Path) -> anyhow::Result<BTreeMap<String, String>> {
        let path = tenant_dir.join(TENANT_CONFIG_FILE_NAME);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                anyhow::anyhow!("{}: {e}; fix or remove the file (the tenant then uses the defaults)", path.display())
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(anyhow::anyhow!("reading {}: {e}", path.display())),
        }
    }

    /// Saves `overrides` as the tenant's `config.json` atomically (temp file, fsync, rename,
    /// directory fsync), and in remote storage beside its timelines so an attach gets them.
    async fn save_overrides(&self, tenant_id: TenantId, overrides: &BTreeMap<String, String>) -> anyhow::Result<()> {
        let dir = self.tenants_dir().join(tenant_id.to_string());
        let bytes = serde_json::to_vec_pretty(overrides)?;
        let (dir2, bytes2) = (dir.clone(), bytes.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            std::fs::create_dir_all(&dir2)?;
            let temp = dir2.join(format!("{TENANT_CONFIG_FILE_NAME}.tmp"));
            utils::durable::replace_file(&dir2.join(TENANT_CONFIG_FILE_NAME), &temp, &bytes2)?;
            Ok(())
        })
        .await??;
        if let Some(storage) = &self.resources.remote_storage {
            let path = remote_tenant_path(tenant_id).join(TENANT_CONFIG_FILE_NAME)?;
            remote_storage::RemoteStorage::put_bytes(storage, &path, bytes.into())
                .await
                .map_err(|e| anyhow::anyhow!("uploading the config of tenant {tenant_id}: {e}"))?;
        }
        Ok(())
    }

    /// The tenant's effective settings: the pageserver defaults with `overrides` applied.
    fn tenant_conf(&self, overrides: &BTreeMap<String, String>) -> Result<TenantConf, TenantMgrError> {
        self.conf.default_tenant_conf.with_overrides(overrides).map_err(TenantMgrError::BadRequest)
    }

    /// Replaces the tenant's overrides (and so its settings) with `overrides`.
    pub async fn set_tenant_config(
        &self,
        tenant_id: TenantId,
        overrides: BTreeMap<String, String>,
    ) -> Result<TenantConf, TenantMgrError> {
        let tenant = self.get_tenant(tenant_id)?;
        let conf = self.tenant_conf(&overrides)?;
        self.save_overrides(tenant_id, &overrides)
            .await
            .map_err(|e| TenantMgrError::Internal(format!("saving the config of tenant {tenant_id}: {e:#}")))?;
        *tenant.conf.write().unwrap_or_else(|p| p.into_inner()) = conf.clone();
        *tenant.overrides.lock().unwrap_or_else(|p| p.into_inner()) = overrides;
        info!("tenant {tenant_id}: config set to {:?}", conf.to_map());
        Ok(conf)
    }

    /// Compaction and GC of every timeline, each when its tenant's period has passed. Runs
    /// until shutdown; a failure is logged and retried at the next period.
    async fn background_jobs(self: Arc<Self>) {
        let mut last_compaction: HashMap<TimelineId, Instant> = HashMap::new();
        let mut last_gc: HashMap<TimelineId, Instant> = HashMap::new();
        let mut last_eviction = Instant::now();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if let Some(limit) = self.conf.max_local_layer_bytes {
                if last_eviction.elapsed() >= EVICTION_PERIOD {
                    last_eviction = Instant::now();
                    let me = Arc::clone(&self);
                    if let Err(e) = tokio::task::spawn_blocking(move || me.evict_to_limit(limit)).await {
                        warn!("eviction panicked: {e}");
                    }
                }
            }
            for tenant in self.list_tenants() {
                let conf = tenant.conf();
                for tl in tenant.timelines() {
                    if self.shutdown.is_cancelled() {
                        return;
                    }
                    let id = tl.timeline_id();
                    let due = |last: Option<&Instant>, period: Duration| {
                        !period.is_zero() && last.is_none_or(|t| t.elapsed() >= period)
                    };
                    if due(last_compaction.get(&id), conf.compaction_period) {
                        last_compaction.insert(id, Instant::now());
                        let tl2 = Arc::clone(&tl);
                        match tokio::task::spawn_blocking(move || tl2.compact(false)).await {
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => warn!("compaction of {}/{id} failed: {e}", tenant.id),
                            Err(e) => warn!("compaction of {}/{id} panicked: {e}", tenant.id),
                        }
                    }
                    if due(last_gc.get(&id), conf.gc_period) {
                        last_gc.insert(id, Instant::now());
                        let tl2 = Arc::clone(&tl);
                        match tokio::task::spawn_blocking(move || tl2.gc(SystemTime::now())).await {
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => warn!("gc of {}/{id} failed: {e}", tenant.id),
                            Err(e) => warn!("gc of {}/{id} panicked: {e}", tenant.id),
                        }
                    }
                }
            }
        }
    }

    /// Evicts local layer files, least recently read first, while they hold more than `limit`
    /// bytes, down to 90% of it. Only uploaded layers can go (see [`Timeline::evict_layer`]).
    /// Returns the bytes evicted. Blocking.
    pub fn evict_to_limit(&self, limit: u64) -> u64 {
        let mut candidates: Vec<(u64, u64, String, Arc<Timeline>)> = Vec::new();
        let mut total = 0u64;
        for tenant in self.list_tenants() {
            for tl in tenant.timelines() {
                for (name, bytes, access) in tl.local_layers() {
                    total += bytes;
                    candidates.push((access, bytes, name, Arc::clone(&tl)));
                }
            }
        }
        if total <= limit {
            return 0;
        }
        let target = limit / 10 * 9;
        candidates.sort_by_key(|(access, ..)| *access);
        let mut evicted = 0u64;
        for (_, bytes, name, tl) in candidates {
            if total - evicted <= target {
                break;
            }
            match tl.evict_layer(&name) {
                Ok(true) => evicted += bytes,
                Ok(false) => {}
                // Not uploaded yet, or changed meanwhile: try the next one.
                Err(e) => tracing::debug!("not evicting {name}: {e}"),
            }
        }
        info!(
            "local layers held {total} bytes, over max_local_layer_bytes {limit}: evicted {evicted} bytes (least \
             recently read first)"
        );
        evicted
    }

    /// Finishes the deletion of every timeline of the tenant that has a deletion marker.
    async fn finish_timeline_deletions(&self, tenant_id: TenantId, tenant_dir: &Path) {
        let Ok(entries) = std::fs::read_dir(tenant_dir.join(TIMELINES_DIR_NAME)) else { return };
        for entry in entries.flatten() {
            let Ok(timeline_id) = entry.file_name().to_string_lossy().parse::<TimelineId>() else { continue };
            if entry.path().join(DELETED_MARKER_FILE_NAME).exists() {
                info!("timeline {tenant_id}/{timeline_id}: finishing a deletion that was interrupted");
                if let Err(e) = self.delete_timeline_data(tenant_id, timeline_id).await {
                    tracing::error!("{e}");
                }
            }
        }
    }

    /// Deletes a timeline that has no child branches: stops its WAL receiver and uploads, then
    /// removes its remote objects and local directory (see the module docs). Repeating it
    /// after a crash midway (or at the next start) finishes the job.
    pub async fn delete_timeline(&self, tenant_id: TenantId, timeline_id: TimelineId) -> Result<(), TenantMgrError> {
        let _lifecycle = self.lifecycle.lock().await;
        let tenant = self.get_tenant(tenant_id)?;
        let tl = self.get_timeline(tenant_id, timeline_id)?;
        let children: Vec<String> = tl.child_branch_points().iter().map(|(id, _)| id.to_string()).collect();
        if !children.is_empty() {
            return Err(TenantMgrError::BadRequest(format!(
                "timeline {timeline_id} has child branches {}; delete them first",
                children.join(", ")
            )));
        }
        write_marker(tl.dir()).map_err(TenantMgrError::Internal)?;
        tenant.timelines.write().expect("lock").remove(&timeline_id);
        if let Some(stop) = self.walreceivers.lock().expect("lock").remove(&(tenant_id, timeline_id)) {
            stop.cancel();
        }
        if let Some(ancestor) = tl.ancestor() {
            ancestor.forget_child(timeline_id);
        }
        if let Some(remote) = tl.remote_client() {
            remote.stop().await;
        }
        drop(tl);
        self.delete_timeline_data(tenant_id, timeline_id).await
    }

    /// The remote objects (index first) and the local directory of a timeline being deleted.
    async fn delete_timeline_data(&self, tenant_id: TenantId, timeline_id: TimelineId) -> Result<(), TenantMgrError> {
        if let Some(storage) = &self.resources.remote_storage {
            let index = crate::tenant::remote::remote_index_path(tenant_id, timeline_id);
            remote_storage::RemoteStorage::delete(storage, &index).await.map_err(|e| {
                TenantMgrError::Internal(format!(
                    "deleting the remote index of timeline {tenant_id}/{timeline_id}: {e}; retry the deletion"
                ))
            })?;
            delete_remote_prefix(storage, &remote_timeline_path(tenant_id, timeline_id))
                .await
                .map_err(|e| TenantMgrError::Internal(format!("timeline {tenant_id}/{timeline_id}: {e:#}")))?;
        }
        let dir = crate::tenant::timeline::timeline_path(&self.conf.workdir, tenant_id, timeline_id);
        remove_dir_durably(&dir).await.map_err(TenantMgrError::Internal)?;
        info!("deleted timeline {tenant_id}/{timeline_id}");
        Ok(())
    }

    /// Deletes a tenant: every timeline (children first), its remote prefix and its directory.
    pub async fn delete_tenant(&self, tenant_id: TenantId) -> Result<(), TenantMgrError> {
        let tenant = self.get_tenant(tenant_id)?;
        let dir = self.tenants_dir().join(tenant_id.to_string());
        write_marker(&dir).map_err(TenantMgrError::Internal)?;
        loop {
            let timelines = tenant.timelines();
            let Some(leaf) = timelines
                .iter()
                .find(|t| !timelines.iter().any(|c| c.metadata().ancestor_timeline == Some(t.timeline_id())))
            else {
                break;
            };
            self.delete_timeline(tenant_id, leaf.timeline_id()).await?;
        }
        self.tenants.write().expect("lock").remove(&tenant_id);
        self.finish_tenant_deletion(tenant_id).await
    }

    async fn finish_tenant_deletion(&self, tenant_id: TenantId) -> Result<(), TenantMgrError> {
        let _lifecycle = self.lifecycle.lock().await;
        if let Some(storage) = &self.resources.remote_storage {
            delete_remote_prefix(storage, &remote_tenant_path(tenant_id))
                .await
                .map_err(|e| TenantMgrError::Internal(format!("tenant {tenant_id}: {e:#}; retry the deletion")))?;
        }
        remove_dir_durably(&self.tenants_dir().join(tenant_id.to_string())).await.map_err(TenantMgrError::Internal)?;
        info!("deleted tenant {tenant_id}");
        Ok(())
    }

    /// Loads the timelines in `tenant_dir` (`<workdir>/tenants/<tenant>`), ancestors first.
    /// Timelines that fail to load are logged and left out.
    /// With remote storage: the remote indexes of the tenant's local timelines (for
    /// [`Timeline::load_with_remote_index`]); empty without.
    async fn remote_indexes(&self, tenant_id: TenantId) -> HashMap<TimelineId, IndexPart> {
        match &self.resources.remote_storage {
            Some(storage) => download::local_timelines_remote_indexes(storage, &self.conf.workdir, tenant_id).await,
            None => HashMap::new(),
        }
    }

    fn load_tenant(
        &self,
        tenant_id: TenantId,
        tenant_dir: &std::path::Path,
        indexes: &HashMap<TimelineId, IndexPart>,
    ) -> anyhow::Result<Arc<Tenant>> {
        let overrides = Self::read_overrides(tenant_dir)?;
        let conf = self.tenant_conf(&overrides).map_err(|e| anyhow::anyhow!("tenant {tenant_id} config: {e}"))?;
        let tenant = Arc::new(Tenant {
            id: tenant_id,
            timelines: RwLock::new(BTreeMap::new()),
            conf: Arc::new(RwLock::new(conf)),
            overrides: Mutex::new(overrides),
        });
        let resources = TimelineResources { conf: Arc::clone(&tenant.conf), ..self.resources.clone() };
        let tl_dir = tenant_dir.join(TIMELINES_DIR_NAME);
        let mut pending: BTreeMap<TimelineId, (PathBuf, Option<TimelineId>)> = BTreeMap::new();
        if tl_dir.exists() {
            for tl in std::fs::read_dir(&tl_dir)? {
                let tl = tl?;
                let Ok(timeline_id) = tl.file_name().to_string_lossy().parse::<TimelineId>() else { continue };
                match load_metadata(&tl.path()) {
                    Ok(md) => {
                        pending.insert(timeline_id, (tl.path(), md.ancestor_timeline));
                    }
                    Err(e) => tracing::error!("skipping timeline {tenant_id}/{timeline_id}: {e}"),
                }
            }
        }
        // Ancestors first: repeat until nothing more can be loaded.
        loop {
            let ready: Vec<TimelineId> = pending
                .iter()
                .filter(|(_, (_, anc))| anc.is_none_or(|a| tenant.timelines.read().expect("lock").contains_key(&a)))
                .map(|(id, _)| *id)
                .collect();
            if ready.is_empty() {
                break;
            }
            for id in ready {
                let (path, anc) = pending.remove(&id).expect("listed");
                let ancestor = anc.map(|a| tenant.timelines.read().expect("lock")[&a].clone());
                match Timeline::load_with_remote_index(&path, ancestor, resources.clone(), indexes.get(&id)) {
                    Ok(tl) => {
                        tenant.timelines.write().expect("lock").insert(id, tl);
                    }
                    Err(e) => tracing::error!("cannot load timeline {tenant_id}/{id}: {e}"),
                }
            }
        }
        for (id, (_, anc)) in pending {
            tracing::error!("timeline {tenant_id}/{id} not loaded: its ancestor {anc:?} is missing");
        }
        info!("loaded tenant {tenant_id} with {} timelines", tenant.timelines.read().expect("lock").len());
        Ok(tenant)
    }

    /// Attaches a tenant that is in remote storage but not here: downloads its timelines, loads
    /// them and starts their WAL receivers.
    pub async fn attach_tenant(&self, tenant_id: TenantId) -> Result<Arc<Tenant>, TenantMgrError> {
        let Some(storage) = &self.resources.remote_storage else {
            return Err(TenantMgrError::BadRequest(
                "attach needs remote storage: configure [remote_storage] in pageserver.toml".to_string(),
            ));
        };
        if self.tenants.read().expect("lock").contains_key(&tenant_id) {
            return Err(TenantMgrError::AlreadyExists(format!("tenant {tenant_id}")));
        }
        let timelines = download::list_remote_timelines(storage, tenant_id)
            .await
            .map_err(|e| TenantMgrError::Internal(format!("listing tenant {tenant_id} in remote storage: {e:#}")))?;
        if timelines.is_empty() {
            return Err(TenantMgrError::TenantNotFound(tenant_id));
        }
        download::restore_tenant(storage, &self.conf.workdir, tenant_id)
            .await
            .map_err(|e| TenantMgrError::Internal(format!("restoring tenant {tenant_id}: {e:#}")))?;
        let indexes = self.remote_indexes(tenant_id).await;
        let tenant = self
            .load_tenant(tenant_id, &self.tenants_dir().join(tenant_id.to_string()), &indexes)
            .map_err(|e| TenantMgrError::Internal(format!("loading tenant {tenant_id}: {e:#}")))?;
        {
            let mut map = self.tenants.write().expect("lock");
            if map.contains_key(&tenant_id) {
                return Err(TenantMgrError::AlreadyExists(format!("tenant {tenant_id}")));
            }
            map.insert(tenant_id, tenant.clone());
        }
        for tl in tenant.timelines() {
            self.start_walreceiver(&tl);
        }
        info!("attached tenant {tenant_id} from remote storage");
        Ok(tenant)
    }

    /// Waits (at most `timeout`) for the compaction/GC loop to finish its current job and end
    /// (call after cancelling the shutdown token).
    pub async fn wait_background_jobs(&self, timeout: std::time::Duration) {
        let handle = self.background.lock().expect("lock").take();
        if let Some(handle) = handle {
            if tokio::time::timeout(timeout, handle).await.is_err() {
                warn!("compaction/GC did not finish within {timeout:?} of shutdown");
            }
        }
    }

    /// Waits (up to `timeout` in total) until every timeline's upload queue is empty.
    pub async fn wait_uploads(&self, timeout: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        for t in self.list_tenants() {
            for tl in t.timelines() {
                let Some(remote) = tl.remote_client() else { continue };
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if let Err(status) = remote.wait_uploaded(left).await {
                    warn!(
                        "timeline {}/{}: {} uploads not done at shutdown (remote_consistent_lsn {}); they are \
                         retried at the next start",
                        tl.tenant_id(),
                        tl.timeline_id(),
                        status.queue_len,
                        status.remote_consistent_lsn
                    );
                }
            }
        }
    }

    fn start_walreceiver(&self, tl: &Arc<Timeline>) {
        if self.conf.safekeepers.is_empty() {
            warn!("no safekeepers configured: timeline {}/{} will not receive WAL", tl.tenant_id(), tl.timeline_id());
            return;
        }
        let stop = self.shutdown.child_token();
        self.walreceivers.lock().expect("lock").insert((tl.tenant_id(), tl.timeline_id()), stop.clone());
        tokio::spawn(walreceiver::run(tl.clone(), Arc::clone(&self.wal_sources), stop));
    }

    pub fn list_tenants(&self) -> Vec<Arc<Tenant>> {
        self.tenants.read().expect("lock").values().cloned().collect()
    }

    pub fn get_tenant(&self, id: TenantId) -> Result<Arc<Tenant>, TenantMgrError> {
        self.tenants.read().expect("lock").get(&id).cloned().ok_or(TenantMgrError::TenantNotFound(id))
    }

    pub fn get_timeline(&self, tenant_id: TenantId, timeline_id: TimelineId) -> Result<Arc<Timeline>, TenantMgrError> {
        self.get_tenant(tenant_id)?
            .timelines
            .read()
            .expect("lock")
            .get(&timeline_id)
            .cloned()
            .ok_or(TenantMgrError::TimelineNotFound(tenant_id, timeline_id))
    }

    /// Creates a tenant with `overrides` of the default settings (validated first: a bad key or
    /// value creates nothing).
    pub async fn create_tenant(
        &self,
        id: TenantId,
        overrides: BTreeMap<String, String>,
    ) -> Result<Arc<Tenant>, TenantMgrError> {
        let _lifecycle = self.lifecycle.lock().await;
        let conf = self.tenant_conf(&overrides)?;
        if self.tenants.read().expect("lock").contains_key(&id) {
            return Err(TenantMgrError::AlreadyExists(format!("tenant {id}")));
        }
        let dir = self.tenants_dir().join(id.to_string()).join(TIMELINES_DIR_NAME);
        std::fs::create_dir_all(&dir)
            .map_err(|e| TenantMgrError::Internal(format!("creating {}: {e}", dir.display())))?;
        if !overrides.is_empty() {
            self.save_overrides(id, &overrides)
                .await
                .map_err(|e| TenantMgrError::Internal(format!("saving the config of tenant {id}: {e:#}")))?;
        }
        let t = Arc::new(Tenant {
            id,
            timelines: RwLock::new(BTreeMap::new()),
            conf: Arc::new(RwLock::new(conf)),
            overrides: Mutex::new(overrides),
        });
        self.tenants.write().expect("lock").insert(id, t.clone());
        info!("created tenant {id}");
        Ok(t)
    }

    /// Creates a timeline: a branch of `ancestor` at `ancestor_lsn` (default: its last record
    /// LSN; a branch point not yet ingested is waited for up to `wait_lsn_timeout`), or a fresh
    /// one bootstrapped with initdb.
    pub async fn create_timeline(
        self: &Arc<Self>,
        tenant_id: TenantId,
        new_timeline_id: TimelineId,
        ancestor: Option<(TimelineId, Option<Lsn>)>,
    ) -> Result<Arc<Timeline>, TenantMgrError> {
        let _lifecycle = self.lifecycle.lock().await;
        let tenant = self.get_tenant(tenant_id)?;
        if tenant.timelines.read().expect("lock").contains_key(&new_timeline_id) {
            return Err(TenantMgrError::AlreadyExists(format!("timeline {new_timeline_id} on tenant {tenant_id}")));
        }
        let tl = match ancestor {
            Some((ancestor_id, lsn)) => {
                let parent = self.get_timeline(tenant_id, ancestor_id)?;
                let lsn = lsn.unwrap_or_else(|| parent.get_last_record_lsn());
                parent
                    .branch(new_timeline_id, lsn, self.conf.wait_lsn_timeout)
                    .await
                    .map_err(|e| TenantMgrError::BadRequest(format!("cannot branch from {ancestor_id}: {e}")))?
            }
            None => {
                let (workdir, pg, su, res) = (
                    self.conf.workdir.clone(),
                    self.conf.pg_install_dir.clone(),
                    self.conf.superuser.clone(),
                    TimelineResources { conf: Arc::clone(&tenant.conf), ..self.resources.clone() },
                );
                tokio::task::spawn_blocking(move || {
                    bootstrap_timeline(&workdir, tenant_id, new_timeline_id, &pg, &su, res)
                })
                .await
                .map_err(|e| TenantMgrError::Internal(e.to_string()))?
                .map_err(|e| TenantMgrError::Internal(format!("bootstrapping timeline {new_timeline_id}: {e}")))?
            }
        };
        tenant.timelines.write().expect("lock").insert(new_timeline_id, tl.clone());
        info!("created timeline {tenant_id}/{new_timeline_id} at {}", tl.get_last_record_lsn());
        self.start_walreceiver(&tl);
        Ok(tl)
    }

    /// Flushes every open layer (shutdown, or an explicit checkpoint).
    pub fn checkpoint_all(&self) {
        for t in self.list_tenants() {
            for tl in t.timelines() {
                if let Err(e) = tl.checkpoint() {
                    warn!("checkpoint of {}/{} failed: {e}", tl.tenant_id(), tl.timeline_id());
                }
            }
        }
    }
}

/// Writes the deletion marker into `dir` durably.
fn write_marker(dir: &Path) -> Result<(), String> {
    let marker = dir.join(DELETED_MARKER_FILE_NAME);
    std::fs::File::create(&marker)
        .and_then(|f| f.sync_all())
        .and_then(|()| std::fs::File::open(dir)?.sync_all())
        .map_err(|e| format!("writing the deletion marker {}: {e}", marker.display()))
}

/// Removes `dir` and everything in it, then fsyncs its parent; a missing `dir` is fine.
async fn remove_dir_durably(dir: &Path) -> Result<(), String> {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("removing {}: {e}; retry the deletion", dir.display())),
    }
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("fsyncing {}: {e}", parent.display()))?;
    }
    Ok(())
}

/// Deletes every remote object under `prefix`.
async fn delete_remote_prefix(
    storage: &remote_storage::GenericRemoteStorage,
    prefix: &remote_storage::RemotePath,
) -> anyhow::Result<()> {
    use remote_storage::{ListingMode, RemoteStorage};
    let listing = storage
        .list(Some(prefix), ListingMode::NoDelimiter, None)
        .await
        .map_err(|e| anyhow::anyhow!("listing {prefix} in remote storage: {e}"))?;
    // The listing prefix is a plain string prefix: keep to this directory, not a sibling whose
    // name merely starts the same.
    let dir = format!("{}/", prefix.as_str());
    let keys: Vec<_> = listing.keys.into_iter().filter(|k| k.as_str().starts_with(&dir)).collect();
    if !keys.is_empty() {
        storage
            .delete_many(&keys)
            .await
            .map_err(|e| anyhow::anyhow!("deleting {} objects under {prefix}: {e}", keys.len()))?;
    }
    Ok(())
}
