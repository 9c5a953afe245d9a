//! Safekeeper: one member of the Paxos-style quorum that makes compute WAL durable (DESIGN D7).

pub mod acceptor;
pub mod control_file;
pub mod handler;
pub mod http;
pub mod mem_storage;
pub mod recovery;
pub mod state;
#[cfg(test)]
mod test_wal;
pub mod timeline;
pub mod wal_backup;
pub mod wal_storage;
