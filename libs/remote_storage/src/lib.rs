//! Remote object storage: one trait, [`RemoteStorage`], and two backends behind
//! [`GenericRemoteStorage`]: [`LocalFs`] (a directory; the embedded default) and [`S3Bucket`]
//! (any S3 API: AWS, MinIO, moto), either of which [`EncryptedStorage`] can wrap to encrypt every
//! object at rest (the config's `encryption` section; see [`encryption`]).
//!
//! Both backends follow S3 semantics so that code tested against LocalFs behaves the same on S3:
//! puts are atomic (readers see the old object or the new one, never a prefix), deleting a
//! missing object succeeds, listings are sorted by key bytes, and a `NotFound` is distinguishable
//! from every other failure. Every error names the object's full location.

mod config;
pub mod encryption;
mod error;
mod local_fs;
mod path;
mod retry;
mod s3;

use std::io;
use std::pin::Pin;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::{Stream, TryStreamExt};

pub use config::{
    EncryptedStorageConfig, EncryptionConfig, KekConfig, KekSource, LocalFsConfig, RemoteStorageConfig, S3Config,
};
pub use encryption::{EncryptedStorage, KeyEncryptionKey, LocalKek};
pub use error::{AuthenticationError, DeleteFailure, RemoteStorageError};
pub use local_fs::LocalFs;
pub use path::{InvalidRemotePath, RemotePath, REMOTE_PATH_LEN_BYTES_MAX};
pub use retry::RetrySettings;
pub use s3::S3Bucket;

/// Re-exported so callers can pass explicit credentials to [`S3Bucket::with_credentials`]
/// without depending on the AWS crates themselves.
pub use aws_sdk_s3::config::Credentials as S3Credentials;

/// An object body, uploaded or downloaded chunk by chunk so that a 256 MiB layer never has to be
/// in memory at once.
pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send + 'static>>;

/// A [`ByteStream`] of one in-memory buffer.
pub fn byte_stream_from_bytes(bytes: Bytes) -> ByteStream {
    Box::pin(futures::stream::once(async move { Ok(bytes) }))
}

/// S3 `DeleteObjects` accepts at most this many keys per request.
pub const DELETE_BATCH_KEYS_MAX: usize = 1000;

/// The result of [`RemoteStorage::get`].
pub struct Download {
    /// The requested bytes.
    pub body: ByteStream,
    /// Length of `body` (the range clamped to the object).
    pub content_length_bytes: u64,
    /// Size of the whole object, whatever range was asked for.
    pub object_size_bytes: u64,
}

impl Download {
    /// Reads the whole body into memory; for small objects such as `index_part.json`.
    pub async fn collect(self) -> io::Result<Bytes> {
        let capacity = usize::try_from(self.content_length_bytes).unwrap_or(0);
        let buf = self
            .body
            .try_fold(BytesMut::with_capacity(capacity), |mut buf, chunk| async move {
                buf.extend_from_slice(&chunk);
                Ok(buf)
            })
            .await?;
        Ok(buf.freeze())
    }
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Download")
            .field("content_length_bytes", &self.content_length_bytes)
            .field("object_size_bytes", &self.object_size_bytes)
            .finish_non_exhaustive()
    }
}

/// How [`RemoteStorage::list`] treats `/` in keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListingMode {
    /// Every key under the prefix, recursively. The prefix is a plain string prefix:
    /// `tenants/ab` matches `tenants/abc/x`.
    NoDelimiter,
    /// Like `ls`: the prefix is a directory (`tenants/ab` lists `tenants/ab/*`), objects directly
    /// in it are `keys`, and each deeper level is reported once in `prefixes`.
    WithDelimiter,
}

/// The result of [`RemoteStorage::list`], both parts sorted by key bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub keys: Vec<RemotePath>,
    /// "Directories" (without a trailing `/`); only filled in [`ListingMode::WithDelimiter`].
    pub prefixes: Vec<RemotePath>,
}

/// An object store. Implemented by each backend and by [`GenericRemoteStorage`].
#[async_trait]
pub trait RemoteStorage: Send + Sync + 'static {
    /// Stores `body` (exactly `content_length_bytes` long) at `path`, replacing any existing
    /// object atomically. A body of another length fails without touching the old object.
    async fn put(
        &self,
        path: &RemotePath,
        body: ByteStream,
        content_length_bytes: u64,
    ) -> Result<(), RemoteStorageError>;

    /// Reads the object at `path`, or the byte range `[start, end)` of it (`end: None` = to the
    /// end). The range is clamped to the object; a range starting at or beyond the end is empty.
    async fn get(&self, path: &RemotePath, range: Option<(u64, Option<u64>)>) -> Result<Download, RemoteStorageError>;

    /// Lists keys under `prefix` (everything if `None`), following pagination internally.
    /// `max_keys` caps keys and prefixes together, keeping the first ones in key order.
    async fn list(
        &self,
        prefix: Option<&RemotePath>,
        mode: ListingMode,
        max_keys: Option<usize>,
    ) -> Result<Listing, RemoteStorageError>;

    /// Deletes the object at `path`; deleting a missing object succeeds.
    async fn delete(&self, path: &RemotePath) -> Result<(), RemoteStorageError>;

    /// Deletes many objects (S3: in batches of [`DELETE_BATCH_KEYS_MAX`]). Missing keys are not
    /// errors; keys that could not be deleted are reported in
    /// [`RemoteStorageError::DeleteFailed`].
    async fn delete_many(&self, paths: &[RemotePath]) -> Result<(), RemoteStorageError>;

    /// Copies the object at `from` to `to` (replacing `to`) without downloading it.
    async fn copy(&self, from: &RemotePath, to: &RemotePath) -> Result<(), RemoteStorageError>;

    /// [`put`](Self::put) of an in-memory buffer.
    async fn put_bytes(&self, path: &RemotePath, bytes: Bytes) -> Result<(), RemoteStorageError> {
        let len_bytes = bytes.len() as u64;
        self.put(path, byte_stream_from_bytes(bytes), len_bytes).await
    }

    /// [`get`](Self::get) of a whole object into memory; for small objects.
    async fn get_bytes(&self, path: &RemotePath) -> Result<Bytes, RemoteStorageError> {
        let download = self.get(path, None).await?;
        download.collect().await.map_err(|e| RemoteStorageError::from_body_error("get", path.as_str(), e))
    }
}

/// The configured backend, dispatched by enum so it can be cloned and stored without `dyn`.
#[derive(Clone, Debug)]
pub enum GenericRemoteStorage {
    LocalFs(LocalFs),
    S3(S3Bucket),
    /// One of the others, with every object encrypted.
    Encrypted(EncryptedStorage),
}

impl GenericRemoteStorage {
    /// Builds the backend `config` describes. For S3, credentials come from the standard AWS
    /// chain (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, profile, IMDS, ...). With an
    /// `encryption` section the KEK files are read here, so a missing key fails at startup.
    pub async fn from_config(config: &RemoteStorageConfig) -> anyhow::Result<Self> {
        Ok(match config {
            RemoteStorageConfig::Encrypted(encrypted) => {
                let backend = match encrypted.backend.as_ref() {
                    RemoteStorageConfig::Encrypted(_) => anyhow::bail!("remote storage encryption cannot be nested"),
                    plain => Self::plain_from_config(plain).await?,
                };
                GenericRemoteStorage::Encrypted(EncryptedStorage::from_config(backend, &encrypted.encryption)?)
            }
            plain => Self::plain_from_config(plain).await?,
        })
    }

    async fn plain_from_config(config: &RemoteStorageConfig) -> anyhow::Result<Self> {
        Ok(match config {
            RemoteStorageConfig::LocalFs(local) => {
                GenericRemoteStorage::LocalFs(LocalFs::new(local.local_path.clone())?)
            }
            RemoteStorageConfig::S3(s3) => GenericRemoteStorage::S3(S3Bucket::new(s3).await?),
            RemoteStorageConfig::Encrypted(_) => {
                anyhow::bail!("bug: plain_from_config called with an encrypted config")
            }
        })
    }

    fn backend(&self) -> &dyn RemoteStorage {
        match self {
            GenericRemoteStorage::LocalFs(local) => local,
            GenericRemoteStorage::S3(s3) => s3,
            GenericRemoteStorage::Encrypted(encrypted) => encrypted,
        }
    }

    /// Where `path` is stored, as error messages spell it: a file path, or `s3://bucket/key`.
    pub fn location(&self, path: &RemotePath) -> String {
        match self {
            GenericRemoteStorage::LocalFs(local) => local.location(path),
            GenericRemoteStorage::S3(s3) => s3.location_of(path),
            GenericRemoteStorage::Encrypted(encrypted) => encrypted.backend().location(path),
        }
    }
}

#[async_trait]
impl RemoteStorage for GenericRemoteStorage {
    async fn put(
        &self,
        path: &RemotePath,
        body: ByteStream,
        content_length_bytes: u64,
    ) -> Result<(), RemoteStorageError> {
        self.backend().put(path, body, content_length_bytes).await
    }

    async fn get(&self, path: &RemotePath, range: Option<(u64, Option<u64>)>) -> Result<Download, RemoteStorageError> {
        self.backend().get(path, range).await
    }

    async fn list(
        &self,
        prefix: Option<&RemotePath>,
        mode: ListingMode,
        max_keys: Option<usize>,
    ) -> Result<Listing, RemoteStorageError> {
        self.backend().list(prefix, mode, max_keys).await
    }

    async fn delete(&self, path: &RemotePath) -> Result<(), RemoteStorageError> {
        self.backend().delete(path).await
    }

    async fn delete_many(&self, paths: &[RemotePath]) -> Result<(), RemoteStorageError> {
        self.backend().delete_many(paths).await
    }

    async fn copy(&self, from: &RemotePath, to: &RemotePath) -> Result<(), RemoteStorageError> {
        self.backend().copy(from, to).await
    }
}

/// Applies S3 listing semantics to raw keys (relative to the storage root, already filtered by
/// the string prefix): splits them into keys and common prefixes at the first `/` after
/// `list_prefix`, sorts, and keeps the first `max_keys` entries in key order. Shared by both
/// backends so that they agree exactly.
pub(crate) fn finish_listing(
    raw_keys: Vec<String>,
    raw_prefixes: Vec<String>,
    list_prefix: &str,
    mode: ListingMode,
    max_keys: Option<usize>,
) -> Listing {
    // (sort key, is_prefix); prefixes sort with their trailing '/', as S3 orders them.
    let mut entries: Vec<(String, bool)> = Vec::with_capacity(raw_keys.len() + raw_prefixes.len());
    entries.extend(raw_prefixes.into_iter().map(|p| (p, true)));
    for key in raw_keys {
        match mode {
            ListingMode::WithDelimiter => {
                let rest = key.get(list_prefix.len()..).unwrap_or_default();
                match rest.find('/') {
                    Some(slash) => {
                        let end = list_prefix.len() + slash + 1;
                        entries.push((key[..end].to_owned(), true));
                    }
                    None => entries.push((key, false)),
                }
            }
            ListingMode::NoDelimiter => entries.push((key, false)),
        }
    }
    entries.sort();
    entries.dedup();
    if let Some(max_keys) = max_keys {
        entries.truncate(max_keys);
    }
    let mut listing = Listing::default();
    for (entry, is_prefix) in entries {
        let trimmed = if is_prefix { entry.trim_end_matches('/') } else { &entry };
        match RemotePath::new(trimmed) {
            Ok(path) if is_prefix => listing.prefixes.push(path),
            Ok(path) => listing.keys.push(path),
            // Written by something other than us; a listing should not fail because of it.
            Err(e) => tracing::warn!("skipping listed key that is not a valid remote path: {e}"),
        }
    }
    listing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(listing: &Listing) -> Vec<&str> {
        listing.keys.iter().map(RemotePath::as_str).collect()
    }

    fn prefixes(listing: &Listing) -> Vec<&str> {
        listing.prefixes.iter().map(RemotePath::as_str).collect()
    }

    #[test]
    fn listing_with_delimiter_groups_directories() {
        let raw = ["t/a", "t/b/x", "t/b/y", "t/c", "t/b-z/q"].map(String::from).to_vec();
        let listing = finish_listing(raw, vec![], "t/", ListingMode::WithDelimiter, None);
        assert_eq!(keys(&listing), ["t/a", "t/c"]);
        // "t/b-z/" sorts before "t/b/" because '-' < '/'.
        assert_eq!(prefixes(&listing), ["t/b-z", "t/b"]);

        let listing = finish_listing(
            ["t/a", "t/b/x", "t/c"].map(String::from).to_vec(),
            vec![],
            "t/",
            ListingMode::WithDelimiter,
            Some(2),
        );
        assert_eq!(keys(&listing), ["t/a"]);
        assert_eq!(prefixes(&listing), ["t/b"]);
    }

    #[test]
    fn listing_without_delimiter_is_sorted_and_capped() {
        let raw = ["b", "a/x", "a-y", "c"].map(String::from).to_vec();
        let listing = finish_listing(raw, vec![], "", ListingMode::NoDelimiter, Some(3));
        assert_eq!(keys(&listing), ["a-y", "a/x", "b"]);
        assert!(listing.prefixes.is_empty());
    }
}
