//! Messages of Postgres's physical streaming replication protocol, as carried in CopyData
//! after `START_REPLICATION` (see the Postgres docs, "Streaming Replication Protocol"). Used by
//! the walproposer reading from Postgres, by the safekeeper's WAL sender, and by its readers.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use utils::Lsn;

/// Microseconds since 2000-01-01 (Postgres's `TimestampTz` epoch).
pub fn pg_now_us() -> i64 {
    const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_micros() as i64) - (PG_EPOCH_UNIX_SECS as i64 * 1_000_000)
}

/// Server → client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// 'w': WAL starting at `wal_start`.
    XLogData { wal_start: Lsn, wal_end: Lsn, send_time_us: i64, data: Bytes },
    /// 'k': the server's WAL end; `reply_requested` asks for a status update now.
    Keepalive { wal_end: Lsn, send_time_us: i64, reply_requested: bool },
}

/// Client → server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FeedbackMessage {
    /// 'r': how far the client wrote, flushed and applied WAL. The pageserver reports
    /// last received / disk-consistent / remote-consistent LSNs in these fields.
    StandbyStatus { write_lsn: Lsn, flush_lsn: Lsn, apply_lsn: Lsn, send_time_us: i64, reply_requested: bool },
    /// 'h': hot standby feedback (xmin); accepted and ignored by safekeepers.
    HotStandby { send_time_us: i64, xmin: u32, xmin_epoch: u32, catalog_xmin: u32, catalog_xmin_epoch: u32 },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReplicationDecodeError {
    #[error("empty replication message")]
    Empty,
    #[error("replication message '{tag}' is {len} bytes, needs {needed}")]
    Short { tag: char, len: usize, needed: usize },
    #[error("unknown replication message tag {0:#04x}")]
    UnknownTag(u8),
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("caller checked length"))
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("caller checked length"))
}

fn need(b: &[u8], n: usize) -> Result<(), ReplicationDecodeError> {
    if b.len() < n {
        return Err(ReplicationDecodeError::Short { tag: b[0] as char, len: b.len(), needed: n });
    }
    Ok(())
}

impl ReplicationMessage {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::new();
        match self {
            ReplicationMessage::XLogData { wal_start, wal_end, send_time_us, data } => {
                b.reserve(25 + data.len());
                b.put_u8(b'w');
                b.put_u64(wal_start.0);
                b.put_u64(wal_end.0);
                b.put_i64(*send_time_us);
                b.put_slice(data);
            }
            ReplicationMessage::Keepalive { wal_end, send_time_us, reply_requested } => {
                b.put_u8(b'k');
                b.put_u64(wal_end.0);
                b.put_i64(*send_time_us);
                b.put_u8(*reply_requested as u8);
            }
        }
        b.freeze()
    }

    pub fn decode(buf: &Bytes) -> Result<Self, ReplicationDecodeError> {
        let tag = *buf.first().ok_or(ReplicationDecodeError::Empty)?;
        match tag {
            b'w' => {
                need(buf, 25)?;
                Ok(ReplicationMessage::XLogData {
                    wal_start: Lsn(be_u64(buf, 1)),
                    wal_end: Lsn(be_u64(buf, 9)),
                    send_time_us: be_u64(buf, 17) as i64,
                    data: buf.slice(25..),
                })
            }
            b'k' => {
                need(buf, 18)?;
                Ok(ReplicationMessage::Keepalive {
                    wal_end: Lsn(be_u64(buf, 1)),
                    send_time_us: be_u64(buf, 9) as i64,
                    reply_requested: buf[17] != 0,
                })
            }
            t => Err(ReplicationDecodeError::UnknownTag(t)),
        }
    }
}

impl FeedbackMessage {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::new();
        match self {
            FeedbackMessage::StandbyStatus { write_lsn, flush_lsn, apply_lsn, send_time_us, reply_requested } => {
                b.put_u8(b'r');
                b.put_u64(write_lsn.0);
                b.put_u64(flush_lsn.0);
                b.put_u64(apply_lsn.0);
                b.put_i64(*send_time_us);
                b.put_u8(*reply_requested as u8);
            }
            FeedbackMessage::HotStandby { send_time_us, xmin, xmin_epoch, catalog_xmin, catalog_xmin_epoch } => {
                b.put_u8(b'h');
                b.put_i64(*send_time_us);
                b.put_u32(*xmin);
                b.put_u32(*xmin_epoch);
                b.put_u32(*catalog_xmin);
                b.put_u32(*catalog_xmin_epoch);
            }
        }
        b.freeze()
    }

    pub fn decode(buf: &[u8]) -> Result<Self, ReplicationDecodeError> {
        let tag = *buf.first().ok_or(ReplicationDecodeError::Empty)?;
        match tag {
            b'r' => {
                need(buf, 34)?;
                Ok(FeedbackMessage::StandbyStatus {
                    write_lsn: Lsn(be_u64(buf, 1)),
                    flush_lsn: Lsn(be_u64(buf, 9)),
                    apply_lsn: Lsn(be_u64(buf, 17)),
                    send_time_us: be_u64(buf, 25) as i64,
                    reply_requested: buf[33] != 0,
                })
            }
            b'h' => {
                need(buf, 25)?;
                Ok(FeedbackMessage::HotStandby {
                    send_time_us: be_u64(buf, 1) as i64,
                    xmin: be_u32(buf, 9),
                    xmin_epoch: be_u32(buf, 13),
                    catalog_xmin: be_u32(buf, 17),
                    catalog_xmin_epoch: be_u32(buf, 21),
                })
            }
            t => Err(ReplicationDecodeError::UnknownTag(t)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_short_messages() {
        let m = ReplicationMessage::XLogData {
            wal_start: Lsn(8),
            wal_end: Lsn(16),
            send_time_us: 5,
            data: Bytes::from_static(b"wal"),
        };
        assert_eq!(ReplicationMessage::decode(&m.encode()).unwrap(), m);
        let k = ReplicationMessage::Keepalive { wal_end: Lsn(1), send_time_us: 2, reply_requested: true };
        assert_eq!(ReplicationMessage::decode(&k.encode()).unwrap(), k);
        let f = FeedbackMessage::StandbyStatus {
            write_lsn: Lsn(1),
            flush_lsn: Lsn(2),
            apply_lsn: Lsn(3),
            send_time_us: 4,
            reply_requested: false,
        };
        assert_eq!(FeedbackMessage::decode(&f.encode()).unwrap(), f);
        let h = FeedbackMessage::HotStandby {
            send_time_us: 1,
            xmin: 2,
            xmin_epoch: 3,
            catalog_xmin: 4,
            catalog_xmin_epoch: 5,
        };
        assert_eq!(FeedbackMessage::decode(&h.encode()).unwrap(), h);
        for short in [&b"w123"[..], b"k", b"r12345", b"h"] {
            assert!(
                FeedbackMessage::decode(short).is_err()
                    || ReplicationMessage::decode(&Bytes::copy_from_slice(short)).is_err()
            );
        }
        assert!(ReplicationMessage::decode(&Bytes::from_static(b"w")).is_err());
        assert_eq!(FeedbackMessage::decode(b"z"), Err(ReplicationDecodeError::UnknownTag(b'z')));
    }
}
