//! In-memory `AcceptorStorage` for unit tests and the deterministic simulator. It models a disk
//! that loses what was not synced: `crash()` keeps only durable state and WAL. A fail point makes
//! every storage call after the N-th fail, to crash an acceptor in the middle of a message.

use std::io;

use utils::Lsn;

use crate::acceptor::AcceptorStorage;
use crate::state::TimelinePersistentState;

#[derive(Clone, Debug)]
pub struct MemStorage {
    /// WAL bytes from `start_lsn`; the first `durable_len` bytes are synced.
    pub start_lsn: Lsn,
    pub wal: Vec<u8>,
    pub durable_len: usize,
    pub state: TimelinePersistentState,
    /// Storage calls that still succeed; `None` = unlimited.
    pub ops_left: Option<u64>,
}

impl MemStorage {
    pub fn new(state: TimelinePersistentState) -> Self {
        MemStorage { start_lsn: state.local_start_lsn, wal: Vec::new(), durable_len: 0, state, ops_left: None }
    }

    /// What survives a crash: durable WAL and state.
    pub fn crash(&self) -> MemStorage {
        let mut s = self.clone();
        s.wal.truncate(s.durable_len);
        s.ops_left = None;
        s
    }

    /// Durable WAL in `[from, to)`, if held.
    pub fn durable_wal(&self, from: Lsn, to: Lsn) -> Option<&[u8]> {
        let a = from.checked_sub(self.start_lsn)? as usize;
        let b = to.checked_sub(self.start_lsn)? as usize;
        (a <= b && b <= self.durable_len).then(|| &self.wal[a..b])
    }

    fn op(&mut self) -> io::Result<()> {
        match &mut self.ops_left {
            Some(0) => Err(io::Error::other("injected storage failure")),
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

impl AcceptorStorage for MemStorage {
    fn persist_state(&mut self, state: &TimelinePersistentState) -> io::Result<()> {
        self.op()?;
        self.state = state.clone();
        Ok(())
    }

    fn write_wal(&mut self, lsn: Lsn, data: &[u8]) -> io::Result<()> {
        self.op()?;
        assert_eq!(lsn, self.write_lsn(), "write must continue the WAL");
        self.wal.extend_from_slice(data);
        Ok(())
    }

    fn flush_wal(&mut self) -> io::Result<()> {
        self.op()?;
        self.durable_len = self.wal.len();
        Ok(())
    }

    fn truncate_wal(&mut self, end_lsn: Lsn) -> io::Result<()> {
        self.op()?;
        let keep = (end_lsn - self.start_lsn) as usize;
        self.wal.truncate(keep);
        self.durable_len = self.durable_len.min(keep);
        Ok(())
    }

    fn write_lsn(&self) -> Lsn {
        self.start_lsn + self.wal.len() as u64
    }

    fn flush_lsn(&self) -> Lsn {
        self.start_lsn + self.durable_len as u64
    }
}
