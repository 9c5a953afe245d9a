//! `pg_control` (`ControlFileData` in catalog/pg_control.h), read and written field by field.
//!
//! The file is `PG_CONTROL_FILE_SIZE` (8192) bytes: the 296-byte struct, zero padding after.
//! Its `crc` covers the bytes before the `crc` field. A compute started at an LSN (DESIGN D4)
//! gets a `pg_control` whose `checkPoint` points at the synthetic shutdown checkpoint.

use utils::Lsn;

use crate::checkpoint::{CheckPoint, SIZEOF_CHECKPOINT};
use crate::error::DecodeError;
use crate::reader::Reader;
use crate::TimeLineId;

pub const PG_CONTROL_VERSION: u32 = 1300;
/// `CATALOG_VERSION_NO` of Postgres 15.
pub const CATALOG_VERSION_NO: u32 = 202209061;
pub const PG_CONTROL_FILE_SIZE: usize = 8192;
pub const MOCK_AUTH_NONCE_LEN: usize = 32;
/// `sizeof(ControlFileData)` and `offsetof(ControlFileData, crc)`.
pub const SIZEOF_CONTROL_FILE_DATA: usize = 296;
pub const CONTROL_FILE_CRC_OFFSET: usize = 288;
/// `FLOATFORMAT_VALUE`: lets Postgres detect a float format mismatch.
pub const FLOATFORMAT_VALUE: f64 = 1234567.0;

/// `wal_level` values.
pub const WAL_LEVEL_MINIMAL: i32 = 0;
pub const WAL_LEVEL_REPLICA: i32 = 1;
pub const WAL_LEVEL_LOGICAL: i32 = 2;

/// `DBState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbState {
    Startup,
    Shutdowned,
    ShutdownedInRecovery,
    Shutdowning,
    InCrashRecovery,
    InArchiveRecovery,
    InProduction,
    /// A value this version does not know; kept so decoding never loses information.
    Unknown(u32),
}

impl DbState {
    pub fn from_u32(v: u32) -> DbState {
        match v {
            0 => DbState::Startup,
            1 => DbState::Shutdowned,
            2 => DbState::ShutdownedInRecovery,
            3 => DbState::Shutdowning,
            4 => DbState::InCrashRecovery,
            5 => DbState::InArchiveRecovery,
            6 => DbState::InProduction,
            other => DbState::Unknown(other),
        }
    }

    pub fn as_u32(self) -> u32 {
        match self {
            DbState::Startup => 0,
            DbState::Shutdowned => 1,
            DbState::ShutdownedInRecovery => 2,
            DbState::Shutdowning => 3,
            DbState::InCrashRecovery => 4,
            DbState::InArchiveRecovery => 5,
            DbState::InProduction => 6,
            DbState::Unknown(v) => v,
        }
    }

    /// What `pg_controldata` prints for "Database cluster state".
    pub fn description(self) -> &'static str {
        match self {
            DbState::Startup => "starting up",
            DbState::Shutdowned => "shut down",
            DbState::ShutdownedInRecovery => "shut down in recovery",
            DbState::Shutdowning => "shutting down",
            DbState::InCrashRecovery => "in crash recovery",
            DbState::InArchiveRecovery => "in archive recovery",
            DbState::InProduction => "in production",
            DbState::Unknown(_) => "unrecognized status code",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ControlFileData {
    pub system_identifier: u64,
    pub pg_control_version: u32,
    pub catalog_version_no: u32,
    pub state: DbState,
    /// `pg_time_t` of the last update (Unix seconds).
    pub time: i64,
    /// LSN of the last checkpoint record.
    pub checkpoint: Lsn,
    pub checkpoint_copy: CheckPoint,
    pub unlogged_lsn: Lsn,
    pub min_recovery_point: Lsn,
    pub min_recovery_point_tli: TimeLineId,
    pub backup_start_point: Lsn,
    pub backup_end_point: Lsn,
    pub backup_end_required: bool,
    pub wal_level: i32,
    pub wal_log_hints: bool,
    pub max_connections: i32,
    pub max_worker_processes: i32,
    pub max_wal_senders: i32,
    pub max_prepared_xacts: i32,
    pub max_locks_per_xact: i32,
    pub track_commit_timestamp: bool,
    pub max_align: u32,
    pub float_format: f64,
    pub blcksz: u32,
    pub relseg_size: u32,
    pub xlog_blcksz: u32,
    pub xlog_seg_size: u32,
    pub name_data_len: u32,
    pub index_max_keys: u32,
    pub toast_max_chunk_size: u32,
    pub loblksize: u32,
    pub float8_by_val: bool,
    pub data_checksum_version: u32,
    pub mock_authentication_nonce: [u8; MOCK_AUTH_NONCE_LEN],
    /// The stored CRC (recomputed by [`ControlFileData::encode`]).
    pub crc: u32,
}

impl ControlFileData {
    /// Decodes and checks the CRC and `pg_control_version`. Accepts the 296-byte struct or the
    /// whole 8192-byte file.
    pub fn decode(buf: &[u8]) -> Result<ControlFileData, DecodeError> {
        let cf = Self::decode_unchecked(buf)?;
        let crc = crc32c::crc32c(&buf[..CONTROL_FILE_CRC_OFFSET]);
        if crc != cf.crc {
            return Err(DecodeError::new(
                Lsn::INVALID,
                format!("pg_control: incorrect checksum: stored {:08X}, computed {crc:08X}", cf.crc),
            ));
        }
        if cf.pg_control_version != PG_CONTROL_VERSION {
            return Err(DecodeError::new(
                Lsn::INVALID,
                format!(
                    "pg_control: version {} is not the Postgres 15 version {PG_CONTROL_VERSION}",
                    cf.pg_control_version
                ),
            ));
        }
        Ok(cf)
    }

    /// Decodes without checking the CRC or version (for inspecting damaged files).
    pub fn decode_unchecked(buf: &[u8]) -> Result<ControlFileData, DecodeError> {
        let mut r = Reader::new(buf, Lsn::INVALID, "pg_control");
        if buf.len() < SIZEOF_CONTROL_FILE_DATA {
            return Err(r.error(format_args!("{} bytes, expected at least {SIZEOF_CONTROL_FILE_DATA}", buf.len())));
        }
        let system_identifier = r.u64("system_identifier")?;
        let pg_control_version = r.u32("pg_control_version")?;
        let catalog_version_no = r.u32("catalog_version_no")?;
        let state = DbState::from_u32(r.u32("state")?);
        r.align(8, "padding before time")?;
        let time = r.i64("time")?;
        let checkpoint = r.lsn("checkPoint")?;
        let checkpoint_copy = CheckPoint::decode(r.bytes(SIZEOF_CHECKPOINT, "checkPointCopy")?, Lsn::INVALID)?;
        let unlogged_lsn = r.lsn("unloggedLSN")?;
        let min_recovery_point = r.lsn("minRecoveryPoint")?;
        let min_recovery_point_tli = r.u32("minRecoveryPointTLI")?;
        r.align(8, "padding before backupStartPoint")?;
        let backup_start_point = r.lsn("backupStartPoint")?;
        let backup_end_point = r.lsn("backupEndPoint")?;
        let backup_end_required = r.bool("backupEndRequired")?;
        r.align(4, "padding before wal_level")?;
        let wal_level = r.i32("wal_level")?;
        let wal_log_hints = r.bool("wal_log_hints")?;
        r.align(4, "padding before MaxConnections")?;
        let max_connections = r.i32("MaxConnections")?;
        let max_worker_processes = r.i32("max_worker_processes")?;
        let max_wal_senders = r.i32("max_wal_senders")?;
        let max_prepared_xacts = r.i32("max_prepared_xacts")?;
        let max_locks_per_xact = r.i32("max_locks_per_xact")?;
        let track_commit_timestamp = r.bool("track_commit_timestamp")?;
        r.align(4, "padding before maxAlign")?;
        let max_align = r.u32("maxAlign")?;
        r.align(8, "padding before floatFormat")?;
        let float_format = r.f64("floatFormat")?;
        let blcksz = r.u32("blcksz")?;
        let relseg_size = r.u32("relseg_size")?;
        let xlog_blcksz = r.u32("xlog_blcksz")?;
        let xlog_seg_size = r.u32("xlog_seg_size")?;
        let name_data_len = r.u32("nameDataLen")?;
        let index_max_keys = r.u32("indexMaxKeys")?;
        let toast_max_chunk_size = r.u32("toast_max_chunk_size")?;
        let loblksize = r.u32("loblksize")?;
        let float8_by_val = r.bool("float8ByVal")?;
        r.align(4, "padding before data_checksum_version")?;
        let data_checksum_version = r.u32("data_checksum_version")?;
        let mock_authentication_nonce = r.array::<MOCK_AUTH_NONCE_LEN>("mock_authentication_nonce")?;
        debug_assert_eq!(r.pos(), CONTROL_FILE_CRC_OFFSET);
        let crc = r.u32("crc")?;
        Ok(ControlFileData {
            system_identifier,
            pg_control_version,
            catalog_version_no,
            state,
            time,
            checkpoint,
            checkpoint_copy,
            unlogged_lsn,
            min_recovery_point,
            min_recovery_point_tli,
            backup_start_point,
            backup_end_point,
            backup_end_required,
            wal_level,
            wal_log_hints,
            max_connections,
            max_worker_processes,
            max_wal_senders,
            max_prepared_xacts,
            max_locks_per_xact,
            track_commit_timestamp,
            max_align,
            float_format,
            blcksz,
            relseg_size,
            xlog_blcksz,
            xlog_seg_size,
            name_data_len,
            index_max_keys,
            toast_max_chunk_size,
            loblksize,
            float8_by_val,
            data_checksum_version,
            mock_authentication_nonce,
            crc,
        })
    }

    /// Encodes the whole 8192-byte file, computing a fresh CRC (and storing it in `self.crc`
    /// of the returned bytes, not in `self`).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; PG_CONTROL_FILE_SIZE];
        b[0..8].copy_from_slice(&self.system_identifier.to_le_bytes());
        b[8..12].copy_from_slice(&self.pg_control_version.to_le_bytes());
        b[12..16].copy_from_slice(&self.catalog_version_no.to_le_bytes());
        b[16..20].copy_from_slice(&self.state.as_u32().to_le_bytes());
        b[24..32].copy_from_slice(&self.time.to_le_bytes());
        b[32..40].copy_from_slice(&self.checkpoint.0.to_le_bytes());
        b[40..128].copy_from_slice(&self.checkpoint_copy.encode());
        b[128..136].copy_from_slice(&self.unlogged_lsn.0.to_le_bytes());
        b[136..144].copy_from_slice(&self.min_recovery_point.0.to_le_bytes());
        b[144..148].copy_from_slice(&self.min_recovery_point_tli.to_le_bytes());
        b[152..160].copy_from_slice(&self.backup_start_point.0.to_le_bytes());
        b[160..168].copy_from_slice(&self.backup_end_point.0.to_le_bytes());
        b[168] = self.backup_end_required as u8;
        b[172..176].copy_from_slice(&self.wal_level.to_le_bytes());
        b[176] = self.wal_log_hints as u8;
        b[180..184].copy_from_slice(&self.max_connections.to_le_bytes());
        b[184..188].copy_from_slice(&self.max_worker_processes.to_le_bytes());
        b[188..192].copy_from_slice(&self.max_wal_senders.to_le_bytes());
        b[192..196].copy_from_slice(&self.max_prepared_xacts.to_le_bytes());
        b[196..200].copy_from_slice(&self.max_locks_per_xact.to_le_bytes());
        b[200] = self.track_commit_timestamp as u8;
        b[204..208].copy_from_slice(&self.max_align.to_le_bytes());
        b[208..216].copy_from_slice(&self.float_format.to_le_bytes());
        b[216..220].copy_from_slice(&self.blcksz.to_le_bytes());
        b[220..224].copy_from_slice(&self.relseg_size.to_le_bytes());
        b[224..228].copy_from_slice(&self.xlog_blcksz.to_le_bytes());
        b[228..232].copy_from_slice(&self.xlog_seg_size.to_le_bytes());
        b[232..236].copy_from_slice(&self.name_data_len.to_le_bytes());
        b[236..240].copy_from_slice(&self.index_max_keys.to_le_bytes());
        b[240..244].copy_from_slice(&self.toast_max_chunk_size.to_le_bytes());
        b[244..248].copy_from_slice(&self.loblksize.to_le_bytes());
        b[248] = self.float8_by_val as u8;
        b[252..256].copy_from_slice(&self.data_checksum_version.to_le_bytes());
        b[256..288].copy_from_slice(&self.mock_authentication_nonce);
        let crc = crc32c::crc32c(&b[..CONTROL_FILE_CRC_OFFSET]);
        b[288..292].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// A control file with this build's compile-time constants and a shut-down state at
    /// `checkpoint_lsn`; the caller fills in the cluster-specific fields it knows.
    pub fn new_shut_down(
        system_identifier: u64,
        checkpoint_lsn: Lsn,
        checkpoint: CheckPoint,
        seg_size_bytes: u32,
    ) -> Self {
        ControlFileData {
            system_identifier,
            pg_control_version: PG_CONTROL_VERSION,
            catalog_version_no: CATALOG_VERSION_NO,
            state: DbState::Shutdowned,
            time: checkpoint.time,
            checkpoint: checkpoint_lsn,
            checkpoint_copy: checkpoint,
            unlogged_lsn: Lsn(1000),
            min_recovery_point: Lsn::INVALID,
            min_recovery_point_tli: 0,
            backup_start_point: Lsn::INVALID,
            backup_end_point: Lsn::INVALID,
            backup_end_required: false,
            wal_level: WAL_LEVEL_REPLICA,
            wal_log_hints: false,
            max_connections: 100,
            max_worker_processes: 8,
            max_wal_senders: 10,
            max_prepared_xacts: 0,
            max_locks_per_xact: 64,
            track_commit_timestamp: false,
            max_align: 8,
            float_format: FLOATFORMAT_VALUE,
            blcksz: crate::BLCKSZ as u32,
            relseg_size: 131072,
            xlog_blcksz: crate::XLOG_BLCKSZ as u32,
            xlog_seg_size: seg_size_bytes,
            name_data_len: 64,
            index_max_keys: 32,
            toast_max_chunk_size: 1996,
            loblksize: 2048,
            float8_by_val: true,
            data_checksum_version: 0,
            mock_authentication_nonce: [0u8; MOCK_AUTH_NONCE_LEN],
            crc: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_crc() {
        let cp = CheckPoint { redo: Lsn(0x0300_0028), this_timeline_id: 1, time: 1_700_000_000, ..Default::default() };
        let mut cf = ControlFileData::new_shut_down(7_300_000_000_000_000_001, Lsn(0x0300_0028), cp, 16 << 20);
        cf.mock_authentication_nonce[5] = 9;
        let bytes = cf.encode();
        assert_eq!(bytes.len(), PG_CONTROL_FILE_SIZE);
        let back = ControlFileData::decode(&bytes).unwrap();
        assert_eq!(back.crc, crc32c::crc32c(&bytes[..288]));
        cf.crc = back.crc;
        assert_eq!(back, cf);
        assert_eq!(back.encode(), bytes);
        let mut corrupt = bytes.clone();
        corrupt[100] ^= 1;
        assert!(ControlFileData::decode(&corrupt).unwrap_err().to_string().contains("checksum"));
        assert!(ControlFileData::decode(&bytes[..200]).is_err());
        assert_eq!(DbState::from_u32(1).description(), "shut down");
    }
}
