//! The walproposer: the leader side of the safekeeper protocol (DESIGN D2, D7). `proposer` is
//! the sans-IO state machine; `driver` runs it on tokio: connections to the safekeepers, WAL
//! read from the local Postgres as a physical replication client, and the commit LSN reported
//! back to Postgres as the flush position of the synchronous standby `walproposer`.

pub mod driver;
pub mod proposer;
