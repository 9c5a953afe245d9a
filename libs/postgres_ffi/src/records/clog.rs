//! CLOG records (access/clog.h): a new zeroed status page, or truncation of old segments.

use utils::Lsn;

use crate::error::DecodeError;
use crate::reader::Reader;
use crate::{Oid, TransactionId};

pub const CLOG_ZEROPAGE: u8 = 0x00;
pub const CLOG_TRUNCATE: u8 = 0x10;

/// `xl_clog_truncate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClogTruncate {
    pub pageno: u32,
    pub oldest_xact: TransactionId,
    pub oldest_xact_db: Oid,
}

/// A zero-page record's body: the page number as a C `int`.
pub fn parse_zero_page(data: &[u8], lsn: Lsn) -> Result<u32, DecodeError> {
    let mut r = Reader::new(data, lsn, "CLOG_ZEROPAGE");
    let pageno = r.i32("pageno")?;
    u32::try_from(pageno).map_err(|_| r.error(format_args!("negative page number {pageno}")))
}

pub fn parse_truncate(data: &[u8], lsn: Lsn) -> Result<ClogTruncate, DecodeError> {
    let mut r = Reader::new(data, lsn, "xl_clog_truncate");
    let pageno = r.i32("pageno")?;
    let pageno = u32::try_from(pageno).map_err(|_| r.error(format_args!("negative page number {pageno}")))?;
    Ok(ClogTruncate { pageno, oldest_xact: r.u32("oldestXact")?, oldest_xact_db: r.u32("oldestXactDb")? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        assert_eq!(parse_zero_page(&7i32.to_le_bytes(), Lsn(1)).unwrap(), 7);
        assert!(parse_zero_page(&(-1i32).to_le_bytes(), Lsn(1)).is_err());
        assert!(parse_zero_page(&[1, 2], Lsn(1)).is_err());
        let d: Vec<u8> = [3u32, 1000, 5].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(
            parse_truncate(&d, Lsn(1)).unwrap(),
            ClogTruncate { pageno: 3, oldest_xact: 1000, oldest_xact_db: 5 }
        );
    }
}
