//! Storage manager records (catalog/storage_xlog.h): relation fork creation and truncation.

use utils::Lsn;

use crate::error::DecodeError;
use crate::reader::Reader;
use crate::reltag::{RelFileNode, MAX_FORKNUM};
use crate::BlockNumber;

pub const XLOG_SMGR_CREATE: u8 = 0x10;
pub const XLOG_SMGR_TRUNCATE: u8 = 0x20;

pub const SMGR_TRUNCATE_HEAP: u32 = 0x0001;
pub const SMGR_TRUNCATE_VM: u32 = 0x0002;
pub const SMGR_TRUNCATE_FSM: u32 = 0x0004;
pub const SMGR_TRUNCATE_ALL: u32 = SMGR_TRUNCATE_HEAP | SMGR_TRUNCATE_VM | SMGR_TRUNCATE_FSM;

/// `xl_smgr_create`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmgrCreate {
    pub rnode: RelFileNode,
    pub forknum: u8,
}

/// `xl_smgr_truncate`: truncate the forks named in `flags` to `blkno` blocks (the VM and FSM
/// are truncated to the blocks covering `blkno` heap blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmgrTruncate {
    pub blkno: BlockNumber,
    pub rnode: RelFileNode,
    pub flags: u32,
}

pub(crate) fn read_rnode(r: &mut Reader<'_>) -> Result<RelFileNode, DecodeError> {
    Ok(RelFileNode { spcnode: r.u32("spcNode")?, dbnode: r.u32("dbNode")?, relnode: r.u32("relNode")? })
}

pub fn parse_create(data: &[u8], lsn: Lsn) -> Result<SmgrCreate, DecodeError> {
    let mut r = Reader::new(data, lsn, "xl_smgr_create");
    let rnode = read_rnode(&mut r)?;
    let forknum = r.i32("forkNum")?;
    if !(0..=MAX_FORKNUM as i32).contains(&forknum) {
        return Err(r.error(format_args!("invalid fork number {forknum}")));
    }
    Ok(SmgrCreate { rnode, forknum: forknum as u8 })
}

pub fn parse_truncate(data: &[u8], lsn: Lsn) -> Result<SmgrTruncate, DecodeError> {
    let mut r = Reader::new(data, lsn, "xl_smgr_truncate");
    Ok(SmgrTruncate { blkno: r.u32("blkno")?, rnode: read_rnode(&mut r)?, flags: r.u32("flags")? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        let mut d = Vec::new();
        for v in [1663u32, 5, 16384, 2] {
            d.extend_from_slice(&v.to_le_bytes());
        }
        let c = parse_create(&d, Lsn(8)).unwrap();
        assert_eq!(c.rnode.relnode, 16384);
        assert_eq!(c.forknum, 2);
        assert!(parse_create(&d[..12], Lsn(8)).is_err());
        d[12] = 9;
        assert!(parse_create(&d, Lsn(8)).is_err());
        let mut t = Vec::new();
        for v in [10u32, 1663, 5, 16384, 7] {
            t.extend_from_slice(&v.to_le_bytes());
        }
        let t = parse_truncate(&t, Lsn(8)).unwrap();
        assert_eq!((t.blkno, t.rnode.dbnode, t.flags), (10, 5, SMGR_TRUNCATE_ALL));
    }
}
