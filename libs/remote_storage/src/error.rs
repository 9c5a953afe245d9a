//! The error every remote storage operation returns.
//!
//! Every variant carries the full location of the object (`s3://bucket/prefix/key` or the
//! LocalFs file path), because "object not found" without saying which object and where is
//! useless in a pageserver log.

use std::fmt;

/// An error from a [`crate::RemoteStorage`] operation.
#[derive(Debug, thiserror::Error)]
pub enum RemoteStorageError {
    /// The object does not exist (S3 404, missing file). Never retried.
    #[error("object {key} not found")]
    NotFound { key: String },

    /// A failure that retrying cannot fix: access denied, bad request, a body whose length does
    /// not match the declared one, a local I/O error.
    #[error("{op} of {key} failed: {error:#}")]
    Permanent { op: &'static str, key: String, error: anyhow::Error },

    /// A failure that might go away (timeout, 5xx, throttling, connection reset), still failing
    /// after all retries.
    #[error("{op} of {key} failed after {attempts} attempts, last error: {error:#}")]
    Transient { op: &'static str, key: String, attempts: u32, error: anyhow::Error },

    /// An encrypted object could not be decrypted and verified: a byte of it was changed, it was
    /// cut short or extended, it is not encrypted at all, or the key that would open it (its data
    /// key, or the key-encryption key wrapping that) is missing or a different one. Never retried.
    #[error(transparent)]
    Authentication(AuthenticationError),

    /// `delete_many` removed some keys but not these.
    #[error("delete_many in {storage}: {} keys not deleted: {}", failures.len(), FirstFailures(failures))]
    DeleteFailed { storage: String, failures: Vec<DeleteFailure> },
}

/// One key `delete_many` could not delete, with the backend's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteFailure {
    pub key: String,
    pub message: String,
}

/// Why an encrypted object failed authentication. Also travels inside the `io::Error` of a
/// download stream when a later chunk fails, so [`RemoteStorageError::from_body_error`] (and a
/// caller, with `io::Error::get_ref`) can tell it from a network error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "object {key} failed authentication: {reason}. It was modified, or encrypted with a key that is not \
     configured here: check encryption.kek_file (or kek_hex) and encryption.old_keks in the remote storage config"
)]
pub struct AuthenticationError {
    /// Full location of the object.
    pub key: String,
    pub reason: String,
}

impl RemoteStorageError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, RemoteStorageError::NotFound { .. })
    }

    /// Whether this is an encrypted object failing authentication (tampered, or the wrong key).
    pub fn is_authentication(&self) -> bool {
        matches!(self, RemoteStorageError::Authentication(_))
    }

    /// Classifies an error read from a download body: an [`AuthenticationError`] carried in the
    /// `io::Error` stays one; anything else is a permanent failure of `op` on `key`.
    pub fn from_body_error(op: &'static str, key: &str, error: std::io::Error) -> Self {
        match error.get_ref().and_then(|inner| inner.downcast_ref::<AuthenticationError>()) {
            Some(auth) => RemoteStorageError::Authentication(auth.clone()),
            None => RemoteStorageError::permanent(op, key, error),
        }
    }

    pub(crate) fn permanent(op: &'static str, key: impl Into<String>, error: impl Into<anyhow::Error>) -> Self {
        RemoteStorageError::Permanent { op, key: key.into(), error: error.into() }
    }
}

/// Shows the first few failures; a batch of 1000 failures would otherwise flood the log line.
struct FirstFailures<'a>(&'a [DeleteFailure]);

impl fmt::Display for FirstFailures<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN_MAX: usize = 5;
        for (i, failure) in self.0.iter().take(SHOWN_MAX).enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", failure.key, failure.message)?;
        }
        if self.0.len() > SHOWN_MAX {
            write!(f, "; and {} more", self.0.len() - SHOWN_MAX)?;
        }
        Ok(())
    }
}
