//! Image layers: the value of every key in a key range as of one LSN. A read that reaches an
//! image layer stops there, so images bound how far down a read has to walk; GC can drop what
//! lies under them.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use utils::{Lsn, TenantId, TimelineId};

use super::block_cache::BlockCache;
use super::btree::{BTreeReader, Cursor};
use super::file::LayerFile;
use super::writer::LayerFileWriter;
use super::{LayerError, LayerKind, PersistentLayerDesc};
use crate::key::{Key, KeyRange, KEY_SIZE_BYTES};
use crate::value::Value;

fn cursor_key(cursor: &Cursor) -> Key {
    let b: &[u8; KEY_SIZE_BYTES] = cursor.key().try_into().expect("image index keys are 18 bytes (checked on load)");
    Key::from_be_bytes(b)
}

/// Writes an image layer from images given in key order.
pub struct ImageLayerWriter {
    inner: LayerFileWriter,
    lsn: Lsn,
    last: Option<Key>,
}

impl ImageLayerWriter {
    /// Starts an image layer in `dir` holding keys from `key_start` as of `lsn`.
    pub fn new(
        dir: &Path,
        tenant_id: TenantId,
        timeline_id: TimelineId,
        key_start: Key,
        lsn: Lsn,
    ) -> Result<ImageLayerWriter, LayerError> {
        assert!(lsn < Lsn::MAX, "image LSN {lsn} leaves no room for the exclusive end of its range");
        let inner = LayerFileWriter::new(dir, LayerKind::Image, tenant_id, timeline_id, key_start)?;
        Ok(ImageLayerWriter { inner, lsn, last: None })
    }

    /// zstd level for large values, or `None` to store everything raw.
    pub fn set_compression(&mut self, zstd_level: Option<i32>) {
        self.inner.set_compression(zstd_level);
    }

    /// Adds the image of `key`. Panics unless keys come strictly increasing, from `key_start`.
    pub fn put(&mut self, key: Key, image: &[u8]) -> Result<(), LayerError> {
        assert!(key >= self.inner.key_start() && key < Key::MAX, "key {key} outside the layer's key range");
        if let Some(last) = self.last {
            assert!(key > last, "image layer keys out of order: {key} after {last}");
        }
        let offset = self.inner.write_blob(image)?;
        self.inner.index.append(&key.to_be_bytes(), offset);
        self.last = Some(key);
        Ok(())
    }

    /// Bytes written so far.
    pub fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    /// Finishes the layer with key range `key_start..key_end`. Panics if `key_end` is not above
    /// every key put.
    pub fn finish(self, key_end: Key) -> Result<PersistentLayerDesc, LayerError> {
        if let Some(last) = self.last {
            assert!(key_end > last, "key_end {key_end} is not above the last key {last}");
        }
        self.inner.finish(key_end, self.lsn..Lsn(self.lsn.0 + 1))
    }
}

/// An open image layer file.
pub struct ImageLayer {
    file: LayerFile,
}

impl ImageLayer {
    /// Opens and validates an image layer file.
    pub fn open(path: &Path, cache: &Arc<BlockCache>) -> Result<ImageLayer, LayerError> {
        ImageLayer::from_file(LayerFile::open(path, cache)?)
    }

    pub(crate) fn from_file(file: LayerFile) -> Result<ImageLayer, LayerError> {
        if file.kind() != LayerKind::Image {
            return Err(file.corrupt(format!("expected an image layer, the summary says {}", file.kind())));
        }
        Ok(ImageLayer { file })
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

    /// The LSN the images are at.
    pub fn lsn(&self) -> Lsn {
        self.file.desc().lsn_range.start
    }

    /// The image of `key`, if the layer has one.
    pub fn get(&self, key: Key) -> Result<Option<Bytes>, LayerError> {
        if !self.desc().key_range.contains(&key) {
            return Ok(None);
        }
        let index = BTreeReader::new(&self.file);
        match index.seek_ge(&key.to_be_bytes())? {
            Some(cursor) if cursor_key(&cursor) == key => Ok(Some(self.file.read_blob(cursor.value())?)),
            _ => Ok(None),
        }
    }

    /// `[(lsn, image)]` if the layer's LSN is in `lsn_range` and it holds `key`, else empty: the
    /// same contract as a delta layer's lookup.
    pub fn get_value_reconstruct_data(&self, key: Key, lsn_range: Range<Lsn>) -> Result<Vec<(Lsn, Value)>, LayerError> {
        if !lsn_range.contains(&self.lsn()) {
            return Ok(Vec::new());
        }
        Ok(self.get(key)?.map(|img| vec![(self.lsn(), Value::Image(img))]).unwrap_or_default())
    }

    /// Every (key, image) with a key in `key_range`, in key order; stops after the first error.
    pub fn iter(&self, key_range: KeyRange) -> impl Iterator<Item = Result<(Key, Bytes), LayerError>> + '_ {
        let mut keys = self.iter_cursors(key_range);
        std::iter::from_fn(move || {
            let (cursor, key) = match keys.next()? {
                Ok(v) => v,
                Err(e) => return Some(Err(e)),
            };
            Some(self.file.read_blob(cursor.value()).map(|img| (key, img)))
        })
        .scan(false, |failed, item| {
            if *failed {
                return None;
            }
            *failed = item.is_err();
            Some(item)
        })
    }

    /// The keys in `key_range` that have an image, in order.
    pub fn iter_keys(&self, key_range: KeyRange) -> impl Iterator<Item = Result<Key, LayerError>> + '_ {
        self.iter_cursors(key_range).map(|r| r.map(|(_, key)| key))
    }

    fn iter_cursors(&self, key_range: KeyRange) -> impl Iterator<Item = Result<(Cursor, Key), LayerError>> + '_ {
        let index = BTreeReader::new(&self.file);
        let mut state: Option<Option<Cursor>> = None; // None = not started; Some(None) = done
        std::iter::from_fn(move || {
            let step = match state.take() {
                Some(None) => return None,
                None if key_range.is_empty() => Ok(None),
                None => index.seek_ge(&key_range.start.to_be_bytes()),
                Some(Some(mut cursor)) => index.next(&mut cursor).map(|more| more.then_some(cursor)),
            };
            state = Some(None);
            match step {
                Err(e) => Some(Err(e)),
                Ok(None) => None,
                Ok(Some(cursor)) => {
                    let key = cursor_key(&cursor);
                    if key >= key_range.end {
                        return None;
                    }
                    state = Some(Some(cursor.clone()));
                    Some(Ok((cursor, key)))
                }
            }
        })
    }
}
