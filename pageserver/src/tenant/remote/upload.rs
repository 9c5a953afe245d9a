//! The upload queue of one timeline.
//!
//! The write path schedules operations without waiting (it runs on blocking threads, holding
//! the flush lock): [`RemoteTimelineClient::schedule_layer_upload`] once a new layer file is
//! durable locally, then [`RemoteTimelineClient::schedule_index_upload`] once the metadata that
//! covers it is. One tokio task executes the operations strictly in order, one at a time, each
//! retried with backoff until it succeeds. So an index is uploaded only after every layer it
//! names, and `remote_consistent_lsn` (the `disk_consistent_lsn` of the last uploaded index)
//! never claims data that is not in remote storage.
//!
//! When the task starts it reads the remote index (if any): layers already uploaded with the
//! same size are not uploaded again, so a restart re-uploads only what the previous run missed.
//!
//! A failing operation blocks the queue (later operations depend on it): it is retried with
//! backoff capped at [`RETRY_BACKOFF_MAX`], every failure is logged (as an error when the storage
//! calls it permanent) and the latest one is shown in [`UploadStatus::last_error`] until the
//! operation succeeds.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use remote_storage::{GenericRemoteStorage, RemoteStorage, RemoteStorageError};
use tokio::sync::{watch, Notify};
use tracing::{debug, error, info, warn};
use utils::{Lsn, TenantId, TimelineId};

use super::download::download_layer;
use super::index::{IndexPart, IndexPartError, LayerFileMetadata};
use super::{checksum_file, remote_index_path, remote_layer_path};
use crate::layer::{LayerDownloader, LayerName, PersistentLayerDesc};
use crate::tenant::metadata::TimelineMetadata;

/// Longest wait between two attempts of a failing operation.
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(10);
const RETRY_BACKOFF_BASE: Duration = Duration::from_millis(100);

/// What the timeline detail API shows about uploads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UploadStatus {
    /// `disk_consistent_lsn` of the index last uploaded (or found remotely at start).
    pub remote_consistent_lsn: Lsn,
    /// Operations scheduled and not yet done (including the one in progress).
    pub queue_len: usize,
    /// The latest failure of the operation at the head of the queue; `None` once it succeeded.
    pub last_error: Option<String>,
    /// Layer files uploaded by this process, and their bytes.
    pub uploaded_layers: u64,
    pub uploaded_bytes: u64,
    /// False until the task has read the remote index at start.
    pub initialized: bool,
    /// Layer files downloaded on demand by this process, and their bytes.
    pub downloaded_layers: u64,
    pub downloaded_bytes: u64,
    /// Remote layer objects deleted (compacted away or collected) by this process.
    pub deleted_layers: u64,
    /// The task has stopped ([`RemoteTimelineClient::stop`]): nothing more is uploaded.
    pub stopped: bool,
}

#[derive(Debug, Clone)]
enum UploadOp {
    Layer {
        name: String,
        path: PathBuf,
    },
    Index {
        metadata: TimelineMetadata,
        layers: Vec<String>,
    },
    /// Remote objects of layers that an index uploaded before this op no longer names.
    Delete {
        names: Vec<String>,
    },
}

impl std::fmt::Display for UploadOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UploadOp::Layer { name, .. } => write!(f, "upload of layer {name}"),
            UploadOp::Index { metadata, layers } => write!(
                f,
                "upload of index_part.json at disk_consistent_lsn {} ({} layers)",
                metadata.disk_consistent_lsn,
                layers.len()
            ),
            UploadOp::Delete { names } => write!(f, "deletion of {} replaced layers", names.len()),
        }
    }
}

struct Queue {
    /// The layers the next scheduled index names: every layer scheduled so far.
    latest_layers: BTreeSet<String>,
    ops: VecDeque<UploadOp>,
    /// What is known to be in remote storage, with sizes and checksums.
    uploaded: HashMap<String, LayerFileMetadata>,
}

/// The upload queue of one timeline; see the module docs.
pub struct RemoteTimelineClient {
    tenant_id: TenantId,
    timeline_id: TimelineId,
    storage: GenericRemoteStorage,
    queue: Mutex<Queue>,
    wake: Notify,
    status: watch::Sender<UploadStatus>,
    runtime: tokio::runtime::Handle,
    /// Layers of the remote index that were not on local disk at load: what
    /// [`LayerDownloader::download`] may fetch, with the size and checksums to check.
    remote_only_layers: Mutex<HashMap<String, LayerFileMetadata>>,
    /// Set by [`Self::stop`]: the task ends before its next operation or retry.
    stopping: std::sync::atomic::AtomicBool,
}

impl RemoteTimelineClient {
    /// A client with an empty queue, uploading and downloading on `runtime`; the upload task
    /// runs once [`Self::launch`]ed.
    pub fn new(
        storage: GenericRemoteStorage,
        tenant_id: TenantId,
        timeline_id: TimelineId,
        runtime: tokio::runtime::Handle,
    ) -> Arc<Self> {
        Arc::new(RemoteTimelineClient {
            tenant_id,
            timeline_id,
            storage,
            queue: Mutex::new(Queue { latest_layers: BTreeSet::new(), ops: VecDeque::new(), uploaded: HashMap::new() }),
            wake: Notify::new(),
            status: watch::Sender::new(UploadStatus::default()),
            runtime,
            remote_only_layers: Mutex::new(HashMap::new()),
            stopping: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Starts the upload task; it runs for the life of the process. `known_index`: the remote
    /// index the caller already downloaded (so the task does not fetch it again); `None`: the
    /// task downloads it.
    pub fn launch(self: &Arc<Self>, known_index: Option<IndexPart>) {
        self.runtime.spawn(Arc::clone(self).run(known_index));
    }

    /// Size and checksums of layer `name` as it is in remote storage, if it is there (known from
    /// the remote index read at start or uploaded since).
    pub fn uploaded_layer(&self, name: &str) -> Option<LayerFileMetadata> {
        self.lock().uploaded.get(name).cloned()
    }

    /// Records a layer that the remote index names and local disk lacks: later indexes name it
    /// too, and [`LayerDownloader::download`] fetches it on first read.
    pub fn add_remote_only_layer(&self, name: String, meta: LayerFileMetadata) {
        self.lock().latest_layers.insert(name.clone());
        self.remote_only_layers.lock().unwrap_or_else(|p| p.into_inner()).insert(name, meta);
    }

    pub fn storage(&self) -> &GenericRemoteStorage {
        &self.storage
    }

    pub fn status(&self) -> UploadStatus {
        self.status.borrow().clone()
    }

    pub fn remote_consistent_lsn(&self) -> Lsn {
        self.status.borrow().remote_consistent_lsn
    }

    /// Queues the upload of the durable local layer file at `path`, named `name`; the next
    /// scheduled index names it.
    pub fn schedule_layer_upload(&self, name: String, path: PathBuf) {
        let mut q = self.lock();
        q.latest_layers.insert(name.clone());
        q.ops.push_back(UploadOp::Layer { name, path });
        self.published(q);
    }

    /// Queues the upload of an index with `metadata` naming every layer scheduled so far.
    pub fn schedule_index_upload(&self, metadata: &TimelineMetadata) {
        let mut q = self.lock();
        // Only layers the metadata covers: one being flushed is named once its metadata is saved.
        let layers_end = metadata.disk_consistent_lsn.0.saturating_add(1);
        let layers = q
            .latest_layers
            .iter()
            .filter(|name| name.parse::<LayerName>().is_ok_and(|l| l.lsn_range().end.0 <= layers_end))
            .cloned()
            .collect();
        q.ops.push_back(UploadOp::Index { metadata: metadata.clone(), layers });
        self.published(q);
    }

    /// Stops the task (the timeline is being deleted): it finishes the operation in progress,
    /// starts no other, and this waits until it has stopped (at most 60 s).
    pub async fn stop(&self) {
        self.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        self.wake.notify_one();
        let mut rx = self.status.subscribe();
        let stopped = tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|s| s.stopped)).await;
        if stopped.is_err() {
            warn!(tenant = %self.tenant_id, timeline = %self.timeline_id, "the upload task did not stop within 60 s");
        }
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops naming `names` in the indexes scheduled from now on (they were compacted away or
    /// collected), and forgets them as download sources.
    pub fn unlink_layers(&self, names: &[String]) {
        let mut q = self.lock();
        let mut remote_only = self.remote_only_layers.lock().unwrap_or_else(|p| p.into_inner());
        for name in names {
            q.latest_layers.remove(name);
            remote_only.remove(name);
        }
    }

    /// Queues the deletion of the remote objects of `names`. Schedule it after an index that no
    /// longer names them ([`Self::unlink_layers`], then [`Self::schedule_index_upload`]): the
    /// queue runs in order, so no uploaded index ever names a deleted object.
    pub fn schedule_layer_deletion(&self, names: Vec<String>) {
        if names.is_empty() {
            return;
        }
        let mut q = self.lock();
        q.ops.push_back(UploadOp::Delete { names });
        self.published(q);
    }

    /// Waits until everything scheduled before the call is uploaded (the queue drains), for at
    /// most `timeout`. Returns the status, or `Err` with it on timeout.
    pub async fn wait_uploaded(&self, timeout: Duration) -> Result<UploadStatus, UploadStatus> {
        let mut rx = self.status.subscribe();
        let drained =
            tokio::time::timeout(timeout, async { rx.wait_for(|s| s.queue_len == 0 && s.initialized).await.is_ok() })
                .await
                .unwrap_or(false);
        if drained {
            Ok(self.status())
        } else {
            Err(self.status())
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Every change to the queue is a single push or pop: a panic cannot leave it half-done.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes the queue length and wakes the task.
    fn published(&self, q: MutexGuard<'_, Queue>) {
        let len = q.ops.len();
        drop(q);
        self.status.send_modify(|s| s.queue_len = len);
        self.wake.notify_one();
    }

    async fn run(self: Arc<Self>, known_index: Option<IndexPart>) {
        let remote = match known_index {
            Some(index) => Some(index),
            None => match self.retry("download of the remote index_part.json", || self.download_remote_index()).await {
                Some(remote) => remote,
                None => {
                    self.status.send_modify(|s| s.stopped = true);
                    return;
                }
            },
        };
        {
            let mut q = self.lock();
            if let Some(index) = &remote {
                q.uploaded.extend(index.layers.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
        let remote_lsn = remote.as_ref().map_or(Lsn::INVALID, IndexPart::disk_consistent_lsn);
        info!(
            tenant = %self.tenant_id,
            timeline = %self.timeline_id,
            "upload queue started; remote index: {}",
            match &remote {
                Some(index) => format!("{} layers, disk_consistent_lsn {remote_lsn}", index.layers.len()),
                None => "none".to_string(),
            }
        );
        self.status.send_modify(|s| {
            s.remote_consistent_lsn = remote_lsn;
            s.initialized = true;
        });
        loop {
            if self.is_stopping() {
                info!(tenant = %self.tenant_id, timeline = %self.timeline_id, "upload queue stopped");
                self.status.send_modify(|s| s.stopped = true);
                return;
            }
            let notified = self.wake.notified();
            let (op, superseded) = {
                let q = self.lock();
                let superseded = matches!(
                    (q.ops.front(), q.ops.get(1)),
                    (Some(UploadOp::Index { .. }), Some(UploadOp::Index { .. }))
                );
                (q.ops.front().cloned(), superseded)
            };
            let Some(op) = op else {
                notified.await;
                continue;
            };
            // An index followed by a newer index need not be uploaded: the newer one names
            // everything the older one does.
            if !superseded {
                let what = op.to_string();
                if self.retry(&what, || self.execute(&op)).await.is_none() {
                    continue; // stopping: the loop's check ends the task
                }
            }
            let q = {
                let mut q = self.lock();
                q.ops.pop_front();
                q
            };
            self.published(q);
        }
    }

    /// Runs `attempt` until it succeeds, recording each failure in the status; `None` if the
    /// client is stopped meanwhile.
    async fn retry<T, F, Fut>(&self, what: &str, mut attempt: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        let mut failures = 0u32;
        loop {
            match attempt().await {
                Ok(value) => {
                    if failures > 0 {
                        info!(tenant = %self.tenant_id, timeline = %self.timeline_id, "{what} succeeded after {failures} failed attempts");
                        self.status.send_modify(|s| s.last_error = None);
                    }
                    return Some(value);
                }
                Err(e) => {
                    failures += 1;
                    let permanent = e
                        .downcast_ref::<RemoteStorageError>()
                        .is_some_and(|e| matches!(e, RemoteStorageError::Permanent { .. }));
                    let backoff = RETRY_BACKOFF_BASE.saturating_mul(1 << failures.min(10)).min(RETRY_BACKOFF_MAX);
                    let msg = format!("{what} failed (attempt {failures}): {e:#}");
                    if permanent {
                        error!(tenant = %self.tenant_id, timeline = %self.timeline_id, "{msg}; retrying in {backoff:?}");
                    } else {
                        warn!(tenant = %self.tenant_id, timeline = %self.timeline_id, "{msg}; retrying in {backoff:?}");
                    }
                    self.status.send_modify(|s| s.last_error = Some(msg));
                    if self.is_stopping() {
                        return None;
                    }
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }

    /// The remote index. A corrupt one is treated as absent (the local timeline is complete and
    /// its next index replaces it); one of an unsupported version is an error (a newer
    /// pageserver wrote it: do not overwrite it), retried like any other.
    async fn download_remote_index(&self) -> anyhow::Result<Option<IndexPart>> {
        match super::download::download_index(&self.storage, self.tenant_id, self.timeline_id).await {
            Err(e) if e.downcast_ref::<IndexPartError>().is_some_and(IndexPartError::is_corruption) => {
                error!(
                    tenant = %self.tenant_id,
                    timeline = %self.timeline_id,
                    "{e:#}; uploading every local layer and a new index over it"
                );
                Ok(None)
            }
            other => other,
        }
    }

    async fn execute(&self, op: &UploadOp) -> anyhow::Result<()> {
        match op {
            UploadOp::Layer { name, path } => {
                let path2 = path.clone();
                let meta = tokio::task::spawn_blocking(move || checksum_file(&path2))
                    .await?
                    .map_err(|e| anyhow::anyhow!("reading local layer file {}: {e}", path.display()))?;
                if self.lock().uploaded.get(name) == Some(&meta) {
                    debug!(tenant = %self.tenant_id, timeline = %self.timeline_id, "layer {name} is already in remote storage");
                    return Ok(());
                }
                let remote = remote_layer_path(self.tenant_id, self.timeline_id, name)?;
                let file = tokio::fs::File::open(path)
                    .await
                    .map_err(|e| anyhow::anyhow!("opening local layer file {}: {e}", path.display()))?;
                let body = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).map_ok(Bytes::from);
                self.storage.put(&remote, Box::pin(body), meta.file_size).await?;
                self.status.send_modify(|s| {
                    s.uploaded_layers += 1;
                    s.uploaded_bytes += meta.file_size;
                });
                self.lock().uploaded.insert(name.clone(), meta);
                Ok(())
            }
            UploadOp::Index { metadata, layers } => {
                let mut named = BTreeMap::new();
                {
                    let q = self.lock();
                    for name in layers {
                        let meta = q.uploaded.get(name).ok_or_else(|| {
                            anyhow::anyhow!("bug: the index would name layer {name}, which was never uploaded")
                        })?;
                        named.insert(name.clone(), meta.clone());
                    }
                }
                let index = IndexPart::new(self.tenant_id, self.timeline_id, metadata, named);
                let path = remote_index_path(self.tenant_id, self.timeline_id);
                self.storage.put_bytes(&path, Bytes::from(index.encode())).await?;
                let lsn = metadata.disk_consistent_lsn;
                self.status.send_modify(|s| s.remote_consistent_lsn = s.remote_consistent_lsn.max(lsn));
                Ok(())
            }
            UploadOp::Delete { names } => {
                let paths = names
                    .iter()
                    .map(|name| remote_layer_path(self.tenant_id, self.timeline_id, name))
                    .collect::<Result<Vec<_>, _>>()?;
                // Deleting an object that is not there succeeds: a repeated deletion is harmless.
                self.storage.delete_many(&paths).await?;
                let mut q = self.lock();
                for name in names {
                    q.uploaded.remove(name);
                }
                drop(q);
                self.status.send_modify(|s| s.deleted_layers += names.len() as u64);
                Ok(())
            }
        }
    }
}

impl LayerDownloader for RemoteTimelineClient {
    /// Downloads to a temp file in the timeline directory, checks size and checksums against the
    /// index, fsyncs, renames into place and fsyncs the directory. Blocks the calling thread (a
    /// reader's blocking thread, or a runtime worker through `block_in_place`).
    fn download(&self, desc: &PersistentLayerDesc) -> Result<(), String> {
        let name = desc.layer_name().to_string();
        let meta = self.remote_only_layers.lock().unwrap_or_else(|p| p.into_inner()).get(&name).cloned();
        let meta =
            meta.ok_or_else(|| format!("layer {name} is not in the remote index this timeline was loaded from"))?;
        if matches!(tokio::runtime::Handle::try_current(), Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread)
        {
            return Err(format!("layer {name} cannot be downloaded from a current-thread tokio runtime"));
        }
        let dir = desc.path.parent().ok_or_else(|| format!("layer path {} has no parent", desc.path.display()))?;
        let temp = dir.join(format!("{name}.download.layer.tmp"));
        let started = std::time::Instant::now();
        let download = download_layer(&self.storage, self.tenant_id, self.timeline_id, &name, &meta, &temp);
        tokio::task::block_in_place(|| self.runtime.block_on(download)).map_err(|e| {
            let _ = std::fs::remove_file(&temp);
            format!("{e:#}")
        })?;
        std::fs::rename(&temp, &desc.path).map_err(|e| format!("renaming {} into place: {e}", temp.display()))?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| format!("fsyncing {}: {e}", dir.display()))?;
        self.status.send_modify(|s| {
            s.downloaded_layers += 1;
            s.downloaded_bytes += meta.file_size;
        });
        info!(
            tenant = %self.tenant_id,
            timeline = %self.timeline_id,
            "downloaded layer {name} on demand: {} bytes in {:?}",
            meta.file_size,
            started.elapsed()
        );
        Ok(())
    }
}
