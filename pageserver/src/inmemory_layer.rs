//! The open layer: where ingest puts new versions, keyed (key, LSN), until it is large or old
//! enough to be frozen and written out as an L0 delta layer (DESIGN D6). Reads see it like any
//! other layer, so a page written a moment ago is served without waiting for a flush.
//!
//! Backed by memory (a `BTreeMap` from key to its versions). That bounds a timeline's unflushed
//! data by `checkpoint_distance`, which the caller enforces using [`InMemoryLayer::size_bytes`];
//! an ephemeral file with an in-memory index (as Neon does) is the upgrade if memory gets tight.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use utils::{Lsn, TenantId, TimelineId};

use crate::key::{Key, KEY_SIZE_BYTES};
use crate::layer::{DeltaLayerWriter, LayerError, PersistentLayerDesc};
use crate::value::Value;

/// Bookkeeping bytes charged per version on top of its encoded size (key, LSN, vector slot).
const VERSION_OVERHEAD_BYTES: u64 = (KEY_SIZE_BYTES + 8 + 16) as u64;

/// The open (or frozen, not yet flushed) layer of a timeline.
pub struct InMemoryLayer {
    tenant_id: TenantId,
    timeline_id: TimelineId,
    start_lsn: Lsn,
    inner: RwLock<Inner>,
}

struct Inner {
    /// Versions of each key, LSN strictly increasing.
    versions: BTreeMap<Key, Vec<(Lsn, Value)>>,
    size_bytes: u64,
    value_count: u64,
    /// Set by [`InMemoryLayer::freeze`]; exclusive.
    end_lsn: Option<Lsn>,
}

impl InMemoryLayer {
    /// An empty layer for versions at `start_lsn` and later.
    pub fn new(tenant_id: TenantId, timeline_id: TimelineId, start_lsn: Lsn) -> InMemoryLayer {
        InMemoryLayer {
            tenant_id,
            timeline_id,
            start_lsn,
            inner: RwLock::new(Inner { versions: BTreeMap::new(), size_bytes: 0, value_count: 0, end_lsn: None }),
        }
    }

    pub fn start_lsn(&self) -> Lsn {
        self.start_lsn
    }

    /// The LSN range the layer covers: up to `end_lsn` once frozen, unbounded while open.
    pub fn lsn_range(&self) -> Range<Lsn> {
        self.start_lsn..self.read().end_lsn.unwrap_or(Lsn::MAX)
    }

    pub fn is_frozen(&self) -> bool {
        self.read().end_lsn.is_some()
    }

    /// Approximate memory held: encoded value sizes plus a per-version overhead.
    pub fn size_bytes(&self) -> u64 {
        self.read().size_bytes
    }

    pub fn value_count(&self) -> u64 {
        self.read().value_count
    }

    pub fn is_empty(&self) -> bool {
        self.read().value_count == 0
    }

    /// Adds a version. Panics if the layer is frozen, `lsn` is below the layer's start, `key` is
    /// [`Key::MAX`], or `lsn` is not above the key's latest version: ingest applies WAL in LSN
    /// order, one value per key per record, so any of these is a bug upstream.
    pub fn put(&self, key: Key, lsn: Lsn, value: Value) {
        assert!(lsn >= self.start_lsn, "LSN {lsn} is below the in-memory layer's start {}", self.start_lsn);
        assert!(key < Key::MAX, "Key::MAX is reserved and cannot be stored");
        let mut inner = self.write();
        assert!(inner.end_lsn.is_none(), "put into a frozen in-memory layer");
        let size_bytes = value.encoded_size_bytes() as u64 + VERSION_OVERHEAD_BYTES;
        let versions = inner.versions.entry(key).or_default();
        if let Some((last_lsn, _)) = versions.last() {
            assert!(lsn > *last_lsn, "key {key}: version at {lsn} is not above the previous one at {last_lsn}");
        }
        versions.push((lsn, value));
        inner.size_bytes += size_bytes;
        inner.value_count += 1;
    }

    /// Closes the layer at `end_lsn` (exclusive): no more puts; it can now be written out.
    /// Panics if already frozen or if a version lies at or above `end_lsn`.
    pub fn freeze(&self, end_lsn: Lsn) {
        let mut inner = self.write();
        assert!(inner.end_lsn.is_none(), "in-memory layer frozen twice");
        assert!(end_lsn > self.start_lsn, "freezing at {end_lsn} would leave the layer an empty LSN range");
        let max_lsn = inner.versions.values().filter_map(|v| v.last()).map(|(lsn, _)| *lsn).max();
        if let Some(max_lsn) = max_lsn {
            assert!(max_lsn < end_lsn, "freezing at {end_lsn} below the layer's newest version at {max_lsn}");
        }
        inner.end_lsn = Some(end_lsn);
    }

    /// Versions of `key` with LSN in `lsn_range`, newest first, ending at (and including) the first
    /// image or will-init record. Same contract as the layer files' lookup.
    pub fn get_value_reconstruct_data(&self, key: Key, lsn_range: Range<Lsn>) -> Vec<(Lsn, Value)> {
        let inner = self.read();
        let mut out = Vec::new();
        let Some(versions) = inner.versions.get(&key) else { return out };
        let end = versions.partition_point(|(lsn, _)| *lsn < lsn_range.end);
        for (lsn, value) in versions[..end].iter().rev() {
            if *lsn < lsn_range.start {
                break;
            }
            out.push((*lsn, value.clone()));
            if value.will_init() {
                break;
            }
        }
        out
    }

    /// Writes the frozen layer to `dir` as an L0 delta: all keys (`Key::MIN..Key::MAX`, since the
    /// layer saw every change in its LSN range), LSNs `start_lsn..end_lsn`. Panics unless frozen.
    pub fn write_to_disk(&self, dir: &Path) -> Result<PersistentLayerDesc, LayerError> {
        let inner = self.read();
        let end_lsn = inner.end_lsn.expect("only a frozen in-memory layer can be written to disk");
        let mut writer =
            DeltaLayerWriter::new(dir, self.tenant_id, self.timeline_id, Key::MIN, self.start_lsn..end_lsn)?;
        for (key, versions) in &inner.versions {
            for (lsn, value) in versions {
                writer.put(*key, *lsn, value)?;
            }
        }
        writer.finish(Key::MAX)
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        // Every mutation is a single push/insert after its asserts, so a panicking writer leaves
        // consistent data behind: a poisoned lock is still safe to read.
        self.inner.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl fmt::Debug for InMemoryLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let range = self.lsn_range();
        write!(f, "inmem-{:016X}-{:016X}", range.start.0, range.end.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{BlockCache, DeltaLayer};
    use crate::value::WalRecord;
    use bytes::Bytes;
    use std::sync::Arc;

    fn rec(will_init: bool, tag: u8) -> Value {
        Value::WalRecord(WalRecord::Postgres { will_init, rec: Bytes::from(vec![tag; 3]) })
    }

    #[test]
    fn lookup_and_flush() {
        let layer = InMemoryLayer::new(TenantId([1; 16]), TimelineId([2; 16]), Lsn(100));
        let k = Key { field6: 7, ..Key::MIN };
        layer.put(k, Lsn(100), Value::Image(Bytes::from_static(b"img")));
        layer.put(k, Lsn(110), rec(false, 1));
        layer.put(k, Lsn(120), rec(true, 2));
        layer.put(k, Lsn(130), rec(false, 3));
        layer.put(k.next(), Lsn(105), rec(false, 4));
        assert_eq!(layer.value_count(), 5);
        assert!(layer.size_bytes() > 0);
        let lsns = |v: Vec<(Lsn, Value)>| v.into_iter().map(|(l, _)| l.0).collect::<Vec<_>>();
        assert_eq!(lsns(layer.get_value_reconstruct_data(k, Lsn(0)..Lsn::MAX)), [130, 120]);
        assert_eq!(lsns(layer.get_value_reconstruct_data(k, Lsn(0)..Lsn(120))), [110, 100]);
        assert_eq!(lsns(layer.get_value_reconstruct_data(k, Lsn(105)..Lsn(120))), [110]);
        assert!(layer.get_value_reconstruct_data(Key::MIN, Lsn(0)..Lsn::MAX).is_empty());

        layer.freeze(Lsn(131));
        assert_eq!(layer.lsn_range(), Lsn(100)..Lsn(131));
        let dir = tempfile::tempdir().expect("tempdir");
        let desc = layer.write_to_disk(dir.path()).expect("flush");
        assert!(desc.is_l0());
        assert_eq!(desc.value_count, 5);
        let delta = DeltaLayer::open(&desc.path, &Arc::new(BlockCache::new(16))).expect("open");
        for range in [Lsn(0)..Lsn(200), Lsn(0)..Lsn(120), Lsn(105)..Lsn(120), Lsn(131)..Lsn(200)] {
            assert_eq!(
                delta.get_value_reconstruct_data(k, range.clone()).expect("read"),
                layer.get_value_reconstruct_data(k, range)
            );
        }
    }

    #[test]
    #[should_panic(expected = "not above the previous one")]
    fn out_of_order_put_panics() {
        let layer = InMemoryLayer::new(TenantId([1; 16]), TimelineId([2; 16]), Lsn(100));
        layer.put(Key::MIN, Lsn(110), rec(false, 1));
        layer.put(Key::MIN, Lsn(110), rec(false, 1));
    }
}
