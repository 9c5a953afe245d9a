//! WAL segment file names (`XLogFileName`, `XLogFromFileName`, `IsPartialXLogFileName`).
//!
//! A name is 24 upper-case hex digits: timeline, then the segment number split into a "log"
//! part and a "seg" part at `0x1_0000_0000 / segment size`. `.partial` marks an incomplete
//! last segment (what a safekeeper holds for the segment being written).

use utils::Lsn;

use crate::TimeLineId;

pub const XLOG_FNAME_LEN: usize = 24;
pub const PARTIAL_SUFFIX: &str = ".partial";

/// `XLogSegmentsPerXLogId`.
pub fn segments_per_xlog_id(seg_size_bytes: usize) -> u64 {
    0x1_0000_0000u64 / seg_size_bytes as u64
}

/// `XLogFileName`.
pub fn xlog_file_name(tli: TimeLineId, segno: u64, seg_size_bytes: usize) -> String {
    let per_id = segments_per_xlog_id(seg_size_bytes);
    format!("{:08X}{:08X}{:08X}", tli, segno / per_id, segno % per_id)
}

/// Name of the segment holding `lsn`.
pub fn xlog_file_name_for_lsn(tli: TimeLineId, lsn: Lsn, seg_size_bytes: usize) -> String {
    xlog_file_name(tli, lsn.0 / seg_size_bytes as u64, seg_size_bytes)
}

/// `IsXLogFileName`.
pub fn is_xlog_file_name(name: &str) -> bool {
    name.len() == XLOG_FNAME_LEN && name.bytes().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

/// `IsPartialXLogFileName`.
pub fn is_partial_xlog_file_name(name: &str) -> bool {
    name.strip_suffix(PARTIAL_SUFFIX).is_some_and(is_xlog_file_name)
}

/// `XLogFromFileName`: (segment number, timeline); accepts a `.partial` name too.
pub fn parse_xlog_file_name(name: &str, seg_size_bytes: usize) -> Option<(u64, TimeLineId)> {
    let base = name.strip_suffix(PARTIAL_SUFFIX).unwrap_or(name);
    if !is_xlog_file_name(base) {
        return None;
    }
    let tli = u32::from_str_radix(&base[0..8], 16).ok()?;
    let log = u32::from_str_radix(&base[8..16], 16).ok()? as u64;
    let seg = u32::from_str_radix(&base[16..24], 16).ok()? as u64;
    let per_id = segments_per_xlog_id(seg_size_bytes);
    if seg >= per_id {
        return None;
    }
    Some((log * per_id + seg, tli))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::WAL_SEGMENT_SIZE;

    #[test]
    fn names_round_trip() {
        assert_eq!(xlog_file_name(1, 1, WAL_SEGMENT_SIZE), "000000010000000000000001");
        assert_eq!(xlog_file_name(1, 0x100, WAL_SEGMENT_SIZE), "000000010000000100000000");
        assert_eq!(xlog_file_name_for_lsn(2, Lsn(0x1_0300_0028), WAL_SEGMENT_SIZE), "000000020000000100000003");
        assert_eq!(parse_xlog_file_name("000000010000000100000000", WAL_SEGMENT_SIZE), Some((0x100, 1)));
        assert_eq!(parse_xlog_file_name("000000010000000000000003.partial", WAL_SEGMENT_SIZE), Some((3, 1)));
        assert!(is_partial_xlog_file_name("000000010000000000000003.partial"));
        assert!(!is_partial_xlog_file_name("000000010000000000000003"));
        assert!(!is_xlog_file_name("00000001000000000000000a"));
        assert_eq!(parse_xlog_file_name("000000010000000000000100", WAL_SEGMENT_SIZE), None);
        assert_eq!(xlog_file_name(1, 5000, 1024 * 1024), "000000010000000100000388");
    }
}
