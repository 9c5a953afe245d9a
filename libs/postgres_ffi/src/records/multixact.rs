//! MultiXact records (access/multixact.h): zeroed offsets/members pages, a new multixact
//! with its members, and truncation.

use utils::Lsn;

use crate::error::DecodeError;
use crate::reader::Reader;
use crate::{MultiXactId, MultiXactOffset, Oid, TransactionId};

pub const XLOG_MULTIXACT_ZERO_OFF_PAGE: u8 = 0x00;
pub const XLOG_MULTIXACT_ZERO_MEM_PAGE: u8 = 0x10;
pub const XLOG_MULTIXACT_CREATE_ID: u8 = 0x20;
pub const XLOG_MULTIXACT_TRUNCATE_ID: u8 = 0x30;

/// `MultiXactStatus` values.
pub const MULTIXACT_STATUS_FOR_KEY_SHARE: u32 = 0x00;
pub const MULTIXACT_STATUS_FOR_SHARE: u32 = 0x01;
pub const MULTIXACT_STATUS_FOR_NO_KEY_UPDATE: u32 = 0x02;
pub const MULTIXACT_STATUS_FOR_UPDATE: u32 = 0x03;
pub const MULTIXACT_STATUS_NO_KEY_UPDATE: u32 = 0x04;
pub const MULTIXACT_STATUS_UPDATE: u32 = 0x05;

/// `MultiXactMember`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultiXactMember {
    pub xid: TransactionId,
    pub status: u32,
}

/// `xl_multixact_create`: multixact `mid` has `members`, stored from offset `moff` on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultiXactCreate {
    pub mid: MultiXactId,
    pub moff: MultiXactOffset,
    pub members: Vec<MultiXactMember>,
}

/// `xl_multixact_truncate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultiXactTruncate {
    pub oldest_multi_db: Oid,
    pub start_trunc_off: MultiXactId,
    pub end_trunc_off: MultiXactId,
    pub start_trunc_memb: MultiXactOffset,
    pub end_trunc_memb: MultiXactOffset,
}

/// Body of a zero-offsets-page or zero-members-page record: the page number (`int`).
pub fn parse_zero_page(data: &[u8], lsn: Lsn) -> Result<u32, DecodeError> {
    let mut r = Reader::new(data, lsn, "multixact zero page");
    let pageno = r.i32("pageno")?;
    u32::try_from(pageno).map_err(|_| r.error(format_args!("negative page number {pageno}")))
}

pub fn parse_create(data: &[u8], lsn: Lsn) -> Result<MultiXactCreate, DecodeError> {
    let mut r = Reader::new(data, lsn, "xl_multixact_create");
    let mid = r.u32("mid")?;
    let moff = r.u32("moff")?;
    let n = r.count("nmembers", 8)?;
    let mut members = Vec::with_capacity(n);
    for _ in 0..n {
        let xid = r.u32("members.xid")?;
        let status = r.u32("members.status")?;
        if status > MULTIXACT_STATUS_UPDATE {
            return Err(r.error(format_args!("member {xid} has invalid status {status}")));
        }
        members.push(MultiXactMember { xid, status });
    }
    Ok(MultiXactCreate { mid, moff, members })
}

pub fn parse_truncate(data: &[u8], lsn: Lsn) -> Result<MultiXactTruncate, DecodeError> {
    let mut r = Reader::new(data, lsn, "xl_multixact_truncate");
    Ok(MultiXactTruncate {
        oldest_multi_db: r.u32("oldestMultiDB")?,
        start_trunc_off: r.u32("startTruncOff")?,
        end_trunc_off: r.u32("endTruncOff")?,
        start_trunc_memb: r.u32("startTruncMemb")?,
        end_trunc_memb: r.u32("endTruncMemb")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        let words = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let c = parse_create(&words(&[5, 9, 2, 100, 0, 101, 1]), Lsn(1)).unwrap();
        assert_eq!(c.members, vec![MultiXactMember { xid: 100, status: 0 }, MultiXactMember { xid: 101, status: 1 }]);
        assert!(parse_create(&words(&[5, 9, 3, 100, 0, 101, 1]), Lsn(1)).is_err());
        assert!(parse_create(&words(&[5, 9, 1, 100, 77]), Lsn(1)).is_err());
        assert_eq!(parse_truncate(&words(&[1, 2, 3, 4, 5]), Lsn(1)).unwrap().end_trunc_memb, 5);
        assert_eq!(parse_zero_page(&words(&[3]), Lsn(1)).unwrap(), 3);
    }
}
