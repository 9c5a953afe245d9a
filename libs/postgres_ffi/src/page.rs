//! Relation page layout (`storage/bufpage.h`): the 24-byte page header every 8 KiB block
//! starts with, and the visibility-map page geometry.
//!
//! The pageserver needs `pd_lsn` (to stamp pages it reconstructs and to check FPIs) and
//! `PageIsNew`; the visibility-map helpers let it clear VM bits without a redo process.

use utils::Lsn;

use crate::error::DecodeError;
use crate::{BlockNumber, TransactionId, BLCKSZ};

/// `SizeOfPageHeaderData`.
pub const SIZE_OF_PAGE_HEADER_DATA: usize = 24;
/// `PG_PAGE_LAYOUT_VERSION`, stored in the low byte of `pd_pagesize_version`.
pub const PG_PAGE_LAYOUT_VERSION: u16 = 4;

pub const PD_HAS_FREE_LINES: u16 = 0x0001;
pub const PD_PAGE_FULL: u16 = 0x0002;
pub const PD_ALL_VISIBLE: u16 = 0x0004;
pub const PD_VALID_FLAG_BITS: u16 = 0x0007;

/// `PageHeaderData`, field by field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PageHeaderData {
    /// LSN of the last WAL record that changed this page (stored as two `uint32`: hi, lo).
    pub pd_lsn: Lsn,
    pub pd_checksum: u16,
    pub pd_flags: u16,
    /// Offset to the start of free space.
    pub pd_lower: u16,
    /// Offset to the end of free space; 0 on a never-initialised page.
    pub pd_upper: u16,
    /// Offset to the start of the special space.
    pub pd_special: u16,
    pub pd_pagesize_version: u16,
    pub pd_prune_xid: TransactionId,
}

impl PageHeaderData {
    pub fn decode(page: &[u8]) -> Result<PageHeaderData, DecodeError> {
        let mut r = crate::reader::Reader::new(page, Lsn::INVALID, "PageHeaderData");
        let hi = r.u32("pd_lsn.xlogid")? as u64;
        let lo = r.u32("pd_lsn.xrecoff")? as u64;
        Ok(PageHeaderData {
            pd_lsn: Lsn((hi << 32) | lo),
            pd_checksum: r.u16("pd_checksum")?,
            pd_flags: r.u16("pd_flags")?,
            pd_lower: r.u16("pd_lower")?,
            pd_upper: r.u16("pd_upper")?,
            pd_special: r.u16("pd_special")?,
            pd_pagesize_version: r.u16("pd_pagesize_version")?,
            pd_prune_xid: r.u32("pd_prune_xid")?,
        })
    }

    pub fn encode(&self) -> [u8; SIZE_OF_PAGE_HEADER_DATA] {
        let mut out = [0u8; SIZE_OF_PAGE_HEADER_DATA];
        out[0..4].copy_from_slice(&((self.pd_lsn.0 >> 32) as u32).to_le_bytes());
        out[4..8].copy_from_slice(&(self.pd_lsn.0 as u32).to_le_bytes());
        out[8..10].copy_from_slice(&self.pd_checksum.to_le_bytes());
        out[10..12].copy_from_slice(&self.pd_flags.to_le_bytes());
        out[12..14].copy_from_slice(&self.pd_lower.to_le_bytes());
        out[14..16].copy_from_slice(&self.pd_upper.to_le_bytes());
        out[16..18].copy_from_slice(&self.pd_special.to_le_bytes());
        out[18..20].copy_from_slice(&self.pd_pagesize_version.to_le_bytes());
        out[20..24].copy_from_slice(&self.pd_prune_xid.to_le_bytes());
        out
    }

    /// Page size encoded in `pd_pagesize_version` (high byte bits).
    pub fn page_size(&self) -> usize {
        (self.pd_pagesize_version & 0xFF00) as usize
    }

    pub fn layout_version(&self) -> u16 {
        self.pd_pagesize_version & 0x00FF
    }
}

/// `PageGetLSN`; `None` if `page` is shorter than the 8-byte `pd_lsn`.
pub fn page_get_lsn(page: &[u8]) -> Option<Lsn> {
    let b = page.get(0..8)?;
    let hi = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64;
    let lo = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as u64;
    Some(Lsn((hi << 32) | lo))
}

/// `PageSetLSN`; returns false (and changes nothing) if `page` is shorter than 8 bytes.
pub fn page_set_lsn(page: &mut [u8], lsn: Lsn) -> bool {
    let Some(b) = page.get_mut(0..8) else {
        return false;
    };
    b[0..4].copy_from_slice(&((lsn.0 >> 32) as u32).to_le_bytes());
    b[4..8].copy_from_slice(&(lsn.0 as u32).to_le_bytes());
    true
}

/// `PageIsNew`: `pd_upper == 0`, i.e. the page was never initialised (an all-zero block that
/// a relation extension left behind). A buffer too short to hold `pd_upper` counts as new.
pub fn page_is_new(page: &[u8]) -> bool {
    match page.get(14..16) {
        Some(b) => u16::from_le_bytes([b[0], b[1]]) == 0,
        None => true,
    }
}

/// `PageInit`: an empty page with `special_size_bytes` (MAXALIGNed) of special space.
pub fn page_init(special_size_bytes: usize) -> Vec<u8> {
    let special = crate::maxalign(special_size_bytes).min(BLCKSZ - SIZE_OF_PAGE_HEADER_DATA);
    let mut page = vec![0u8; BLCKSZ];
    let hdr = PageHeaderData {
        pd_lower: SIZE_OF_PAGE_HEADER_DATA as u16,
        pd_upper: (BLCKSZ - special) as u16,
        pd_special: (BLCKSZ - special) as u16,
        pd_pagesize_version: BLCKSZ as u16 | PG_PAGE_LAYOUT_VERSION,
        ..Default::default()
    };
    page[..SIZE_OF_PAGE_HEADER_DATA].copy_from_slice(&hdr.encode());
    page
}

/// Visibility-map bits per heap block (`visibilitymapdefs.h`).
pub const VISIBILITYMAP_ALL_VISIBLE: u8 = 0x01;
pub const VISIBILITYMAP_ALL_FROZEN: u8 = 0x02;
pub const VISIBILITYMAP_VALID_BITS: u8 = 0x03;
/// Bytes of map per VM page (`MAPSIZE`), and heap blocks one VM page covers.
pub const VM_MAPSIZE_BYTES: usize = BLCKSZ - crate::maxalign(SIZE_OF_PAGE_HEADER_DATA);
pub const VM_HEAPBLOCKS_PER_BYTE: u32 = 4;
pub const VM_HEAPBLOCKS_PER_PAGE: u32 = VM_MAPSIZE_BYTES as u32 * VM_HEAPBLOCKS_PER_BYTE;

/// Where heap block `heap_blk`'s VM bits live: (VM block, byte offset within the VM page,
/// bit shift within that byte). The byte offset already includes the page header.
pub fn vm_bit_location(heap_blk: BlockNumber) -> (BlockNumber, usize, u8) {
    let map_block = heap_blk / VM_HEAPBLOCKS_PER_PAGE;
    let map_byte = (heap_blk % VM_HEAPBLOCKS_PER_PAGE) / VM_HEAPBLOCKS_PER_BYTE;
    let shift = ((heap_blk % VM_HEAPBLOCKS_PER_BYTE) * 2) as u8;
    (map_block, SIZE_OF_PAGE_HEADER_DATA + map_byte as usize, shift)
}

/// Clears `bits` (a mask of `VISIBILITYMAP_*`) for `heap_blk` on its VM page, as
/// `visibilitymap_clear` does in redo. Returns false if `vm_page` is not a full block or is
/// not the VM page that covers `heap_blk` (caller's bug, reported instead of panicking).
pub fn vm_clear_bits(vm_page: &mut [u8], vm_blkno: BlockNumber, heap_blk: BlockNumber, bits: u8) -> bool {
    let (map_block, byte, shift) = vm_bit_location(heap_blk);
    if vm_page.len() != BLCKSZ || map_block != vm_blkno {
        return false;
    }
    vm_page[byte] &= !((bits & VISIBILITYMAP_VALID_BITS) << shift);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_lsn() {
        let mut page = page_init(16);
        assert!(!page_is_new(&page));
        assert!(page_is_new(&[0u8; BLCKSZ]));
        let hdr = PageHeaderData::decode(&page).unwrap();
        assert_eq!(hdr.pd_lower, 24);
        assert_eq!(hdr.pd_upper, 8176);
        assert_eq!(hdr.page_size(), 8192);
        assert_eq!(hdr.layout_version(), 4);
        assert!(page_set_lsn(&mut page, Lsn(0x1_0000_0028)));
        assert_eq!(page_get_lsn(&page), Some(Lsn(0x1_0000_0028)));
        // xlogid (high half) comes first.
        assert_eq!(&page[0..8], &[1, 0, 0, 0, 0x28, 0, 0, 0]);
        let hdr = PageHeaderData::decode(&page).unwrap();
        assert_eq!(PageHeaderData::decode(&hdr.encode()).unwrap(), hdr);
        assert!(PageHeaderData::decode(&page[..10]).is_err());
        assert_eq!(page_get_lsn(&page[..7]), None);
    }

    #[test]
    fn vm_geometry() {
        assert_eq!(VM_HEAPBLOCKS_PER_PAGE, 32672);
        assert_eq!(vm_bit_location(0), (0, 24, 0));
        assert_eq!(vm_bit_location(5), (0, 25, 2));
        assert_eq!(vm_bit_location(32672 + 3), (1, 24, 6));
        let mut vm = vec![0xFFu8; BLCKSZ];
        assert!(vm_clear_bits(&mut vm, 0, 5, VISIBILITYMAP_ALL_FROZEN));
        assert_eq!(vm[25], !(0x02 << 2));
        assert!(!vm_clear_bits(&mut vm, 1, 5, VISIBILITYMAP_VALID_BITS));
    }
}
