//! The on-disk B-tree index of a layer file: fixed-size keys (delta: key ++ LSN, 26 bytes;
//! image: key, 18 bytes) mapping to a u64 (blob offset, plus the will-init bit for deltas).
//!
//! Built in bulk, bottom-up, from sorted input: leaves are filled completely in key order and
//! written contiguously, then each upper level over the one below, root last. So the shape of the
//! tree follows from (entry count, entry size) alone ([`IndexShape`]): which block is at which level,
//! how many entries each holds, which child each pointer must name. The reader checks all of that
//! when a block is first loaded, on top of its crc32c, so a damaged or misplaced block is an
//! error, never a wrong answer. Leaves being contiguous also means a scan moves to the next leaf
//! by block number, with no sibling pointers and no path stack.
//!
//! ```text
//!  index block:  u32 crc32c of bytes 4..8192 | u8 level (0 = leaf) | u8 key length | u16 count
//!                | count × (key bytes ++ u64 BE value) | zero padding
//!  internal entry: key = first key of the child's subtree, value = child block number
//! ```

use std::sync::Arc;

use super::block_cache::Block;
use super::file::LayerFile;
use super::summary::Summary;
use super::{LayerError, LayerKind, BLOCK_SIZE_BYTES};
use crate::key::KEY_SIZE_BYTES;

const NODE_HEADER_SIZE_BYTES: usize = 8;
const VALUE_SIZE_BYTES: usize = 8;
/// Delta index keys: the 18-byte key then the 8-byte LSN, big-endian, so byte order = (key, LSN).
pub const DELTA_INDEX_KEY_SIZE_BYTES: usize = KEY_SIZE_BYTES + 8;
/// Image index keys: just the key.
pub const IMAGE_INDEX_KEY_SIZE_BYTES: usize = KEY_SIZE_BYTES;

pub fn index_key_size_bytes(kind: LayerKind) -> usize {
    match kind {
        LayerKind::Delta => DELTA_INDEX_KEY_SIZE_BYTES,
        LayerKind::Image => IMAGE_INDEX_KEY_SIZE_BYTES,
    }
}

/// Entries per index block for keys of `key_len` bytes.
pub fn node_capacity(key_len: usize) -> usize {
    (BLOCK_SIZE_BYTES - NODE_HEADER_SIZE_BYTES) / (key_len + VALUE_SIZE_BYTES)
}

/// The exact shape of a bulk-built tree, derived from its entry count.
#[derive(Debug, Clone)]
pub struct IndexShape {
    pub key_len: usize,
    pub capacity: usize,
    pub value_count: u64,
    pub index_start_block: u32,
    /// Per level, leaves first: (first block, node count, item count).
    levels: Vec<(u32, u32, u64)>,
}

impl IndexShape {
    /// The shape for `value_count` entries starting at `index_start_block`; an error if the
    /// numbers are impossible (they come from disk).
    pub fn new(kind: LayerKind, value_count: u64, index_start_block: u32) -> Result<IndexShape, String> {
        let key_len = index_key_size_bytes(kind);
        let capacity = node_capacity(key_len);
        if index_start_block == 0 {
            return Err("index starts at block 0, which is the summary".to_string());
        }
        let mut levels = Vec::new();
        let mut next_block = index_start_block as u64;
        let mut items = value_count;
        loop {
            // An empty tree is a single empty leaf.
            let nodes = items.div_ceil(capacity as u64).max(1);
            levels.push((next_block, nodes, items));
            next_block += nodes;
            if next_block > u32::MAX as u64 {
                return Err(format!("{value_count} index entries do not fit in a file of 2^32 blocks"));
            }
            if nodes == 1 {
                break;
            }
            items = nodes;
        }
        let levels = levels.into_iter().map(|(start, nodes, items)| (start as u32, nodes as u32, items)).collect();
        Ok(IndexShape { key_len, capacity, value_count, index_start_block, levels })
    }

    /// Checks the summary's root block and block count against the shape.
    pub fn check_summary(&self, summary: &Summary) -> Result<(), String> {
        if summary.index_root_block != self.root_block() {
            return Err(format!(
                "index root block is {}, but {} entries from block {} put it at {}",
                summary.index_root_block,
                self.value_count,
                self.index_start_block,
                self.root_block()
            ));
        }
        if summary.block_count != self.end_block() {
            return Err(format!(
                "block count is {}, but the index ends at block {}",
                summary.block_count,
                self.end_block()
            ));
        }
        Ok(())
    }

    pub fn root_block(&self) -> u32 {
        self.end_block() - 1
    }

    pub fn root_level(&self) -> u8 {
        (self.levels.len() - 1) as u8
    }

    /// One past the last index block (= the file's block count).
    pub fn end_block(&self) -> u32 {
        let (start, nodes, _) = *self.levels.last().expect("a tree has at least one level");
        start + nodes
    }

    /// Leaves are blocks `leaf_blocks().0 .. leaf_blocks().1`.
    pub fn leaf_blocks(&self) -> (u32, u32) {
        (self.levels[0].0, self.levels[0].0 + self.levels[0].1)
    }

    /// (level, node index within the level) of an index block.
    fn locate(&self, blkno: u32) -> Option<(u8, u32)> {
        self.levels
            .iter()
            .enumerate()
            .find(|(_, (start, nodes, _))| blkno >= *start && blkno < start + nodes)
            .map(|(level, (start, _, _))| (level as u8, blkno - start))
    }

    /// How many entries node `node` of `level` must hold: full nodes, the last one the rest.
    fn expected_count(&self, level: u8, node: u32) -> usize {
        let (_, _, items) = self.levels[level as usize];
        let before = node as u64 * self.capacity as u64;
        (items - before).min(self.capacity as u64) as usize
    }
}

/// Validates a freshly read index block against the tree shape: crc, header, entry count,
/// ordering, and (internal nodes) that each child pointer names the block the shape puts there.
pub fn check_node(block: &Block, blkno: u32, shape: &IndexShape) -> Result<(), String> {
    let stored_crc = u32::from_be_bytes([block[0], block[1], block[2], block[3]]);
    let actual_crc = crc32c::crc32c(&block[4..]);
    if stored_crc != actual_crc {
        return Err(format!("checksum (crc32c) mismatch: stored {stored_crc:08x}, computed {actual_crc:08x}"));
    }
    let Some((level, node)) = shape.locate(blkno) else {
        return Err("block is not part of the index".to_string());
    };
    let header = NodeHeader::decode(block);
    if header.level != level {
        return Err(format!("node level is {}, expected {level}", header.level));
    }
    if header.key_len as usize != shape.key_len {
        return Err(format!("key length is {}, expected {}", header.key_len, shape.key_len));
    }
    let expected = shape.expected_count(level, node);
    if header.count as usize != expected {
        return Err(format!("node holds {} entries, expected {expected}", header.count));
    }
    let view = NodeView { block, key_len: shape.key_len };
    for i in 1..expected {
        if view.key(i - 1) >= view.key(i) {
            return Err(format!("entries {} and {i} are out of order", i - 1));
        }
    }
    if level > 0 {
        let (child_level_start, _, _) = shape.levels[level as usize - 1];
        for i in 0..expected {
            let want = child_level_start as u64 + node as u64 * shape.capacity as u64 + i as u64;
            if view.value(i) != want {
                return Err(format!("child pointer {i} is block {}, expected {want}", view.value(i)));
            }
        }
    }
    Ok(())
}

struct NodeHeader {
    level: u8,
    key_len: u8,
    count: u16,
}

impl NodeHeader {
    fn decode(block: &Block) -> NodeHeader {
        NodeHeader { level: block[4], key_len: block[5], count: u16::from_be_bytes([block[6], block[7]]) }
    }
}

struct NodeView<'a> {
    block: &'a Block,
    key_len: usize,
}

impl NodeView<'_> {
    fn entry_offset(&self, i: usize) -> usize {
        NODE_HEADER_SIZE_BYTES + i * (self.key_len + VALUE_SIZE_BYTES)
    }

    fn key(&self, i: usize) -> &[u8] {
        let off = self.entry_offset(i);
        &self.block[off..off + self.key_len]
    }

    fn value(&self, i: usize) -> u64 {
        let off = self.entry_offset(i) + self.key_len;
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.block[off..off + 8]);
        u64::from_be_bytes(b)
    }
}

fn encode_node(level: u8, key_len: usize, count: usize, entries: &[u8]) -> Vec<u8> {
    assert!(count <= node_capacity(key_len));
    assert_eq!(entries.len(), count * (key_len + VALUE_SIZE_BYTES));
    let mut block = Vec::with_capacity(BLOCK_SIZE_BYTES);
    block.extend_from_slice(&[0u8; 4]);
    block.push(level);
    block.push(key_len as u8);
    block.extend_from_slice(&(count as u16).to_be_bytes());
    block.extend_from_slice(entries);
    block.resize(BLOCK_SIZE_BYTES, 0);
    let crc = crc32c::crc32c(&block[4..]);
    block[0..4].copy_from_slice(&crc.to_be_bytes());
    block
}

/// Builds the index from entries appended in strictly increasing key order.
///
/// Memory: the leaves are kept in memory until [`BTreeBuilder::finish`] (they must follow the
/// value blobs in the file): about `(key_len + 8)` bytes per entry, 34 for deltas. A layer of a
/// few million small records needs tens of MiB here; spilling leaves to a side file is the fix if
/// that ever matters.
pub struct BTreeBuilder {
    key_len: usize,
    capacity: usize,
    /// Finished leaf blocks, back to back.
    leaves: Vec<u8>,
    /// First key of every finished leaf, back to back.
    leaf_first_keys: Vec<u8>,
    /// Entries of the leaf being filled.
    current: Vec<u8>,
    current_count: usize,
    last_key: Option<Vec<u8>>,
    value_count: u64,
}

impl BTreeBuilder {
    pub fn new(kind: LayerKind) -> BTreeBuilder {
        let key_len = index_key_size_bytes(kind);
        BTreeBuilder {
            key_len,
            capacity: node_capacity(key_len),
            leaves: Vec::new(),
            leaf_first_keys: Vec::new(),
            current: Vec::new(),
            current_count: 0,
            last_key: None,
            value_count: 0,
        }
    }

    pub fn value_count(&self) -> u64 {
        self.value_count
    }

    /// Adds an entry. Panics if `key` is not strictly greater than the previous key: the writer
    /// API requires sorted input, and an unsorted index would answer lookups wrongly.
    pub fn append(&mut self, key: &[u8], value: u64) {
        assert_eq!(key.len(), self.key_len, "index key of the wrong length");
        if let Some(last) = &self.last_key {
            assert!(key > last.as_slice(), "index keys must be appended in strictly increasing order");
        }
        if self.current_count == 0 {
            self.leaf_first_keys.extend_from_slice(key);
        }
        self.current.extend_from_slice(key);
        self.current.extend_from_slice(&value.to_be_bytes());
        self.current_count += 1;
        self.value_count += 1;
        self.last_key = Some(key.to_vec());
        if self.current_count == self.capacity {
            self.flush_leaf();
        }
    }

    fn flush_leaf(&mut self) {
        let block = encode_node(0, self.key_len, self.current_count, &self.current);
        self.leaves.extend_from_slice(&block);
        self.current.clear();
        self.current_count = 0;
    }

    /// The index blocks, to be written at `index_start_block`, and the root block number.
    pub fn finish(mut self, index_start_block: u32) -> (Vec<u8>, u32) {
        if self.current_count > 0 || self.value_count == 0 {
            self.flush_leaf();
        }
        let mut out = std::mem::take(&mut self.leaves);
        let mut level_first_keys = std::mem::take(&mut self.leaf_first_keys);
        let mut level_nodes = out.len() / BLOCK_SIZE_BYTES;
        let mut level_start = index_start_block as u64;
        let mut level = 0u8;
        while level_nodes > 1 {
            level += 1;
            let mut next_first_keys = Vec::new();
            let mut entries = Vec::new();
            let mut count = 0;
            for child in 0..level_nodes {
                let key = &level_first_keys[child * self.key_len..(child + 1) * self.key_len];
                if count == 0 {
                    next_first_keys.extend_from_slice(key);
                }
                entries.extend_from_slice(key);
                entries.extend_from_slice(&(level_start + child as u64).to_be_bytes());
                count += 1;
                if count == self.capacity || child == level_nodes - 1 {
                    out.extend_from_slice(&encode_node(level, self.key_len, count, &entries));
                    entries.clear();
                    count = 0;
                }
            }
            level_start += level_nodes as u64;
            level_nodes = next_first_keys.len() / self.key_len;
            level_first_keys = next_first_keys;
        }
        let total_blocks = (out.len() / BLOCK_SIZE_BYTES) as u64;
        let root = index_start_block as u64 + total_blocks - 1;
        let root = u32::try_from(root).expect("layer file larger than 2^32 blocks");
        (out, root)
    }
}

/// A loaded, validated index node.
#[derive(Clone)]
pub struct Node {
    blkno: u32,
    block: Arc<Block>,
    level: u8,
    count: usize,
    key_len: usize,
}

impl Node {
    fn view(&self) -> NodeView<'_> {
        NodeView { block: &self.block, key_len: self.key_len }
    }

    fn key(&self, i: usize) -> &[u8] {
        let off = NODE_HEADER_SIZE_BYTES + i * (self.key_len + VALUE_SIZE_BYTES);
        &self.block[off..off + self.key_len]
    }

    /// Index of the first entry whose key is > `target` (or ≥ when `inclusive` is false).
    fn partition(&self, target: &[u8], inclusive: bool) -> usize {
        let (mut lo, mut hi) = (0, self.count);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let k = self.key(mid);
            let before = if inclusive { k <= target } else { k < target };
            if before {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }
}

/// A position at one leaf entry.
#[derive(Clone)]
pub struct Cursor {
    node: Node,
    idx: usize,
}

impl Cursor {
    pub fn key(&self) -> &[u8] {
        self.node.key(self.idx)
    }

    pub fn value(&self) -> u64 {
        self.node.view().value(self.idx)
    }

    /// Block number of the leaf, for error messages.
    pub fn leaf_block(&self) -> u32 {
        self.node.blkno
    }
}

/// Searches the index of one file.
pub struct BTreeReader<'a> {
    file: &'a LayerFile,
}

impl<'a> BTreeReader<'a> {
    pub fn new(file: &'a LayerFile) -> BTreeReader<'a> {
        BTreeReader { file }
    }

    fn load(&self, blkno: u32, expected_level: u8) -> Result<Node, LayerError> {
        let block = self.file.read_index_block(blkno)?;
        // Level, count and key length were checked against the shape when the block was read.
        let header = NodeHeader::decode(&block);
        if header.level != expected_level {
            return Err(self.file.corrupt(format!(
                "index block {blkno}: level {} where level {expected_level} was expected",
                header.level
            )));
        }
        Ok(Node { blkno, block, level: header.level, count: header.count as usize, key_len: self.file.shape().key_len })
    }

    /// Descends from the root to the leaf that would hold `target`; `None` if `target` is below
    /// the first key and `below_first_is_none` asks for that.
    fn descend(&self, target: &[u8], below_first_is_none: bool) -> Result<Option<Node>, LayerError> {
        let shape = self.file.shape();
        let mut node = self.load(shape.root_block(), shape.root_level())?;
        while node.level > 0 {
            let idx = node.partition(target, true);
            if idx == 0 && below_first_is_none {
                return Ok(None);
            }
            let child_idx = idx.saturating_sub(1);
            let child_blkno = node.view().value(child_idx) as u32; // checked against the shape on load
            let child = self.load(child_blkno, node.level - 1)?;
            if child.count == 0 || child.key(0) != node.key(child_idx) {
                return Err(self.file.corrupt(format!(
                    "index block {child_blkno}: first key does not match its separator in block {}",
                    node.blkno
                )));
            }
            node = child;
        }
        Ok(Some(node))
    }

    /// The last entry with key ≤ `target`.
    pub fn seek_le(&self, target: &[u8]) -> Result<Option<Cursor>, LayerError> {
        let Some(leaf) = self.descend(target, true)? else { return Ok(None) };
        let idx = leaf.partition(target, true);
        if idx == 0 {
            return Ok(None);
        }
        Ok(Some(Cursor { node: leaf, idx: idx - 1 }))
    }

    /// The first entry with key ≥ `target`.
    pub fn seek_ge(&self, target: &[u8]) -> Result<Option<Cursor>, LayerError> {
        let Some(leaf) = self.descend(target, false)? else { return Ok(None) };
        let idx = leaf.partition(target, false);
        let mut cursor = Cursor { node: leaf, idx };
        if idx < cursor.node.count {
            return Ok(Some(cursor));
        }
        // Everything in this leaf is smaller: the answer is the first entry of the next leaf.
        if cursor.node.count == 0 {
            return Ok(None);
        }
        cursor.idx = cursor.node.count - 1;
        Ok(self.next(&mut cursor)?.then_some(cursor))
    }

    /// Moves to the next entry; false (cursor unchanged) at the end.
    pub fn next(&self, cursor: &mut Cursor) -> Result<bool, LayerError> {
        if cursor.idx + 1 < cursor.node.count {
            cursor.idx += 1;
            return Ok(true);
        }
        let (_, leaves_end) = self.file.shape().leaf_blocks();
        if cursor.node.blkno + 1 >= leaves_end {
            return Ok(false);
        }
        let next = self.load(cursor.node.blkno + 1, 0)?;
        if next.count == 0 || next.key(0) <= cursor.key() {
            return Err(self.file.corrupt(format!(
                "index leaf {} does not continue the key order of leaf {}",
                next.blkno, cursor.node.blkno
            )));
        }
        *cursor = Cursor { node: next, idx: 0 };
        Ok(true)
    }

    /// Moves to the previous entry; false (cursor unchanged) at the start.
    pub fn prev(&self, cursor: &mut Cursor) -> Result<bool, LayerError> {
        if cursor.idx > 0 {
            cursor.idx -= 1;
            return Ok(true);
        }
        let (leaves_start, _) = self.file.shape().leaf_blocks();
        if cursor.node.blkno <= leaves_start {
            return Ok(false);
        }
        let prev = self.load(cursor.node.blkno - 1, 0)?;
        if prev.count == 0 || prev.key(prev.count - 1) >= cursor.key() {
            return Err(self.file.corrupt(format!(
                "index leaf {} does not precede the key order of leaf {}",
                prev.blkno, cursor.node.blkno
            )));
        }
        let idx = prev.count - 1;
        *cursor = Cursor { node: prev, idx };
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let cap = node_capacity(DELTA_INDEX_KEY_SIZE_BYTES) as u64;
        assert_eq!(cap, 240);
        let empty = IndexShape::new(LayerKind::Delta, 0, 1).expect("valid");
        assert_eq!((empty.root_block(), empty.root_level(), empty.end_block()), (1, 0, 2));
        let one_leaf = IndexShape::new(LayerKind::Delta, cap, 5).expect("valid");
        assert_eq!((one_leaf.root_block(), one_leaf.root_level()), (5, 0));
        let two = IndexShape::new(LayerKind::Delta, cap + 1, 5).expect("valid");
        assert_eq!((two.leaf_blocks(), two.root_block(), two.root_level()), ((5, 7), 7, 1));
        assert_eq!(two.expected_count(0, 1), 1);
        let three_levels = IndexShape::new(LayerKind::Delta, cap * cap + 1, 1).expect("valid");
        assert_eq!(three_levels.root_level(), 2);
        assert!(IndexShape::new(LayerKind::Delta, u64::MAX, 1).is_err());
        assert!(IndexShape::new(LayerKind::Delta, 1, 0).is_err());
    }

    #[test]
    fn builder_output_matches_shape() {
        for n in [0u64, 1, 239, 240, 241, 240 * 240, 240 * 240 + 1] {
            let mut b = BTreeBuilder::new(LayerKind::Delta);
            for i in 0..n {
                let mut key = [0u8; DELTA_INDEX_KEY_SIZE_BYTES];
                key[18..].copy_from_slice(&i.to_be_bytes());
                b.append(&key, i);
            }
            let (blocks, root) = b.finish(3);
            let shape = IndexShape::new(LayerKind::Delta, n, 3).expect("valid");
            assert_eq!(root, shape.root_block(), "n={n}");
            assert_eq!(blocks.len() / BLOCK_SIZE_BYTES, (shape.end_block() - 3) as usize, "n={n}");
            for (i, chunk) in blocks.chunks(BLOCK_SIZE_BYTES).enumerate() {
                let block: &Block = chunk.try_into().expect("whole block");
                check_node(block, 3 + i as u32, &shape).unwrap_or_else(|e| panic!("n={n} block {i}: {e}"));
            }
        }
    }
}
