//! Block 0 of a layer file: what the file is and where its parts are. Opening a layer reads only
//! this block; everything else is found from it.
//!
//! ```text
//!  off  size  field
//!    0     4  magic "NPLF"
//!    4     2  format version (1)
//!    6     1  kind (1 delta, 2 image)
//!    7     1  reserved (0)
//!    8    16  tenant id
//!   24    16  timeline id
//!   40    18  key range start
//!   58    18  key range end
//!   76     8  LSN range start
//!   84     8  LSN range end (image: LSN + 1)
//!   92     4  index start block (first leaf)
//!   96     4  index root block
//!  100     8  value count (index entries)
//!  108     4  block count (the file is exactly this many blocks)
//!  112     4  crc32c of bytes 0..112
//! ```
//!
//! All integers big-endian; the rest of the block is zero and not checked (it carries no meaning).

use std::ops::Range;

use utils::{Lsn, TenantId, TimelineId};

use super::{LayerKind, BLOCK_SIZE_BYTES};
use crate::key::{Key, KeyRange, KEY_SIZE_BYTES};

pub const LAYER_MAGIC: [u8; 4] = *b"NPLF";
pub const LAYER_FORMAT_VERSION: u16 = 1;
/// Bytes of the summary covered by its crc (the crc follows them).
pub const SUMMARY_BODY_SIZE_BYTES: usize = 112;
pub const SUMMARY_SIZE_BYTES: usize = SUMMARY_BODY_SIZE_BYTES + 4;

const KIND_DELTA: u8 = 1;
const KIND_IMAGE: u8 = 2;

/// The decoded summary block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub kind: LayerKind,
    pub tenant_id: TenantId,
    pub timeline_id: TimelineId,
    pub key_range: KeyRange,
    pub lsn_range: Range<Lsn>,
    pub index_start_block: u32,
    pub index_root_block: u32,
    pub value_count: u64,
    pub block_count: u32,
}

impl Summary {
    /// The full summary block, zero-padded to [`BLOCK_SIZE_BYTES`].
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(BLOCK_SIZE_BYTES);
        b.extend_from_slice(&LAYER_MAGIC);
        b.extend_from_slice(&LAYER_FORMAT_VERSION.to_be_bytes());
        b.push(match self.kind {
            LayerKind::Delta => KIND_DELTA,
            LayerKind::Image => KIND_IMAGE,
        });
        b.push(0);
        b.extend_from_slice(self.tenant_id.as_bytes());
        b.extend_from_slice(self.timeline_id.as_bytes());
        b.extend_from_slice(&self.key_range.start.to_be_bytes());
        b.extend_from_slice(&self.key_range.end.to_be_bytes());
        b.extend_from_slice(&self.lsn_range.start.0.to_be_bytes());
        b.extend_from_slice(&self.lsn_range.end.0.to_be_bytes());
        b.extend_from_slice(&self.index_start_block.to_be_bytes());
        b.extend_from_slice(&self.index_root_block.to_be_bytes());
        b.extend_from_slice(&self.value_count.to_be_bytes());
        b.extend_from_slice(&self.block_count.to_be_bytes());
        assert_eq!(b.len(), SUMMARY_BODY_SIZE_BYTES);
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_be_bytes());
        b.resize(BLOCK_SIZE_BYTES, 0);
        b
    }

    /// Decodes and checks a summary block. The error says what is wrong (the caller adds the path).
    pub fn decode(block: &[u8]) -> Result<Summary, String> {
        if block.len() < SUMMARY_SIZE_BYTES {
            return Err(format!("summary block is {} bytes, need {SUMMARY_SIZE_BYTES}", block.len()));
        }
        if block[0..4] != LAYER_MAGIC {
            return Err(format!("summary block: bad magic {:02x?} (not a layer file?)", &block[0..4]));
        }
        let stored_crc = be_u32(block, SUMMARY_BODY_SIZE_BYTES);
        let actual_crc = crc32c::crc32c(&block[..SUMMARY_BODY_SIZE_BYTES]);
        if stored_crc != actual_crc {
            return Err(format!(
                "summary block: checksum (crc32c) mismatch: stored {stored_crc:08x}, computed {actual_crc:08x}"
            ));
        }
        let version = u16::from_be_bytes([block[4], block[5]]);
        if version != LAYER_FORMAT_VERSION {
            return Err(format!(
                "summary block: format version {version} is not supported (this build reads {LAYER_FORMAT_VERSION})"
            ));
        }
        let kind = match block[6] {
            KIND_DELTA => LayerKind::Delta,
            KIND_IMAGE => LayerKind::Image,
            other => return Err(format!("summary block: unknown layer kind {other}")),
        };
        let id = |off: usize| -> [u8; 16] {
            let mut out = [0u8; 16];
            out.copy_from_slice(&block[off..off + 16]);
            out
        };
        let key = |off: usize| -> Key {
            let mut out = [0u8; KEY_SIZE_BYTES];
            out.copy_from_slice(&block[off..off + KEY_SIZE_BYTES]);
            Key::from_be_bytes(&out)
        };
        let key_start = key(40);
        let key_end = key(58);
        if key_start > key_end {
            return Err(format!("summary block: key range start {key_start} is after its end {key_end}"));
        }
        let lsn_range = Lsn(be_u64(block, 76))..Lsn(be_u64(block, 84));
        if lsn_range.start >= lsn_range.end {
            return Err(format!("summary block: empty LSN range {}..{}", lsn_range.start, lsn_range.end));
        }
        if kind == LayerKind::Image && lsn_range.end.0 != lsn_range.start.0.wrapping_add(1) {
            return Err(format!(
                "summary block: image layer LSN range {}..{} is not one LSN wide",
                lsn_range.start, lsn_range.end
            ));
        }
        Ok(Summary {
            kind,
            tenant_id: TenantId(id(8)),
            timeline_id: TimelineId(id(24)),
            key_range: KeyRange::new(key_start, key_end),
            lsn_range,
            index_start_block: be_u32(block, 92),
            index_root_block: be_u32(block, 96),
            value_count: be_u64(block, 100),
            block_count: be_u32(block, 108),
        })
    }
}

fn be_u32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn be_u64(b: &[u8], off: usize) -> u64 {
    let mut out = [0u8; 8];
    out.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_byte_flip_detected() {
        let s = Summary {
            kind: LayerKind::Delta,
            tenant_id: TenantId([1; 16]),
            timeline_id: TimelineId([2; 16]),
            key_range: KeyRange::new(Key::MIN, Key::MAX),
            lsn_range: Lsn(10)..Lsn(20),
            index_start_block: 3,
            index_root_block: 4,
            value_count: 5,
            block_count: 5,
        };
        let block = s.encode();
        assert_eq!(block.len(), BLOCK_SIZE_BYTES);
        assert_eq!(Summary::decode(&block), Ok(s));
        for pos in 0..SUMMARY_SIZE_BYTES {
            let mut b = block.clone();
            b[pos] ^= 0x40;
            assert!(Summary::decode(&b).is_err(), "flip at {pos} not detected");
        }
        assert!(Summary::decode(&block[..50]).is_err());
    }
}
