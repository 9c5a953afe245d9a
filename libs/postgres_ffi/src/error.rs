//! The error every decoder of external bytes returns: what was wrong, and at which LSN.

use utils::Lsn;

/// A record, record body, page image or control file could not be decoded.
///
/// `lsn` is the start LSN of the WAL record being decoded ([`Lsn::INVALID`] for inputs that are
/// not WAL, such as `pg_control`); `what` names the structure and the field that was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} (record at {lsn})")]
pub struct DecodeError {
    pub lsn: Lsn,
    pub what: String,
}

impl DecodeError {
    pub fn new(lsn: Lsn, what: impl Into<String>) -> Self {
        DecodeError { lsn, what: what.into() }
    }
}
