//! The layers of one timeline and the question every read asks of them: "which layer holds the
//! newest version of this key below this LSN, and down to which LSN is that layer the authority?"
//!
//! Layers: an open in-memory layer (newest), frozen in-memory layers waiting to be flushed, and
//! historic (on-disk) delta and image layers. In-memory layers cover every key, and all historic
//! layers lie below them in LSN (asserted on insert), so they are consulted first by LSN alone.
//!
//! Historic layers are kept in a vector and searched by a full scan: O(layers) per search step, and
//! a read takes one step per layer it visits. A timeline holds at most a few hundred layers in
//! practice, so this is microseconds; it is also obviously correct, which is what the rest of the
//! storage engine is tested against. The faster structure (Neon's: per LSN, a persistent map from
//! key range to the layer covering it, giving O(log n) searches) would replace
//! [`LayerMap::search_historic`] and [`LayerMap::image_coverage`] behind the same signatures.

use std::collections::VecDeque;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use utils::Lsn;

use crate::inmemory_layer::InMemoryLayer;
use crate::key::{Key, KeyRange};
use crate::layer::{LayerError, LayerName, PersistentLayer};
use crate::value::Value;

/// A layer a read can visit.
#[derive(Clone)]
pub enum LayerRef {
    InMemory(Arc<InMemoryLayer>),
    Persistent(Arc<PersistentLayer>),
}

impl LayerRef {
    /// Versions of `key` with LSN in `lsn_range`, newest first, ending at (and including) the
    /// first image or will-init record.
    pub fn get_value_reconstruct_data(&self, key: Key, lsn_range: Range<Lsn>) -> Result<Vec<(Lsn, Value)>, LayerError> {
        match self {
            LayerRef::InMemory(l) => Ok(l.get_value_reconstruct_data(key, lsn_range)),
            LayerRef::Persistent(l) => l.get_value_reconstruct_data(key, lsn_range),
        }
    }

    pub fn lsn_range(&self) -> Range<Lsn> {
        match self {
            LayerRef::InMemory(l) => l.lsn_range(),
            LayerRef::Persistent(l) => l.desc().lsn_range.clone(),
        }
    }
}

impl fmt::Debug for LayerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayerRef::InMemory(l) => write!(f, "{l:?}"),
            LayerRef::Persistent(l) => write!(f, "{l:?}"),
        }
    }
}

/// Answer of [`LayerMap::search`]: read `layer` for LSNs in `lsn_floor..end_lsn`; anything
/// older is found by searching again below `lsn_floor`.
#[derive(Debug, Clone)]
pub struct SearchResult {
    pub layer: LayerRef,
    pub lsn_floor: Lsn,
}

/// The layers of one timeline.
#[derive(Default)]
pub struct LayerMap {
    open_layer: Option<Arc<InMemoryLayer>>,
    /// Oldest first; contiguous in LSN and below the open layer.
    frozen_layers: VecDeque<Arc<InMemoryLayer>>,
    historic: Vec<Arc<PersistentLayer>>,
}

impl LayerMap {
    pub fn new() -> LayerMap {
        LayerMap::default()
    }

    pub fn open_layer(&self) -> Option<&Arc<InMemoryLayer>> {
        self.open_layer.as_ref()
    }

    /// Installs a new open layer. Panics if one is open or it would start below the newest data.
    pub fn set_open_layer(&mut self, layer: Arc<InMemoryLayer>) {
        assert!(self.open_layer.is_none(), "a timeline has at most one open in-memory layer");
        assert!(!layer.is_frozen(), "the open layer cannot be frozen");
        if let Some(newest) = self.frozen_layers.back() {
            assert_eq!(layer.start_lsn(), newest.lsn_range().end, "open layer must start where the frozen ones end");
        }
        let historic_end = self.historic.iter().map(|l| l.desc().lsn_range.end).max();
        if let Some(end) = historic_end {
            assert!(layer.start_lsn() >= end, "open layer at {} below historic data up to {end}", layer.start_lsn());
        }
        self.open_layer = Some(layer);
    }

    /// Freezes the open layer at `end_lsn` and queues it for flushing. No-op without an open layer.
    pub fn freeze_open_layer(&mut self, end_lsn: Lsn) {
        if let Some(open) = self.open_layer.take() {
            open.freeze(end_lsn);
            self.frozen_layers.push_back(open);
        }
    }

    /// Frozen layers, oldest first (the flush order).
    pub fn frozen_layers(&self) -> impl Iterator<Item = &Arc<InMemoryLayer>> {
        self.frozen_layers.iter()
    }

    /// Replaces the oldest frozen layer with the file it was written to, in one step so no read
    /// sees neither. Panics if `flushed` is not the oldest frozen layer or `written` does not
    /// cover its LSN range.
    pub fn finish_flush(&mut self, flushed: &Arc<InMemoryLayer>, written: Arc<PersistentLayer>) {
        let oldest = self.frozen_layers.front().expect("finish_flush without a frozen layer");
        assert!(Arc::ptr_eq(oldest, flushed), "layers must be flushed oldest first");
        assert_eq!(written.desc().lsn_range, flushed.lsn_range(), "flushed file covers other LSNs than its layer");
        self.frozen_layers.pop_front();
        self.insert_historic(written);
    }

    /// Adds an on-disk layer. Panics if a layer of the same name is present or the layer reaches
    /// into the LSNs of the in-memory layers.
    pub fn insert_historic(&mut self, layer: Arc<PersistentLayer>) {
        let name = layer.desc().layer_name();
        assert!(!self.historic.iter().any(|l| l.desc().layer_name() == name), "layer {name} is already in the map");
        let in_memory_start = self.frozen_layers.front().or(self.open_layer.as_ref()).map(|l| l.start_lsn());
        if let Some(start) = in_memory_start {
            assert!(
                layer.desc().lsn_range.end <= start,
                "layer {name} overlaps the in-memory layers starting at {start}"
            );
        }
        self.historic.push(layer);
    }

    /// Removes an on-disk layer (after compaction replaced it, or GC), returning it.
    pub fn remove_historic(&mut self, name: &LayerName) -> Option<Arc<PersistentLayer>> {
        let pos = self.historic.iter().position(|l| l.desc().layer_name() == *name)?;
        Some(self.historic.swap_remove(pos))
    }

    pub fn historic_layers(&self) -> impl Iterator<Item = &Arc<PersistentLayer>> {
        self.historic.iter()
    }

    /// L0 deltas (full key range, straight from in-memory layers), oldest first: compaction's input.
    pub fn l0_deltas(&self) -> Vec<Arc<PersistentLayer>> {
        let mut out: Vec<_> = self.historic.iter().filter(|l| l.desc().is_l0()).cloned().collect();
        out.sort_by_key(|l| l.desc().lsn_range.start);
        out
    }

    /// L1 deltas: key-partitioned, produced by compaction.
    pub fn l1_deltas(&self) -> Vec<Arc<PersistentLayer>> {
        self.historic.iter().filter(|l| l.desc().is_delta() && !l.desc().is_l0()).cloned().collect()
    }

    /// The layer holding the newest version of `key` below `end_lsn` (exclusive), and the LSN down
    /// to which that layer answers. `None`: this timeline has nothing for `key` below `end_lsn`.
    pub fn search(&self, key: Key, end_lsn: Lsn) -> Option<SearchResult> {
        let in_memory = self.open_layer.iter().chain(self.frozen_layers.iter().rev());
        for layer in in_memory {
            if layer.start_lsn() < end_lsn {
                return Some(SearchResult {
                    layer: LayerRef::InMemory(Arc::clone(layer)),
                    lsn_floor: layer.start_lsn(),
                });
            }
        }
        self.search_historic(key, end_lsn)
    }

    /// The historic part of [`LayerMap::search`].
    ///
    /// A delta layer is the authority for every (key, LSN) in its rectangle. Among the deltas
    /// holding `key` and starting below `end_lsn`, `top` is the highest LSN any of them reaches
    /// (capped at `end_lsn`); the answer is a delta covering `top - 1`, read down to its start, or
    /// the newest image below `end_lsn` if that image is at least as new as `top - 1` (an image at
    /// `L` includes every change at or below `L`). When an image lies inside the chosen delta's
    /// range, the delta is read only down to just above the image, and the next search finds it.
    pub fn search_historic(&self, key: Key, end_lsn: Lsn) -> Option<SearchResult> {
        let deltas = || {
            self.historic.iter().filter(move |l| {
                let d = l.desc();
                d.is_delta() && d.key_range.contains(&key) && d.lsn_range.start < end_lsn
            })
        };
        let top = deltas().map(|l| l.desc().lsn_range.end.min(end_lsn)).max();
        let delta = top.and_then(|top| {
            deltas()
                .filter(|l| l.desc().lsn_range.end >= top)
                .min_by_key(|l| (l.desc().lsn_range.start, l.desc().lsn_range.end))
                .map(|d| (d, top))
        });
        let image = self
            .historic
            .iter()
            .filter(|l| {
                let d = l.desc();
                !d.is_delta() && d.key_range.contains(&key) && d.lsn_range.start < end_lsn
            })
            .max_by_key(|l| l.desc().lsn_range.start);

        let result = match (delta, image) {
            (None, None) => return None,
            (None, Some(img)) => SearchResult { layer: LayerRef::Persistent(Arc::clone(img)), lsn_floor: img_lsn(img) },
            (Some((d, _)), None) => {
                SearchResult { layer: LayerRef::Persistent(Arc::clone(d)), lsn_floor: d.desc().lsn_range.start }
            }
            (Some((d, top)), Some(img)) => {
                if img_lsn(img).0 >= top.0 - 1 {
                    SearchResult { layer: LayerRef::Persistent(Arc::clone(img)), lsn_floor: img_lsn(img) }
                } else {
                    let floor = d.desc().lsn_range.start.max(Lsn(img_lsn(img).0 + 1));
                    SearchResult { layer: LayerRef::Persistent(Arc::clone(d)), lsn_floor: floor }
                }
            }
        };
        assert!(result.lsn_floor < end_lsn, "search must make progress: floor {} end {end_lsn}", result.lsn_floor);
        Some(result)
    }

    /// For each part of `key_range`, the newest image layer at or below `max_lsn` covering it
    /// (`None` where there is none), in key order, adjacent parts with the same answer merged.
    /// GC asks this to learn whether newer images make older layers unnecessary.
    pub fn image_coverage(&self, key_range: KeyRange, max_lsn: Lsn) -> Vec<(KeyRange, Option<Arc<PersistentLayer>>)> {
        let images: Vec<&Arc<PersistentLayer>> = self
            .historic
            .iter()
            .filter(|l| !l.desc().is_delta() && img_lsn(l) <= max_lsn && l.desc().key_range.overlaps(&key_range))
            .collect();
        let mut bounds = vec![key_range.start, key_range.end];
        for img in &images {
            let r = img.desc().key_range.intersect(&key_range);
            bounds.extend([r.start, r.end]);
        }
        bounds.sort();
        bounds.dedup();
        let mut out: Vec<(KeyRange, Option<Arc<PersistentLayer>>)> = Vec::new();
        for w in bounds.windows(2) {
            let part = KeyRange::new(w[0], w[1]);
            let best = images.iter().filter(|l| l.desc().key_range.contains_range(&part)).max_by_key(|l| img_lsn(l));
            let best = best.map(|l| Arc::clone(l));
            match out.last_mut() {
                Some((prev, prev_best)) if same_layer(prev_best, &best) => prev.end = part.end,
                _ => out.push((part, best)),
            }
        }
        out
    }

    /// True if every key of `key_range` has an image layer with LSN in `lsn_range`.
    pub fn is_covered_by_images(&self, key_range: KeyRange, lsn_range: Range<Lsn>) -> bool {
        if lsn_range.start >= lsn_range.end {
            return key_range.is_empty();
        }
        self.image_coverage(key_range, Lsn(lsn_range.end.0 - 1))
            .iter()
            .all(|(_, img)| img.as_ref().is_some_and(|img| img_lsn(img) >= lsn_range.start))
    }
}

fn img_lsn(layer: &PersistentLayer) -> Lsn {
    layer.desc().lsn_range.start
}

fn same_layer(a: &Option<Arc<PersistentLayer>>, b: &Option<Arc<PersistentLayer>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::BlockCache;
    use crate::test_utils::{delta_layer, image_layer, key, TENANT, TIMELINE};
    use bytes::Bytes;

    fn found(r: Option<SearchResult>) -> Option<(String, u64)> {
        r.map(|r| {
            let name = match &r.layer {
                LayerRef::InMemory(l) => format!("mem@{}", l.start_lsn().0),
                LayerRef::Persistent(l) => {
                    let d = l.desc();
                    format!("{}{}-{}", if d.is_delta() { "d" } else { "i" }, d.lsn_range.start.0, d.lsn_range.end.0)
                }
            };
            (name, r.lsn_floor.0)
        })
    }

    fn hit(name: &str, floor: u64) -> Option<(String, u64)> {
        Some((name.to_string(), floor))
    }

    #[test]
    fn layers_are_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<LayerMap>();
        assert_send_sync::<LayerRef>();
        assert_send_sync::<PersistentLayer>();
        assert_send_sync::<InMemoryLayer>();
    }

    #[test]
    fn search_rules() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Arc::new(BlockCache::new(64));
        let mut map = LayerMap::new();
        assert!(map.search(key(5), Lsn(1000)).is_none());

        let full = KeyRange::full();
        let low = KeyRange::new(key(0), key(10));
        map.insert_historic(delta_layer(dir.path(), &cache, &[], full, Lsn(100)..Lsn(300)));
        map.insert_historic(delta_layer(dir.path(), &cache, &[], full, Lsn(300)..Lsn(400)));
        assert_eq!(found(map.search(key(5), Lsn(350))), hit("d300-400", 300));
        assert_eq!(found(map.search(key(5), Lsn(1000))), hit("d300-400", 300));
        assert_eq!(found(map.search(key(5), Lsn(300))), hit("d100-300", 100));
        assert_eq!(found(map.search(key(5), Lsn(100))), None);

        // A delta nested inside another's LSN range must not hide the outer one's newer part.
        map.insert_historic(delta_layer(dir.path(), &cache, &[], low, Lsn(150)..Lsn(250)));
        assert_eq!(found(map.search(key(5), Lsn(300))), hit("d100-300", 100));
        assert_eq!(found(map.search(key(5), Lsn(200))), hit("d100-300", 100));

        // An image inside a delta's range: read the delta down to just above it, then the image.
        map.insert_historic(image_layer(dir.path(), &cache, &[], low, Lsn(200)));
        assert_eq!(found(map.search(key(5), Lsn(300))), hit("d100-300", 201));
        assert_eq!(found(map.search(key(5), Lsn(201))), hit("i200-201", 200));
        assert_eq!(found(map.search(key(20), Lsn(201))), hit("d100-300", 100));
        assert_eq!(found(map.search(key(5), Lsn(200))), hit("d100-300", 100));

        // An image at the top of the newest delta wins over it.
        map.insert_historic(image_layer(dir.path(), &cache, &[], low, Lsn(399)));
        assert_eq!(found(map.search(key(5), Lsn(1000))), hit("i399-400", 399));
        assert_eq!(found(map.search(key(5), Lsn(399))), hit("d300-400", 300));
        assert_eq!(found(map.search(key(20), Lsn(1000))), hit("d300-400", 300));

        // In-memory layers come first, by LSN.
        map.set_open_layer(Arc::new(InMemoryLayer::new(TENANT, TIMELINE, Lsn(400))));
        assert_eq!(found(map.search(key(5), Lsn(1000))), hit("mem@400", 400));
        assert_eq!(found(map.search(key(5), Lsn(400))), hit("i399-400", 399));
        map.freeze_open_layer(Lsn(500));
        map.set_open_layer(Arc::new(InMemoryLayer::new(TENANT, TIMELINE, Lsn(500))));
        assert_eq!(found(map.search(key(5), Lsn(1000))), hit("mem@500", 500));
        assert_eq!(found(map.search(key(5), Lsn(500))), hit("mem@400", 400));

        assert_eq!(map.l0_deltas().len(), 2);
        assert_eq!(map.l1_deltas().len(), 1);
        let name = LayerName::Image { key_range: low, lsn: Lsn(399) };
        assert!(map.remove_historic(&name).is_some());
        assert!(map.remove_historic(&name).is_none());
        assert_eq!(found(map.search(key(5), Lsn(500))), hit("mem@400", 400));
        assert_eq!(found(map.search(key(5), Lsn(400))), hit("d300-400", 300));
    }

    #[test]
    fn image_coverage_and_gc_question() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Arc::new(BlockCache::new(64));
        let mut map = LayerMap::new();
        let img = [(key(1), Bytes::from_static(b"x"))];
        map.insert_historic(image_layer(dir.path(), &cache, &img, KeyRange::new(key(0), key(10)), Lsn(200)));
        map.insert_historic(image_layer(dir.path(), &cache, &[], KeyRange::new(key(5), key(20)), Lsn(300)));
        let summary = |cov: Vec<(KeyRange, Option<Arc<PersistentLayer>>)>| {
            cov.into_iter()
                .map(|(r, l)| (r.start.field6, r.end.field6, l.map(|l| l.desc().lsn_range.start.0)))
                .collect::<Vec<_>>()
        };
        let all = KeyRange::new(key(0), key(30));
        assert_eq!(
            summary(map.image_coverage(all, Lsn(1000))),
            [(0, 5, Some(200)), (5, 20, Some(300)), (20, 30, None)]
        );
        assert_eq!(summary(map.image_coverage(all, Lsn(250))), [(0, 10, Some(200)), (10, 30, None)]);
        assert_eq!(summary(map.image_coverage(all, Lsn(100))), [(0, 30, None)]);
        assert!(map.is_covered_by_images(KeyRange::new(key(0), key(20)), Lsn(150)..Lsn(1000)));
        assert!(!map.is_covered_by_images(KeyRange::new(key(0), key(20)), Lsn(250)..Lsn(1000)));
        assert!(map.is_covered_by_images(KeyRange::new(key(5), key(20)), Lsn(250)..Lsn(1000)));
        assert!(!map.is_covered_by_images(KeyRange::new(key(5), key(21)), Lsn(250)..Lsn(1000)));
        assert!(!map.is_covered_by_images(KeyRange::new(key(5), key(20)), Lsn(250)..Lsn(300)));
    }

    #[test]
    fn flush_moves_a_frozen_layer_to_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Arc::new(BlockCache::new(64));
        let mut map = LayerMap::new();
        let open = Arc::new(InMemoryLayer::new(TENANT, TIMELINE, Lsn(100)));
        open.put(key(1), Lsn(150), Value::Image(Bytes::from_static(b"page")));
        map.set_open_layer(Arc::clone(&open));
        map.freeze_open_layer(Lsn(200));
        assert!(map.open_layer().is_none());
        let frozen = Arc::clone(map.frozen_layers().next().expect("frozen"));
        let desc = frozen.write_to_disk(dir.path()).expect("flush");
        map.finish_flush(&frozen, Arc::new(PersistentLayer::open(&desc.path, &cache).expect("open")));
        assert_eq!(map.frozen_layers().count(), 0);
        assert_eq!(map.l0_deltas().len(), 1);
        let r = map.search(key(1), Lsn(1000)).expect("found");
        let got = r.layer.get_value_reconstruct_data(key(1), r.lsn_floor..Lsn(1000)).expect("read");
        assert_eq!(got, [(Lsn(150), Value::Image(Bytes::from_static(b"page")))]);
    }
}
