//! Immutable layer files (DESIGN D6): a *delta* layer holds every change to a key range within an
//! LSN range; an *image* layer holds the value of every key in a key range at one LSN.
//!
//! Both share one file format, so one reader and one writer core serve both:
//!
//! ```text
//!  block 0          summary (see summary.rs): magic, version, kind, ids, key/LSN range,
//!                   index root/start block, value count, block count, crc32c
//!  blocks 1..S      value blobs, back to back, crossing block boundaries (see blob.rs):
//!                   u32 length|zstd-flag, u32 crc32c, payload
//!  blocks S..N      B-tree index, built bottom-up: leaves first (contiguous, in key order),
//!                   then each upper level, root last (see btree.rs). Every index block
//!                   carries a crc32c.
//!    delta entry    18-byte key ++ 8-byte LSN  →  u64 blob offset | will-init bit (bit 63)
//!    image entry    18-byte key                →  u64 blob offset
//! ```
//!
//! Blocks are 8 KiB and the file is exactly N blocks long, so truncation is detected at open.
//! Every byte that changes what a read returns is covered by a crc32c (summary, blob, index
//! block); a mismatch is a [`LayerError`] naming the file and the place, never wrong data.
//! Reads are positioned (`read_at`) and go through a shared bounded [`BlockCache`].

pub(crate) mod blob;
pub mod block_cache;
pub(crate) mod btree;
pub mod delta;
pub(crate) mod file;
pub mod image;
pub mod name;
pub mod summary;
mod writer;

#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use utils::{Lsn, TenantId, TimelineId};

pub use block_cache::BlockCache;
pub use delta::{DeltaEntry, DeltaLayer, DeltaLayerWriter};
pub use image::{ImageLayer, ImageLayerWriter};
pub use name::LayerName;

use crate::key::{Key, KeyRange};
use crate::value::Value;

/// Size of every block in a layer file: the summary, the unit of the block cache, an index node.
pub const BLOCK_SIZE_BYTES: usize = 8192;

/// Delta or image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerKind {
    Delta,
    Image,
}

impl fmt::Display for LayerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LayerKind::Delta => "delta",
            LayerKind::Image => "image",
        })
    }
}

/// What a finished writer produced, and what the layer map keeps about a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistentLayerDesc {
    pub tenant_id: TenantId,
    pub timeline_id: TimelineId,
    pub kind: LayerKind,
    pub key_range: KeyRange,
    /// For an image layer at LSN `L`: `L..L+1`.
    pub lsn_range: Range<Lsn>,
    pub value_count: u64,
    pub file_size_bytes: u64,
    /// Where the file is on local disk.
    pub path: PathBuf,
}

impl PersistentLayerDesc {
    pub fn layer_name(&self) -> LayerName {
        match self.kind {
            LayerKind::Delta => LayerName::Delta { key_range: self.key_range, lsn_range: self.lsn_range.clone() },
            LayerKind::Image => LayerName::Image { key_range: self.key_range, lsn: self.lsn_range.start },
        }
    }

    pub fn is_delta(&self) -> bool {
        self.kind == LayerKind::Delta
    }

    /// The image LSN of an image layer (`lsn_range.start`).
    pub fn image_lsn(&self) -> Option<Lsn> {
        (self.kind == LayerKind::Image).then_some(self.lsn_range.start)
    }

    /// L0 = a delta over the whole key space: what an in-memory layer becomes when flushed.
    /// Compaction turns L0s into key-partitioned L1 deltas.
    pub fn is_l0(&self) -> bool {
        self.kind == LayerKind::Delta && self.key_range.is_full()
    }
}

/// An error reading or writing a layer file. Always names the file.
#[derive(Debug, thiserror::Error)]
#[error("layer file {}: {kind}", path.display())]
pub struct LayerError {
    pub path: PathBuf,
    #[source]
    pub kind: LayerErrorKind,
}

#[derive(Debug, thiserror::Error)]
pub enum LayerErrorKind {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The bytes on disk are not a valid layer: detected, never served.
    #[error("corrupt: {0}; the file must not be used: delete it so it is downloaded again or rebuilt from WAL")]
    Corrupt(String),
}

impl LayerError {
    pub fn io(path: &Path, context: impl Into<String>, source: io::Error) -> LayerError {
        LayerError { path: path.to_path_buf(), kind: LayerErrorKind::Io { context: context.into(), source } }
    }

    pub fn corrupt(path: &Path, what: impl Into<String>) -> LayerError {
        LayerError { path: path.to_path_buf(), kind: LayerErrorKind::Corrupt(what.into()) }
    }

    pub fn is_corruption(&self) -> bool {
        matches!(self.kind, LayerErrorKind::Corrupt(_))
    }
}

/// An opened layer file of either kind, or one that is only in remote storage yet.
pub enum PersistentLayer {
    Delta(DeltaLayer),
    Image(ImageLayer),
    Remote(RemoteLayer),
}

/// Fetches a layer file that is in remote storage but not on local disk.
pub trait LayerDownloader: Send + Sync {
    /// Puts the verified, durable file at `desc.path` (blocking).
    fn download(&self, desc: &PersistentLayerDesc) -> Result<(), String>;
}

/// A layer known from the remote index and not downloaded yet. The first read downloads it
/// (concurrent readers wait for that one download) and opens it; later reads go to the file.
pub struct RemoteLayer {
    desc: PersistentLayerDesc,
    downloader: Arc<dyn LayerDownloader>,
    cache: Arc<BlockCache>,
    opened: std::sync::Mutex<Option<Arc<PersistentLayer>>>,
}

impl RemoteLayer {
    /// `desc` as the layer name and the index give it: `value_count` is unknown (0) until the
    /// file is downloaded; `path` is where it will be.
    pub fn new(desc: PersistentLayerDesc, downloader: Arc<dyn LayerDownloader>, cache: Arc<BlockCache>) -> RemoteLayer {
        RemoteLayer { desc, downloader, cache, opened: std::sync::Mutex::new(None) }
    }

    /// The layer opened from local disk, downloading it first if needed.
    pub fn get_or_download(&self) -> Result<Arc<PersistentLayer>, LayerError> {
        // A panic while holding the lock leaves `None`: the next reader tries again.
        let mut opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(layer) = &*opened {
            return Ok(Arc::clone(layer));
        }
        if !self.desc.path.exists() {
            self.downloader
                .download(&self.desc)
                .map_err(|e| LayerError::io(&self.desc.path, "downloading from remote storage", io::Error::other(e)))?;
        }
        let layer = Arc::new(PersistentLayer::open(&self.desc.path, &self.cache)?);
        if layer.desc().layer_name() != self.desc.layer_name() {
            return Err(LayerError::corrupt(&self.desc.path, "its summary names another layer than its file name"));
        }
        *opened = Some(Arc::clone(&layer));
        Ok(layer)
    }

    /// Whether the file has been downloaded and opened.
    pub fn is_local(&self) -> bool {
        self.opened.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

impl PersistentLayer {
    /// Opens a layer file of whichever kind its summary says.
    pub fn open(path: &Path, cache: &Arc<BlockCache>) -> Result<PersistentLayer, LayerError> {
        let file = file::LayerFile::open(path, cache)?;
        Ok(match file.summary().kind {
            LayerKind::Delta => PersistentLayer::Delta(DeltaLayer::from_file(file)?),
            LayerKind::Image => PersistentLayer::Image(ImageLayer::from_file(file)?),
        })
    }

    pub fn desc(&self) -> &PersistentLayerDesc {
        match self {
            PersistentLayer::Delta(l) => l.desc(),
            PersistentLayer::Image(l) => l.desc(),
            PersistentLayer::Remote(l) => &l.desc,
        }
    }

    /// When a value was last read from the local file (Unix seconds); `None` for a layer that is
    /// only in remote storage.
    pub fn last_access_secs(&self) -> Option<u64> {
        match self {
            PersistentLayer::Delta(l) => Some(l.last_access_secs()),
            PersistentLayer::Image(l) => Some(l.last_access_secs()),
            PersistentLayer::Remote(l) => {
                l.opened.lock().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(|o| o.last_access_secs())
            }
        }
    }

    /// Versions of `key` with LSN in `lsn_range`, newest first, ending at (and including) the
    /// first image or will-init record.
    pub fn get_value_reconstruct_data(&self, key: Key, lsn_range: Range<Lsn>) -> Result<Vec<(Lsn, Value)>, LayerError> {
        match self {
            PersistentLayer::Delta(l) => l.get_value_reconstruct_data(key, lsn_range),
            PersistentLayer::Image(l) => l.get_value_reconstruct_data(key, lsn_range),
            PersistentLayer::Remote(l) => l.get_or_download()?.get_value_reconstruct_data(key, lsn_range),
        }
    }
}

impl fmt::Debug for PersistentLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.desc().layer_name())
    }
}
