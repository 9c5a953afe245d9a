//! Helpers shared by the unit tests: small layer files built from literal entries.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use utils::{Lsn, TenantId, TimelineId};

use crate::key::{Key, KeyRange};
use crate::layer::{BlockCache, DeltaLayerWriter, ImageLayerWriter, PersistentLayer};
use crate::value::Value;

pub const TENANT: TenantId = TenantId([0x11; 16]);
pub const TIMELINE: TimelineId = TimelineId([0x22; 16]);

/// A key whose order follows `n`.
pub fn key(n: u32) -> Key {
    Key { field1: 0, field2: 1663, field3: 5, field4: 16384, field5: 0, field6: n }
}

/// Writes and opens a delta layer; `entries` must be sorted by (key, LSN).
pub fn delta_layer(
    dir: &Path,
    cache: &Arc<BlockCache>,
    entries: &[(Key, Lsn, Value)],
    key_range: KeyRange,
    lsn_range: Range<Lsn>,
) -> Arc<PersistentLayer> {
    let mut w = DeltaLayerWriter::new(dir, TENANT, TIMELINE, key_range.start, lsn_range).expect("delta writer");
    for (k, lsn, v) in entries {
        w.put(*k, *lsn, v).expect("put");
    }
    let desc = w.finish(key_range.end).expect("finish delta");
    Arc::new(PersistentLayer::open(&desc.path, cache).expect("open delta"))
}

/// Writes and opens an image layer; `entries` must be sorted by key.
pub fn image_layer(
    dir: &Path,
    cache: &Arc<BlockCache>,
    entries: &[(Key, Bytes)],
    key_range: KeyRange,
    lsn: Lsn,
) -> Arc<PersistentLayer> {
    let mut w = ImageLayerWriter::new(dir, TENANT, TIMELINE, key_range.start, lsn).expect("image writer");
    for (k, img) in entries {
        w.put(*k, img).expect("put");
    }
    let desc = w.finish(key_range.end).expect("finish image");
    Arc::new(PersistentLayer::open(&desc.path, cache).expect("open image"))
}
