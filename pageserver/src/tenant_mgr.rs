//! All tenants of this pageserver and their timelines: loading them at start (ancestors before
//! children), creating tenants, bootstrapping timelines with initdb, branching, and starting a
//! WAL receiver for every timeline.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use utils::{Lsn, TenantId, TimelineId};

use crate::config::PageServerConf;
use crate::import_datadir::bootstrap_timeline;
use crate::tenant::metadata::load_metadata;
use crate::tenant::remote::{download, IndexPart};
use crate::tenant::timeline::{Timeline, TimelineResources, TENANTS_DIR_NAME, TIMELINES_DIR_NAME};
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

pub struct Tenant {
    pub id: TenantId,
    timelines: RwLock<BTreeMap<TimelineId, Arc<Timeline>>>,
}

impl Tenant {
    pub fn timelines(&self) -> Vec<Arc<Timeline>> {
        self.timelines.read().expect("lock").values().cloned().collect()
    }
}

pub struct TenantManager {
    pub conf: PageServerConf,
    resources: TimelineResources,
    tenants: RwLock<HashMap<TenantId, Arc<Tenant>>>,
    shutdown: CancellationToken,
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
        let mgr = Arc::new(TenantManager { conf, resources, tenants: RwLock::new(HashMap::new()), shutdown });
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
            let indexes = mgr.remote_indexes(tenant_id).await;
            let tenant = mgr.load_tenant(tenant_id, &entry.path(), &indexes)?;
            mgr.tenants.write().expect("lock").insert(tenant_id, tenant);
        }
        for tenant in mgr.list_tenants() {
            for tl in tenant.timelines() {
                mgr.start_walreceiver(&tl);
            }
        }
        Ok(mgr)
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
        let tenant = Arc::new(Tenant { id: tenant_id, timelines: RwLock::new(BTreeMap::new()) });
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
                match Timeline::load_with_remote_index(&path, ancestor, self.resources.clone(), indexes.get(&id)) {
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
        tokio::spawn(walreceiver::run(tl.clone(), self.conf.safekeepers.clone(), self.shutdown.child_token()));
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

    pub fn create_tenant(&self, id: TenantId) -> Result<Arc<Tenant>, TenantMgrError> {
        let mut map = self.tenants.write().expect("lock");
        if map.contains_key(&id) {
            return Err(TenantMgrError::AlreadyExists(format!("tenant {id}")));
        }
        let dir = self.tenants_dir().join(id.to_string()).join(TIMELINES_DIR_NAME);
        std::fs::create_dir_all(&dir)
            .map_err(|e| TenantMgrError::Internal(format!("creating {}: {e}", dir.display())))?;
        let t = Arc::new(Tenant { id, timelines: RwLock::new(BTreeMap::new()) });
        map.insert(id, t.clone());
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
                    self.resources.clone(),
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
