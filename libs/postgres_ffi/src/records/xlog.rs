//! `RM_XLOG_ID` records (catalog/pg_control.h): checkpoints, next OID, WAL switch.

use utils::Lsn;

use crate::checkpoint::CheckPoint;
use crate::error::DecodeError;
use crate::reader::Reader;
use crate::Oid;

pub const XLOG_CHECKPOINT_SHUTDOWN: u8 = 0x00;
pub const XLOG_CHECKPOINT_ONLINE: u8 = 0x10;
pub const XLOG_NOOP: u8 = 0x20;
pub const XLOG_NEXTOID: u8 = 0x30;
pub const XLOG_SWITCH: u8 = 0x40;
pub const XLOG_BACKUP_END: u8 = 0x50;
pub const XLOG_PARAMETER_CHANGE: u8 = 0x60;
pub const XLOG_RESTORE_POINT: u8 = 0x70;
pub const XLOG_FPW_CHANGE: u8 = 0x80;
pub const XLOG_END_OF_RECOVERY: u8 = 0x90;
pub const XLOG_FPI_FOR_HINT: u8 = 0xA0;
pub const XLOG_FPI: u8 = 0xB0;
pub const XLOG_OVERWRITE_CONTRECORD: u8 = 0xD0;

/// The `CheckPoint` in a checkpoint record's main data.
pub fn parse_checkpoint(data: &[u8], lsn: Lsn) -> Result<CheckPoint, DecodeError> {
    CheckPoint::decode(data, lsn)
}

/// The `Oid` in an `XLOG_NEXTOID` record.
pub fn parse_next_oid(data: &[u8], lsn: Lsn) -> Result<Oid, DecodeError> {
    Reader::new(data, lsn, "XLOG_NEXTOID").u32("nextOid")
}
