//! PostgreSQL 15 on-disk and WAL formats, written from the Postgres sources.
//!
//! Everything that reads bytes from outside (WAL streams, records, page images, `pg_control`)
//! is bounds-checked and returns an error that says what was wrong and at which LSN; nothing
//! here panics on bad input. The layouts follow the C headers of Postgres 15 (x86_64, 8 KiB
//! blocks, `MAXALIGN` 8): `access/xlogrecord.h`, `access/xlog_internal.h`,
//! `catalog/pg_control.h`, `storage/bufpage.h` and the per-resource-manager `*_xlog.h` files.
//!
//! Map of the crate:
//! - [`xlog_page`]: WAL page headers (short and long).
//! - [`wal_decoder`]: streaming reassembly of WAL records from arbitrary byte chunks.
//! - [`record`]: `XLogRecord` decoding into block references and main data.
//! - [`fpi`] and [`pglz`]: full-page images back into 8 KiB pages.
//! - [`records`]: typed bodies of the records the pageserver interprets.
//! - [`wal_writer`]: record encoding, WAL stream building, the start-at-LSN segment (D4).
//! - [`controlfile`], [`checkpoint`]: `pg_control` and the `CheckPoint` struct.
//! - [`page`], [`reltag`], [`slru`], [`xlog_file`], [`rmgr`], [`crc`]: small shared pieces.

pub mod checkpoint;
pub mod controlfile;
pub mod crc;
pub mod error;
pub mod fpi;
pub mod page;
pub mod pglz;
mod reader;
pub mod record;
pub mod records;
pub mod reltag;
pub mod rmgr;
pub mod slru;
pub mod wal_decoder;
pub mod wal_writer;
pub mod xlog_file;
pub mod xlog_page;

pub use checkpoint::CheckPoint;
pub use controlfile::{ControlFileData, DbState};
pub use error::DecodeError;
pub use record::{decode_record, BlockImage, BlockRef, DecodedXLogRecord, ImageCompression, XLogRecordHeader};
pub use reltag::{ForkNumber, RelFileNode, RelTag};
pub use wal_decoder::{WalDecodeError, WalDecoderConfig, WalRecordBytes, WalStreamDecoder};

/// Major version whose formats this crate implements.
pub const PG_MAJORVERSION: u32 = 15;
/// Size of a relation data block (`BLCKSZ`).
pub const BLCKSZ: usize = 8192;
/// Size of a WAL page (`XLOG_BLCKSZ`).
pub const XLOG_BLCKSZ: usize = 8192;
/// Default WAL segment size (`wal_segment_size`).
pub const WAL_SEGMENT_SIZE: usize = 16 * 1024 * 1024;
/// Smallest and largest segment sizes `initdb --wal-segsize` accepts.
pub const WAL_SEGMENT_SIZE_MIN: usize = 1024 * 1024;
pub const WAL_SEGMENT_SIZE_MAX: usize = 1024 * 1024 * 1024;
/// `MAXIMUM_ALIGNOF` on the platforms we support; WAL records start on such a boundary.
pub const MAXALIGN: usize = 8;

/// Transaction ids (`TransactionId`), object ids (`Oid`), block numbers (`BlockNumber`).
pub type TransactionId = u32;
pub type Oid = u32;
pub type BlockNumber = u32;
pub type MultiXactId = u32;
pub type MultiXactOffset = u32;
pub type TimeLineId = u32;
/// `TimestampTz`: microseconds since 2000-01-01 00:00:00 UTC.
pub type TimestampTz = i64;

pub const INVALID_TRANSACTION_ID: TransactionId = 0;
pub const FIRST_NORMAL_TRANSACTION_ID: TransactionId = 3;
pub const INVALID_BLOCK_NUMBER: BlockNumber = u32::MAX;
/// `pg_global` and `pg_default` tablespace OIDs.
pub const GLOBALTABLESPACE_OID: Oid = 1664;
pub const DEFAULTTABLESPACE_OID: Oid = 1663;

/// Rounds `len` up to a multiple of [`MAXALIGN`].
pub const fn maxalign(len: usize) -> usize {
    (len + MAXALIGN - 1) & !(MAXALIGN - 1)
}

/// Seconds between the Unix epoch and the Postgres epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_SECS: i64 = 946_684_800;

/// Converts a `TimestampTz` (µs since 2000-01-01) to a [`std::time::SystemTime`].
pub fn timestamptz_to_system_time(ts_us: TimestampTz) -> std::time::SystemTime {
    let unix_us = ts_us as i128 + PG_EPOCH_OFFSET_SECS as i128 * 1_000_000;
    if unix_us >= 0 {
        std::time::UNIX_EPOCH + std::time::Duration::from_micros(unix_us.min(u64::MAX as i128) as u64)
    } else {
        let back = (-unix_us).min(u64::MAX as i128) as u64;
        std::time::UNIX_EPOCH.checked_sub(std::time::Duration::from_micros(back)).unwrap_or(std::time::UNIX_EPOCH)
    }
}

/// Converts a [`std::time::SystemTime`] to a `TimestampTz`.
pub fn system_time_to_timestamptz(t: std::time::SystemTime) -> TimestampTz {
    let unix_us: i128 = match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_micros() as i128,
        Err(e) => -(e.duration().as_micros() as i128),
    };
    let pg_us = unix_us - PG_EPOCH_OFFSET_SECS as i128 * 1_000_000;
    pg_us.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_round_trip() {
        let now = std::time::SystemTime::now();
        let ts = system_time_to_timestamptz(now);
        let back = timestamptz_to_system_time(ts);
        let diff = back.duration_since(now).unwrap_or_else(|e| e.duration());
        assert!(diff.as_micros() <= 1);
        assert_eq!(timestamptz_to_system_time(0), std::time::UNIX_EPOCH + std::time::Duration::from_secs(946_684_800));
        assert_eq!(maxalign(114), 120);
        assert_eq!(maxalign(0), 0);
    }
}
