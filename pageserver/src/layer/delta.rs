//! Delta layers: every version of every key in a key range whose LSN lies in an LSN range,
//! indexed by (key, LSN). A read walks one key's versions newest-first until a version that
//! needs nothing older (an image or a will-init record); compaction scans them in order.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use utils::{Lsn, TenantId, TimelineId};

use super::block_cache::BlockCache;
use super::btree::{BTreeReader, Cursor, DELTA_INDEX_KEY_SIZE_BYTES};
use super::file::LayerFile;
use super::writer::LayerFileWriter;
use super::{LayerError, LayerKind, PersistentLayerDesc};
use crate::key::{Key, KeyRange, KEY_SIZE_BYTES};
use crate::value::Value;

/// Bit 63 of a delta index value: the version needs no older one. Kept in the index so a read
/// knows where to stop without decoding the blob (and is cross-checked against it when it does).
const WILL_INIT_BIT: u64 = 1 << 63;

fn index_key(key: Key, lsn: Lsn) -> [u8; DELTA_INDEX_KEY_SIZE_BYTES] {
    let mut out = [0u8; DELTA_INDEX_KEY_SIZE_BYTES];
    out[..KEY_SIZE_BYTES].copy_from_slice(&key.to_be_bytes());
    out[KEY_SIZE_BYTES..].copy_from_slice(&lsn.0.to_be_bytes());
    out
}

fn split_index_key(b: &[u8]) -> (Key, Lsn) {
    let key: &[u8; KEY_SIZE_BYTES] = b[..KEY_SIZE_BYTES].try_into().expect("index keys are 26 bytes (checked on load)");
    let lsn: [u8; 8] = b[KEY_SIZE_BYTES..].try_into().expect("index keys are 26 bytes (checked on load)");
    (Key::from_be_bytes(key), Lsn(u64::from_be_bytes(lsn)))
}

/// Writes a delta layer from versions given in (key, LSN) order.
pub struct DeltaLayerWriter {
    inner: LayerFileWriter,
    lsn_range: Range<Lsn>,
    last: Option<(Key, Lsn)>,
}

impl DeltaLayerWriter {
    /// Starts a layer in `dir` covering keys from `key_start` and LSNs `lsn_range`.
    pub fn new(
        dir: &Path,
        tenant_id: TenantId,
        timeline_id: TimelineId,
        key_start: Key,
        lsn_range: Range<Lsn>,
    ) -> Result<DeltaLayerWriter, LayerError> {
        assert!(lsn_range.start < lsn_range.end, "delta layer LSN range {lsn_range:?} is empty");
        let inner = LayerFileWriter::new(dir, LayerKind::Delta, tenant_id, timeline_id, key_start)?;
        Ok(DeltaLayerWriter { inner, lsn_range, last: None })
    }

    /// zstd level for large values, or `None` to store everything raw.
    pub fn set_compression(&mut self, zstd_level: Option<i32>) {
        self.inner.set_compression(zstd_level);
    }

    /// Adds a version. Panics unless (key, lsn) is strictly after the previous one, the key is at
    /// or after `key_start` and below [`Key::MAX`], and `lsn` lies in the layer's LSN range.
    pub fn put(&mut self, key: Key, lsn: Lsn, value: &Value) -> Result<(), LayerError> {
        assert!(key >= self.inner.key_start() && key < Key::MAX, "key {key} outside the layer's key range");
        assert!(self.lsn_range.contains(&lsn), "LSN {lsn} outside the layer's range {:?}", self.lsn_range);
        if let Some(last) = self.last {
            assert!((key, lsn) > last, "delta layer entries out of order: ({key}, {lsn}) after {last:?}");
        }
        let offset = self.inner.write_blob(&value.encode())?;
        assert!(offset & WILL_INIT_BIT == 0);
        let will_init = if value.will_init() { WILL_INIT_BIT } else { 0 };
        self.inner.index.append(&index_key(key, lsn), offset | will_init);
        self.last = Some((key, lsn));
        Ok(())
    }

    /// Bytes written so far.
    pub fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    /// Finishes the layer with key range `key_start..key_end` and moves it to its final name.
    /// Panics if `key_end` does not lie above every key put.
    pub fn finish(self, key_end: Key) -> Result<PersistentLayerDesc, LayerError> {
        if let Some((last_key, _)) = self.last {
            assert!(key_end > last_key, "key_end {key_end} is not above the last key {last_key}");
        }
        self.inner.finish(key_end, self.lsn_range)
    }
}

/// One version read from a delta layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaEntry {
    pub key: Key,
    pub lsn: Lsn,
    pub value: Value,
}

/// An open delta layer file.
pub struct DeltaLayer {
    file: LayerFile,
}

impl DeltaLayer {
    /// Opens and validates a delta layer file.
    pub fn open(path: &Path, cache: &Arc<BlockCache>) -> Result<DeltaLayer, LayerError> {
        DeltaLayer::from_file(LayerFile::open(path, cache)?)
    }

    pub(crate) fn from_file(file: LayerFile) -> Result<DeltaLayer, LayerError> {
        if file.kind() != LayerKind::Delta {
            return Err(file.corrupt(format!("expected a delta layer, the summary says {}", file.kind())));
        }
        Ok(DeltaLayer { file })
    }

    pub fn desc(&self) -> &PersistentLayerDesc {
        self.file.desc()
    }

    /// When a value was last read from this layer (Unix seconds).
    pub fn last_access_secs(&self) -> u64 {
        self.file.last_access_secs()
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The decoded summary block.
    pub fn summary(&self) -> &super::summary::Summary {
        self.file.summary()
    }

    /// Versions of `key` with LSN in `lsn_range` (clamped to the layer's), newest first, ending at
    /// (and including) the first one that will-init.
    pub fn get_value_reconstruct_data(&self, key: Key, lsn_range: Range<Lsn>) -> Result<Vec<(Lsn, Value)>, LayerError> {
        let desc = self.file.desc();
        let lsn_start = lsn_range.start.max(desc.lsn_range.start);
        let lsn_end = lsn_range.end.min(desc.lsn_range.end);
        let mut out = Vec::new();
        if !desc.key_range.contains(&key) || lsn_start >= lsn_end {
            return Ok(out);
        }
        let index = BTreeReader::new(&self.file);
        let Some(mut cursor) = index.seek_le(&index_key(key, Lsn(lsn_end.0 - 1)))? else { return Ok(out) };
        loop {
            let (k, lsn) = split_index_key(cursor.key());
            if k != key || lsn < lsn_start {
                break;
            }
            let value = self.read_value(&cursor, k, lsn)?;
            let will_init = value.will_init();
            out.push((lsn, value));
            if will_init || !index.prev(&mut cursor)? {
                break;
            }
        }
        Ok(out)
    }

    /// Reads and decodes the value an index entry points at, checking the will-init bit.
    fn read_value(&self, cursor: &Cursor, key: Key, lsn: Lsn) -> Result<Value, LayerError> {
        let desc = self.file.desc();
        if !desc.key_range.contains(&key) || !desc.lsn_range.contains(&lsn) {
            return Err(self.file.corrupt(format!(
                "index leaf {}: entry for key {key} at LSN {lsn} lies outside the layer's range",
                cursor.leaf_block()
            )));
        }
        let raw = cursor.value();
        let offset = raw & !WILL_INIT_BIT;
        let bytes = self.file.read_blob(offset)?;
        let value = Value::decode(&bytes).map_err(|e| {
            self.file.corrupt(format!("value of key {key} at LSN {lsn} (blob offset {offset}) does not decode: {e}"))
        })?;
        if value.will_init() != (raw & WILL_INIT_BIT != 0) {
            return Err(self.file.corrupt(format!(
                "index leaf {}: will-init bit of key {key} at LSN {lsn} disagrees with its value",
                cursor.leaf_block()
            )));
        }
        Ok(value)
    }

    /// Every version with a key in `key_range`, in (key, LSN) order: the input of compaction.
    pub fn iter(&self, key_range: KeyRange) -> DeltaIter<'_> {
        DeltaIter { layer: self, index: BTreeReader::new(&self.file), state: IterState::Start(key_range) }
    }

    /// Like [`DeltaLayer::iter`] without reading values: (key, LSN, will-init).
    pub fn iter_keys(&self, key_range: KeyRange) -> impl Iterator<Item = Result<(Key, Lsn, bool), LayerError>> + '_ {
        let mut iter = self.iter(key_range);
        std::iter::from_fn(move || iter.advance().map(|r| r.map(|(c, k, l)| (k, l, c.value() & WILL_INIT_BIT != 0))))
    }
}

enum IterState {
    Start(KeyRange),
    At(Cursor, Key),
    Done,
}

/// Iterator over a key range of a delta layer; stops after the first error.
pub struct DeltaIter<'a> {
    layer: &'a DeltaLayer,
    index: BTreeReader<'a>,
    state: IterState,
}

impl DeltaIter<'_> {
    /// Moves to the next entry in range: (cursor, key, lsn).
    fn advance(&mut self) -> Option<Result<(Cursor, Key, Lsn), LayerError>> {
        let step = match std::mem::replace(&mut self.state, IterState::Done) {
            IterState::Done => return None,
            IterState::Start(range) => {
                if range.is_empty() {
                    return None;
                }
                self.index.seek_ge(&index_key(range.start, Lsn(0))).map(|c| c.map(|c| (c, range.end)))
            }
            IterState::At(mut cursor, end) => self.index.next(&mut cursor).map(|more| more.then_some((cursor, end))),
        };
        match step {
            Err(e) => Some(Err(e)),
            Ok(None) => None,
            Ok(Some((cursor, end))) => {
                let (key, lsn) = split_index_key(cursor.key());
                if key >= end {
                    return None;
                }
                self.state = IterState::At(cursor.clone(), end);
                Some(Ok((cursor, key, lsn)))
            }
        }
    }
}

impl Iterator for DeltaIter<'_> {
    type Item = Result<DeltaEntry, LayerError>;

    fn next(&mut self) -> Option<Self::Item> {
        let (cursor, key, lsn) = match self.advance()? {
            Ok(v) => v,
            Err(e) => return Some(Err(e)),
        };
        match self.layer.read_value(&cursor, key, lsn) {
            Ok(value) => Some(Ok(DeltaEntry { key, lsn, value })),
            Err(e) => {
                self.state = IterState::Done;
                Some(Err(e))
            }
        }
    }
}
