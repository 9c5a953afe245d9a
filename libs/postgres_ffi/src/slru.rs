//! SLRU geometry (`access/slru.h`, clog.c, multixact.c): which page and segment file hold a
//! transaction's status or a multixact's offset/members, and how those bits sit in a page.
//!
//! The pageserver stores SLRU pages by (kind, segment, page) and applies clog/multixact
//! records itself (DESIGN D5), so the math lives here next to the formats.

use crate::{MultiXactId, MultiXactOffset, TransactionId, BLCKSZ};

/// Pages per SLRU segment file.
pub const SLRU_PAGES_PER_SEGMENT: u32 = 32;

/// Which SLRU, and its directory under the data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SlruKind {
    Clog,
    MultiXactOffsets,
    MultiXactMembers,
}

impl SlruKind {
    pub fn dir_name(self) -> &'static str {
        match self {
            SlruKind::Clog => "pg_xact",
            SlruKind::MultiXactOffsets => "pg_multixact/offsets",
            SlruKind::MultiXactMembers => "pg_multixact/members",
        }
    }
}

/// Segment number and page-within-segment of SLRU page `pageno`.
pub fn page_to_segment(pageno: u32) -> (u32, u32) {
    (pageno / SLRU_PAGES_PER_SEGMENT, pageno % SLRU_PAGES_PER_SEGMENT)
}

/// `SlruFileName`: segment files are named with (at least) four upper-case hex digits.
pub fn segment_file_name(segno: u32) -> String {
    format!("{segno:04X}")
}

/// Parses a segment file name made by [`segment_file_name`].
pub fn parse_segment_file_name(name: &str) -> Option<u32> {
    if name.len() < 4 || name.len() > 6 || !name.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase()) {
        return None;
    }
    u32::from_str_radix(name, 16).ok()
}

// --- CLOG (pg_xact): 2 status bits per transaction.

pub const CLOG_BITS_PER_XACT: u32 = 2;
pub const CLOG_XACTS_PER_BYTE: u32 = 4;
pub const CLOG_XACTS_PER_PAGE: u32 = BLCKSZ as u32 * CLOG_XACTS_PER_BYTE;
pub const CLOG_XACT_BITMASK: u8 = 0x03;

pub const TRANSACTION_STATUS_IN_PROGRESS: u8 = 0x00;
pub const TRANSACTION_STATUS_COMMITTED: u8 = 0x01;
pub const TRANSACTION_STATUS_ABORTED: u8 = 0x02;
pub const TRANSACTION_STATUS_SUB_COMMITTED: u8 = 0x03;

/// `TransactionIdToPage`.
pub fn clog_xid_to_page(xid: TransactionId) -> u32 {
    xid / CLOG_XACTS_PER_PAGE
}

/// Byte offset within the clog page and bit shift within the byte for `xid`.
pub fn clog_xid_location(xid: TransactionId) -> (usize, u8) {
    let index = xid % CLOG_XACTS_PER_PAGE;
    let byte = (index / CLOG_XACTS_PER_BYTE) as usize;
    let shift = ((xid % CLOG_XACTS_PER_BYTE) * CLOG_BITS_PER_XACT) as u8;
    (byte, shift)
}

/// Reads `xid`'s status from its clog page; `None` if `page` is not a full block.
pub fn clog_get_status(page: &[u8], xid: TransactionId) -> Option<u8> {
    let (byte, shift) = clog_xid_location(xid);
    (page.len() == BLCKSZ).then(|| (page[byte] >> shift) & CLOG_XACT_BITMASK)
}

/// Sets `xid`'s status on its clog page; false if `page` is not a full block.
pub fn clog_set_status(page: &mut [u8], xid: TransactionId, status: u8) -> bool {
    if page.len() != BLCKSZ {
        return false;
    }
    let (byte, shift) = clog_xid_location(xid);
    page[byte] = (page[byte] & !(CLOG_XACT_BITMASK << shift)) | ((status & CLOG_XACT_BITMASK) << shift);
    true
}

// --- MultiXact offsets: one 4-byte MultiXactOffset per multixact id.

pub const MULTIXACT_OFFSETS_PER_PAGE: u32 = BLCKSZ as u32 / 4;

/// `MultiXactIdToOffsetPage`.
pub fn multixact_id_to_offsets_page(multi: MultiXactId) -> u32 {
    multi / MULTIXACT_OFFSETS_PER_PAGE
}

/// Byte offset of `multi`'s entry within its offsets page.
pub fn multixact_id_to_offsets_byte(multi: MultiXactId) -> usize {
    (multi % MULTIXACT_OFFSETS_PER_PAGE) as usize * 4
}

// --- MultiXact members: groups of 4 flag bytes followed by 4 xids (20 bytes).

pub const MXACT_MEMBER_BITS_PER_XACT: u32 = 8;
pub const MULTIXACT_FLAGBYTES_PER_GROUP: u32 = 4;
pub const MULTIXACT_MEMBERS_PER_MEMBERGROUP: u32 = MULTIXACT_FLAGBYTES_PER_GROUP;
pub const MULTIXACT_MEMBERGROUP_SIZE: u32 = 4 * MULTIXACT_MEMBERS_PER_MEMBERGROUP + MULTIXACT_FLAGBYTES_PER_GROUP;
pub const MULTIXACT_MEMBERGROUPS_PER_PAGE: u32 = BLCKSZ as u32 / MULTIXACT_MEMBERGROUP_SIZE;
pub const MULTIXACT_MEMBERS_PER_PAGE: u32 = MULTIXACT_MEMBERGROUPS_PER_PAGE * MULTIXACT_MEMBERS_PER_MEMBERGROUP;

/// `MXOffsetToMemberPage`.
pub fn mx_offset_to_member_page(offset: MultiXactOffset) -> u32 {
    offset / MULTIXACT_MEMBERS_PER_PAGE
}

/// `MXOffsetToFlagsOffset`: byte offset of the flags word holding member `offset`'s status.
pub fn mx_offset_to_flags_offset(offset: MultiXactOffset) -> usize {
    ((offset / MULTIXACT_MEMBERS_PER_MEMBERGROUP) % MULTIXACT_MEMBERGROUPS_PER_PAGE * MULTIXACT_MEMBERGROUP_SIZE)
        as usize
}

/// `MXOffsetToFlagsBitShift`.
pub fn mx_offset_to_flags_bitshift(offset: MultiXactOffset) -> u32 {
    (offset % MULTIXACT_MEMBERS_PER_MEMBERGROUP) * MXACT_MEMBER_BITS_PER_XACT
}

/// `MXOffsetToMemberOffset`: byte offset of member `offset`'s xid within its page.
pub fn mx_offset_to_member_offset(offset: MultiXactOffset) -> usize {
    mx_offset_to_flags_offset(offset)
        + MULTIXACT_FLAGBYTES_PER_GROUP as usize
        + (offset % MULTIXACT_MEMBERS_PER_MEMBERGROUP) as usize * 4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_postgres() {
        assert_eq!(CLOG_XACTS_PER_PAGE, 32768);
        assert_eq!(MULTIXACT_OFFSETS_PER_PAGE, 2048);
        assert_eq!(MULTIXACT_MEMBERGROUPS_PER_PAGE, 409);
        assert_eq!(MULTIXACT_MEMBERS_PER_PAGE, 1636);
        assert_eq!(page_to_segment(33), (1, 1));
        assert_eq!(segment_file_name(0x1A), "001A");
        assert_eq!(parse_segment_file_name("001A"), Some(0x1A));
        assert_eq!(parse_segment_file_name("001a"), None);
        assert_eq!(parse_segment_file_name("1A"), None);
        assert_eq!(clog_xid_to_page(32768 * 3 + 5), 3);
        assert_eq!(clog_xid_location(5), (1, 2));
        assert_eq!(multixact_id_to_offsets_page(4096), 2);
        assert_eq!(multixact_id_to_offsets_byte(2049), 4);
        assert_eq!(mx_offset_to_member_page(1636), 1);
        assert_eq!(mx_offset_to_flags_offset(5), 20);
        assert_eq!(mx_offset_to_flags_bitshift(5), 8);
        assert_eq!(mx_offset_to_member_offset(5), 20 + 4 + 4);
    }

    #[test]
    fn clog_status_round_trip() {
        let mut page = vec![0u8; BLCKSZ];
        for xid in [3u32, 4, 5, 6, 32767] {
            assert!(clog_set_status(&mut page, xid, TRANSACTION_STATUS_COMMITTED));
        }
        assert!(clog_set_status(&mut page, 4, TRANSACTION_STATUS_ABORTED));
        assert_eq!(clog_get_status(&page, 3), Some(TRANSACTION_STATUS_COMMITTED));
        assert_eq!(clog_get_status(&page, 4), Some(TRANSACTION_STATUS_ABORTED));
        assert_eq!(clog_get_status(&page, 7), Some(TRANSACTION_STATUS_IN_PROGRESS));
        assert_eq!(clog_get_status(&page[..10], 7), None);
    }
}
