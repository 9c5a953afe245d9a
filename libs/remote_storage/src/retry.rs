//! The one retry loop every S3 request goes through.
//!
//! The SDK's own retries are disabled so that there is exactly one place that decides what is
//! transient, how long to wait, and how the final error names the key.

use std::future::Future;
use std::time::Duration;

use rand::Rng;

use crate::RemoteStorageError;

/// How one attempt of an operation failed; [`retry`] turns it into a [`RemoteStorageError`].
#[derive(Debug)]
pub(crate) enum AttemptError {
    /// The object does not exist; never retried.
    NotFound,
    /// Might succeed if tried again (timeout, 5xx, throttling, connection error).
    Transient(anyhow::Error),
    /// Will fail again (403, 400, bad input).
    Permanent(anyhow::Error),
}

/// Attempts and backoff for [`retry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySettings {
    /// Total attempts, including the first; at least 1.
    pub attempts_max: u32,
    /// Wait before the first retry; doubles on every further retry.
    pub backoff_base: Duration,
    /// Cap on one wait, so a long outage is polled rather than waited out blindly.
    pub backoff_max: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self { attempts_max: 6, backoff_base: Duration::from_millis(100), backoff_max: Duration::from_secs(10) }
    }
}

impl RetrySettings {
    /// The wait after `failed_attempts` failures: exponential, capped, with "equal jitter"
    /// (uniform in [cap/2, cap]) so that many clients failing together do not retry in lockstep.
    fn backoff(&self, failed_attempts: u32) -> Duration {
        let exponent = failed_attempts.saturating_sub(1).min(30);
        let cap = self.backoff_base.saturating_mul(1u32 << exponent).min(self.backoff_max);
        let half = cap / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=cap - half)
    }
}

/// Runs `attempt` until it succeeds, fails permanently, or `settings.attempts_max` attempts
/// have failed transiently. `op_name` and `key` (the full object location) go into the error.
pub(crate) async fn retry<T, F, Fut>(
    op_name: &'static str,
    key: &str,
    settings: &RetrySettings,
    mut attempt: F,
) -> Result<T, RemoteStorageError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, AttemptError>>,
{
    let attempts_max = settings.attempts_max.max(1);
    let mut failed_attempts = 0u32;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(AttemptError::NotFound) => return Err(RemoteStorageError::NotFound { key: key.to_owned() }),
            Err(AttemptError::Permanent(error)) => {
                return Err(RemoteStorageError::Permanent { op: op_name, key: key.to_owned(), error })
            }
            Err(AttemptError::Transient(error)) => {
                failed_attempts += 1;
                if failed_attempts >= attempts_max {
                    return Err(RemoteStorageError::Transient {
                        op: op_name,
                        key: key.to_owned(),
                        attempts: failed_attempts,
                        error,
                    });
                }
                let wait = settings.backoff(failed_attempts);
                tracing::warn!(
                    "{op_name} of {key} failed (attempt {failed_attempts} of {attempts_max}), \
                     retrying in {wait:?}: {error:#}"
                );
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn fast() -> RetrySettings {
        RetrySettings { attempts_max: 5, backoff_base: Duration::from_millis(1), backoff_max: Duration::from_millis(4) }
    }

    #[tokio::test]
    async fn transient_failures_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        let result = retry("get", "s3://b/k", &fast(), || async {
            match calls.fetch_add(1, Ordering::SeqCst) {
                0 | 1 => Err(AttemptError::Transient(anyhow::anyhow!("503 slow down"))),
                _ => Ok(42),
            }
        })
        .await;
        assert_eq!(result.unwrap(), 42);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn permanent_failure_is_not_retried() {
        let calls = AtomicU32::new(0);
        let err = retry("put", "s3://b/k", &fast(), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(AttemptError::Permanent(anyhow::anyhow!("403 access denied")))
        })
        .await
        .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(matches!(err, RemoteStorageError::Permanent { .. }));
        let message = err.to_string();
        assert!(message.contains("s3://b/k") && message.contains("403"), "{message}");
    }

    #[tokio::test]
    async fn not_found_is_not_retried_and_names_the_key() {
        let calls = AtomicU32::new(0);
        let err = retry("get", "s3://b/missing", &fast(), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(AttemptError::NotFound)
        })
        .await
        .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(err.is_not_found());
        assert_eq!(err.to_string(), "object s3://b/missing not found");
    }

    #[tokio::test]
    async fn gives_up_after_attempts_max() {
        let calls = AtomicU32::new(0);
        let err = retry("list", "s3://b/p", &fast(), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(AttemptError::Transient(anyhow::anyhow!("timeout")))
        })
        .await
        .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 5);
        match err {
            RemoteStorageError::Transient { attempts, key, .. } => {
                assert_eq!(attempts, 5);
                assert_eq!(key, "s3://b/p");
            }
            other => panic!("expected Transient, got {other:?}"),
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let settings = RetrySettings {
            attempts_max: 10,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_millis(1000),
        };
        for _ in 0..100 {
            let first = settings.backoff(1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let third = settings.backoff(3);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            let late = settings.backoff(40);
            assert!(late >= Duration::from_millis(500) && late <= Duration::from_millis(1000));
        }
    }
}
