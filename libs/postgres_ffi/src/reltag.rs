//! Relation identity: `RelFileNode` (tablespace, database, relfilenode) plus a fork.

use std::fmt;

use crate::Oid;

/// Fork numbers (`common/relpath.h`). Stored as a plain `u8` in [`RelTag`] because that is what
/// travels in WAL block references and storage keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum ForkNumber {
    Main = 0,
    Fsm = 1,
    VisibilityMap = 2,
    Init = 3,
}

pub const MAIN_FORKNUM: u8 = ForkNumber::Main as u8;
pub const FSM_FORKNUM: u8 = ForkNumber::Fsm as u8;
pub const VISIBILITYMAP_FORKNUM: u8 = ForkNumber::VisibilityMap as u8;
pub const INIT_FORKNUM: u8 = ForkNumber::Init as u8;
pub const MAX_FORKNUM: u8 = INIT_FORKNUM;

impl ForkNumber {
    pub fn from_u8(n: u8) -> Option<ForkNumber> {
        match n {
            0 => Some(ForkNumber::Main),
            1 => Some(ForkNumber::Fsm),
            2 => Some(ForkNumber::VisibilityMap),
            3 => Some(ForkNumber::Init),
            _ => None,
        }
    }

    /// The name Postgres uses in file names and `pg_waldump` output (`forkNames[]`).
    pub fn name(self) -> &'static str {
        match self {
            ForkNumber::Main => "main",
            ForkNumber::Fsm => "fsm",
            ForkNumber::VisibilityMap => "vm",
            ForkNumber::Init => "init",
        }
    }

    pub fn from_name(name: &str) -> Option<ForkNumber> {
        [ForkNumber::Main, ForkNumber::Fsm, ForkNumber::VisibilityMap, ForkNumber::Init]
            .into_iter()
            .find(|f| f.name() == name)
    }
}

/// Name of fork number `n`, or `None` if it is not a valid fork.
pub fn fork_name(n: u8) -> Option<&'static str> {
    ForkNumber::from_u8(n).map(ForkNumber::name)
}

/// `RelFileNode`: where a relation's files live. 12 bytes in WAL: spc, db, rel as `Oid`s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelFileNode {
    pub spcnode: Oid,
    pub dbnode: Oid,
    pub relnode: Oid,
}

impl RelFileNode {
    pub const SIZE_BYTES: usize = 12;

    pub fn encode(&self) -> [u8; 12] {
        let mut out = [0u8; 12];
        out[0..4].copy_from_slice(&self.spcnode.to_le_bytes());
        out[4..8].copy_from_slice(&self.dbnode.to_le_bytes());
        out[8..12].copy_from_slice(&self.relnode.to_le_bytes());
        out
    }

    pub fn with_fork(self, forknum: u8) -> RelTag {
        RelTag { spcnode: self.spcnode, dbnode: self.dbnode, relnode: self.relnode, forknum }
    }
}

impl fmt::Display for RelFileNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.spcnode, self.dbnode, self.relnode)
    }
}

/// One fork of one relation: the unit the pageserver stores blocks and sizes for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelTag {
    pub spcnode: Oid,
    pub dbnode: Oid,
    pub relnode: Oid,
    pub forknum: u8,
}

impl RelTag {
    pub fn rel_file_node(&self) -> RelFileNode {
        RelFileNode { spcnode: self.spcnode, dbnode: self.dbnode, relnode: self.relnode }
    }

    /// The file name Postgres uses inside the database directory: `16384`, `16384_fsm`, ...
    pub fn file_name(&self) -> String {
        match fork_name(self.forknum) {
            Some("main") => self.relnode.to_string(),
            Some(name) => format!("{}_{}", self.relnode, name),
            None => format!("{}_fork{}", self.relnode, self.forknum),
        }
    }
}

/// `spc/db/rel` for the main fork, `spc/db/rel_fsm` (etc.) for the others.
impl fmt::Display for RelTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.spcnode, self.dbnode, self.relnode)?;
        match fork_name(self.forknum) {
            Some("main") => Ok(()),
            Some(name) => write!(f, "_{name}"),
            None => write!(f, "_fork{}", self.forknum),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_names() {
        let rel = RelFileNode { spcnode: 1663, dbnode: 5, relnode: 16384 };
        assert_eq!(rel.with_fork(MAIN_FORKNUM).to_string(), "1663/5/16384");
        assert_eq!(rel.with_fork(VISIBILITYMAP_FORKNUM).to_string(), "1663/5/16384_vm");
        assert_eq!(rel.with_fork(FSM_FORKNUM).file_name(), "16384_fsm");
        assert_eq!(rel.with_fork(MAIN_FORKNUM).file_name(), "16384");
        assert_eq!(fork_name(3), Some("init"));
        assert_eq!(fork_name(4), None);
        assert_eq!(ForkNumber::from_name("vm"), Some(ForkNumber::VisibilityMap));
        assert_eq!(rel.encode()[0..4], 1663u32.to_le_bytes());
    }
}
