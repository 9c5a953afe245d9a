//! `RemoteStorageConfig`: which backend to use, as written in pageserver/safekeeper TOML.
//!
//! ```toml
//! remote_storage = { local_path = ".neon/remote_storage" }
//! remote_storage = { bucket_name = "neon", bucket_region = "us-east-1", endpoint = "http://127.0.0.1:5000", prefix_in_bucket = "pageserver" }
//! # Either backend, with every object encrypted (see `crate::encryption`):
//! remote_storage = { local_path = ".neon/remote_storage", encryption = { kek_id = "k2", kek_file = "/etc/neon/k2.key", old_keks = [{ kek_id = "k1", kek_file = "/etc/neon/k1.key" }] } }
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
    /// Either backend with an `encryption` section. A separate variant (rather than a field in
    /// both backend configs) so that code matching or building the plain variants keeps working.
    Encrypted(EncryptedStorageConfig),
}

/// A backend config plus how to encrypt its objects. `backend` is never itself `Encrypted`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedStorageConfig {
    pub backend: Box<RemoteStorageConfig>,
    pub encryption: EncryptionConfig,
}

/// Written back flat (the backend's fields next to `encryption`), as it is read. By hand because
/// a derived `flatten` of the recursive `RemoteStorageConfig` has no finite serializer type.
impl Serialize for EncryptedStorageConfig {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        #[serde(untagged)]
        enum Plain<'a> {
            LocalFs(&'a LocalFsConfig),
            S3(&'a S3Config),
        }
        #[derive(Serialize)]
        struct Flat<'a> {
            #[serde(flatten)]
            backend: Plain<'a>,
            encryption: &'a EncryptionConfig,
        }
        let backend = match self.backend.as_ref() {
            RemoteStorageConfig::LocalFs(local) => Plain::LocalFs(local),
            RemoteStorageConfig::S3(s3) => Plain::S3(s3),
            RemoteStorageConfig::Encrypted(_) => {
                return Err(serde::ser::Error::custom("remote storage encryption cannot be nested"))
            }
        };
        Flat { backend, encryption: &self.encryption }.serialize(serializer)
    }
}

/// The `encryption` section: the key-encryption keys (KEKs). `kek_id` + `kek_file`/`kek_hex`
/// name the active KEK, which wraps new data keys; `old_keks` are only used to unwrap data keys
/// made before a rotation, so objects written under them stay readable.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct EncryptionConfig {
    #[serde(flatten)]
    pub active: KekConfig,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub old_keks: Vec<KekConfig>,
}

/// One key-encryption key: an id (written into every data key it wraps, so a reader knows which
/// KEK to use) and where its 32 bytes come from.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct KekConfig {
    pub kek_id: String,
    #[serde(flatten)]
    pub source: KekSource,
}

#[derive(Clone, PartialEq, Eq, Serialize)]
pub enum KekSource {
    /// A file holding the key as 64 hex digits (surrounding whitespace ignored) or as 32 raw
    /// bytes, e.g. made with `openssl rand -hex 32 > k1.key` or `head -c 32 /dev/urandom`.
    #[serde(rename = "kek_file")]
    File(PathBuf),
    /// The key inline, as 64 hex digits. Convenient for tests; a file keeps it out of the config.
    #[serde(rename = "kek_hex")]
    Hex(String),
}

/// Longest KEK id; ids go into object headers and key-object names.
pub const KEK_ID_LEN_MAX: usize = 64;

impl EncryptionConfig {
    /// Every configured KEK, the active one first.
    pub fn keks(&self) -> impl Iterator<Item = &KekConfig> {
        std::iter::once(&self.active).chain(&self.old_keks)
    }
}

// Hand-written so that `{config:?}` (the pageserver logs it when setup fails) never shows an
// inline key.
impl std::fmt::Debug for EncryptionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptionConfig").field("active", &self.active).field("old_keks", &self.old_keks).finish()
    }
}

impl std::fmt::Debug for KekConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let source = match &self.source {
            KekSource::File(path) => format!("kek_file {}", path.display()),
            KekSource::Hex(_) => "kek_hex (redacted)".to_owned(),
        };
        f.debug_struct("KekConfig").field("kek_id", &self.kek_id).field("source", &source).finish()
    }
}

impl std::fmt::Debug for KekSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KekSource::File(path) => f.debug_tuple("File").field(path).finish(),
            KekSource::Hex(_) => f.write_str("Hex(<redacted>)"),
        }
    }
}

/// Whether `id` may name a KEK: ASCII letters, digits, `_`, `-` and `.`, at most
/// [`KEK_ID_LEN_MAX`] bytes.
pub(crate) fn is_valid_kek_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= KEK_ID_LEN_MAX
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Parses 64 hex digits into a 32-byte key.
pub(crate) fn parse_kek_hex(hex_digits: &str) -> Result<[u8; 32], String> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(hex_digits.trim(), &mut key).map_err(|_| {
        format!(
            "must be 64 hex digits (32 bytes), e.g. from `openssl rand -hex 32`; got {} characters",
            hex_digits.trim().len()
        )
    })?;
    Ok(key)
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
    encryption: Option<RawEncryptionConfig>,
}

/// The `encryption` table, validated into [`EncryptionConfig`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEncryptionConfig {
    kek_id: Option<String>,
    kek_file: Option<PathBuf>,
    kek_hex: Option<String>,
    #[serde(default)]
    old_keks: Vec<RawKekConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKekConfig {
    kek_id: Option<String>,
    kek_file: Option<PathBuf>,
    kek_hex: Option<String>,
}

impl RawKekConfig {
    fn validate(self, what: &str) -> Result<KekConfig, String> {
        let kek_id = self.kek_id.ok_or_else(|| format!("{what} needs kek_id (a name for the key, e.g. \"k1\")"))?;
        if !is_valid_kek_id(&kek_id) {
            return Err(format!(
                "{what}: kek_id {kek_id:?} must be 1 to {KEK_ID_LEN_MAX} ASCII letters, digits, '_', '-' or '.'"
            ));
        }
        let source = match (self.kek_file, self.kek_hex) {
            (Some(_), Some(_)) => {
                return Err(format!("{what} (kek_id {kek_id:?}) sets both kek_file and kek_hex; choose one"))
            }
            (None, None) => {
                return Err(format!(
                    "{what} (kek_id {kek_id:?}) needs kek_file (a file holding the key as 64 hex digits) or kek_hex"
                ))
            }
            (Some(file), None) => KekSource::File(file),
            (None, Some(hex_digits)) => {
                parse_kek_hex(&hex_digits).map_err(|e| format!("{what} (kek_id {kek_id:?}): kek_hex {e}"))?;
                KekSource::Hex(hex_digits)
            }
        };
        Ok(KekConfig { kek_id, source })
    }
}

impl RawEncryptionConfig {
    fn validate(self) -> Result<EncryptionConfig, String> {
        let active = RawKekConfig { kek_id: self.kek_id, kek_file: self.kek_file, kek_hex: self.kek_hex }
            .validate("remote storage encryption")?;
        let old_keks = self
            .old_keks
            .into_iter()
            .enumerate()
            .map(|(i, raw)| raw.validate(&format!("remote storage encryption.old_keks[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let config = EncryptionConfig { active, old_keks };
        let mut seen = std::collections::HashSet::new();
        for kek in config.keks() {
            if !seen.insert(kek.kek_id.as_str()) {
                return Err(format!(
                    "remote storage encryption names kek_id {:?} twice; every KEK needs its own id (a data key records \
                     the id of the KEK that wrapped it)",
                    kek.kek_id
                ));
            }
        }
        Ok(config)
    }
}

impl TryFrom<RawRemoteStorageConfig> for RemoteStorageConfig {
    type Error = String;

    fn try_from(mut raw: RawRemoteStorageConfig) -> Result<Self, String> {
        let encryption = raw.encryption.take().map(RawEncryptionConfig::validate).transpose()?;
        let backend = Self::backend_from_raw(raw)?;
        Ok(match encryption {
            None => backend,
            Some(encryption) => {
                RemoteStorageConfig::Encrypted(EncryptedStorageConfig { backend: Box::new(backend), encryption })
            }
        })
    }
}

impl RemoteStorageConfig {
    /// The encryption section, if any.
    pub fn encryption(&self) -> Option<&EncryptionConfig> {
        match self {
            RemoteStorageConfig::Encrypted(encrypted) => Some(&encrypted.encryption),
            _ => None,
        }
    }

    fn backend_from_raw(raw: RawRemoteStorageConfig) -> Result<Self, String> {
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

    const HEX_A: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn parses_encryption_and_round_trips() {
        let toml_like = format!(
            r#"{{"local_path": "/tmp/rs", "encryption": {{"kek_id": "k2", "kek_file": "/etc/k2.key",
                "old_keks": [{{"kek_id": "k1", "kek_hex": "{HEX_A}"}}]}}}}"#
        );
        let config = RemoteStorageConfig::from_json(&toml_like).unwrap();
        let RemoteStorageConfig::Encrypted(encrypted) = &config else {
            panic!("expected Encrypted, got {config:?}");
        };
        assert_eq!(*encrypted.backend, RemoteStorageConfig::LocalFs(LocalFsConfig { local_path: "/tmp/rs".into() }));
        let ids: Vec<_> = encrypted.encryption.keks().map(|k| k.kek_id.as_str()).collect();
        assert_eq!(ids, ["k2", "k1"]);
        assert_eq!(encrypted.encryption.active.source, KekSource::File("/etc/k2.key".into()));
        assert_eq!(config.encryption(), Some(&encrypted.encryption));

        // Written back flat, as read.
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(RemoteStorageConfig::from_json(&json).unwrap(), config, "{json}");
        // An inline key never shows in Debug output (the pageserver logs the config on errors).
        let debug = format!("{config:?}");
        assert!(!debug.contains(HEX_A) && debug.contains("redacted"), "{debug}");

        let s3 = RemoteStorageConfig::from_json(&format!(
            r#"{{"bucket_name": "neon", "bucket_region": "r", "encryption": {{"kek_id": "a", "kek_hex": "{HEX_A}"}}}}"#
        ))
        .unwrap();
        let RemoteStorageConfig::Encrypted(encrypted) = &s3 else { panic!("{s3:?}") };
        assert!(matches!(*encrypted.backend, RemoteStorageConfig::S3(_)));
        assert_eq!(RemoteStorageConfig::from_json(&serde_json::to_string(&s3).unwrap()).unwrap(), s3);
    }

    #[test]
    fn rejects_bad_encryption_configs_with_reasons() {
        let with = |enc: &str| format!(r#"{{"local_path": "x", "encryption": {enc}}}"#);
        for (json, expected) in [
            (with(r#"{"kek_file": "/k"}"#), "needs kek_id"),
            (with(r#"{"kek_id": "k1"}"#), "needs kek_file"),
            (
                with(&format!(r#"{{"kek_id": "k1", "kek_file": "/k", "kek_hex": "{HEX_A}"}}"#)),
                "both kek_file and kek_hex",
            ),
            (with(r#"{"kek_id": "k1", "kek_hex": "abcd"}"#), "64 hex digits"),
            (with(r#"{"kek_id": "k/1", "kek_file": "/k"}"#), "must be 1 to 64 ASCII"),
            (with(r#"{"kek_id": "k1", "kek_file": "/k", "kek_fiel": "/x"}"#), "unknown field"),
            (with(r#"{"kek_id": "k1", "kek_file": "/k", "old_keks": [{"kek_id": "k1", "kek_file": "/j"}]}"#), "twice"),
            (
                with(r#"{"kek_id": "k1", "kek_file": "/k", "old_keks": [{"kek_file": "/j"}]}"#),
                "old_keks[0] needs kek_id",
            ),
            (r#"{"encryption": {"kek_id": "k1", "kek_file": "/k"}}"#.to_owned(), "needs either local_path"),
        ] {
            let err = RemoteStorageConfig::from_json(&json).unwrap_err().to_string();
            assert!(err.contains(expected), "{json}: {err}");
        }
    }
}
