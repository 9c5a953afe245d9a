//! `RemoteStorageConfig`: which backend to use, as written in pageserver/safekeeper TOML.
//!
//! ```toml
//! remote_storage = { local_path = ".neon/remote_storage" }
//! remote_storage = { bucket_name = "neon", bucket_region = "us-east-1", endpoint = "http://127.0.0.1:5000", prefix_in_bucket = "pageserver" }
//! ```
//!
//! Parsed through a flat struct rather than an untagged enum so that a typo or a missing field
//! gets a message saying what is wrong instead of serde's "did not match any variant".

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::RetrySettings;

/// S3 refuses multipart parts smaller than this (except the last one).
pub const UPLOAD_PART_SIZE_BYTES_MIN: usize = 5 * 1024 * 1024;

/// Where remote objects live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, try_from = "RawRemoteStorageConfig")]
pub enum RemoteStorageConfig {
    LocalFs(LocalFsConfig),
    S3(S3Config),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalFsConfig {
    /// Root directory of the objects; created if missing.
    pub local_path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct S3Config {
    pub bucket_name: String,
    pub bucket_region: String,
    /// Custom endpoint (MinIO, moto: `http://127.0.0.1:5000`); switches to path-style addressing.
    pub endpoint: Option<String>,
    /// Every key is stored as `<prefix_in_bucket>/<key>`, so several services can share a bucket.
    pub prefix_in_bucket: Option<String>,
    /// Requests in flight at once, downloads counted until their body is consumed or dropped.
    pub concurrency_limit: NonZeroUsize,
    /// Retries after the first attempt of a request that failed transiently.
    pub max_retries: u32,
    /// Limit on one attempt of one request (for uploads: one part).
    pub request_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// Uploads longer than this use multipart upload with parts of this size; also the upload
    /// buffer per in-flight put, so it bounds upload memory.
    pub upload_part_size_bytes: usize,
}

impl S3Config {
    pub const CONCURRENCY_LIMIT_DEFAULT: usize = 100;
    pub const MAX_RETRIES_DEFAULT: u32 = 5;
    pub const REQUEST_TIMEOUT_MS_DEFAULT: u64 = 120_000;
    pub const CONNECT_TIMEOUT_MS_DEFAULT: u64 = 10_000;
    pub const UPLOAD_PART_SIZE_BYTES_DEFAULT: usize = 16 * 1024 * 1024;

    /// A config with defaults for everything but the bucket.
    pub fn new(bucket_name: impl Into<String>, bucket_region: impl Into<String>) -> Self {
        Self {
            bucket_name: bucket_name.into(),
            bucket_region: bucket_region.into(),
            endpoint: None,
            prefix_in_bucket: None,
            concurrency_limit: NonZeroUsize::new(Self::CONCURRENCY_LIMIT_DEFAULT).expect("constant is non-zero"),
            max_retries: Self::MAX_RETRIES_DEFAULT,
            request_timeout_ms: Self::REQUEST_TIMEOUT_MS_DEFAULT,
            connect_timeout_ms: Self::CONNECT_TIMEOUT_MS_DEFAULT,
            upload_part_size_bytes: Self::UPLOAD_PART_SIZE_BYTES_DEFAULT,
        }
    }

    pub(crate) fn retry_settings(&self) -> RetrySettings {
        RetrySettings { attempts_max: self.max_retries.saturating_add(1), ..RetrySettings::default() }
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    fn validate(mut self) -> Result<Self, String> {
        if self.bucket_name.len() < 3 {
            return Err(format!(
                "bucket_name {:?} is too short (S3 bucket names have at least 3 characters)",
                self.bucket_name
            ));
        }
        if self.bucket_region.is_empty() {
            return Err("bucket_region must not be empty (e.g. \"us-east-1\")".to_owned());
        }
        if self.upload_part_size_bytes < UPLOAD_PART_SIZE_BYTES_MIN {
            return Err(format!(
                "upload_part_size_bytes = {} is below S3's minimum part size of {UPLOAD_PART_SIZE_BYTES_MIN}",
                self.upload_part_size_bytes
            ));
        }
        if self.request_timeout_ms == 0 || self.connect_timeout_ms == 0 {
            return Err("request_timeout_ms and connect_timeout_ms must be positive".to_owned());
        }
        // "a/b/" and "/a/b" mean the same prefix; store it without surrounding slashes.
        self.prefix_in_bucket = match self.prefix_in_bucket.take() {
            None => None,
            Some(prefix) => {
                let trimmed = prefix.trim_matches('/');
                if trimmed.is_empty() {
                    None
                } else {
                    crate::RemotePath::new(trimmed).map_err(|e| format!("prefix_in_bucket: {e}"))?;
                    Some(trimmed.to_owned())
                }
            }
        };
        Ok(self)
    }
}

impl RemoteStorageConfig {
    /// Parses a TOML-like `key = value` table given as JSON, e.g. for command line overrides.
    pub fn from_json(json: &str) -> anyhow::Result<Self> {
        serde_json::from_str(json).map_err(|e| anyhow::anyhow!("invalid remote storage config {json}: {e}"))
    }
}

/// Every field either backend accepts; validated into [`RemoteStorageConfig`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRemoteStorageConfig {
    local_path: Option<PathBuf>,
    bucket_name: Option<String>,
    bucket_region: Option<String>,
    endpoint: Option<String>,
    prefix_in_bucket: Option<String>,
    concurrency_limit: Option<NonZeroUsize>,
    max_retries: Option<u32>,
    request_timeout_ms: Option<u64>,
    connect_timeout_ms: Option<u64>,
    upload_part_size_bytes: Option<usize>,
}

impl TryFrom<RawRemoteStorageConfig> for RemoteStorageConfig {
    type Error = String;

    fn try_from(raw: RawRemoteStorageConfig) -> Result<Self, String> {
        match (raw.local_path, raw.bucket_name) {
            (Some(_), Some(_)) => {
                Err("remote storage config sets both local_path and bucket_name; choose one".to_owned())
            }
            (None, None) => {
                Err("remote storage config needs either local_path (a directory) or bucket_name and bucket_region (S3)"
                    .to_owned())
            }
            (Some(local_path), None) => {
                let s3_only = [
                    raw.bucket_region.is_some(),
                    raw.endpoint.is_some(),
                    raw.prefix_in_bucket.is_some(),
                    raw.concurrency_limit.is_some(),
                    raw.max_retries.is_some(),
                    raw.request_timeout_ms.is_some(),
                    raw.connect_timeout_ms.is_some(),
                    raw.upload_part_size_bytes.is_some(),
                ];
                if s3_only.into_iter().any(|set| set) {
                    return Err(
                        "remote storage config with local_path must not set S3 options (bucket_region, endpoint, ...)"
                            .to_owned(),
                    );
                }
                Ok(RemoteStorageConfig::LocalFs(LocalFsConfig { local_path }))
            }
            (None, Some(bucket_name)) => {
                let bucket_region = raw.bucket_region.ok_or_else(|| {
                    format!("S3 remote storage config for bucket {bucket_name:?} needs bucket_region")
                })?;
                let defaults = S3Config::new(bucket_name, bucket_region);
                let config = S3Config {
                    endpoint: raw.endpoint,
                    prefix_in_bucket: raw.prefix_in_bucket,
                    concurrency_limit: raw.concurrency_limit.unwrap_or(defaults.concurrency_limit),
                    max_retries: raw.max_retries.unwrap_or(defaults.max_retries),
                    request_timeout_ms: raw.request_timeout_ms.unwrap_or(defaults.request_timeout_ms),
                    connect_timeout_ms: raw.connect_timeout_ms.unwrap_or(defaults.connect_timeout_ms),
                    upload_part_size_bytes: raw.upload_part_size_bytes.unwrap_or(defaults.upload_part_size_bytes),
                    ..defaults
                };
                Ok(RemoteStorageConfig::S3(config.validate()?))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_local_fs() {
        let config = RemoteStorageConfig::from_json(r#"{"local_path": "/tmp/rs"}"#).unwrap();
        assert_eq!(config, RemoteStorageConfig::LocalFs(LocalFsConfig { local_path: "/tmp/rs".into() }));
    }

    #[test]
    fn parses_s3_with_defaults_and_normalizes_prefix() {
        let config = RemoteStorageConfig::from_json(
            r#"{"bucket_name": "neon", "bucket_region": "us-east-1",
                "endpoint": "http://127.0.0.1:5000", "prefix_in_bucket": "/pageserver/",
                "max_retries": 2}"#,
        )
        .unwrap();
        let RemoteStorageConfig::S3(s3) = &config else {
            panic!("expected S3, got {config:?}");
        };
        assert_eq!(s3.prefix_in_bucket.as_deref(), Some("pageserver"));
        assert_eq!(s3.max_retries, 2);
        assert_eq!(s3.retry_settings().attempts_max, 3);
        assert_eq!(s3.concurrency_limit.get(), S3Config::CONCURRENCY_LIMIT_DEFAULT);

        // Serializes to something that parses back to the same config.
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(RemoteStorageConfig::from_json(&json).unwrap(), config);
    }

    #[test]
    fn rejects_bad_configs_with_reasons() {
        for (json, expected) in [
            (r#"{}"#, "needs either local_path"),
            (r#"{"local_path": "x", "bucket_name": "neon"}"#, "both"),
            (r#"{"bucket_name": "neon"}"#, "needs bucket_region"),
            (r#"{"local_path": "x", "endpoint": "http://x"}"#, "must not set S3 options"),
            (r#"{"local_path": "x", "bucket_nmae": "neon"}"#, "unknown field"),
            (r#"{"bucket_name": "neon", "bucket_region": "r", "upload_part_size_bytes": 1000}"#, "minimum part size"),
            (r#"{"bucket_name": "neon", "bucket_region": "r", "prefix_in_bucket": "a/../b"}"#, "prefix_in_bucket"),
        ] {
            let err = RemoteStorageConfig::from_json(json).unwrap_err().to_string();
            assert!(err.contains(expected), "{json}: {err}");
        }
    }
}
