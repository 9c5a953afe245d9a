//! Standby records (storage/standbydefs.h): running-transaction snapshots and the
//! AccessExclusiveLocks a hot standby must replay.

use utils::Lsn;

use crate::error::DecodeError;
use crate::reader::Reader;
use crate::{Oid, TransactionId};

pub const XLOG_STANDBY_LOCK: u8 = 0x00;
pub const XLOG_RUNNING_XACTS: u8 = 0x10;
pub const XLOG_INVALIDATIONS: u8 = 0x20;

/// `xl_running_xacts`: top-level xids first (`xcnt`), then subxids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningXacts {
    pub xcnt: u32,
    pub subxcnt: u32,
    pub subxid_overflow: bool,
    pub next_xid: TransactionId,
    pub oldest_running_xid: TransactionId,
    pub latest_completed_xid: TransactionId,
    pub xids: Vec<TransactionId>,
}

impl RunningXacts {
    pub fn top_level_xids(&self) -> &[TransactionId] {
        &self.xids[..self.xcnt as usize]
    }

    pub fn subxids(&self) -> &[TransactionId] {
        &self.xids[self.xcnt as usize..]
    }
}

/// `xl_standby_lock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandbyLock {
    pub xid: TransactionId,
    pub db_oid: Oid,
    pub rel_oid: Oid,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandbyLocks {
    pub locks: Vec<StandbyLock>,
}

pub fn parse_running_xacts(data: &[u8], lsn: Lsn) -> Result<RunningXacts, DecodeError> {
    let mut r = Reader::new(data, lsn, "xl_running_xacts");
    let xcnt = r.i32("xcnt")?;
    let subxcnt = r.i32("subxcnt")?;
    let subxid_overflow = r.bool("subxid_overflow")?;
    r.align(4, "padding after subxid_overflow")?;
    let next_xid = r.u32("nextXid")?;
    let oldest_running_xid = r.u32("oldestRunningXid")?;
    let latest_completed_xid = r.u32("latestCompletedXid")?;
    let n = r.check_count(xcnt as i64 + subxcnt as i64, "xcnt + subxcnt", 4)?;
    if xcnt < 0 || subxcnt < 0 {
        return Err(r.error(format_args!("negative xcnt {xcnt} or subxcnt {subxcnt}")));
    }
    Ok(RunningXacts {
        xcnt: xcnt as u32,
        subxcnt: subxcnt as u32,
        subxid_overflow,
        next_xid,
        oldest_running_xid,
        latest_completed_xid,
        xids: r.u32_array(n, "xids")?,
    })
}

pub fn parse_locks(data: &[u8], lsn: Lsn) -> Result<StandbyLocks, DecodeError> {
    let mut r = Reader::new(data, lsn, "xl_standby_locks");
    let n = r.count("nlocks", 12)?;
    let mut locks = Vec::with_capacity(n);
    for _ in 0..n {
        locks.push(StandbyLock { xid: r.u32("xid")?, db_oid: r.u32("dbOid")?, rel_oid: r.u32("relOid")? });
    }
    Ok(StandbyLocks { locks })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        let mut d = Vec::new();
        d.extend_from_slice(&2i32.to_le_bytes());
        d.extend_from_slice(&1i32.to_le_bytes());
        d.extend_from_slice(&[1, 0, 0, 0]);
        for v in [800u32, 700, 799, 701, 702, 703] {
            d.extend_from_slice(&v.to_le_bytes());
        }
        let rx = parse_running_xacts(&d, Lsn(1)).unwrap();
        assert!(rx.subxid_overflow);
        assert_eq!(rx.next_xid, 800);
        assert_eq!(rx.top_level_xids(), &[701, 702]);
        assert_eq!(rx.subxids(), &[703]);
        assert!(parse_running_xacts(&d[..d.len() - 1], Lsn(1)).is_err());
        d[4] = 0xFF;
        d[7] = 0xFF;
        assert!(parse_running_xacts(&d, Lsn(1)).is_err());
        let l: Vec<u8> = [1u32, 700, 5, 16384].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(parse_locks(&l, Lsn(1)).unwrap().locks[0].rel_oid, 16384);
    }
}
