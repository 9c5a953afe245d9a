//! The read path's first half: collect what is needed to build a key's value at an LSN, by
//! walking the timeline's layers from the newest down (in-memory → frozen → historic), taking
//! records until an image or a will-init record is reached (DESIGN D6). The second half, applying
//! the records (WAL redo, DESIGN D5), takes a [`ValueReconstructState`] and comes later.
//!
//! Extension point: branches. When this timeline runs out of layers before the value is complete,
//! the walk reports [`ReconstructOutcome::Incomplete`] with the LSN it stopped at. The caller (the
//! timeline) then continues in its ancestor with [`collect_reconstruct_data`], the same `state`,
//! and `end_lsn = min(cont_lsn, ancestor_lsn + 1)`; a timeline without an ancestor reports the
//! key as missing.

use bytes::Bytes;
use utils::Lsn;

use crate::key::Key;
use crate::layer::LayerError;
use crate::layer_map::LayerMap;
use crate::value::{Value, WalRecord};

/// What has been collected so far for one key.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ValueReconstructState {
    /// Records to apply, newest first (apply them in reverse).
    pub records: Vec<(Lsn, WalRecord)>,
    /// The base image, if the walk ended at one.
    pub img: Option<(Lsn, Bytes)>,
}

impl ValueReconstructState {
    /// True once nothing older is needed: an image, or a will-init record at the bottom.
    pub fn is_complete(&self) -> bool {
        self.img.is_some() || self.records.last().is_some_and(|(_, rec)| rec.will_init())
    }
}

/// How a walk ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReconstructOutcome {
    /// The state holds everything needed.
    Complete,
    /// No layer of this timeline has versions below `cont_lsn` (exclusive): continue in the
    /// ancestor, or report the key missing.
    Incomplete { cont_lsn: Lsn },
}

/// A read failed; says which key and LSN, and (through the layer error) which file.
#[derive(Debug, thiserror::Error)]
#[error("reading key {key} at LSN {lsn}: {source}")]
pub struct ReadError {
    pub key: Key,
    pub lsn: Lsn,
    #[source]
    pub source: LayerError,
}

/// Collects the versions of `key` needed to build its value as of `request_lsn` (inclusive).
pub fn get_page_reconstruct_data(
    layers: &LayerMap,
    key: Key,
    request_lsn: Lsn,
) -> Result<(ValueReconstructState, ReconstructOutcome), ReadError> {
    let mut state = ValueReconstructState::default();
    let end_lsn = Lsn(request_lsn.0.saturating_add(1));
    let outcome = collect_reconstruct_data(layers, key, end_lsn, &mut state)?;
    Ok((state, outcome))
}

/// Walks `layers` for versions of `key` below `end_lsn` (exclusive), appending to `state` (which
/// may already hold newer records, from a child timeline). Each step asks the layer map for the
/// layer holding the newest version below the current LSN, takes that layer's versions down to the
/// floor the map gave, and continues below the floor.
pub fn collect_reconstruct_data(
    layers: &LayerMap,
    key: Key,
    end_lsn: Lsn,
    state: &mut ValueReconstructState,
) -> Result<ReconstructOutcome, ReadError> {
    let mut end_lsn = end_lsn;
    if state.is_complete() {
        return Ok(ReconstructOutcome::Complete);
    }
    while let Some(found) = layers.search(key, end_lsn) {
        // The map guarantees progress; without it this loop would not terminate.
        assert!(found.lsn_floor < end_lsn, "layer map returned floor {} for end {end_lsn}", found.lsn_floor);
        let versions = found
            .layer
            .get_value_reconstruct_data(key, found.lsn_floor..end_lsn)
            .map_err(|source| ReadError { key, lsn: end_lsn, source })?;
        for (lsn, value) in versions {
            debug_assert!(lsn >= found.lsn_floor && lsn < end_lsn);
            debug_assert!(state.records.last().is_none_or(|(newer, _)| *newer > lsn));
            match value {
                Value::Image(img) => state.img = Some((lsn, img)),
                Value::WalRecord(rec) => state.records.push((lsn, rec)),
            }
            if state.is_complete() {
                return Ok(ReconstructOutcome::Complete);
            }
        }
        end_lsn = found.lsn_floor;
    }
    Ok(ReconstructOutcome::Incomplete { cont_lsn: end_lsn })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inmemory_layer::InMemoryLayer;
    use crate::key::KeyRange;
    use crate::layer::{BlockCache, PersistentLayer};
    use crate::test_utils::{delta_layer, image_layer, key, TENANT, TIMELINE};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;
    use std::ops::Range;
    use std::sync::Arc;

    const KEYS: u32 = 50;
    const BOTTOM_LSN: u64 = 100;

    struct ImageModel {
        key_range: KeyRange,
        lsn: Lsn,
        images: BTreeMap<Key, Bytes>,
    }

    fn random_value(rng: &mut StdRng, lsn: Lsn) -> Value {
        let payload = Bytes::from(format!("{lsn}-{}", rng.gen::<u32>()).into_bytes());
        match rng.gen_range(0..20) {
            0 => Value::Image(payload),
            1 | 2 => Value::WalRecord(WalRecord::Postgres { will_init: true, rec: payload }),
            _ => Value::WalRecord(WalRecord::Postgres { will_init: false, rec: payload }),
        }
    }

    /// Adds ~4 random versions per key in `lsns` to `model`; returns them sorted.
    fn versions(
        rng: &mut StdRng,
        model: &mut BTreeMap<(Key, Lsn), Value>,
        keys: Range<u32>,
        lsns: Range<u64>,
    ) -> Vec<(Key, Lsn, Value)> {
        let mut out = BTreeMap::new();
        for k in keys {
            for _ in 0..rng.gen_range(0..8) {
                let lsn = Lsn(rng.gen_range(lsns.clone()));
                out.insert((key(k), lsn), random_value(rng, lsn));
            }
        }
        model.extend(out.iter().map(|(k, v)| (*k, v.clone())));
        out.into_iter().map(|((k, l), v)| (k, l, v)).collect()
    }

    /// An image layer holding every key of `key_range` that has a version at or below `lsn`.
    fn images(rng: &mut StdRng, model: &BTreeMap<(Key, Lsn), Value>, key_range: KeyRange, lsn: Lsn) -> ImageModel {
        let mut images = BTreeMap::new();
        for (k, l) in model.keys() {
            if key_range.contains(k) && *l <= lsn {
                images.insert(*k, Bytes::from(format!("image of {k:?} at {lsn} {}", rng.gen::<u16>()).into_bytes()));
            }
        }
        ImageModel { key_range, lsn, images }
    }

    fn expected(
        model: &BTreeMap<(Key, Lsn), Value>,
        image_layers: &[ImageModel],
        k: Key,
        request_lsn: Lsn,
    ) -> (ValueReconstructState, ReconstructOutcome) {
        let img = image_layers
            .iter()
            .filter(|i| i.lsn <= request_lsn && i.key_range.contains(&k))
            .filter_map(|i| i.images.get(&k).map(|img| (i.lsn, img.clone())))
            .max_by_key(|(lsn, _)| *lsn);
        let floor = img.as_ref().map(|(lsn, _)| Lsn(lsn.0 + 1)).unwrap_or(Lsn(0));
        let mut state = ValueReconstructState::default();
        let newer_than_image = model.range((k, floor)..).take_while(|((mk, lsn), _)| *mk == k && *lsn <= request_lsn);
        let newer_than_image: Vec<_> = newer_than_image.collect();
        for ((_, lsn), value) in newer_than_image.into_iter().rev() {
            match value {
                Value::Image(i) => {
                    state.img = Some((*lsn, i.clone()));
                    return (state, ReconstructOutcome::Complete);
                }
                Value::WalRecord(rec) => {
                    state.records.push((*lsn, rec.clone()));
                    if rec.will_init() {
                        return (state, ReconstructOutcome::Complete);
                    }
                }
            }
        }
        if let Some(img) = img {
            state.img = Some(img);
            return (state, ReconstructOutcome::Complete);
        }
        let cont_lsn = Lsn(BOTTOM_LSN.min(request_lsn.0 + 1));
        (state, ReconstructOutcome::Incomplete { cont_lsn })
    }

    /// L1 deltas, an image at the top of an L1, L0 deltas, an image inside an L0, a frozen and
    /// an open in-memory layer: every walk agrees with a model that applies the rules directly.
    #[test]
    fn walk_matches_model() {
        let mut rng = StdRng::seed_from_u64(0x3a1c);
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Arc::new(BlockCache::new(128));
        let mut model = BTreeMap::new();
        let mut image_models = Vec::new();
        let mut map = LayerMap::new();

        // L1: two key partitions over 100..4000.
        let split = key(25);
        let low = KeyRange::new(Key::MIN, split);
        let high = KeyRange::new(split, Key::MAX);
        let lsns = BOTTOM_LSN..4000;
        let v = versions(&mut rng, &mut model, 0..25, lsns.clone());
        map.insert_historic(delta_layer(dir.path(), &cache, &v, low, Lsn(lsns.start)..Lsn(lsns.end)));
        let v = versions(&mut rng, &mut model, 25..KEYS, lsns.clone());
        map.insert_historic(delta_layer(dir.path(), &cache, &v, high, Lsn(lsns.start)..Lsn(lsns.end)));

        // Image at the top LSN of the L1s for keys 10..20.
        let img = images(&mut rng, &model, KeyRange::new(key(10), key(20)), Lsn(3999));
        let entries: Vec<(Key, Bytes)> = img.images.iter().map(|(k, v)| (*k, v.clone())).collect();
        map.insert_historic(image_layer(dir.path(), &cache, &entries, img.key_range, img.lsn));
        image_models.push(img);

        // L0s, through the in-memory layer → flush path; an image inside the first one.
        for (start, end) in [(4000u64, 6000u64), (6000, 7000)] {
            let layer = Arc::new(InMemoryLayer::new(TENANT, TIMELINE, Lsn(start)));
            for (k, lsn, v) in versions(&mut rng, &mut model, 0..KEYS, start..end) {
                layer.put(k, lsn, v);
            }
            map.set_open_layer(Arc::clone(&layer));
            map.freeze_open_layer(Lsn(end));
            let desc = layer.write_to_disk(dir.path()).expect("flush");
            map.finish_flush(&layer, Arc::new(PersistentLayer::open(&desc.path, &cache).expect("open")));
        }
        let img = images(&mut rng, &model, KeyRange::new(key(20), key(40)), Lsn(5000));
        let entries: Vec<(Key, Bytes)> = img.images.iter().map(|(k, v)| (*k, v.clone())).collect();
        map.insert_historic(image_layer(dir.path(), &cache, &entries, img.key_range, img.lsn));
        image_models.push(img);

        // A frozen layer and the open one.
        for (start, end) in [(7000u64, Some(8000u64)), (8000, None)] {
            let layer = Arc::new(InMemoryLayer::new(TENANT, TIMELINE, Lsn(start)));
            for (k, lsn, v) in versions(&mut rng, &mut model, 0..KEYS, start..end.unwrap_or(9000)) {
                layer.put(k, lsn, v);
            }
            map.set_open_layer(layer);
            if let Some(end) = end {
                map.freeze_open_layer(Lsn(end));
            }
        }
        assert_eq!(map.frozen_layers().count(), 1);
        assert_eq!(map.l0_deltas().len(), 2);

        let boundaries = [0u64, 99, 100, 101, 3998, 3999, 4000, 4999, 5000, 5001, 5999, 6000, 6999, 7000, 7999, 8000];
        let mut complete = 0;
        for k in 0..=KEYS {
            // key(KEYS) has no versions anywhere.
            let mut lsns: Vec<u64> = boundaries.to_vec();
            lsns.extend((0..60).map(|_| rng.gen_range(0..9500)));
            for lsn in lsns {
                let got = get_page_reconstruct_data(&map, key(k), Lsn(lsn)).expect("read");
                let want = expected(&model, &image_models, key(k), Lsn(lsn));
                assert_eq!(got, want, "key {k} at {lsn}");
                if got.1 == ReconstructOutcome::Complete {
                    complete += 1;
                }
            }
        }
        assert!(complete > 1000, "the scenario should mostly produce complete reads, got {complete}");
    }

    #[test]
    fn continues_from_a_partial_state() {
        let mut map = LayerMap::new();
        let layer = Arc::new(InMemoryLayer::new(TENANT, TIMELINE, Lsn(10)));
        let rec = |will_init| Value::WalRecord(WalRecord::Postgres { will_init, rec: Bytes::new() });
        layer.put(key(1), Lsn(10), rec(true));
        layer.put(key(1), Lsn(20), rec(false));
        map.set_open_layer(layer);
        // A child timeline already collected a record at 50 and continues here below 30.
        let mut state = ValueReconstructState::default();
        state.records.push((Lsn(50), WalRecord::Postgres { will_init: false, rec: Bytes::new() }));
        let outcome = collect_reconstruct_data(&map, key(1), Lsn(30), &mut state).expect("read");
        assert_eq!(outcome, ReconstructOutcome::Complete);
        assert_eq!(state.records.iter().map(|(l, _)| l.0).collect::<Vec<_>>(), [50, 20, 10]);
        let (state, outcome) = get_page_reconstruct_data(&map, key(2), Lsn(100)).expect("read");
        assert_eq!(
            (state, outcome),
            (ValueReconstructState::default(), ReconstructOutcome::Incomplete { cont_lsn: Lsn(10) })
        );
    }
}
