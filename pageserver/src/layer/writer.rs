//! The write side shared by delta and image layers: stream blobs into a temporary file, then add
//! the index and the summary, fsync, and move the file to its final name atomically, so a crash
//! leaves either no layer or a complete one (a leftover `.tmp` file is garbage to delete).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use utils::{Lsn, TenantId, TimelineId};

use super::blob::{self, BLOB_HEADER_SIZE_BYTES};
use super::btree::BTreeBuilder;
use super::name::LayerName;
use super::summary::Summary;
use super::{LayerError, LayerKind, PersistentLayerDesc, BLOCK_SIZE_BYTES};
use crate::key::{Key, KeyRange};

/// Suffix of in-progress layer files.
pub const TEMP_FILE_SUFFIX: &str = ".layer.tmp";
/// Write buffer: large sequential writes, bounded memory.
const WRITE_BUFFER_SIZE_BYTES: usize = 1024 * 1024;
/// zstd level for large values: level 1 keeps the writer fast; the gain over higher levels on
/// page images is small.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

static NEXT_TEMP_ID: AtomicU64 = AtomicU64::new(0);

pub(crate) struct LayerFileWriter {
    dir: PathBuf,
    temp_path: PathBuf,
    out: Option<BufWriter<File>>,
    /// Bytes written so far (the offset of the next blob).
    offset_bytes: u64,
    kind: LayerKind,
    tenant_id: TenantId,
    timeline_id: TimelineId,
    key_start: Key,
    pub(crate) index: BTreeBuilder,
    zstd_level: Option<i32>,
}

impl LayerFileWriter {
    pub fn new(
        dir: &Path,
        kind: LayerKind,
        tenant_id: TenantId,
        timeline_id: TimelineId,
        key_start: Key,
    ) -> Result<LayerFileWriter, LayerError> {
        let temp_name = format!(
            ".{}-{}-{}{TEMP_FILE_SUFFIX}",
            kind,
            std::process::id(),
            NEXT_TEMP_ID.fetch_add(1, Ordering::Relaxed)
        );
        let temp_path = dir.join(temp_name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp_path)
            .map_err(|e| LayerError::io(&temp_path, "creating temporary layer file", e))?;
        let mut out = BufWriter::with_capacity(WRITE_BUFFER_SIZE_BYTES, file);
        // Block 0 is the summary, written last when everything it describes is known.
        out.write_all(&[0u8; BLOCK_SIZE_BYTES]).map_err(|e| LayerError::io(&temp_path, "writing", e))?;
        Ok(LayerFileWriter {
            dir: dir.to_path_buf(),
            temp_path,
            out: Some(out),
            offset_bytes: BLOCK_SIZE_BYTES as u64,
            kind,
            tenant_id,
            timeline_id,
            key_start,
            index: BTreeBuilder::new(kind),
            zstd_level: Some(DEFAULT_ZSTD_LEVEL),
        })
    }

    pub fn set_compression(&mut self, zstd_level: Option<i32>) {
        self.zstd_level = zstd_level;
    }

    pub fn key_start(&self) -> Key {
        self.key_start
    }

    /// Bytes written so far: lets callers cut layers at a target size.
    pub fn size_bytes(&self) -> u64 {
        self.offset_bytes
    }

    fn out(&mut self) -> &mut BufWriter<File> {
        self.out.as_mut().expect("writer used after finish")
    }

    /// Appends a value blob; returns its offset.
    pub fn write_blob(&mut self, raw: &[u8]) -> Result<u64, LayerError> {
        let (header, compressed) = blob::encode_blob(raw, self.zstd_level);
        let stored: &[u8] = compressed.as_deref().unwrap_or(raw);
        let offset = self.offset_bytes;
        let temp_path = self.temp_path.clone();
        let out = self.out();
        out.write_all(&header).map_err(|e| LayerError::io(&temp_path, "writing", e))?;
        out.write_all(stored).map_err(|e| LayerError::io(&temp_path, "writing", e))?;
        self.offset_bytes += (BLOB_HEADER_SIZE_BYTES + stored.len()) as u64;
        Ok(offset)
    }

    /// Writes index and summary, makes the file durable under its final name in `dir`.
    /// Fails (leaving nothing behind) if a layer of that name already exists.
    pub fn finish(mut self, key_end: Key, lsn_range: Range<Lsn>) -> Result<PersistentLayerDesc, LayerError> {
        assert!(self.key_start <= key_end, "layer key range {}..{key_end} is reversed", self.key_start);
        assert!(lsn_range.start < lsn_range.end, "layer LSN range {lsn_range:?} is empty");
        let temp_path = self.temp_path.clone();
        let io = |what: &str| {
            let temp_path = temp_path.clone();
            let what = what.to_string();
            move |e| LayerError::io(&temp_path, what, e)
        };
        // Pad the value area to a block boundary: the index starts on a block.
        let pad = (BLOCK_SIZE_BYTES as u64 - self.offset_bytes % BLOCK_SIZE_BYTES as u64) % BLOCK_SIZE_BYTES as u64;
        self.out().write_all(&vec![0u8; pad as usize]).map_err(io("writing"))?;
        self.offset_bytes += pad;
        let index_start_block =
            u32::try_from(self.offset_bytes / BLOCK_SIZE_BYTES as u64).expect("layer file larger than 2^32 blocks");
        let value_count = self.index.value_count();
        let index = std::mem::replace(&mut self.index, BTreeBuilder::new(self.kind));
        let (index_blocks, index_root_block) = index.finish(index_start_block);
        self.out().write_all(&index_blocks).map_err(io("writing the index"))?;
        self.offset_bytes += index_blocks.len() as u64;
        let block_count =
            u32::try_from(self.offset_bytes / BLOCK_SIZE_BYTES as u64).expect("layer file larger than 2^32 blocks");
        let summary = Summary {
            kind: self.kind,
            tenant_id: self.tenant_id,
            timeline_id: self.timeline_id,
            key_range: KeyRange::new(self.key_start, key_end),
            lsn_range: lsn_range.clone(),
            index_start_block,
            index_root_block,
            value_count,
            block_count,
        };
        let file = self
            .out
            .take()
            .expect("writer used after finish")
            .into_inner()
            .map_err(|e| LayerError::io(&temp_path, "flushing", e.into_error()))?;
        file.write_all_at(&summary.encode(), 0).map_err(io("writing the summary"))?;
        file.sync_all().map_err(io("fsyncing"))?;
        drop(file);

        let desc_name = match self.kind {
            LayerKind::Delta => LayerName::Delta { key_range: summary.key_range, lsn_range: lsn_range.clone() },
            LayerKind::Image => LayerName::Image { key_range: summary.key_range, lsn: lsn_range.start },
        };
        let final_path = self.dir.join(desc_name.to_string());
        // hard_link + unlink instead of rename: refuses to replace an existing layer, atomically.
        std::fs::hard_link(&temp_path, &final_path)
            .map_err(|e| LayerError::io(&final_path, "moving the finished layer to its final name", e))?;
        std::fs::remove_file(&temp_path).map_err(io("removing the temporary file"))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| LayerError::io(&final_path, format!("fsyncing directory {}", self.dir.display()), e))?;
        Ok(PersistentLayerDesc {
            tenant_id: self.tenant_id,
            timeline_id: self.timeline_id,
            kind: self.kind,
            key_range: summary.key_range,
            lsn_range,
            value_count,
            file_size_bytes: self.offset_bytes,
            path: final_path,
        })
    }
}

impl Drop for LayerFileWriter {
    fn drop(&mut self) {
        // Unfinished (error or abandoned): the temp file is garbage. After finish it is gone.
        if self.temp_path.exists() {
            let _ = std::fs::remove_file(&self.temp_path);
        }
    }
}
