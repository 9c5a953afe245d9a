//! Resource manager ids and the names `pg_waldump` prints for them (`access/rmgrlist.h`).

pub const RM_XLOG_ID: u8 = 0;
pub const RM_XACT_ID: u8 = 1;
pub const RM_SMGR_ID: u8 = 2;
pub const RM_CLOG_ID: u8 = 3;
pub const RM_DBASE_ID: u8 = 4;
pub const RM_TBLSPC_ID: u8 = 5;
pub const RM_MULTIXACT_ID: u8 = 6;
pub const RM_RELMAP_ID: u8 = 7;
pub const RM_STANDBY_ID: u8 = 8;
pub const RM_HEAP2_ID: u8 = 9;
pub const RM_HEAP_ID: u8 = 10;
pub const RM_BTREE_ID: u8 = 11;
pub const RM_HASH_ID: u8 = 12;
pub const RM_GIN_ID: u8 = 13;
pub const RM_GIST_ID: u8 = 14;
pub const RM_SEQ_ID: u8 = 15;
pub const RM_SPGIST_ID: u8 = 16;
pub const RM_BRIN_ID: u8 = 17;
pub const RM_COMMIT_TS_ID: u8 = 18;
pub const RM_REPLORIGIN_ID: u8 = 19;
pub const RM_GENERIC_ID: u8 = 20;
pub const RM_LOGICALMSG_ID: u8 = 21;
/// Highest built-in id; 22..=127 are unused, 128..=255 belong to custom resource managers.
pub const RM_MAX_BUILTIN_ID: u8 = RM_LOGICALMSG_ID;
pub const RM_MIN_CUSTOM_ID: u8 = 128;

const NAMES: [&str; RM_MAX_BUILTIN_ID as usize + 1] = [
    "XLOG",
    "Transaction",
    "Storage",
    "CLOG",
    "Database",
    "Tablespace",
    "MultiXact",
    "RelMap",
    "Standby",
    "Heap2",
    "Heap",
    "Btree",
    "Hash",
    "Gin",
    "Gist",
    "Sequence",
    "SPGist",
    "BRIN",
    "CommitTs",
    "ReplicationOrigin",
    "Generic",
    "LogicalMessage",
];

/// `RmgrIdIsValid`: a built-in or a custom resource manager id.
pub fn rmgr_id_is_valid(rmid: u8) -> bool {
    rmid <= RM_MAX_BUILTIN_ID || rmid >= RM_MIN_CUSTOM_ID
}

/// The name `pg_waldump` prints in its `rmgr:` column; `None` for custom or invalid ids.
pub fn rmgr_name(rmid: u8) -> Option<&'static str> {
    NAMES.get(rmid as usize).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_validity() {
        assert_eq!(rmgr_name(RM_XLOG_ID), Some("XLOG"));
        assert_eq!(rmgr_name(RM_HEAP_ID), Some("Heap"));
        assert_eq!(rmgr_name(RM_LOGICALMSG_ID), Some("LogicalMessage"));
        assert_eq!(rmgr_name(22), None);
        assert!(rmgr_id_is_valid(21) && !rmgr_id_is_valid(22) && !rmgr_id_is_valid(127) && rmgr_id_is_valid(128));
    }
}
