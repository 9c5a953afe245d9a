//! A bounded LRU cache of 8 KiB layer-file blocks shared by all open layers, so repeated lookups
//! (index roots and inner nodes above all) do not go to the disk.
//!
//! Keyed by (file id, block number). File ids are handed out once per open file and never reused,
//! so a block of a deleted or replaced file can never be served for another: its entries just age
//! out. Index blocks enter the cache only after their crc32c checked out, so a hit needs no
//! re-check. One mutex guards the map: a lookup is a hash probe plus a B-tree update, far cheaper
//! than the read it saves; a sharded cache is the next step if profiles show contention.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::BLOCK_SIZE_BYTES;

/// One cached block.
pub type Block = [u8; BLOCK_SIZE_BYTES];

type BlockId = (u64, u32);

/// Bounded by block count; evicts the least recently used block.
pub struct BlockCache {
    capacity_blocks: usize,
    inner: Mutex<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
}

struct Inner {
    /// Block → (contents, recency tick).
    blocks: HashMap<BlockId, (Arc<Block>, u64)>,
    /// Recency tick → block; the first entry is the eviction victim.
    lru: BTreeMap<u64, BlockId>,
    next_tick: u64,
}

impl BlockCache {
    /// A cache holding at most `capacity_blocks` blocks (≥ 1).
    pub fn new(capacity_blocks: usize) -> BlockCache {
        assert!(capacity_blocks > 0, "a block cache needs room for at least one block");
        BlockCache {
            capacity_blocks,
            inner: Mutex::new(Inner { blocks: HashMap::new(), lru: BTreeMap::new(), next_tick: 0 }),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    pub fn capacity_blocks(&self) -> usize {
        self.capacity_blocks
    }

    /// The cached block, marked most recently used.
    pub fn get(&self, file_id: u64, blkno: u32) -> Option<Arc<Block>> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let tick = inner.next_tick;
        match inner.blocks.get_mut(&(file_id, blkno)) {
            Some((block, old_tick)) => {
                inner.lru.remove(old_tick);
                inner.lru.insert(tick, (file_id, blkno));
                *old_tick = tick;
                inner.next_tick += 1;
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(Arc::clone(block))
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Caches `block`, evicting the least recently used block when full.
    pub fn insert(&self, file_id: u64, blkno: u32, block: Arc<Block>) {
        let mut inner = self.lock();
        let tick = inner.next_tick;
        inner.next_tick += 1;
        if let Some((_, old_tick)) = inner.blocks.insert((file_id, blkno), (block, tick)) {
            inner.lru.remove(&old_tick);
        }
        inner.lru.insert(tick, (file_id, blkno));
        while inner.blocks.len() > self.capacity_blocks {
            let Some((_, victim)) = inner.lru.pop_first() else { break };
            inner.blocks.remove(&victim);
        }
        debug_assert_eq!(inner.blocks.len(), inner.lru.len());
        assert!(inner.blocks.len() <= self.capacity_blocks);
    }

    /// Number of blocks cached now.
    pub fn len(&self) -> usize {
        self.lock().blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (hits, misses) since creation.
    pub fn hit_miss_counts(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map half-updated in a way that serves
        // wrong bytes (entries are whole Arcs), so a poisoned lock is still safe to use.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(v: u8) -> Arc<Block> {
        Arc::new([v; BLOCK_SIZE_BYTES])
    }

    #[test]
    fn evicts_least_recently_used() {
        let cache = BlockCache::new(2);
        cache.insert(1, 0, block(0));
        cache.insert(1, 1, block(1));
        assert_eq!(cache.get(1, 0).map(|b| b[0]), Some(0)); // 0 is now the most recent
        cache.insert(2, 0, block(2)); // evicts (1, 1)
        assert!(cache.get(1, 1).is_none());
        assert_eq!(cache.get(1, 0).map(|b| b[0]), Some(0));
        assert_eq!(cache.get(2, 0).map(|b| b[0]), Some(2));
        assert_eq!(cache.len(), 2);
        cache.insert(2, 0, block(3)); // replace in place
        assert_eq!(cache.get(2, 0).map(|b| b[0]), Some(3));
        assert_eq!(cache.len(), 2);
        let (hits, misses) = cache.hit_miss_counts();
        assert_eq!((hits, misses), (4, 1));
    }
}
