//! `CheckPoint` (catalog/pg_control.h): the body of checkpoint records and the copy of the
//! last checkpoint kept in `pg_control`. 88 bytes on x86_64, C padding included.

use utils::Lsn;

use crate::error::DecodeError;
use crate::reader::Reader;
use crate::{MultiXactId, MultiXactOffset, Oid, TimeLineId, TransactionId};

/// `sizeof(CheckPoint)`.
pub const SIZEOF_CHECKPOINT: usize = 88;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CheckPoint {
    /// Where redo starts: the insert position when the checkpoint began.
    pub redo: Lsn,
    pub this_timeline_id: TimeLineId,
    pub prev_timeline_id: TimeLineId,
    pub full_page_writes: bool,
    /// `FullTransactionId`: epoch in the high 32 bits.
    pub next_xid: u64,
    pub next_oid: Oid,
    pub next_multi: MultiXactId,
    pub next_multi_offset: MultiXactOffset,
    pub oldest_xid: TransactionId,
    pub oldest_xid_db: Oid,
    pub oldest_multi: MultiXactId,
    pub oldest_multi_db: Oid,
    /// `pg_time_t`: seconds since the Unix epoch.
    pub time: i64,
    pub oldest_commit_ts_xid: TransactionId,
    pub newest_commit_ts_xid: TransactionId,
    /// Oldest xid still running; only set in online checkpoints taken with hot standby info.
    pub oldest_active_xid: TransactionId,
}

impl CheckPoint {
    pub fn decode(buf: &[u8], lsn: Lsn) -> Result<CheckPoint, DecodeError> {
        let mut r = Reader::new(buf, lsn, "CheckPoint");
        if buf.len() < SIZEOF_CHECKPOINT {
            return Err(r.error(format_args!("{} bytes, expected {SIZEOF_CHECKPOINT}", buf.len())));
        }
        let redo = r.lsn("redo")?;
        let this_timeline_id = r.u32("ThisTimeLineID")?;
        let prev_timeline_id = r.u32("PrevTimeLineID")?;
        let full_page_writes = r.bool("fullPageWrites")?;
        r.align(8, "padding before nextXid")?;
        let cp = CheckPoint {
            redo,
            this_timeline_id,
            prev_timeline_id,
            full_page_writes,
            next_xid: r.u64("nextXid")?,
            next_oid: r.u32("nextOid")?,
            next_multi: r.u32("nextMulti")?,
            next_multi_offset: r.u32("nextMultiOffset")?,
            oldest_xid: r.u32("oldestXid")?,
            oldest_xid_db: r.u32("oldestXidDB")?,
            oldest_multi: r.u32("oldestMulti")?,
            oldest_multi_db: {
                let v = r.u32("oldestMultiDB")?;
                r.align(8, "padding before time")?;
                v
            },
            time: r.i64("time")?,
            oldest_commit_ts_xid: r.u32("oldestCommitTsXid")?,
            newest_commit_ts_xid: r.u32("newestCommitTsXid")?,
            oldest_active_xid: r.u32("oldestActiveXid")?,
        };
        Ok(cp)
    }

    pub fn encode(&self) -> [u8; SIZEOF_CHECKPOINT] {
        let mut b = [0u8; SIZEOF_CHECKPOINT];
        b[0..8].copy_from_slice(&self.redo.0.to_le_bytes());
        b[8..12].copy_from_slice(&self.this_timeline_id.to_le_bytes());
        b[12..16].copy_from_slice(&self.prev_timeline_id.to_le_bytes());
        b[16] = self.full_page_writes as u8;
        b[24..32].copy_from_slice(&self.next_xid.to_le_bytes());
        b[32..36].copy_from_slice(&self.next_oid.to_le_bytes());
        b[36..40].copy_from_slice(&self.next_multi.to_le_bytes());
        b[40..44].copy_from_slice(&self.next_multi_offset.to_le_bytes());
        b[44..48].copy_from_slice(&self.oldest_xid.to_le_bytes());
        b[48..52].copy_from_slice(&self.oldest_xid_db.to_le_bytes());
        b[52..56].copy_from_slice(&self.oldest_multi.to_le_bytes());
        b[56..60].copy_from_slice(&self.oldest_multi_db.to_le_bytes());
        b[64..72].copy_from_slice(&self.time.to_le_bytes());
        b[72..76].copy_from_slice(&self.oldest_commit_ts_xid.to_le_bytes());
        b[76..80].copy_from_slice(&self.newest_commit_ts_xid.to_le_bytes());
        b[80..84].copy_from_slice(&self.oldest_active_xid.to_le_bytes());
        b
    }

    /// The 32-bit `nextXid` (`XidFromFullTransactionId`).
    pub fn next_xid_32(&self) -> TransactionId {
        self.next_xid as u32
    }

    /// The xid epoch (`EpochFromFullTransactionId`).
    pub fn next_xid_epoch(&self) -> u32 {
        (self.next_xid >> 32) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_layout() {
        let cp = CheckPoint {
            redo: Lsn(0x1_0000_0028),
            this_timeline_id: 1,
            prev_timeline_id: 1,
            full_page_writes: true,
            next_xid: (2u64 << 32) | 750,
            next_oid: 24576,
            next_multi: 1,
            next_multi_offset: 0,
            oldest_xid: 716,
            oldest_xid_db: 1,
            oldest_multi: 1,
            oldest_multi_db: 1,
            time: 1_700_000_000,
            oldest_commit_ts_xid: 0,
            newest_commit_ts_xid: 0,
            oldest_active_xid: 0,
        };
        let b = cp.encode();
        assert_eq!(&b[24..32], &((2u64 << 32) | 750).to_le_bytes());
        assert_eq!(&b[64..72], &1_700_000_000i64.to_le_bytes());
        assert_eq!(CheckPoint::decode(&b, Lsn(0)).unwrap(), cp);
        assert_eq!(cp.next_xid_32(), 750);
        assert_eq!(cp.next_xid_epoch(), 2);
        assert!(CheckPoint::decode(&b[..87], Lsn(0)).is_err());
    }
}
