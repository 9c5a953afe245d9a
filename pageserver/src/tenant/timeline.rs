//! One timeline: a copy-on-write history of every key, built from WAL (DESIGN D6).
//!
//! **Directory.** `<workdir>/tenants/<tenant>/timelines/<timeline>/` holds the `metadata` file
//! and the timeline's layer files, nothing else. A branch holds only what was written after its
//! branch point; older reads fall through to the ancestor, so branching costs one small file.
//!
//! **Write path.** A single writer (ingest) takes [`Timeline::writer`], puts the versions of one
//! WAL record at the record's end LSN into the open in-memory layer, and calls
//! [`TimelineWriter::finish_write`], which advances `last_record_lsn`. When the open layer
//! reaches `checkpoint_distance_bytes` (or is older than `checkpoint_timeout`, or on
//! [`Timeline::checkpoint`]), it is frozen at `last_record_lsn + 1` and flushed:
//!
//! 1. the frozen layer is written as an L0 delta file (the layer writer fsyncs it and its
//!    directory entry);
//! 2. the file replaces the frozen layer in the layer map;
//! 3. `disk_consistent_lsn` in the metadata file moves to the layer's last LSN (fsync'd).
//!
//! In that order, `disk_consistent_lsn` never claims data that is not durable. A crash loses
//! only the in-memory layers, and [`Timeline::load`] resumes ingest at `disk_consistent_lsn`
//! (the WAL above it is still held by the safekeepers); a layer file above it can only come from
//! a flush that crashed between steps 1 and 3, and is deleted at load. Today the flush runs
//! inline in the writer's thread; a background flush task is the upgrade when ingest latency
//! matters.
//!
//! **LSN ranges.** Versions are keyed by the end LSN of the record that made them. A timeline's
//! own layers cover `disk_consistent_lsn + 1 ..` after a load, so a branch (created with
//! `disk_consistent_lsn = ancestor_lsn`) never holds a version at or below its branch point.
//!
//! **Read path.** [`Timeline::get`] walks this timeline's layers (open, frozen, historic; see
//! [`crate::reconstruct`]); if the value is still incomplete it continues in the ancestor at
//! `min(lsn, ancestor_lsn)`, and so on up the chain; then the [`RedoApplier`] applies the
//! records on the base image (skipped when the newest version is an image).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use postgres_ffi::RelTag;
use remote_storage::GenericRemoteStorage;
use tokio::sync::watch;
use tracing::{info, warn};
use utils::{Lsn, TenantId, TimelineId};

use crate::inmemory_layer::InMemoryLayer;
use crate::key::Key;
use crate::layer::{BlockCache, LayerError, LayerName, PersistentLayer, PersistentLayerDesc};
use crate::layer::{LayerDownloader, LayerKind, RemoteLayer};
use crate::layer_map::LayerMap;
use crate::reconstruct::{collect_reconstruct_data, ReadError, ReconstructOutcome, ValueReconstructState};
use crate::redo_applier::{RedoApplier, RedoError};
use crate::tenant::metadata::{
    load_metadata, save_metadata, MetadataError, TimelineMetadata, METADATA_FILE_NAME, METADATA_TEMP_FILE_NAME,
};
use crate::tenant::remote::{IndexPart, RemoteTimelineClient};
use crate::value::Value;

/// `<workdir>/tenants`.
pub const TENANTS_DIR_NAME: &str = "tenants";
/// `<workdir>/tenants/<tenant>/timelines`.
pub const TIMELINES_DIR_NAME: &str = "timelines";
/// Suffix of unfinished layer files (the layer writer's `TEMP_FILE_SUFFIX`, private there).
const LAYER_TEMP_FILE_SUFFIX: &str = ".layer.tmp";
/// Suffix of a timeline directory being created (renamed to its final name once complete).
const TIMELINE_TEMP_DIR_SUFFIX: &str = ".___temp";

/// Blocks in the default layer block cache (64 MiB).
pub const DEFAULT_BLOCK_CACHE_BLOCKS: usize = 8192;

pub use crate::tenant::config::{TenantConf, DEFAULT_CHECKPOINT_DISTANCE_BYTES, DEFAULT_CHECKPOINT_TIMEOUT};

/// A tenant's settings, shared by its timelines and replaced whole by a config change.
pub type SharedTenantConf = Arc<RwLock<TenantConf>>;

/// What a timeline shares with the rest of the tenant / process.
#[derive(Clone)]
pub struct TimelineResources {
    pub conf: SharedTenantConf,
    /// Applies WAL records on top of images on the read path (DESIGN D5).
    pub redo: Arc<dyn RedoApplier>,
    /// Shared by every layer file the process opens.
    pub block_cache: Arc<BlockCache>,
    /// Where layers and indexes are uploaded (DESIGN D8); `None`: local disk only.
    pub remote_storage: Option<GenericRemoteStorage>,
}

impl TimelineResources {
    pub fn new(conf: TenantConf, redo: Arc<dyn RedoApplier>) -> TimelineResources {
        TimelineResources {
            conf: Arc::new(RwLock::new(conf)),
            redo,
            block_cache: Arc::new(BlockCache::new(DEFAULT_BLOCK_CACHE_BLOCKS)),
            remote_storage: None,
        }
    }

    /// The same, uploading every timeline's layers and index to `storage`.
    pub fn with_remote_storage(self, storage: Option<GenericRemoteStorage>) -> TimelineResources {
        TimelineResources { remote_storage: storage, ..self }
    }
}

/// `<workdir>/tenants/<tenant>/timelines/<timeline>`.
pub fn timeline_path(workdir: &Path, tenant_id: TenantId, timeline_id: TimelineId) -> PathBuf {
    workdir.join(TENANTS_DIR_NAME).join(tenant_id.to_string()).join(TIMELINES_DIR_NAME).join(timeline_id.to_string())
}

/// End of the last ingested record, and the start of that record when known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordLsn {
    /// Everything up to here has been ingested (the end LSN of the last record).
    pub last: Lsn,
    /// Start LSN of the record that ends at `last`: the `xl_prev` of the next record.
    pub prev: Option<Lsn>,
}

/// An error of the timeline's lifecycle or write path.
#[derive(Debug, thiserror::Error)]
pub enum TimelineError {
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error("timeline directory {}: {context}: {source}", path.display())]
    Io {
        path: PathBuf,
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("timeline {timeline_id} already exists at {}; choose another timeline id", path.display())]
    AlreadyExists { timeline_id: TimelineId, path: PathBuf },
    #[error("cannot branch from timeline {timeline_id} at LSN {lsn}: {reason}")]
    InvalidBranchLsn { timeline_id: TimelineId, lsn: Lsn, reason: String },
    #[error(
        "timed out after {timeout:?} waiting for WAL up to LSN {lsn} on timeline {timeline_id}; \
         the last ingested record ends at {last}"
    )]
    WaitLsnTimeout { timeline_id: TimelineId, lsn: Lsn, last: Lsn, timeout: Duration },
    /// A caller broke the write-path contract (LSN order) or handed in an inconsistent
    /// directory; the message names the timeline and what was expected.
    #[error("{0}")]
    Invalid(String),
}

impl TimelineError {
    fn io(path: &Path, context: impl Into<String>, source: io::Error) -> TimelineError {
        TimelineError::Io { path: path.to_path_buf(), context: context.into(), source }
    }
}

/// A read that could not produce a value. Says which key, LSN and timeline, and why.
#[derive(Debug, thiserror::Error)]
#[error("could not find data for key {key} at LSN {lsn} in timeline {timeline_id}: {reason}")]
pub struct GetError {
    pub key: Key,
    pub lsn: Lsn,
    pub timeline_id: TimelineId,
    pub reason: GetErrorReason,
}

#[derive(Debug, thiserror::Error)]
pub enum GetErrorReason {
    /// No version of the key at or below the LSN, here or in any ancestor.
    #[error("the key has no version at or below this LSN in this timeline or its ancestors")]
    Missing,
    /// Records were found but nothing to apply them to: lost or never-ingested history.
    #[error(
        "found {records} WAL record(s) but no image or initialising record at or below LSN {bottom_lsn}; \
         the history of the key is incomplete"
    )]
    Incomplete { records: usize, bottom_lsn: Lsn },
    #[error(
        "the LSN is below the garbage-collection cutoff {cutoff}: that history is no longer kept; read at a later LSN"
    )]
    BelowGcCutoff { cutoff: Lsn },
    #[error("{0}")]
    Read(Box<ReadError>),
    #[error("{0}")]
    Redo(Box<RedoError>),
}

impl GetError {
    /// True if the key simply does not exist at that LSN (as opposed to a failure).
    pub fn is_missing(&self) -> bool {
        matches!(self.reason, GetErrorReason::Missing)
    }
}

/// State of the single writer, guarded by the write lock.
struct WriterState {
    /// Where the next open layer starts: just above the last frozen or flushed LSN.
    next_open_layer_at: Lsn,
    /// When the current open layer got its first version (for `checkpoint_timeout`).
    open_layer_opened_at: Option<Instant>,
}

/// One timeline of a tenant. See the module docs.
pub struct Timeline {
    tenant_id: TenantId,
    timeline_id: TimelineId,
    dir: PathBuf,
    ancestor: Option<Arc<Timeline>>,
    /// Branch point (0 without an ancestor); immutable.
    ancestor_lsn: Lsn,
    resources: TimelineResources,
    /// The durable metadata as last saved.
    metadata: Mutex<TimelineMetadata>,
    layers: RwLock<LayerMap>,
    /// `last` only grows; readers wait on it with [`Timeline::wait_lsn`].
    last_record: watch::Sender<RecordLsn>,
    write_lock: Mutex<WriterState>,
    /// Serialises flushes; taken after `write_lock` when both are needed.
    flush_lock: Mutex<()>,
    /// The [`RecordLsn`] each frozen layer was frozen at, oldest first, in step with the layer
    /// map's frozen layers (both change under the layer map's write lock): the metadata values
    /// a flush of that layer makes durable.
    frozen_record_lsns: Mutex<VecDeque<RecordLsn>>,
    /// Latest known size (or absence) of relations, with the LSN it was written at; a read at
    /// or after that LSN can use it instead of walking the layers. Filled by puts of size keys.
    rel_size_cache: RwLock<HashMap<RelTag, (Lsn, Option<u32>)>>,
    /// Branches created from this timeline: (child, branch point). GC must keep their history.
    children: Mutex<Vec<(TimelineId, Lsn)>>,
    /// The upload queue, when remote storage is configured.
    remote: Option<Arc<RemoteTimelineClient>>,
    /// One compaction or GC at a time.
    compaction_lock: Mutex<()>,
    /// Held while GC moves the cutoff and snapshots the branch points, and while a branch or a
    /// lease checks the cutoff and registers itself: neither can slip below a moving cutoff.
    gc_branch_lock: Mutex<()>,
    leases: Mutex<gc::Leases>,
    loaded_at: Instant,
}

impl Timeline {
    /// Creates the directory and metadata of a new, empty root timeline whose data will be
    /// imported at `initdb_lsn` (see [`crate::import_datadir`]), and loads it. Nothing is
    /// ingested yet: `last_record_lsn` is 0 until the import commits.
    pub fn create_empty(
        workdir: &Path,
        tenant_id: TenantId,
        timeline_id: TimelineId,
        initdb_lsn: Lsn,
        pg_version: u32,
        resources: TimelineResources,
    ) -> Result<Arc<Timeline>, TimelineError> {
        let dir = timeline_path(workdir, tenant_id, timeline_id);
        let md = TimelineMetadata {
            disk_consistent_lsn: Lsn::INVALID,
            prev_record_lsn: None,
            ancestor_timeline: None,
            ancestor_lsn: Lsn::INVALID,
            latest_gc_cutoff_lsn: Lsn::INVALID,
            initdb_lsn,
            pg_version,
        };
        create_timeline_dir(&dir, timeline_id, &md)?;
        Timeline::load(&dir, None, resources)
    }

    /// Opens the timeline in `dir` (`<workdir>/tenants/<tenant>/timelines/<timeline>`): reads the
    /// metadata, deletes unfinished temp files and layers above `disk_consistent_lsn` (left by a
    /// crashed flush), opens every other layer file, and sets `last_record_lsn` to
    /// `disk_consistent_lsn`, where ingest resumes. `ancestor` must be the (already loaded)
    /// timeline the metadata names as ancestor, or `None` for a root timeline.
    pub fn load(
        dir: &Path,
        ancestor: Option<Arc<Timeline>>,
        resources: TimelineResources,
    ) -> Result<Arc<Timeline>, TimelineError> {
        Timeline::load_with_remote_index(dir, ancestor, resources, None)
    }

    /// [`Timeline::load`], and with remote storage and the timeline's remote index: every layer
    /// the index names that is not on local disk (and lies at or below `disk_consistent_lsn`)
    /// becomes a remote layer in the layer map, downloaded when a read first needs it.
    pub fn load_with_remote_index(
        dir: &Path,
        ancestor: Option<Arc<Timeline>>,
        resources: TimelineResources,
        remote_index: Option<&IndexPart>,
    ) -> Result<Arc<Timeline>, TimelineError> {
        let (tenant_id, timeline_id) = parse_timeline_dir(dir)?;
        let md = load_metadata(dir)?;
        match (md.ancestor_timeline, &ancestor) {
            (None, None) => {}
            (Some(want), Some(got)) if want == got.timeline_id && got.tenant_id == tenant_id => {}
            (want, got) => {
                return Err(TimelineError::Invalid(format!(
                    "timeline {timeline_id}: its metadata names ancestor {}, but the caller passed {}; load the \
                     ancestor first and pass it",
                    want.map_or("none".to_string(), |id| id.to_string()),
                    got.as_ref().map_or("none".to_string(), |t| format!("{}/{}", t.tenant_id, t.timeline_id)),
                )));
            }
        }

        let mut names: Vec<String> = Vec::new();
        let entries = fs::read_dir(dir).map_err(|e| TimelineError::io(dir, "listing", e))?;
        for entry in entries {
            let entry = entry.map_err(|e| TimelineError::io(dir, "listing", e))?;
            match entry.file_name().into_string() {
                Ok(name) => names.push(name),
                Err(name) => warn!(timeline = %timeline_id, "ignoring file with a non-UTF-8 name {name:?}"),
            }
        }
        names.sort();

        let mut layers = LayerMap::new();
        let mut removed_any = false;
        let layers_end = Lsn(md.disk_consistent_lsn.0 + 1);
        for name in names {
            let path = dir.join(&name);
            if name == METADATA_FILE_NAME {
                continue;
            }
            if name == METADATA_TEMP_FILE_NAME || name.ends_with(LAYER_TEMP_FILE_SUFFIX) {
                info!(timeline = %timeline_id, "removing leftover temp file {}", path.display());
                fs::remove_file(&path).map_err(|e| TimelineError::io(&path, "removing a leftover temp file", e))?;
                removed_any = true;
                continue;
            }
            let Ok(layer_name) = name.parse::<LayerName>() else {
                warn!(timeline = %timeline_id, "ignoring unexpected file {}", path.display());
                continue;
            };
            if layer_name.lsn_range().end > layers_end {
                warn!(
                    timeline = %timeline_id,
                    "removing layer {} above disk_consistent_lsn {}: left by a flush that did not complete",
                    path.display(),
                    md.disk_consistent_lsn
                );
                fs::remove_file(&path).map_err(|e| TimelineError::io(&path, "removing an unfinished layer", e))?;
                removed_any = true;
                continue;
            }
            let layer = PersistentLayer::open(&path, &resources.block_cache)?;
            let desc = layer.desc();
            if desc.tenant_id != tenant_id || desc.timeline_id != timeline_id || desc.layer_name() != layer_name {
                return Err(LayerError::corrupt(
                    &path,
                    format!(
                        "its summary says it is {} of tenant {} timeline {}, but it lies in the directory of \
                         tenant {tenant_id} timeline {timeline_id} under that name",
                        desc.layer_name(),
                        desc.tenant_id,
                        desc.timeline_id
                    ),
                )
                .into());
            }
            layers.insert_historic(Arc::new(layer));
        }
        // A compaction that crashed midway leaves redundant layers (its inputs beside its
        // complete output, or an incomplete output beside its inputs); the remote index may
        // still name inputs already gone here. Decide over both, and drop the redundant ones.
        let remote_names: Vec<LayerName> = match (remote_index, &resources.remote_storage) {
            (Some(index), Some(_)) => index.layers.keys().filter_map(|n| n.parse::<LayerName>().ok()).collect(),
            _ => Vec::new(),
        };
        let all_names: Vec<(LayerName, bool)> = layers
            .historic_layers()
            .map(|l| (l.desc().layer_name(), true))
            .chain(remote_names.iter().map(|n| (n.clone(), false)))
            .collect();
        let redundant = compaction::redundant_layers(&all_names);
        for name in &redundant {
            if let Some(layer) = layers.remove_historic(name) {
                warn!(timeline = %timeline_id, "removing layer {name}: made redundant by a compaction that did not finish");
                let path = &layer.desc().path;
                fs::remove_file(path).map_err(|e| TimelineError::io(path, "removing a redundant layer", e))?;
                removed_any = true;
            }
        }
        if removed_any {
            fsync_dir(dir)?;
        }

        // With remote storage: every local layer and then the index are scheduled; the queue skips
        // layers the remote index already has, so only what a previous run missed is uploaded.
        let remote = match &resources.remote_storage {
            None => None,
            Some(storage) => {
                let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
                    TimelineError::Invalid(format!(
                        "timeline {timeline_id}: remote storage needs a tokio runtime to upload in"
                    ))
                })?;
                let client = RemoteTimelineClient::new(storage.clone(), tenant_id, timeline_id, runtime);
                let mut local: Vec<(String, PathBuf)> = layers
                    .historic_layers()
                    .map(|l| (l.desc().layer_name().to_string(), l.desc().path.clone()))
                    .collect();
                local.sort();
                // Layers of the remote index that are not here (a restored or partly lost
                // directory) join the layer map as remote layers, downloaded on first read.
                if let Some(index) = remote_index {
                    let local_names: HashSet<&String> = local.iter().map(|(name, _)| name).collect();
                    for (name, meta) in &index.layers {
                        let Ok(layer_name) = name.parse::<LayerName>() else { continue };
                        if local_names.contains(name)
                            || layer_name.lsn_range().end > layers_end
                            || redundant.contains(&layer_name)
                        {
                            continue;
                        }
                        let desc = PersistentLayerDesc {
                            tenant_id,
                            timeline_id,
                            kind: if matches!(layer_name, LayerName::Delta { .. }) {
                                LayerKind::Delta
                            } else {
                                LayerKind::Image
                            },
                            key_range: layer_name.key_range(),
                            lsn_range: layer_name.lsn_range(),
                            value_count: 0,
                            file_size_bytes: meta.file_size,
                            path: dir.join(name),
                        };
                        client.add_remote_only_layer(name.clone(), meta.clone());
                        let downloader: Arc<dyn LayerDownloader> = client.clone();
                        layers.insert_historic(Arc::new(PersistentLayer::Remote(RemoteLayer::new(
                            desc,
                            downloader,
                            Arc::clone(&resources.block_cache),
                        ))));
                    }
                }
                for (name, path) in local {
                    client.schedule_layer_upload(name, path);
                }
                client.schedule_index_upload(&md);
                let redundant_remote: Vec<String> =
                    remote_names.iter().filter(|n| redundant.contains(*n)).map(|n| n.to_string()).collect();
                if !redundant_remote.is_empty() {
                    client.schedule_layer_deletion(redundant_remote);
                }
                client.launch(remote_index.cloned());
                Some(client)
            }
        };
        let record = RecordLsn { last: md.disk_consistent_lsn, prev: md.prev_record_lsn };
        let tl = Arc::new(Timeline {
            tenant_id,
            timeline_id,
            dir: dir.to_path_buf(),
            ancestor,
            ancestor_lsn: md.ancestor_lsn,
            resources,
            metadata: Mutex::new(md),
            layers: RwLock::new(layers),
            last_record: watch::Sender::new(record),
            write_lock: Mutex::new(WriterState { next_open_layer_at: layers_end, open_layer_opened_at: None }),
            flush_lock: Mutex::new(()),
            frozen_record_lsns: Mutex::new(VecDeque::new()),
            rel_size_cache: RwLock::new(HashMap::new()),
            children: Mutex::new(Vec::new()),
            remote,
            compaction_lock: Mutex::new(()),
            gc_branch_lock: Mutex::new(()),
            leases: Mutex::new(gc::Leases::default()),
            loaded_at: Instant::now(),
        });
        // The ancestor's GC must keep the history this branch reads.
        if let Some(ancestor) = &tl.ancestor {
            lock(&ancestor.children).push((timeline_id, tl.ancestor_lsn));
        }
        Ok(tl)
    }

    // --- identity and state

    pub fn tenant_id(&self) -> TenantId {
        self.tenant_id
    }

    pub fn timeline_id(&self) -> TimelineId {
        self.timeline_id
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ancestor(&self) -> Option<&Arc<Timeline>> {
        self.ancestor.as_ref()
    }

    /// The branch point; 0 for a root timeline.
    pub fn ancestor_lsn(&self) -> Lsn {
        self.ancestor_lsn
    }

    /// The tenant's current settings (a copy: a config change may replace them at any time).
    pub fn conf(&self) -> TenantConf {
        self.resources.conf.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn resources(&self) -> &TimelineResources {
        &self.resources
    }

    /// A copy of the metadata as last made durable.
    pub fn metadata(&self) -> TimelineMetadata {
        lock(&self.metadata).clone()
    }

    pub fn initdb_lsn(&self) -> Lsn {
        lock(&self.metadata).initdb_lsn
    }

    pub fn pg_version(&self) -> u32 {
        lock(&self.metadata).pg_version
    }

    pub fn get_disk_consistent_lsn(&self) -> Lsn {
        lock(&self.metadata).disk_consistent_lsn
    }

    pub fn get_latest_gc_cutoff_lsn(&self) -> Lsn {
        lock(&self.metadata).latest_gc_cutoff_lsn
    }

    pub fn last_record_lsn(&self) -> RecordLsn {
        *self.last_record.borrow()
    }

    /// End LSN of the last ingested record.
    pub fn get_last_record_lsn(&self) -> Lsn {
        self.last_record.borrow().last
    }

    /// Start LSN of the last ingested record, when known.
    pub fn get_prev_record_lsn(&self) -> Option<Lsn> {
        self.last_record.borrow().prev
    }

    /// The upload queue, when remote storage is configured.
    pub fn remote_client(&self) -> Option<&Arc<RemoteTimelineClient>> {
        self.remote.as_ref()
    }

    /// What the uploaded index covers; `None` without remote storage.
    pub fn remote_consistent_lsn(&self) -> Option<Lsn> {
        self.remote.as_ref().map(|r| r.remote_consistent_lsn())
    }

    /// Evicts the local file of layer `name` (a layer file name): the layer stays in the layer
    /// map as a remote layer and the next read that needs it downloads it again. Only a layer
    /// whose local file equals the uploaded one (size and checksums) can be evicted. Returns
    /// whether a file was evicted (`false`: it was not on local disk). Blocking (it checksums
    /// the file).
    pub fn evict_layer(&self, name: &str) -> Result<bool, TimelineError> {
        let remote = self.remote.as_ref().ok_or_else(|| {
            TimelineError::Invalid(format!(
                "timeline {}: no remote storage is configured, so no layer can be evicted",
                self.timeline_id
            ))
        })?;
        let layer_name: LayerName =
            name.parse().map_err(|_| TimelineError::Invalid(format!("{name:?} is not a layer file name")))?;
        let layer = self
            .layers_read()
            .historic_layers()
            .find(|l| l.desc().layer_name() == layer_name)
            .cloned()
            .ok_or_else(|| TimelineError::Invalid(format!("timeline {} has no layer {name}", self.timeline_id)))?;
        let desc = layer.desc().clone();
        if !desc.path.exists() {
            return Ok(false);
        }
        let uploaded = remote.uploaded_layer(name).ok_or_else(|| {
            TimelineError::Invalid(format!("layer {name} is not in remote storage yet; evict it once it is uploaded"))
        })?;
        let local = crate::tenant::remote::checksum_file(&desc.path)
            .map_err(|e| TimelineError::io(&desc.path, "checksumming before eviction", e))?;
        if local != uploaded {
            return Err(TimelineError::Invalid(format!(
                "layer {name}: the local file differs from the uploaded one ({} vs {} bytes, sha256 {} vs {}); not \
                 evicting it",
                local.file_size, uploaded.file_size, local.sha256, uploaded.sha256
            )));
        }
        let downloader: Arc<dyn LayerDownloader> = remote.clone();
        let replacement = Arc::new(PersistentLayer::Remote(RemoteLayer::new(
            desc.clone(),
            downloader,
            Arc::clone(&self.resources.block_cache),
        )));
        {
            let mut layers = self.layers_write();
            // Compaction or GC may have removed the layer meanwhile: then it stays removed.
            if layers.remove_historic(&layer_name).is_none() {
                return Ok(false);
            }
            remote.add_remote_only_layer(name.to_string(), uploaded);
            layers.insert_historic(replacement);
        }
        // Readers that still hold the old layer keep reading through its open file.
        fs::remove_file(&desc.path).map_err(|e| TimelineError::io(&desc.path, "removing an evicted layer", e))?;
        fsync_dir(&self.dir)?;
        info!(timeline = %self.timeline_id, "evicted layer {name} ({} bytes) from local disk", desc.file_size_bytes);
        Ok(true)
    }

    /// Loaded branches of this timeline: (child, branch point). GC keeps their history.
    pub fn child_branch_points(&self) -> Vec<(TimelineId, Lsn)> {
        lock(&self.children).clone()
    }

    /// Forgets a child branch (it was deleted): GC no longer keeps history for it.
    pub fn forget_child(&self, child: TimelineId) {
        lock(&self.children).retain(|(id, _)| *id != child);
    }

    /// Layers with a local file: (name, bytes, last read in Unix seconds), for eviction under a
    /// disk limit.
    pub fn local_layers(&self) -> Vec<(String, u64, u64)> {
        self.layers_read()
            .historic_layers()
            .filter_map(|l| {
                let access = l.last_access_secs()?;
                let d = l.desc();
                Some((d.layer_name().to_string(), d.file_size_bytes, access))
            })
            .collect()
    }

    /// Descriptions of the on-disk layers, in no particular order.
    pub fn historic_layers(&self) -> Vec<PersistentLayerDesc> {
        self.layers_read().historic_layers().map(|l| l.desc().clone()).collect()
    }

    /// Number of in-memory layers (open plus frozen, not yet flushed).
    pub fn in_memory_layer_count(&self) -> usize {
        let layers = self.layers_read();
        layers.open_layer().iter().count() + layers.frozen_layers().count()
    }

    /// Waits until WAL up to `lsn` has been ingested, for at most `timeout`.
    pub async fn wait_lsn(&self, lsn: Lsn, timeout: Duration) -> Result<(), TimelineError> {
        let mut rx = self.last_record.subscribe();
        let reached = matches!(tokio::time::timeout(timeout, rx.wait_for(|r| r.last >= lsn)).await, Ok(Ok(_)));
        if reached {
            Ok(())
        } else {
            Err(TimelineError::WaitLsnTimeout {
                timeline_id: self.timeline_id,
                lsn,
                last: self.get_last_record_lsn(),
                timeout,
            })
        }
    }

    // --- read path

    /// The value of `key` as of `lsn` (inclusive).
    pub fn get(&self, key: Key, lsn: Lsn) -> Result<Bytes, GetError> {
        let state = self.get_reconstruct_state(key, lsn)?;
        let ValueReconstructState { mut records, img } = state;
        if records.is_empty() {
            // Complete with no records means the walk ended at an image.
            return match img {
                Some((_, img)) => Ok(img),
                None => Err(self.get_error(key, lsn, GetErrorReason::Missing)),
            };
        }
        records.reverse();
        self.resources
            .redo
            .apply(key, lsn, img, records)
            .map_err(|e| self.get_error(key, lsn, GetErrorReason::Redo(Box::new(e))))
    }

    /// What [`Timeline::get`] would hand to the redo applier: the base image and the records
    /// above it (newest first), collected across the ancestor chain. Exposed for checks and
    /// debugging (e.g. "is this page's newest version an image?").
    pub fn get_reconstruct_state(&self, key: Key, lsn: Lsn) -> Result<ValueReconstructState, GetError> {
        let cutoff = self.get_latest_gc_cutoff_lsn();
        if lsn < cutoff {
            return Err(self.get_error(key, lsn, GetErrorReason::BelowGcCutoff { cutoff }));
        }
        let mut state = ValueReconstructState::default();
        let mut timeline: &Timeline = self;
        let mut end_lsn = Lsn(lsn.0.saturating_add(1));
        loop {
            let outcome = {
                let layers = timeline.layers_read();
                collect_reconstruct_data(&layers, key, end_lsn, &mut state)
            }
            .map_err(|e| self.get_error(key, lsn, GetErrorReason::Read(Box::new(e))))?;
            match outcome {
                ReconstructOutcome::Complete => return Ok(state),
                ReconstructOutcome::Incomplete { cont_lsn } => match &timeline.ancestor {
                    Some(ancestor) => {
                        end_lsn = cont_lsn.min(Lsn(timeline.ancestor_lsn.0 + 1));
                        timeline = ancestor;
                    }
                    None if state.records.is_empty() => {
                        return Err(self.get_error(key, lsn, GetErrorReason::Missing));
                    }
                    None => {
                        let records = state.records.len();
                        return Err(self.get_error(
                            key,
                            lsn,
                            GetErrorReason::Incomplete { records, bottom_lsn: cont_lsn },
                        ));
                    }
                },
            }
        }
    }

    fn get_error(&self, key: Key, lsn: Lsn, reason: GetErrorReason) -> GetError {
        GetError { key, lsn, timeline_id: self.timeline_id, reason }
    }

    /// The cached latest size of `rel`, if it was written at or below `lsn` and nothing newer
    /// was: `Some(None)` means "does not exist". `None`: not cached, read the layers.
    pub(crate) fn cached_rel_size(&self, rel: RelTag, lsn: Lsn) -> Option<Option<u32>> {
        let cache = self.rel_size_cache.read().unwrap_or_else(|p| p.into_inner());
        cache.get(&rel).filter(|(written_at, _)| lsn >= *written_at).map(|(_, size)| *size)
    }

    // --- write path

    /// The write handle. There is one writer at a time; a second caller waits. Hold it for the
    /// whole of one WAL record (all its puts, then `finish_write`), so a concurrent
    /// [`Timeline::checkpoint`] never freezes half a record.
    pub fn writer(&self) -> TimelineWriter<'_> {
        let state = self.write_lock.lock().unwrap_or_else(|p| {
            panic!("timeline {}: a writer panicked while holding the write lock: {p}", self.timeline_id)
        });
        TimelineWriter { tl: self, state }
    }

    /// Freezes the open layer and flushes every frozen layer, then moves `disk_consistent_lsn` to
    /// `last_record_lsn` (also when the WAL since the last flush changed nothing). On return,
    /// everything ingested before the call is durable.
    pub fn checkpoint(&self) -> Result<(), TimelineError> {
        self.writer().freeze_open_layer();
        self.flush_frozen_layers()?;
        let mut writer = self.writer();
        let record = self.last_record_lsn();
        let nothing_in_memory = {
            let layers = self.layers_read();
            layers.open_layer().is_none() && layers.frozen_layers().next().is_none()
        };
        if nothing_in_memory && record.last > self.get_disk_consistent_lsn() {
            self.update_metadata(|md| {
                md.disk_consistent_lsn = record.last;
                md.prev_record_lsn = record.prev;
            })?;
            writer.state.next_open_layer_at = Lsn(record.last.0 + 1);
        }
        Ok(())
    }

    /// Checkpoints if the open layer is older than `checkpoint_timeout`; for a periodic task.
    /// Returns whether it did.
    pub fn checkpoint_if_due(&self) -> Result<bool, TimelineError> {
        let due = {
            let writer = self.writer();
            writer.state.open_layer_opened_at.is_some_and(|t| t.elapsed() >= self.conf().checkpoint_timeout)
        };
        if due {
            self.checkpoint()?;
        }
        Ok(due)
    }

    /// Writes frozen layers to disk, oldest first, moving `disk_consistent_lsn` after each.
    fn flush_frozen_layers(&self) -> Result<(), TimelineError> {
        let _flush = self.flush_lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let Some(frozen) = self.layers_read().frozen_layers().next().cloned() else {
                return Ok(());
            };
            // 1. Durable file (the writer fsyncs the file and the directory).
            let desc = frozen.write_to_disk(&self.dir)?;
            let written = Arc::new(PersistentLayer::open(&desc.path, &self.resources.block_cache)?);
            if let Some(remote) = &self.remote {
                remote.schedule_layer_upload(desc.layer_name().to_string(), desc.path.clone());
            }
            // 2. Readers switch from the frozen layer to the file in one step.
            let record = {
                let mut layers = self.layers_write();
                layers.finish_flush(&frozen, written);
                lock(&self.frozen_record_lsns).pop_front()
            };
            let record = record.expect("every frozen layer has the record LSN it was frozen at");
            assert_eq!(
                Lsn(record.last.0 + 1),
                frozen.lsn_range().end,
                "timeline {}: frozen layer and its record LSN disagree",
                self.timeline_id
            );
            // 3. Only now may disk_consistent_lsn claim the data.
            self.update_metadata(|md| {
                md.disk_consistent_lsn = record.last;
                md.prev_record_lsn = record.prev;
            })?;
        }
    }

    /// Applies `change` to a copy of the metadata, saves it durably, then publishes it.
    fn update_metadata(&self, change: impl FnOnce(&mut TimelineMetadata)) -> Result<(), TimelineError> {
        let mut md = lock(&self.metadata);
        let mut new = md.clone();
        change(&mut new);
        assert!(
            new.disk_consistent_lsn >= md.disk_consistent_lsn,
            "timeline {}: disk_consistent_lsn must not move back ({} → {})",
            self.timeline_id,
            md.disk_consistent_lsn,
            new.disk_consistent_lsn
        );
        save_metadata(&self.dir, &new)?;
        // Under the metadata lock, so indexes are queued in metadata order.
        if let Some(remote) = &self.remote {
            remote.schedule_index_upload(&new);
        }
        *md = new;
        Ok(())
    }

    // --- branching

    /// Creates timeline `new_timeline_id` branching off this one at `ancestor_lsn`: a directory
    /// with a metadata file naming this timeline and the LSN, no data copied (O(1)). Waits up to
    /// `wait_timeout` for WAL up to `ancestor_lsn` to be ingested.
    ///
    /// `ancestor_lsn` is taken as given: rounding it to a record boundary (so a compute can start
    /// there) is the caller's concern. Rejected below the initdb LSN (no data there), below this
    /// timeline's own branch point (that history is its ancestor's) and below the GC cutoff
    /// (history gone).
    pub async fn branch(
        self: &Arc<Self>,
        new_timeline_id: TimelineId,
        ancestor_lsn: Lsn,
        wait_timeout: Duration,
    ) -> Result<Arc<Timeline>, TimelineError> {
        let md = self.metadata();
        let invalid = |reason: String| TimelineError::InvalidBranchLsn {
            timeline_id: self.timeline_id,
            lsn: ancestor_lsn,
            reason,
        };
        if ancestor_lsn < md.initdb_lsn {
            return Err(invalid(format!(
                "it is below the initdb LSN {}, where the timeline's data begins; branch at or above it",
                md.initdb_lsn
            )));
        }
        if let Some(ancestor) = md.ancestor_timeline {
            if ancestor_lsn < md.ancestor_lsn {
                return Err(invalid(format!(
                    "it is below this timeline's own branch point {}: history before it belongs to its ancestor \
                     {ancestor}; branch from that timeline instead",
                    md.ancestor_lsn
                )));
            }
        }
        if self.wait_lsn(ancestor_lsn, wait_timeout).await.is_err() {
            return Err(invalid(format!(
                "it is above the last ingested record {} and WAL up to it did not arrive within {wait_timeout:?}",
                self.get_last_record_lsn()
            )));
        }
        // From the cutoff check until the child is registered, GC cannot move the cutoff.
        let _gc = lock(&self.gc_branch_lock);
        let md = self.metadata();
        if ancestor_lsn < md.latest_gc_cutoff_lsn {
            return Err(invalid(format!(
                "it is below the garbage-collection cutoff {} (history older than the tenant's pitr_interval and \
                 gc_horizon is not kept); branch at or above it",
                md.latest_gc_cutoff_lsn
            )));
        }
        let parent_dir = self.dir.parent().ok_or_else(|| {
            TimelineError::Invalid(format!("timeline directory {} has no parent", self.dir.display()))
        })?;
        let dir = parent_dir.join(new_timeline_id.to_string());
        let child_md = TimelineMetadata {
            disk_consistent_lsn: ancestor_lsn,
            // Known at the last record and at the end of a commit (where a branch at a point in
            // time is made); elsewhere its first compute's checkpoint gets xl_prev 0/0.
            prev_record_lsn: self.get_prev_record_lsn_at(ancestor_lsn),
            ancestor_timeline: Some(self.timeline_id),
            ancestor_lsn,
            latest_gc_cutoff_lsn: md.latest_gc_cutoff_lsn,
            initdb_lsn: md.initdb_lsn,
            pg_version: md.pg_version,
        };
        create_timeline_dir(&dir, new_timeline_id, &child_md)?;
        // Loading registers the child with this timeline (its branch point is kept by GC).
        Timeline::load(&dir, Some(Arc::clone(self)), self.resources.clone())
    }

    fn layers_read(&self) -> RwLockReadGuard<'_, LayerMap> {
        // Layer map mutations assert before they change anything, so a panicking holder leaves
        // a consistent map: a poisoned lock is still safe to use.
        self.layers.read().unwrap_or_else(|p| p.into_inner())
    }

    fn layers_write(&self) -> RwLockWriteGuard<'_, LayerMap> {
        self.layers.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl std::fmt::Debug for Timeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Timeline({}/{})", self.tenant_id, self.timeline_id)
    }
}

/// The single writer of a timeline; see [`Timeline::writer`].
pub struct TimelineWriter<'a> {
    tl: &'a Timeline,
    state: MutexGuard<'a, WriterState>,
}

impl TimelineWriter<'_> {
    /// Adds a version of `key` at `lsn`, which must be above `last_record_lsn` (a new record).
    /// Each key gets at most one version per LSN (the in-memory layer panics otherwise: one
    /// record changes a key once, and [`crate::pgdatadir_mapping::DatadirModification`] merges).
    pub fn put(&mut self, key: Key, lsn: Lsn, value: Value) -> Result<(), TimelineError> {
        let last = self.tl.get_last_record_lsn();
        if lsn <= last {
            return Err(TimelineError::Invalid(format!(
                "timeline {}: put of key {key} at LSN {lsn}, at or below the last record LSN {last}; versions \
                 must be written at the end LSN of a new record",
                self.tl.timeline_id
            )));
        }
        if key == Key::MAX {
            return Err(TimelineError::Invalid(format!("timeline {}: Key::MAX cannot be stored", self.tl.timeline_id)));
        }
        let layer = self.open_layer();
        if let Some(rel) = key.rel_tag().filter(|_| key.is_rel_size_key()) {
            let size = match &value {
                Value::Image(img) if img.is_empty() => Some(None),
                Value::Image(img) if img.len() == 4 => Some(Some(u32::from_le_bytes([img[0], img[1], img[2], img[3]]))),
                _ => None,
            };
            let mut cache = self.tl.rel_size_cache.write().unwrap_or_else(|p| p.into_inner());
            match size {
                Some(size) => cache.insert(rel, (lsn, size)),
                None => cache.remove(&rel),
            };
        }
        layer.put(key, lsn, value);
        Ok(())
    }

    /// Marks the record that ends at `lsn` (and starts at `record_start_lsn`, when known) as
    /// ingested: readers waiting for `lsn` proceed, and the open layer is frozen and flushed if
    /// it has reached `checkpoint_distance_bytes` or `checkpoint_timeout`.
    pub fn finish_write(&mut self, lsn: Lsn, record_start_lsn: Option<Lsn>) -> Result<(), TimelineError> {
        let last = self.tl.get_last_record_lsn();
        if lsn < last {
            return Err(TimelineError::Invalid(format!(
                "timeline {}: finish_write at LSN {lsn} below the last record LSN {last}; LSNs only grow",
                self.tl.timeline_id
            )));
        }
        if let Some(start) = record_start_lsn {
            assert!(start < lsn, "record start {start} is not below its end {lsn}");
        }
        if lsn == last {
            return Ok(());
        }
        self.tl.last_record.send_replace(RecordLsn { last: lsn, prev: record_start_lsn });
        let conf = self.tl.conf();
        let open_size_bytes = self.tl.layers_read().open_layer().map(|l| l.size_bytes());
        let too_big = open_size_bytes.is_some_and(|s| s >= conf.checkpoint_distance_bytes);
        let too_old = self.state.open_layer_opened_at.is_some_and(|t| t.elapsed() >= conf.checkpoint_timeout);
        if too_big || too_old {
            self.freeze_open_layer();
            self.tl.flush_frozen_layers()?;
        }
        Ok(())
    }

    /// The open layer, created at `next_open_layer_at` if there is none.
    fn open_layer(&mut self) -> Arc<InMemoryLayer> {
        if let Some(layer) = self.tl.layers_read().open_layer() {
            return Arc::clone(layer);
        }
        let layer = Arc::new(InMemoryLayer::new(self.tl.tenant_id, self.tl.timeline_id, self.state.next_open_layer_at));
        self.tl.layers_write().set_open_layer(Arc::clone(&layer));
        self.state.open_layer_opened_at = Some(Instant::now());
        layer
    }

    /// Freezes the open layer (if any) at `last_record_lsn + 1`. Must not run between the puts
    /// of a record and its `finish_write` (the versions above `last_record_lsn` would be cut off);
    /// holding the writer guarantees that.
    fn freeze_open_layer(&mut self) {
        let record = self.tl.last_record_lsn();
        let end_lsn = Lsn(record.last.0 + 1);
        let mut layers = self.tl.layers_write();
        if layers.open_layer().is_none() {
            return;
        }
        layers.freeze_open_layer(end_lsn);
        lock(&self.tl.frozen_record_lsns).push_back(record);
        self.state.next_open_layer_at = end_lsn;
        self.state.open_layer_opened_at = None;
    }
}

/// Creates `dir` with its metadata file atomically: a temp directory renamed into place, so a
/// crash never leaves a timeline directory without metadata.
fn create_timeline_dir(dir: &Path, timeline_id: TimelineId, md: &TimelineMetadata) -> Result<(), TimelineError> {
    if dir.exists() {
        return Err(TimelineError::AlreadyExists { timeline_id, path: dir.to_path_buf() });
    }
    let parent = dir
        .parent()
        .ok_or_else(|| TimelineError::Invalid(format!("timeline directory {} has no parent", dir.display())))?;
    fs::create_dir_all(parent).map_err(|e| TimelineError::io(parent, "creating", e))?;
    let temp = parent.join(format!(".{timeline_id}{TIMELINE_TEMP_DIR_SUFFIX}"));
    if temp.exists() {
        fs::remove_dir_all(&temp).map_err(|e| TimelineError::io(&temp, "removing a leftover temp directory", e))?;
    }
    fs::create_dir(&temp).map_err(|e| TimelineError::io(&temp, "creating", e))?;
    save_metadata(&temp, md)?;
    fs::rename(&temp, dir).map_err(|e| TimelineError::io(dir, "renaming the new timeline directory into place", e))?;
    fsync_dir(parent)
}

/// `(tenant, timeline)` from `<workdir>/tenants/<tenant>/timelines/<timeline>`.
fn parse_timeline_dir(dir: &Path) -> Result<(TenantId, TimelineId), TimelineError> {
    let bad = || {
        TimelineError::Invalid(format!(
            "{} is not a timeline directory (<workdir>/{TENANTS_DIR_NAME}/<tenant id>/{TIMELINES_DIR_NAME}/<timeline id>)",
            dir.display()
        ))
    };
    let name = |p: Option<&Path>| p.and_then(|p| p.file_name()).and_then(|n| n.to_str()).map(str::to_string);
    let timeline_id = name(Some(dir)).and_then(|n| n.parse::<TimelineId>().ok()).ok_or_else(bad)?;
    let timelines = dir.parent();
    if name(timelines).as_deref() != Some(TIMELINES_DIR_NAME) {
        return Err(bad());
    }
    let tenant_id = name(timelines.and_then(Path::parent)).and_then(|n| n.parse::<TenantId>().ok()).ok_or_else(bad)?;
    Ok((tenant_id, timeline_id))
}

fn fsync_dir(dir: &Path) -> Result<(), TimelineError> {
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| TimelineError::io(dir, "fsyncing", e))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every guarded value here is replaced whole after its checks, never left half-updated.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

mod compaction;
mod gc;

pub use compaction::{redundant_layers, CompactionResult};
pub use gc::GcResult;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::layer::DeltaLayerWriter;
    use crate::value::WalRecord;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;

    /// Test semantics for raw records: an initialising record replaces the value, any other
    /// record appends its bytes. Lets a model predict every read.
    pub(crate) struct AppendApplier;

    impl RedoApplier for AppendApplier {
        fn apply(
            &self,
            _key: Key,
            _lsn: Lsn,
            base_img: Option<(Lsn, Bytes)>,
            records: Vec<(Lsn, WalRecord)>,
        ) -> Result<Bytes, RedoError> {
            let mut out = base_img.map(|(_, b)| b.to_vec()).unwrap_or_default();
            for (lsn, rec) in records {
                match rec {
                    WalRecord::Postgres { will_init: true, rec } => out = rec.to_vec(),
                    WalRecord::Postgres { will_init: false, rec } => out.extend_from_slice(&rec),
                    _ => return Err(RedoError::NeedsPostgres { lsn }),
                }
            }
            Ok(Bytes::from(out))
        }
    }

    pub(crate) const TENANT: TenantId = TenantId([0x11; 16]);
    pub(crate) const TIMELINE: TimelineId = TimelineId([0x22; 16]);

    pub(crate) fn resources(checkpoint_distance_bytes: u64) -> TimelineResources {
        let conf = TenantConf { checkpoint_distance_bytes, ..TenantConf::default() };
        TimelineResources {
            conf: Arc::new(RwLock::new(conf)),
            redo: Arc::new(AppendApplier),
            block_cache: Arc::new(BlockCache::new(256)),
            remote_storage: None,
        }
    }

    fn key(n: u32) -> Key {
        crate::test_utils::key(n)
    }

    /// Expected value per the append semantics; `None` if the key has no complete version.
    #[derive(Default)]
    struct Model {
        versions: BTreeMap<(Key, Lsn), Value>,
    }

    impl Model {
        fn expected(&self, k: Key, lsn: Lsn) -> Option<Vec<u8>> {
            let versions: Vec<&Value> = self.versions.range((k, Lsn(0))..=(k, lsn)).map(|(_, v)| v).collect();
            let start = versions.iter().rposition(|v| v.will_init())?;
            let mut out = Vec::new();
            for v in &versions[start..] {
                match v {
                    Value::Image(img) => out = img.to_vec(),
                    Value::WalRecord(WalRecord::Postgres { will_init: true, rec }) => out = rec.to_vec(),
                    Value::WalRecord(WalRecord::Postgres { will_init: false, rec }) => out.extend_from_slice(rec),
                    Value::WalRecord(_) => unreachable!("the model only uses raw records"),
                }
            }
            Some(out)
        }

        fn check(&self, tl: &Timeline, keys: u32, lsns: impl IntoIterator<Item = Lsn>) -> usize {
            let mut checked = 0;
            for lsn in lsns {
                for k in 0..keys {
                    match (self.expected(key(k), lsn), tl.get(key(k), lsn)) {
                        (Some(want), Ok(got)) => assert_eq!(got, want, "key {k} at {lsn}"),
                        (None, Err(e)) => assert!(
                            matches!(e.reason, GetErrorReason::Missing | GetErrorReason::Incomplete { .. }),
                            "key {k} at {lsn}: {e}"
                        ),
                        (want, got) => panic!("key {k} at {lsn}: expected {want:?}, got {got:?}"),
                    }
                    checked += 1;
                }
            }
            checked
        }
    }

    /// Writes one "record" at `lsn`: 1–3 keys, each an image or a raw record.
    fn write_record(rng: &mut StdRng, tl: &Timeline, model: &mut Model, keys: u32, lsn: Lsn) {
        let mut w = tl.writer();
        let mut chosen: Vec<u32> = (0..rng.gen_range(1..=3)).map(|_| rng.gen_range(0..keys)).collect();
        chosen.sort();
        chosen.dedup();
        for k in chosen {
            let payload = Bytes::from(format!("<{k}@{lsn}:{}>", rng.gen::<u16>()).into_bytes());
            let value = match rng.gen_range(0..10) {
                0 => Value::Image(payload),
                1 => Value::WalRecord(WalRecord::Postgres { will_init: true, rec: payload }),
                _ => Value::WalRecord(WalRecord::Postgres { will_init: false, rec: payload }),
            };
            model.versions.insert((key(k), lsn), value.clone());
            w.put(key(k), lsn, value).expect("put");
        }
        w.finish_write(lsn, Some(Lsn(lsn.0 - 8))).expect("finish_write");
    }

    #[test]
    fn reads_match_a_model_across_flushes() {
        let workdir = tempfile::tempdir().expect("tempdir");
        let tl =
            Timeline::create_empty(workdir.path(), TENANT, TIMELINE, Lsn(0x100), 15, resources(4096)).expect("create");
        let mut rng = StdRng::seed_from_u64(0x7469_6d65);
        let mut model = Model::default();
        const KEYS: u32 = 40;
        let mut lsn = Lsn(0x100);
        let mut all_lsns = vec![Lsn(0), Lsn(0xFF)];
        for i in 0..1500 {
            write_record(&mut rng, &tl, &mut model, KEYS, lsn);
            all_lsns.push(lsn);
            if i % 500 == 499 {
                tl.checkpoint().expect("checkpoint");
                assert_eq!(tl.get_disk_consistent_lsn(), lsn);
                assert_eq!(tl.in_memory_layer_count(), 0);
            }
            lsn = Lsn(lsn.0 + rng.gen_range(1..8) * 8);
        }
        let layers = tl.historic_layers();
        assert!(layers.len() > 10, "checkpoint_distance should have caused many flushes, got {}", layers.len());
        assert!(layers.iter().all(|d| d.is_l0()));
        let disk_consistent = tl.get_disk_consistent_lsn();
        assert!(disk_consistent > Lsn(0x100) && disk_consistent <= tl.get_last_record_lsn());
        assert_eq!(tl.metadata(), crate::tenant::metadata::load_metadata(tl.dir()).expect("metadata on disk"));

        let mut sample: Vec<Lsn> = (0..150).map(|_| all_lsns[rng.gen_range(0..all_lsns.len())]).collect();
        sample.extend([Lsn(lsn.0 + 1000), disk_consistent, Lsn(disk_consistent.0 + 1)]);
        let checked = model.check(&tl, KEYS + 1, sample);
        assert!(checked > 6000);

        // The missing-key error says what, where and in which timeline.
        let err = tl.get(key(KEYS + 5), Lsn(0x500)).expect_err("never written");
        let msg = err.to_string();
        assert!(
            msg.contains(&key(KEYS + 5).to_string()) && msg.contains("0/500") && msg.contains(&TIMELINE.to_string())
        );
    }

    #[test]
    fn restart_resumes_at_disk_consistent_lsn() {
        let workdir = tempfile::tempdir().expect("tempdir");
        let tl =
            Timeline::create_empty(workdir.path(), TENANT, TIMELINE, Lsn(0x100), 15, resources(2048)).expect("create");
        let mut rng = StdRng::seed_from_u64(7);
        let mut model = Model::default();
        let mut lsn = Lsn(0x100);
        for _ in 0..400 {
            write_record(&mut rng, &tl, &mut model, 20, lsn);
            lsn = Lsn(lsn.0 + 16);
        }
        let last = tl.get_last_record_lsn();
        let disk_consistent = tl.get_disk_consistent_lsn();
        assert!(disk_consistent < last, "some data must still be only in memory");
        assert_eq!(tl.in_memory_layer_count(), 1);
        let dir = tl.dir().to_path_buf();
        // Leftovers of interrupted writes, and a layer from a flush that crashed before the
        // metadata update.
        fs::write(dir.join(METADATA_TEMP_FILE_NAME), b"half").expect("write");
        fs::write(dir.join(".delta-1-2.layer.tmp"), b"half").expect("write");
        let mut w =
            DeltaLayerWriter::new(&dir, TENANT, TIMELINE, Key::MIN, Lsn(disk_consistent.0 + 1)..last).expect("writer");
        w.put(key(0), Lsn(disk_consistent.0 + 8), &Value::Image(Bytes::from_static(b"stray"))).expect("put");
        let stray = w.finish(Key::MAX).expect("finish").path;
        drop(tl); // kill -9: the open layer is lost

        let tl = Timeline::load(&dir, None, resources(2048)).expect("reload");
        assert_eq!(tl.get_last_record_lsn(), disk_consistent);
        assert_eq!(tl.get_disk_consistent_lsn(), disk_consistent);
        assert!(!stray.exists(), "the layer above disk_consistent_lsn is removed");
        assert!(!dir.join(METADATA_TEMP_FILE_NAME).exists() && !dir.join(".delta-1-2.layer.tmp").exists());
        // Everything up to disk_consistent_lsn is intact; later reads see that state.
        model.versions.retain(|(_, l), _| *l <= disk_consistent);
        let lsns: Vec<Lsn> = (0x100..=last.0 + 64).step_by(40).map(Lsn).collect();
        model.check(&tl, 21, lsns);
        // Ingest resumes from there.
        let mut lsn = Lsn(disk_consistent.0 + 8);
        for _ in 0..50 {
            write_record(&mut rng, &tl, &mut model, 20, lsn);
            lsn = Lsn(lsn.0 + 16);
        }
        tl.checkpoint().expect("checkpoint");
        model.check(&tl, 21, [disk_consistent, lsn, Lsn(lsn.0 - 200)]);
        // Writing at or below the last record is refused, not panicked on.
        let err = tl.writer().put(key(1), disk_consistent, Value::Image(Bytes::new())).expect_err("old LSN");
        assert!(err.to_string().contains("at or below the last record LSN"), "{err}");
    }

    #[tokio::test]
    async fn branches_share_history_not_writes() {
        let workdir = tempfile::tempdir().expect("tempdir");
        let parent =
            Timeline::create_empty(workdir.path(), TENANT, TIMELINE, Lsn(0x100), 15, resources(1024)).expect("create");
        let mut rng = StdRng::seed_from_u64(99);
        let mut parent_model = Model::default();
        let mut lsn = Lsn(0x100);
        for _ in 0..200 {
            write_record(&mut rng, &parent, &mut parent_model, 10, lsn);
            lsn = Lsn(lsn.0 + 16);
        }
        let branch_lsn = Lsn(0x100 + 16 * 120);
        let child_id = TimelineId([0x33; 16]);
        let started = Instant::now();
        let child = parent.branch(child_id, branch_lsn, Duration::from_secs(5)).await.expect("branch");
        assert!(started.elapsed() < Duration::from_secs(1), "branching copies nothing");
        assert_eq!(child.get_last_record_lsn(), branch_lsn);
        assert_eq!(child.ancestor_lsn(), branch_lsn);
        assert_eq!(child.metadata().ancestor_timeline, Some(TIMELINE));
        assert_eq!(parent.child_branch_points(), vec![(child_id, branch_lsn)]);

        // The child sees the parent as of the branch point, plus its own writes after it.
        let mut child_model = Model {
            versions: parent_model
                .versions
                .iter()
                .filter(|((_, l), _)| *l <= branch_lsn)
                .map(|(k, v)| (*k, v.clone()))
                .collect(),
        };
        let mut child_lsn = Lsn(branch_lsn.0 + 8);
        for _ in 0..100 {
            write_record(&mut rng, &child, &mut child_model, 10, child_lsn);
            child_lsn = Lsn(child_lsn.0 + 16);
        }
        child.checkpoint().expect("checkpoint child");
        let lsns: Vec<Lsn> = (0x100..child_lsn.0 + 32).step_by(24).map(Lsn).collect();
        child_model.check(&child, 11, lsns.clone());
        // ... and the parent does not see the child's writes.
        parent_model.check(&parent, 11, lsns.clone());

        // A restarted child (loaded with its ancestor) reads the same.
        let child_dir = child.dir().to_path_buf();
        drop(child);
        let err = Timeline::load(&child_dir, None, resources(1024)).expect_err("ancestor required");
        assert!(err.to_string().contains("names ancestor"), "{err}");
        let child = Timeline::load(&child_dir, Some(Arc::clone(&parent)), resources(1024)).expect("reload child");
        child_model.check(&child, 11, lsns);

        // Invalid branch points are refused with the reason.
        let err = parent.branch(TimelineId([0x44; 16]), Lsn(0xF8), Duration::from_secs(1)).await.unwrap_err();
        assert!(err.to_string().contains("below the initdb LSN"), "{err}");
        let err = parent.branch(TimelineId([0x44; 16]), Lsn(lsn.0 + 800), Duration::from_millis(50)).await.unwrap_err();
        assert!(err.to_string().contains("above the last ingested record"), "{err}");
        let err = parent.branch(child_id, branch_lsn, Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(err, TimelineError::AlreadyExists { .. }), "{err}");

        // A branch point that arrives while waiting is accepted.
        let target = Lsn(lsn.0 + 64);
        let writer_tl = Arc::clone(&parent);
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let mut w = writer_tl.writer();
            w.put(key(0), target, Value::Image(Bytes::from_static(b"late"))).expect("put");
            w.finish_write(target, None).expect("finish");
        });
        let late = parent.branch(TimelineId([0x55; 16]), target, Duration::from_secs(10)).await.expect("late branch");
        writer.join().expect("writer thread");
        assert_eq!(late.get(key(0), target).expect("read").as_ref(), b"late");
        assert_eq!(late.metadata().prev_record_lsn, None);
    }

    #[test]
    fn checkpoint_timeout_flushes_an_old_open_layer() {
        let workdir = tempfile::tempdir().expect("tempdir");
        let res = resources(1 << 30);
        res.conf.write().unwrap().checkpoint_timeout = Duration::from_millis(30);
        let tl = Timeline::create_empty(workdir.path(), TENANT, TIMELINE, Lsn(0x100), 15, res).expect("create");
        let mut w = tl.writer();
        w.put(key(1), Lsn(0x100), Value::Image(Bytes::from_static(b"a"))).expect("put");
        w.finish_write(Lsn(0x100), None).expect("finish");
        drop(w);
        assert!(!tl.checkpoint_if_due().expect("not yet due"));
        assert_eq!(tl.in_memory_layer_count(), 1);
        std::thread::sleep(Duration::from_millis(40));
        assert!(tl.checkpoint_if_due().expect("due"));
        assert_eq!((tl.in_memory_layer_count(), tl.historic_layers().len()), (0, 1));
        assert_eq!(tl.get_disk_consistent_lsn(), Lsn(0x100));
        // The write path checks the age too: a write into a layer older than the timeout flushes.
        let mut w = tl.writer();
        w.put(key(1), Lsn(0x108), Value::Image(Bytes::from_static(b"b"))).expect("put");
        std::thread::sleep(Duration::from_millis(40));
        w.finish_write(Lsn(0x108), None).expect("finish");
        drop(w);
        assert_eq!(tl.get_disk_consistent_lsn(), Lsn(0x108));
    }

    #[test]
    fn checkpoint_advances_over_wal_that_changed_nothing() {
        let workdir = tempfile::tempdir().expect("tempdir");
        let tl = Timeline::create_empty(workdir.path(), TENANT, TIMELINE, Lsn(0x100), 15, resources(1 << 20))
            .expect("create");
        let mut w = tl.writer();
        w.put(key(1), Lsn(0x100), Value::Image(Bytes::from_static(b"a"))).expect("put");
        w.finish_write(Lsn(0x100), None).expect("finish");
        drop(w);
        tl.checkpoint().expect("checkpoint");
        assert_eq!(tl.historic_layers().len(), 1);
        tl.writer().finish_write(Lsn(0x200), Some(Lsn(0x1C0))).expect("finish");
        tl.checkpoint().expect("checkpoint");
        assert_eq!(tl.historic_layers().len(), 1, "no empty layer is written");
        assert_eq!(tl.get_disk_consistent_lsn(), Lsn(0x200));
        assert_eq!(tl.metadata().prev_record_lsn, Some(Lsn(0x1C0)));
        let mut w = tl.writer();
        w.put(key(1), Lsn(0x208), Value::Image(Bytes::from_static(b"b"))).expect("put");
        w.finish_write(Lsn(0x208), None).expect("finish");
        drop(w);
        tl.checkpoint().expect("checkpoint");
        let dir = tl.dir().to_path_buf();
        drop(tl);
        let tl = Timeline::load(&dir, None, resources(1 << 20)).expect("reload");
        assert_eq!(tl.get(key(1), Lsn(0x1FF)).expect("read").as_ref(), b"a");
        assert_eq!(tl.get(key(1), Lsn(0x208)).expect("read").as_ref(), b"b");
    }
}
