//! Heap and heap2 records (access/heapam_xlog.h), only as far as the visibility map goes.
//!
//! Heap redo clears VM bits of the heap pages it touches when the record's flags say so, but
//! the VM page is not among the record's block references. Whoever stores pages by block
//! reference (the pageserver) must therefore see these flags and attach the change to the VM
//! block too. Everything else about heap records lives in their block references.

use utils::Lsn;

use crate::error::DecodeError;
use crate::page::{VISIBILITYMAP_ALL_FROZEN, VISIBILITYMAP_VALID_BITS};
use crate::reader::Reader;
use crate::record::DecodedXLogRecord;
use crate::reltag::RelFileNode;
use crate::rmgr::{RM_HEAP2_ID, RM_HEAP_ID};
use crate::BlockNumber;

pub const XLOG_HEAP_INSERT: u8 = 0x00;
pub const XLOG_HEAP_DELETE: u8 = 0x10;
pub const XLOG_HEAP_UPDATE: u8 = 0x20;
pub const XLOG_HEAP_TRUNCATE: u8 = 0x30;
pub const XLOG_HEAP_HOT_UPDATE: u8 = 0x40;
pub const XLOG_HEAP_CONFIRM: u8 = 0x50;
pub const XLOG_HEAP_LOCK: u8 = 0x60;
pub const XLOG_HEAP_INPLACE: u8 = 0x70;
pub const XLOG_HEAP_OPMASK: u8 = 0x70;
pub const XLOG_HEAP_INIT_PAGE: u8 = 0x80;

pub const XLOG_HEAP2_REWRITE: u8 = 0x00;
pub const XLOG_HEAP2_PRUNE: u8 = 0x10;
pub const XLOG_HEAP2_VACUUM: u8 = 0x20;
pub const XLOG_HEAP2_FREEZE_PAGE: u8 = 0x30;
pub const XLOG_HEAP2_VISIBLE: u8 = 0x40;
pub const XLOG_HEAP2_MULTI_INSERT: u8 = 0x50;
pub const XLOG_HEAP2_LOCK_UPDATED: u8 = 0x60;
pub const XLOG_HEAP2_NEW_CID: u8 = 0x70;

pub const XLH_INSERT_ALL_VISIBLE_CLEARED: u8 = 1 << 0;
pub const XLH_INSERT_LAST_IN_MULTI: u8 = 1 << 1;
pub const XLH_INSERT_IS_SPECULATIVE: u8 = 1 << 2;
pub const XLH_INSERT_CONTAINS_NEW_TUPLE: u8 = 1 << 3;
pub const XLH_INSERT_ON_TOAST_RELATION: u8 = 1 << 4;
pub const XLH_INSERT_ALL_FROZEN_SET: u8 = 1 << 5;
pub const XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED: u8 = 1 << 0;
pub const XLH_UPDATE_NEW_ALL_VISIBLE_CLEARED: u8 = 1 << 1;
pub const XLH_DELETE_ALL_VISIBLE_CLEARED: u8 = 1 << 0;
pub const XLH_LOCK_ALL_FROZEN_CLEARED: u8 = 0x01;

/// Offsets of the `flags` byte in each record's main data.
const INSERT_FLAGS_OFFSET: usize = 2; // xl_heap_insert: offnum u16, flags
const DELETE_FLAGS_OFFSET: usize = 7; // xl_heap_delete: xmax, offnum, infobits_set, flags
const UPDATE_FLAGS_OFFSET: usize = 7; // xl_heap_update: old_xmax, old_offnum, old_infobits_set, flags, ...
const LOCK_FLAGS_OFFSET: usize = 7; // xl_heap_lock / xl_heap_lock_updated: xid, offnum, infobits, flags
const MULTI_INSERT_FLAGS_OFFSET: usize = 0; // xl_heap_multi_insert: flags first

/// Heap blocks of one relation whose VM bits a record clears, and which bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmBitsCleared {
    pub rel: RelFileNode,
    /// The block the new tuple went to (insert, multi-insert, update's new page).
    pub new_heap_blkno: Option<BlockNumber>,
    /// The block of the old tuple (delete, update's old page, lock).
    pub old_heap_blkno: Option<BlockNumber>,
    /// `VISIBILITYMAP_VALID_BITS` for data changes, `VISIBILITYMAP_ALL_FROZEN` for locks.
    pub bits: u8,
}

impl VmBitsCleared {
    /// The distinct heap blocks affected.
    pub fn heap_blocks(&self) -> impl Iterator<Item = BlockNumber> {
        let new = self.new_heap_blkno;
        let old = self.old_heap_blkno.filter(|o| Some(*o) != new);
        new.into_iter().chain(old)
    }
}

fn flags_at(data: &[u8], offset: usize, lsn: Lsn, what: &'static str) -> Result<u8, DecodeError> {
    let mut r = Reader::new(data, lsn, what);
    r.skip(offset, "fields before flags")?;
    r.u8("flags")
}

fn block0(rec: &DecodedXLogRecord, what: &str) -> Result<(RelFileNode, BlockNumber), DecodeError> {
    rec.block(0)
        .map(|b| (b.rel, b.blkno))
        .ok_or_else(|| DecodeError::new(rec.lsn, format!("{what} record has no block reference 0")))
}

/// Which VM bits a heap/heap2 record clears; `Ok(None)` if it clears none (or is not a heap
/// record).
pub fn vm_bits_cleared(rec: &DecodedXLogRecord) -> Result<Option<VmBitsCleared>, DecodeError> {
    let info = rec.rmgr_info() & XLOG_HEAP_OPMASK;
    let lsn = rec.lsn;
    let data = &rec.main_data[..];
    let mk = |rel, new, old, bits| Some(VmBitsCleared { rel, new_heap_blkno: new, old_heap_blkno: old, bits });
    match rec.rmid() {
        RM_HEAP_ID => match info {
            XLOG_HEAP_INSERT => {
                let flags = flags_at(data, INSERT_FLAGS_OFFSET, lsn, "xl_heap_insert")?;
                if flags & XLH_INSERT_ALL_VISIBLE_CLEARED == 0 {
                    return Ok(None);
                }
                let (rel, blk) = block0(rec, "heap insert")?;
                Ok(mk(rel, Some(blk), None, VISIBILITYMAP_VALID_BITS))
            }
            XLOG_HEAP_DELETE => {
                let flags = flags_at(data, DELETE_FLAGS_OFFSET, lsn, "xl_heap_delete")?;
                if flags & XLH_DELETE_ALL_VISIBLE_CLEARED == 0 {
                    return Ok(None);
                }
                let (rel, blk) = block0(rec, "heap delete")?;
                Ok(mk(rel, None, Some(blk), VISIBILITYMAP_VALID_BITS))
            }
            XLOG_HEAP_UPDATE | XLOG_HEAP_HOT_UPDATE => {
                let flags = flags_at(data, UPDATE_FLAGS_OFFSET, lsn, "xl_heap_update")?;
                let (rel, new_blk) = block0(rec, "heap update")?;
                // Block 1 is the old page when the tuple moved to another page.
                let old_blk = rec.block(1).map(|b| b.blkno).unwrap_or(new_blk);
                let new = (flags & XLH_UPDATE_NEW_ALL_VISIBLE_CLEARED != 0).then_some(new_blk);
                let old = (flags & XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED != 0).then_some(old_blk);
                if new.is_none() && old.is_none() {
                    return Ok(None);
                }
                Ok(mk(rel, new, old, VISIBILITYMAP_VALID_BITS))
            }
            XLOG_HEAP_LOCK => {
                let flags = flags_at(data, LOCK_FLAGS_OFFSET, lsn, "xl_heap_lock")?;
                if flags & XLH_LOCK_ALL_FROZEN_CLEARED == 0 {
                    return Ok(None);
                }
                let (rel, blk) = block0(rec, "heap lock")?;
                Ok(mk(rel, None, Some(blk), VISIBILITYMAP_ALL_FROZEN))
            }
            _ => Ok(None),
        },
        RM_HEAP2_ID => match info {
            XLOG_HEAP2_MULTI_INSERT => {
                let flags = flags_at(data, MULTI_INSERT_FLAGS_OFFSET, lsn, "xl_heap_multi_insert")?;
                if flags & XLH_INSERT_ALL_VISIBLE_CLEARED == 0 {
                    return Ok(None);
                }
                let (rel, blk) = block0(rec, "heap2 multi-insert")?;
                Ok(mk(rel, Some(blk), None, VISIBILITYMAP_VALID_BITS))
            }
            XLOG_HEAP2_LOCK_UPDATED => {
                let flags = flags_at(data, LOCK_FLAGS_OFFSET, lsn, "xl_heap_lock_updated")?;
                if flags & XLH_LOCK_ALL_FROZEN_CLEARED == 0 {
                    return Ok(None);
                }
                let (rel, blk) = block0(rec, "heap2 lock-updated")?;
                Ok(mk(rel, None, Some(blk), VISIBILITYMAP_ALL_FROZEN))
            }
            _ => Ok(None),
        },
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::decode_record;
    use crate::wal_writer::{encode_record, BlockSpec, RecordSpec};
    use bytes::Bytes;

    fn rec(rmid: u8, info: u8, main: &[u8], blknos: &[u32]) -> DecodedXLogRecord {
        let rel = RelFileNode { spcnode: 1663, dbnode: 5, relnode: 16384 };
        let blocks = blknos
            .iter()
            .enumerate()
            .map(|(i, &b)| BlockSpec {
                block_id: i as u8,
                rel,
                forknum: 0,
                blkno: b,
                will_init: false,
                image: None,
                data: vec![1],
            })
            .collect();
        let spec = RecordSpec { rmid, info, xid: 700, blocks, main_data: main.to_vec(), ..Default::default() };
        decode_record(Bytes::from(encode_record(&spec, Lsn(0x10)).unwrap()), Lsn(0x100)).unwrap()
    }

    #[test]
    fn flags_map_to_blocks() {
        let r = rec(RM_HEAP_ID, XLOG_HEAP_INSERT, &[1, 0, XLH_INSERT_ALL_VISIBLE_CLEARED], &[7]);
        let v = vm_bits_cleared(&r).unwrap().unwrap();
        assert_eq!((v.new_heap_blkno, v.old_heap_blkno, v.bits), (Some(7), None, VISIBILITYMAP_VALID_BITS));
        let r = rec(RM_HEAP_ID, XLOG_HEAP_INSERT, &[1, 0, 0], &[7]);
        assert_eq!(vm_bits_cleared(&r).unwrap(), None);

        let mut upd = vec![0u8; 14];
        upd[7] = XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED | XLH_UPDATE_NEW_ALL_VISIBLE_CLEARED;
        let v = vm_bits_cleared(&rec(RM_HEAP_ID, XLOG_HEAP_UPDATE, &upd, &[9, 3])).unwrap().unwrap();
        assert_eq!((v.new_heap_blkno, v.old_heap_blkno), (Some(9), Some(3)));
        assert_eq!(v.heap_blocks().collect::<Vec<_>>(), vec![9, 3]);
        let v = vm_bits_cleared(&rec(RM_HEAP_ID, XLOG_HEAP_HOT_UPDATE, &upd, &[9])).unwrap().unwrap();
        assert_eq!(v.heap_blocks().collect::<Vec<_>>(), vec![9]);

        let mut lock = vec![0u8; 8];
        lock[7] = XLH_LOCK_ALL_FROZEN_CLEARED;
        let v = vm_bits_cleared(&rec(RM_HEAP_ID, XLOG_HEAP_LOCK, &lock, &[4])).unwrap().unwrap();
        assert_eq!((v.old_heap_blkno, v.bits), (Some(4), VISIBILITYMAP_ALL_FROZEN));
        let v = vm_bits_cleared(&rec(RM_HEAP2_ID, XLOG_HEAP2_LOCK_UPDATED, &lock, &[4])).unwrap().unwrap();
        assert_eq!(v.bits, VISIBILITYMAP_ALL_FROZEN);
        let v = vm_bits_cleared(&rec(RM_HEAP2_ID, XLOG_HEAP2_MULTI_INSERT, &[1, 2, 0], &[5])).unwrap().unwrap();
        assert_eq!(v.new_heap_blkno, Some(5));
        let mut del = vec![0u8; 8];
        del[7] = XLH_DELETE_ALL_VISIBLE_CLEARED;
        assert_eq!(
            vm_bits_cleared(&rec(RM_HEAP_ID, XLOG_HEAP_DELETE, &del, &[2])).unwrap().unwrap().old_heap_blkno,
            Some(2)
        );
        // Truncated main data and missing block references are errors, not panics.
        assert!(vm_bits_cleared(&rec(RM_HEAP_ID, XLOG_HEAP_DELETE, &del[..5], &[2])).is_err());
        assert!(vm_bits_cleared(&rec(RM_HEAP_ID, XLOG_HEAP_DELETE, &del, &[])).is_err());
    }
}
