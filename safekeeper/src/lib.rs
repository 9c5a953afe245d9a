//! Safekeeper: one member of the Paxos-style quorum that makes compute WAL durable (DESIGN D7).

pub mod acceptor;
pub mod mem_storage;
pub mod state;
