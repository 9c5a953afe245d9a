//! What safekeepers and their clients share: terms and term histories, and the messages of the
//! proposer–acceptor protocol (DESIGN D7).

pub mod models;
pub mod proto;
pub mod replication;
pub mod term;

pub use term::{Term, TermHistory, TermLsn};
