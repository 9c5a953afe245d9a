//! Tablespace records (commands/tablespace.h): `CREATE TABLESPACE` and `DROP TABLESPACE`.
//! Only the tablespace's OID matters to storage; the location path of a create record is not
//! kept (a stateless compute lays tablespaces out inside its data directory).

use utils::Lsn;

use crate::error::DecodeError;
use crate::reader::Reader;
use crate::Oid;

pub const XLOG_TBLSPC_CREATE: u8 = 0x00;
pub const XLOG_TBLSPC_DROP: u8 = 0x10;

/// `xl_tblspc_create_rec` / `xl_tblspc_drop_rec`: both start with the tablespace OID.
pub fn parse_tablespace_id(data: &[u8], lsn: Lsn, what: &'static str) -> Result<Oid, DecodeError> {
    Reader::new(data, lsn, what).u32("ts_id")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tablespace_id_and_short_record() {
        let mut create = 16502u32.to_le_bytes().to_vec();
        create.extend_from_slice(b"/tmp/ts\0");
        assert_eq!(parse_tablespace_id(&create, Lsn(1), "xl_tblspc_create_rec").unwrap(), 16502);
        assert!(parse_tablespace_id(&[1, 2], Lsn(1), "xl_tblspc_drop_rec").is_err());
    }
}
