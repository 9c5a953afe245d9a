//! Database records (commands/dbcommands_xlog.h). `CREATE DATABASE ... STRATEGY file_copy`
//! logs one record that copies a whole directory; `STRATEGY wal_log` (the 15 default) logs
//! the creation and then every copied block as ordinary records.

use utils::Lsn;

use crate::error::DecodeError;
use crate::reader::Reader;
use crate::Oid;

pub const XLOG_DBASE_CREATE_FILE_COPY: u8 = 0x00;
pub const XLOG_DBASE_CREATE_WAL_LOG: u8 = 0x10;
pub const XLOG_DBASE_DROP: u8 = 0x20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DbaseCreateFileCopy {
    pub db_id: Oid,
    pub tablespace_id: Oid,
    pub src_db_id: Oid,
    pub src_tablespace_id: Oid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DbaseCreateWalLog {
    pub db_id: Oid,
    pub tablespace_id: Oid,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbaseDrop {
    pub db_id: Oid,
    pub tablespace_ids: Vec<Oid>,
}

pub fn parse_create_file_copy(data: &[u8], lsn: Lsn) -> Result<DbaseCreateFileCopy, DecodeError> {
    let mut r = Reader::new(data, lsn, "xl_dbase_create_file_copy_rec");
    Ok(DbaseCreateFileCopy {
        db_id: r.u32("db_id")?,
        tablespace_id: r.u32("tablespace_id")?,
        src_db_id: r.u32("src_db_id")?,
        src_tablespace_id: r.u32("src_tablespace_id")?,
    })
}

pub fn parse_create_wal_log(data: &[u8], lsn: Lsn) -> Result<DbaseCreateWalLog, DecodeError> {
    let mut r = Reader::new(data, lsn, "xl_dbase_create_wal_log_rec");
    Ok(DbaseCreateWalLog { db_id: r.u32("db_id")?, tablespace_id: r.u32("tablespace_id")? })
}

pub fn parse_drop(data: &[u8], lsn: Lsn) -> Result<DbaseDrop, DecodeError> {
    let mut r = Reader::new(data, lsn, "xl_dbase_drop_rec");
    let db_id = r.u32("db_id")?;
    let n = r.count("ntablespaces", 4)?;
    Ok(DbaseDrop { db_id, tablespace_ids: r.u32_array(n, "tablespace_ids")? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        let words = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let d = parse_drop(&words(&[16384, 2, 1663, 16390]), Lsn(1)).unwrap();
        assert_eq!(d.tablespace_ids, vec![1663, 16390]);
        assert!(parse_drop(&words(&[16384, 3, 1663, 16390]), Lsn(1)).is_err());
        assert!(parse_drop(&words(&[16384, u32::MAX]), Lsn(1)).is_err());
        let c = parse_create_file_copy(&words(&[16384, 1663, 1, 1663]), Lsn(1)).unwrap();
        assert_eq!(c.src_db_id, 1);
        assert_eq!(parse_create_wal_log(&words(&[16384, 1663]), Lsn(1)).unwrap().db_id, 16384);
        assert!(parse_create_wal_log(&words(&[16384]), Lsn(1)).is_err());
    }
}
