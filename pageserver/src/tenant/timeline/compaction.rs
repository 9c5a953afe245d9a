//! Compaction (DESIGN D6): L0 deltas merged into key-partitioned L1 deltas, and image layers
//! written where reads would otherwise replay deep stacks of deltas.
//!
//! **L0 → L1.** Once `compaction_threshold` L0 deltas have accumulated, all of them (they are
//! contiguous in LSN) are merged in (key, LSN) order and written as L1 deltas spanning their
//! whole LSN range, cut at key boundaries every `compaction_target_size` bytes. The L1s of one
//! compaction partition the key space from the first key up to [`L1_KEY_END`], so one complete
//! set is recognisable by its chain of key ranges ending there (see [`redundant_layers`]), and
//! even a single L1 is never mistaken for an L0 (whose range ends at `Key::MAX`). Files are
//! written and renamed into place in key order, so a crash leaves a prefix of the chain.
//!
//! **Images.** The key space (every key holding data, [`Timeline::collect_keyspace`]) is cut
//! into partitions of about `compaction_target_size` bytes of pages; a partition whose newest
//! image lies below `image_creation_threshold` or more deltas gets a new image layer at
//! `disk_consistent_lsn`. The partitions' key ranges together cover `Key::MIN..Key::MAX`, so
//! images can make even L0 deltas unnecessary for GC.
//!
//! **Crash safety.** New files are durable (fsync'd, renamed, directory fsync'd) before the layer
//! map switches to them; the replaced L0 files are deleted only after that; with remote storage
//! the new layers are uploaded, then an index naming them and not the replaced ones, and only then
//! are the replaced objects deleted. A crash between any two steps leaves either the old layers or
//! a complete new set plus redundant old ones, which [`redundant_layers`] finds at the next load.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;

use tracing::info;
use utils::Lsn;

use super::{fsync_dir, Timeline, TimelineError};
use crate::key::{Key, KeyRange};
use crate::layer::{
    DeltaEntry, DeltaLayer, DeltaLayerWriter, ImageLayerWriter, LayerName, PersistentLayer, PersistentLayerDesc,
    BLOCK_SIZE_BYTES,
};

/// Exclusive end of the last L1 delta of a compaction: just below [`Key::MAX`], above every key
/// that holds data (no key kind uses `field1 = 0xFF`), so an L1 never covers the whole key
/// space the way an L0 does.
pub const L1_KEY_END: Key = Key { field6: u32::MAX - 1, ..Key::MAX };

/// What one compaction did (the API and the tests show it).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct CompactionResult {
    /// L0 deltas merged, and the L1 deltas written from them.
    pub l0_compacted: usize,
    pub l1_created: usize,
    /// Image layers written, and the keys they hold.
    pub images_created: usize,
    pub image_keys: u64,
    /// Files removed from local disk (the merged L0s).
    pub layers_removed: usize,
}

impl Timeline {
    /// Compacts if there is enough work: L0s into L1s once `compaction_threshold` of them exist
    /// (with `force`: once there are two), then image layers where deltas are
    /// `image_creation_threshold` deep (with `force`: wherever any delta lies above the newest
    /// image). Blocking; one compaction or GC of a timeline runs at a time.
    pub fn compact(&self, force: bool) -> Result<CompactionResult, TimelineError> {
        let _one_at_a_time = super::lock(&self.compaction_lock);
        let conf = self.conf();
        let mut result = CompactionResult::default();
        let l0 = self.layers_read().l0_deltas();
        let threshold = if force { 2 } else { conf.compaction_threshold };
        if l0.len() >= threshold {
            self.compact_level0(&l0, conf.compaction_target_size_bytes, &mut result)?;
        }
        let image_threshold = if force { 1 } else { conf.image_creation_threshold };
        self.create_image_layers(image_threshold, conf.compaction_target_size_bytes, &mut result)?;
        if result.l1_created > 0 || result.images_created > 0 {
            info!(
                timeline = %self.timeline_id,
                "compaction: {} L0 deltas → {} L1 deltas; {} image layers ({} keys)",
                result.l0_compacted,
                result.l1_created,
                result.images_created,
                result.image_keys
            );
        }
        Ok(result)
    }

    fn compact_level0(
        &self,
        l0: &[Arc<PersistentLayer>],
        target_size_bytes: u64,
        result: &mut CompactionResult,
    ) -> Result<(), TimelineError> {
        for pair in l0.windows(2) {
            assert_eq!(
                pair[0].desc().lsn_range.end,
                pair[1].desc().lsn_range.start,
                "timeline {}: L0 deltas must be contiguous in LSN",
                self.timeline_id
            );
        }
        let lsn_range = l0[0].desc().lsn_range.start..l0[l0.len() - 1].desc().lsn_range.end;
        // Remote L0s are downloaded here: compaction reads every byte of them anyway.
        let opened: Vec<Arc<PersistentLayer>> = l0.iter().map(open_local).collect::<Result<_, _>>()?;
        let deltas: Vec<&DeltaLayer> = opened
            .iter()
            .map(|l| match &**l {
                PersistentLayer::Delta(d) => Ok(d),
                _ => Err(TimelineError::Invalid(format!("L0 layer {} is not a delta layer", l.desc().layer_name()))),
            })
            .collect::<Result<_, _>>()?;

        // k-way merge in (key, LSN) order; the L0s' LSN ranges are disjoint, so ties cannot occur.
        let mut iters: Vec<_> = deltas.iter().map(|d| d.iter(KeyRange::full())).collect();
        let mut heap: BinaryHeap<Reverse<(Key, Lsn, usize)>> = BinaryHeap::new();
        let mut heads: HashMap<usize, DeltaEntry> = HashMap::new();
        for (i, it) in iters.iter_mut().enumerate() {
            if let Some(entry) = it.next().transpose()? {
                heap.push(Reverse((entry.key, entry.lsn, i)));
                heads.insert(i, entry);
            }
        }
        let mut written: Vec<PersistentLayerDesc> = Vec::new();
        let mut writer: Option<DeltaLayerWriter> = None;
        let mut last_key: Option<Key> = None;
        while let Some(Reverse((key, _, i))) = heap.pop() {
            let entry = heads.remove(&i).expect("every heap entry has its head");
            if let Some(next) = iters[i].next().transpose()? {
                heap.push(Reverse((next.key, next.lsn, i)));
                heads.insert(i, next);
            }
            // Cut only between keys: a key's versions stay in one file.
            if last_key != Some(key) {
                if let Some(w) = writer.take_if(|w| w.size_bytes() >= target_size_bytes) {
                    written.push(w.finish(key)?);
                }
                last_key = Some(key);
            }
            let w = match &mut writer {
                Some(w) => w,
                None => writer.insert(DeltaLayerWriter::new(
                    &self.dir,
                    self.tenant_id,
                    self.timeline_id,
                    key,
                    lsn_range.clone(),
                )?),
            };
            assert!(key < L1_KEY_END, "key {key} lies in the range reserved above every stored key");
            w.put(entry.key, entry.lsn, &entry.value)?;
        }
        if let Some(w) = writer {
            written.push(w.finish(L1_KEY_END)?);
        }
        drop(iters);

        let new_layers: Vec<Arc<PersistentLayer>> = written
            .iter()
            .map(|d| PersistentLayer::open(&d.path, &self.resources.block_cache).map(Arc::new))
            .collect::<Result<_, _>>()?;
        let old_names: Vec<LayerName> = l0.iter().map(|l| l.desc().layer_name()).collect();
        self.replace_layers(&old_names, new_layers)?;
        result.l0_compacted += l0.len();
        result.l1_created += written.len();
        result.layers_removed += l0.len();
        Ok(())
    }

    /// Swaps `old` for `new` in the layer map in one step, then: uploads `new`, uploads an index
    /// without `old`, deletes `old` remotely (all queued in that order), and deletes the local
    /// files of `old`.
    pub(super) fn replace_layers(
        &self,
        old: &[LayerName],
        new: Vec<Arc<PersistentLayer>>,
    ) -> Result<(), TimelineError> {
        let removed: Vec<Arc<PersistentLayer>> = {
            let mut layers = self.layers_write();
            for layer in &new {
                layers.insert_historic(Arc::clone(layer));
            }
            old.iter().filter_map(|name| layers.remove_historic(name)).collect()
        };
        if let Some(remote) = &self.remote {
            // Under the metadata lock, like every index scheduling, so indexes stay in order.
            let md = super::lock(&self.metadata);
            for layer in &new {
                remote.schedule_layer_upload(layer.desc().layer_name().to_string(), layer.desc().path.clone());
            }
            let names: Vec<String> = old.iter().map(|n| n.to_string()).collect();
            remote.unlink_layers(&names);
            remote.schedule_index_upload(&md);
            remote.schedule_layer_deletion(names);
        }
        for layer in &removed {
            let path = &layer.desc().path;
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {} // an evicted or remote-only layer
                Err(e) => return Err(TimelineError::io(path, "removing a replaced layer", e)),
            }
        }
        if !removed.is_empty() {
            fsync_dir(&self.dir)?;
        }
        Ok(())
    }

    fn create_image_layers(
        &self,
        threshold: usize,
        target_size_bytes: u64,
        result: &mut CompactionResult,
    ) -> Result<(), TimelineError> {
        let lsn = self.get_disk_consistent_lsn();
        if lsn == Lsn::INVALID || lsn < self.initdb_lsn() {
            return Ok(());
        }
        let no_data = |e| {
            TimelineError::Invalid(format!(
                "timeline {}: listing databases at {lsn} for image layers: {e}",
                self.timeline_id
            ))
        };
        // Without a database directory there is no Postgres data here (a timeline being created,
        // or synthetic keys in tests): an image layer would only hide what lies below it.
        if self.list_dbdirs(lsn).map_err(no_data)?.is_empty() {
            return Ok(());
        }
        let keyspace = self.collect_keyspace(lsn).map_err(|e| {
            TimelineError::Invalid(format!(
                "timeline {}: listing the keys at {lsn} for image layers: {e}",
                self.timeline_id
            ))
        })?;
        let keys_per_partition = (target_size_bytes / BLOCK_SIZE_BYTES as u64).max(1);
        for partition in partition_keyspace(&keyspace, keys_per_partition) {
            let depth = self.delta_depth_above_images(partition.range, lsn);
            if depth < threshold {
                continue;
            }
            let name = LayerName::Image { key_range: partition.range, lsn };
            if self.layers_read().historic_layers().any(|l| l.desc().layer_name() == name) {
                continue;
            }
            let mut writer =
                ImageLayerWriter::new(&self.dir, self.tenant_id, self.timeline_id, partition.range.start, lsn)?;
            let mut keys = 0u64;
            for range in &partition.keys {
                let mut key = range.start;
                while key < range.end {
                    match self.get(key, lsn) {
                        Ok(img) => {
                            writer.put(key, &img)?;
                            keys += 1;
                        }
                        Err(e) if e.is_missing() => {}
                        Err(e) => {
                            return Err(TimelineError::Invalid(format!(
                                "timeline {}: cannot build the image of a key for an image layer at {lsn}: {e}",
                                self.timeline_id
                            )))
                        }
                    }
                    key = key.next();
                }
            }
            let desc = writer.finish(partition.range.end)?;
            let layer = Arc::new(PersistentLayer::open(&desc.path, &self.resources.block_cache)?);
            self.replace_layers(&[], vec![layer])?;
            result.images_created += 1;
            result.image_keys += keys;
        }
        Ok(())
    }

    /// How many delta layers of this timeline overlapping `range` lie (partly) above the newest
    /// image that covers all of `range` at or below `lsn`.
    fn delta_depth_above_images(&self, range: KeyRange, lsn: Lsn) -> usize {
        let layers = self.layers_read();
        let image_lsn = layers
            .image_coverage(range, lsn)
            .iter()
            .map(|(_, img)| img.as_ref().map_or(Lsn::INVALID, |l| l.desc().lsn_range.start))
            .min()
            .unwrap_or(Lsn::INVALID);
        layers
            .historic_layers()
            .filter(|l| {
                let d = l.desc();
                d.is_delta() && d.key_range.overlaps(&range) && d.lsn_range.end.0 > image_lsn.0 + 1
            })
            .count()
    }
}

/// Opens a layer's local file, downloading it first if it is only in remote storage.
fn open_local(layer: &Arc<PersistentLayer>) -> Result<Arc<PersistentLayer>, TimelineError> {
    match &**layer {
        PersistentLayer::Remote(r) => Ok(r.get_or_download()?),
        _ => Ok(Arc::clone(layer)),
    }
}

/// One image layer's worth of the key space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Partition {
    /// The layer's key range; the partitions of one key space cover `Key::MIN..Key::MAX`.
    pub range: KeyRange,
    /// The keys holding data inside `range`.
    pub keys: Vec<KeyRange>,
}

/// Cuts `keyspace` (sorted, non-overlapping ranges, each one key or a run of keys differing only
/// in their last field) into partitions of about `keys_per_partition` keys, each covering from
/// its first key up to the next partition's first key; the first starts at `Key::MIN` and the
/// last ends at `Key::MAX`.
pub(crate) fn partition_keyspace(keyspace: &[KeyRange], keys_per_partition: u64) -> Vec<Partition> {
    let mut parts: Vec<Vec<KeyRange>> = Vec::new();
    let mut current: Vec<KeyRange> = Vec::new();
    let mut count = 0u64;
    for range in keyspace.iter().filter(|r| !r.is_empty()) {
        let mut start = range.start;
        while start < range.end {
            let room = keys_per_partition - count;
            let (len, splittable) = key_distance(start, range.end);
            let end = if len > room && splittable { advance(start, room) } else { range.end };
            current.push(KeyRange::new(start, end));
            count += if end == range.end { len } else { room };
            start = end;
            if count >= keys_per_partition {
                parts.push(std::mem::take(&mut current));
                count = 0;
            }
        }
    }
    if !current.is_empty() {
        parts.push(current);
    }
    let starts: Vec<Key> = parts.iter().map(|keys| keys[0].start).collect();
    parts
        .into_iter()
        .enumerate()
        .map(|(i, keys)| {
            let start = if i == 0 { Key::MIN } else { starts[i] };
            let end = starts.get(i + 1).copied().unwrap_or(Key::MAX);
            Partition { range: KeyRange::new(start, end), keys }
        })
        .collect()
}

/// Number of keys in `start..end`, and whether the range can be cut (its keys differ only in
/// the last field). Any other multi-prefix range counts as one key and stays whole.
fn key_distance(start: Key, end: Key) -> (u64, bool) {
    if (Key { field6: 0, ..start }) == (Key { field6: 0, ..end }) {
        (u64::from(end.field6 - start.field6), true)
    } else {
        (1, false)
    }
}

/// `start` moved `n` keys forward within its prefix.
fn advance(start: Key, n: u64) -> Key {
    let field6 = u64::from(start.field6) + n;
    assert!(field6 <= u64::from(u32::MAX), "advancing key {start} by {n} leaves its prefix");
    Key { field6: field6 as u32, ..start }
}

/// Layers made redundant by a compaction that crashed before it removed its inputs, or that
/// crashed before it finished its outputs: given every layer of a timeline (local and remote),
/// the names to drop.
///
/// Deltas with the same LSN range form a group; a group is complete when its key ranges chain
/// without gaps up to [`L1_KEY_END`] (or `Key::MAX`: an L0 alone is complete). Any delta whose LSN range lies
/// strictly inside a complete group's is redundant (the group holds all of its versions). An
/// incomplete group with such inner deltas is the unfinished output of a crashed compaction and
/// is dropped instead (its inputs are still there).
pub fn redundant_layers(layers: &[(LayerName, bool)]) -> HashSet<LayerName> {
    use std::collections::BTreeMap;
    let mut groups: BTreeMap<(Lsn, Lsn), Vec<KeyRange>> = BTreeMap::new();
    for (name, _) in layers {
        if let LayerName::Delta { key_range, lsn_range } = name {
            groups.entry((lsn_range.start, lsn_range.end)).or_default().push(*key_range);
        }
    }
    let complete = |ranges: &Vec<KeyRange>| {
        let mut sorted = ranges.clone();
        sorted.sort_by_key(|r| r.start);
        sorted.windows(2).all(|w| w[0].end == w[1].start)
            && sorted.last().is_some_and(|r| r.end == Key::MAX || r.end == L1_KEY_END)
    };
    let inside = |inner: (Lsn, Lsn), outer: (Lsn, Lsn)| inner != outer && outer.0 <= inner.0 && inner.1 <= outer.1;
    let mut drop: HashSet<LayerName> = HashSet::new();
    for (&outer, ranges) in &groups {
        let inner: Vec<(Lsn, Lsn)> = groups.keys().copied().filter(|&g| inside(g, outer)).collect();
        if inner.is_empty() {
            continue;
        }
        let victims: Vec<(Lsn, Lsn)> = if complete(ranges) { inner } else { vec![outer] };
        for (name, _) in layers {
            if let LayerName::Delta { lsn_range, .. } = name {
                if victims.contains(&(lsn_range.start, lsn_range.end)) {
                    drop.insert(name.clone());
                }
            }
        }
    }
    drop
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::key;

    fn delta(start: u32, end: Option<u32>, lsn: (u64, u64)) -> (LayerName, bool) {
        let end = end.map_or(if start == 0 { Key::MAX } else { L1_KEY_END }, key);
        let start = if start == 0 { Key::MIN } else { key(start) };
        (LayerName::Delta { key_range: KeyRange::new(start, end), lsn_range: Lsn(lsn.0)..Lsn(lsn.1) }, true)
    }

    #[test]
    fn crashed_compactions_are_resolved() {
        let l0a = delta(0, None, (10, 20));
        let l0b = delta(0, None, (20, 30));
        let l1a = delta(1, Some(5), (10, 30));
        let l1b = delta(5, None, (10, 30));
        // Complete output: the inputs are redundant.
        let all = [l0a.clone(), l0b.clone(), l1a.clone(), l1b.clone()];
        let dropped = redundant_layers(&all);
        assert_eq!(dropped, HashSet::from([l0a.0.clone(), l0b.0.clone()]));
        // Output cut short (no layer reaches Key::MAX): the output goes.
        let dropped = redundant_layers(&[l0a.clone(), l0b.clone(), l1a.clone()]);
        assert_eq!(dropped, HashSet::from([l1a.0.clone()]));
        // Nothing to resolve.
        assert!(redundant_layers(&[l1a.clone(), l1b.clone(), delta(0, None, (30, 40))]).is_empty());
        assert!(redundant_layers(&[l0a.clone(), l0b.clone()]).is_empty());
        // One L1 from the first key (even Key::MIN) is not an L0, and completes its group.
        let single =
            (LayerName::Delta { key_range: KeyRange::new(Key::MIN, L1_KEY_END), lsn_range: Lsn(10)..Lsn(30) }, true);
        assert_eq!(redundant_layers(&[l0a.clone(), l0b.clone(), single]), HashSet::from([l0a.0, l0b.0]));
    }

    #[test]
    fn partitions_cover_the_key_space_in_bounded_pieces() {
        let rel = |n: u32, blk: u32| Key { field4: n, field6: blk, ..key(0) };
        let ks = vec![
            KeyRange::single(rel(1, 0)),
            KeyRange::new(rel(100, 0), rel(100, 25)),
            KeyRange::single(Key { field6: u32::MAX, ..rel(100, 0) }),
            KeyRange::single(rel(200, 0)),
        ];
        let parts = partition_keyspace(&ks, 10);
        assert_eq!(parts.first().unwrap().range.start, Key::MIN);
        assert_eq!(parts.last().unwrap().range.end, Key::MAX);
        for w in parts.windows(2) {
            assert_eq!(w[0].range.end, w[1].range.start);
        }
        let mut total = 0;
        for p in &parts {
            let n: u64 = p.keys.iter().map(|r| key_distance(r.start, r.end).0).sum();
            assert!(n <= 10, "{p:?}");
            for r in &p.keys {
                assert!(p.range.contains_range(r), "{p:?}");
            }
            total += n;
        }
        assert_eq!(total, 28);
        assert!(partition_keyspace(&[], 10).is_empty());
    }
}
