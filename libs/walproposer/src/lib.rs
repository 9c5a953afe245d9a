//! The walproposer: the leader side of the safekeeper protocol (DESIGN D2, D7). `proposer` is
//! the sans-IO state machine; a tokio driver (run by compute_ctl) feeds it connections, acceptor
//! messages and WAL read from the local Postgres.

pub mod proposer;
