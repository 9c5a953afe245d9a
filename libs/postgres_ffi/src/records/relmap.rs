//! Relation map updates (utils/relmapper.h): a new `pg_filenode.map` for one database (or
//! the shared map when `dbid` is 0).

use bytes::Bytes;
use utils::Lsn;

use crate::error::DecodeError;
use crate::reader::Reader;
use crate::Oid;

pub const XLOG_RELMAP_UPDATE: u8 = 0x00;
/// Size of a `pg_filenode.map` file (`RelMapFile`): magic, count, 62 mappings, crc, pad.
pub const RELMAP_FILE_SIZE: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelmapUpdate {
    pub dbid: Oid,
    pub tsid: Oid,
    /// The new map file contents.
    pub data: Bytes,
}

pub fn parse_update(data: &Bytes, lsn: Lsn) -> Result<RelmapUpdate, DecodeError> {
    let mut r = Reader::new(data, lsn, "xl_relmap_update");
    let dbid = r.u32("dbid")?;
    let tsid = r.u32("tsid")?;
    let nbytes = r.count("nbytes", 1)?;
    let start = r.pos();
    Ok(RelmapUpdate { dbid, tsid, data: data.slice(start..start + nbytes) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        let mut d: Vec<u8> = [0u32, 1664, 3].iter().flat_map(|x| x.to_le_bytes()).collect();
        d.extend_from_slice(b"abc");
        let u = parse_update(&Bytes::from(d.clone()), Lsn(1)).unwrap();
        assert_eq!((u.dbid, u.tsid, &u.data[..]), (0, 1664, &b"abc"[..]));
        d.pop();
        assert!(parse_update(&Bytes::from(d), Lsn(1)).is_err());
    }
}
