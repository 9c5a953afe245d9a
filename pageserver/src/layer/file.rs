//! The read side shared by delta and image layers: open and validate a file, read blocks through
//! the [`BlockCache`], read value blobs. Everything that reaches a caller has been checked here
//! (summary, index block crc, blob crc and bounds); every failure names the file and the place.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use super::blob::{self, BlobHeader, BLOB_HEADER_SIZE_BYTES};
use super::block_cache::{Block, BlockCache};
use super::btree::{self, IndexShape};
use super::name::LayerName;
use super::summary::Summary;
use super::{LayerError, LayerKind, PersistentLayerDesc, BLOCK_SIZE_BYTES};

/// Unique per opened file, so cache entries of different files (or of a replaced file under the
/// same name) never mix.
static NEXT_FILE_ID: AtomicU64 = AtomicU64::new(1);

/// An open, validated layer file.
pub struct LayerFile {
    path: PathBuf,
    file: File,
    file_id: u64,
    cache: Arc<BlockCache>,
    summary: Summary,
    shape: IndexShape,
    desc: PersistentLayerDesc,
    /// When a value was last read (Unix seconds): eviction under a disk limit picks the layers
    /// read longest ago.
    last_access_secs: AtomicU64,
}

fn unix_now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl LayerFile {
    /// Opens `path` and checks its summary against the file's size and name.
    pub fn open(path: &Path, cache: &Arc<BlockCache>) -> Result<LayerFile, LayerError> {
        let file = File::open(path).map_err(|e| LayerError::io(path, "opening", e))?;
        let len_bytes = file.metadata().map_err(|e| LayerError::io(path, "reading file metadata", e))?.len();
        if len_bytes < BLOCK_SIZE_BYTES as u64 {
            return Err(LayerError::corrupt(
                path,
                format!(
                    "file is {len_bytes} bytes, shorter than its {BLOCK_SIZE_BYTES}-byte summary block (truncated?)"
                ),
            ));
        }
        let mut block0 = vec![0u8; BLOCK_SIZE_BYTES];
        file.read_exact_at(&mut block0, 0).map_err(|e| LayerError::io(path, "reading the summary block", e))?;
        let summary = Summary::decode(&block0).map_err(|what| LayerError::corrupt(path, what))?;
        let expected_len_bytes = summary.block_count as u64 * BLOCK_SIZE_BYTES as u64;
        if len_bytes != expected_len_bytes {
            return Err(LayerError::corrupt(
                path,
                format!(
                    "file is {len_bytes} bytes but its summary says {} blocks ({expected_len_bytes} bytes): \
                     truncated or overwritten",
                    summary.block_count
                ),
            ));
        }
        let shape = IndexShape::new(summary.kind, summary.value_count, summary.index_start_block)
            .and_then(|shape| shape.check_summary(&summary).map(|()| shape))
            .map_err(|what| LayerError::corrupt(path, format!("summary block: {what}")))?;
        let desc = PersistentLayerDesc {
            tenant_id: summary.tenant_id,
            timeline_id: summary.timeline_id,
            kind: summary.kind,
            key_range: summary.key_range,
            lsn_range: summary.lsn_range.clone(),
            value_count: summary.value_count,
            file_size_bytes: len_bytes,
            path: path.to_path_buf(),
        };
        // A file renamed by hand (or a bug) must not claim data it does not hold.
        if let Some(name) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<LayerName>().ok()) {
            if name != desc.layer_name() {
                return Err(LayerError::corrupt(
                    path,
                    format!("file name says {name} but its summary says {}", desc.layer_name()),
                ));
            }
        }
        Ok(LayerFile {
            path: path.to_path_buf(),
            file,
            file_id: NEXT_FILE_ID.fetch_add(1, Ordering::Relaxed),
            cache: Arc::clone(cache),
            summary,
            shape,
            desc,
            last_access_secs: AtomicU64::new(unix_now_secs()),
        })
    }

    /// When a value of this file was last read (Unix seconds; the open counts as a read).
    pub fn last_access_secs(&self) -> u64 {
        self.last_access_secs.load(Ordering::Relaxed)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    pub fn desc(&self) -> &PersistentLayerDesc {
        &self.desc
    }

    pub(crate) fn shape(&self) -> &IndexShape {
        &self.shape
    }

    pub fn kind(&self) -> LayerKind {
        self.summary.kind
    }

    pub fn corrupt(&self, what: impl Into<String>) -> LayerError {
        LayerError::corrupt(&self.path, what)
    }

    fn read_block_from_disk(&self, blkno: u32) -> Result<Arc<Block>, LayerError> {
        if blkno >= self.summary.block_count {
            return Err(self.corrupt(format!("block {blkno} is past the end of the file")));
        }
        let mut block = Arc::new([0u8; BLOCK_SIZE_BYTES]);
        let buf = Arc::get_mut(&mut block).expect("a fresh Arc is unique");
        self.file
            .read_exact_at(buf, blkno as u64 * BLOCK_SIZE_BYTES as u64)
            .map_err(|e| LayerError::io(&self.path, format!("reading block {blkno}"), e))?;
        Ok(block)
    }

    /// An index block, crc-checked and header-checked (see `btree::check_node`) before it is
    /// cached.
    pub(crate) fn read_index_block(&self, blkno: u32) -> Result<Arc<Block>, LayerError> {
        if blkno < self.summary.index_start_block || blkno >= self.summary.block_count {
            return Err(self.corrupt(format!(
                "index block number {blkno} outside the index area (blocks {}..{})",
                self.summary.index_start_block, self.summary.block_count
            )));
        }
        if let Some(block) = self.cache.get(self.file_id, blkno) {
            return Ok(block);
        }
        let block = self.read_block_from_disk(blkno)?;
        btree::check_node(&block, blkno, &self.shape)
            .map_err(|what| self.corrupt(format!("index block {blkno} (offset {}): {what}", Self::offset_of(blkno))))?;
        self.cache.insert(self.file_id, blkno, Arc::clone(&block));
        Ok(block)
    }

    /// A block of the value area (blobs are checked by their own crc, not per block).
    fn read_data_block(&self, blkno: u32) -> Result<Arc<Block>, LayerError> {
        debug_assert!(blkno >= 1 && blkno < self.summary.index_start_block);
        if let Some(block) = self.cache.get(self.file_id, blkno) {
            return Ok(block);
        }
        let block = self.read_block_from_disk(blkno)?;
        self.cache.insert(self.file_id, blkno, Arc::clone(&block));
        Ok(block)
    }

    /// Appends `len_bytes` bytes of the value area starting at `offset` to `out`. The caller has
    /// checked that the range lies inside the value area.
    fn read_value_area(&self, offset: u64, len_bytes: usize, out: &mut Vec<u8>) -> Result<(), LayerError> {
        let block_size = BLOCK_SIZE_BYTES as u64;
        let end = offset + len_bytes as u64;
        let mut pos = offset;
        while pos < end {
            let blkno = (pos / block_size) as u32;
            let in_block = (pos % block_size) as usize;
            let take = ((block_size - in_block as u64).min(end - pos)) as usize;
            let block = self.read_data_block(blkno)?;
            out.extend_from_slice(&block[in_block..in_block + take]);
            pos += take as u64;
        }
        Ok(())
    }

    /// The value stored in the blob at byte `offset`, crc-checked and decompressed.
    pub fn read_blob(&self, offset: u64) -> Result<Bytes, LayerError> {
        self.last_access_secs.store(unix_now_secs(), Ordering::Relaxed);
        let area_start = BLOCK_SIZE_BYTES as u64;
        let area_end = self.summary.index_start_block as u64 * BLOCK_SIZE_BYTES as u64;
        let header_end = offset.checked_add(BLOB_HEADER_SIZE_BYTES as u64);
        if offset < area_start || header_end.is_none_or(|e| e > area_end) {
            return Err(self
                .corrupt(format!("blob offset {offset} is outside the value area (bytes {area_start}..{area_end})")));
        }
        let mut header_bytes = Vec::with_capacity(BLOB_HEADER_SIZE_BYTES);
        self.read_value_area(offset, BLOB_HEADER_SIZE_BYTES, &mut header_bytes)?;
        let header_arr: [u8; BLOB_HEADER_SIZE_BYTES] =
            header_bytes.as_slice().try_into().expect("read_value_area returns exactly the bytes asked for");
        let header = BlobHeader::decode(&header_arr);
        let payload_start = offset + BLOB_HEADER_SIZE_BYTES as u64;
        let stored_len_bytes = header.stored_len_bytes as u64;
        if payload_start + stored_len_bytes > area_end {
            return Err(self.corrupt(format!(
                "blob at offset {offset}: length {stored_len_bytes} runs past the end of the value area ({area_end})"
            )));
        }
        let mut stored = Vec::with_capacity(stored_len_bytes as usize);
        self.read_value_area(payload_start, stored_len_bytes as usize, &mut stored)?;
        blob::decode_payload(&header, stored).map_err(|what| self.corrupt(format!("blob at offset {offset}: {what}")))
    }

    fn offset_of(blkno: u32) -> u64 {
        blkno as u64 * BLOCK_SIZE_BYTES as u64
    }
}
