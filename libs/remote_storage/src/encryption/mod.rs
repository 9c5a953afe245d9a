//! Encryption at rest (DESIGN D9): [`EncryptedStorage`] wraps a backend and encrypts every
//! object on the way up and decrypts and verifies it on the way down, so callers (pageserver
//! layers and indexes, safekeeper WAL segments) see plaintext and logical sizes and never change.
//!
//! - Object format: [`format`] (a header naming the KEK and data key, then 64 KiB AES-256-GCM
//!   chunks). Any changed, missing or extra byte fails with
//!   [`RemoteStorageError::Authentication`].
//! - Keys: [`keys`] (per-tenant data keys, wrapped by a key-encryption key, stored as objects
//!   under `_encryption_keys/`, which listings hide).
//! - The tenant is read from the path: `tenants/<tenant>/...` (pageserver) and
//!   `wal/<tenant>/...` (safekeeper) share the tenant's data key; anything else uses the
//!   `global` key.

pub mod format;
pub mod keys;

use std::io;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use crate::config::EncryptionConfig;
use crate::{
    finish_listing, AuthenticationError, ByteStream, Download, GenericRemoteStorage, Listing, ListingMode, RemotePath,
    RemoteStorage, RemoteStorageError,
};
use format::{FormatError, Header, ObjectCipher, HEADER_LEN_MAX, TAG_LEN};
use keys::{DataKey, KeyRing};
pub use keys::{KeyEncryptionKey, LocalKek, KEYS_PREFIX};

/// Scope of objects outside any tenant.
const GLOBAL_SCOPE: &str = "global";

/// Top-level path components under which the next component is a tenant id.
const TENANT_PREFIXES: [&str; 2] = ["tenants", "wal"];

/// The key scope of an object: `tenant-<id>` for `tenants/<id>/...` and `wal/<id>/...`, else
/// `global`.
pub fn key_scope(path: &RemotePath) -> String {
    let mut components = path.as_str().split('/');
    match (components.next(), components.next(), components.next()) {
        (Some(top), Some(tenant), Some(_))
            if TENANT_PREFIXES.contains(&top)
                && tenant.len() <= 64
                && tenant.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
        {
            format!("tenant-{tenant}")
        }
        _ => GLOBAL_SCOPE.to_owned(),
    }
}

/// A backend whose objects are encrypted. Cheap to clone.
#[derive(Clone)]
pub struct EncryptedStorage {
    inner: Arc<Inner>,
}

struct Inner {
    backend: GenericRemoteStorage,
    keys: KeyRing,
}

impl std::fmt::Debug for EncryptedStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptedStorage")
            .field("backend", &self.inner.backend)
            .field("active_kek", &self.inner.keys.active_kek_id())
            .finish_non_exhaustive()
    }
}

impl EncryptedStorage {
    /// Encrypts objects of `backend` with data keys wrapped by `keks[0]`; the other KEKs only
    /// unwrap older data keys. `backend` must not itself be encrypted.
    pub fn new(backend: GenericRemoteStorage, keks: Vec<Arc<dyn KeyEncryptionKey>>) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !matches!(backend, GenericRemoteStorage::Encrypted(_)),
            "remote storage encryption cannot be nested"
        );
        Ok(Self { inner: Arc::new(Inner { backend, keys: KeyRing::new(keks)? }) })
    }

    /// Loads the KEKs `config` names (reading key files) and wraps `backend`.
    pub fn from_config(backend: GenericRemoteStorage, config: &EncryptionConfig) -> anyhow::Result<Self> {
        let keks = config
            .keks()
            .map(|kek| Ok(Arc::new(LocalKek::from_config(kek)?) as Arc<dyn KeyEncryptionKey>))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Self::new(backend, keks)
    }

    /// The backend holding the ciphertext (to inspect raw objects in tests and tools).
    pub fn backend(&self) -> &GenericRemoteStorage {
        &self.inner.backend
    }

    fn check_not_reserved(&self, op: &'static str, path: &RemotePath) -> Result<(), RemoteStorageError> {
        if is_reserved(path.as_str()) {
            return Err(RemoteStorageError::permanent(
                op,
                self.inner.backend.location(path),
                anyhow::anyhow!("keys under {KEYS_PREFIX}/ are reserved for the encryption keys of this storage"),
            ));
        }
        Ok(())
    }

    fn auth_error(location: &str, reason: impl std::fmt::Display) -> RemoteStorageError {
        RemoteStorageError::Authentication(AuthenticationError { key: location.to_owned(), reason: reason.to_string() })
    }

    /// The cipher for reading an object with `header` (its bytes as stored) at `path`.
    async fn read_cipher(
        &self,
        header: Header,
        header_bytes: &[u8],
        path: &RemotePath,
        location: &str,
    ) -> Result<Arc<ObjectCipher>, RemoteStorageError> {
        let key: Arc<DataKey> =
            self.inner.keys.key_for_read(&self.inner.backend, &header.kek_id, &header.data_key_id, location).await?;
        Ok(Arc::new(ObjectCipher::new(&key.bytes, header, header_bytes, path.as_str())))
    }

    /// A ranged read: fetch the header, then only the chunks covering the range.
    async fn get_range(&self, path: &RemotePath, start: u64, end: Option<u64>) -> Result<Download, RemoteStorageError> {
        let backend = &self.inner.backend;
        let location = backend.location(path);
        let head = backend.get(path, Some((0, Some(HEADER_LEN_MAX as u64)))).await?;
        let object_size_bytes = head.object_size_bytes;
        let head_bytes = head.collect().await.map_err(|e| RemoteStorageError::from_body_error("get", &location, e))?;
        let (header, header_len) = match Header::decode(&head_bytes) {
            Ok(Some(decoded)) => decoded,
            Ok(None) => {
                return Err(Self::auth_error(
                    &location,
                    format!("it ends inside its header ({object_size_bytes} bytes)"),
                ))
            }
            Err(e) => return Err(Self::auth_error(&location, e)),
        };
        check_object_size(&header, object_size_bytes, &location)?;
        let plaintext_len = header.plaintext_len;
        let end = end.unwrap_or(u64::MAX).min(plaintext_len);
        let start = start.min(end);
        let cipher = self.read_cipher(header, &head_bytes[..header_len], path, &location).await?;
        if start == end {
            return Ok(Download {
                body: crate::byte_stream_from_bytes(Bytes::new()),
                content_length_bytes: 0,
                object_size_bytes: plaintext_len,
            });
        }
        let header = cipher.header();
        let (first, last) = (start / header.chunk_len(), (end - 1) / header.chunk_len());
        let ct_start = header.chunk_offset(first);
        let ct_end = header.chunk_offset(last) + (header.chunk_plaintext_len(last) + TAG_LEN) as u64;
        let chunks = backend.get(path, Some((ct_start, Some(ct_end)))).await?;
        // Replaced between the two requests: the new object's header is not the one we read.
        check_object_size(header, chunks.object_size_bytes, &location)?;
        let skip = (start - first * header.chunk_len()) as usize;
        let body = decrypt_stream(cipher, chunks.body, first, last, skip, end - start, location.clone());
        Ok(Download {
            body: verify_first_chunk(body, &location).await?,
            content_length_bytes: end - start,
            object_size_bytes: plaintext_len,
        })
    }
}

fn is_reserved(key: &str) -> bool {
    key == KEYS_PREFIX || key.strip_prefix(KEYS_PREFIX).is_some_and(|rest| rest.starts_with('/'))
}

fn check_object_size(header: &Header, object_size_bytes: u64, location: &str) -> Result<(), RemoteStorageError> {
    if header.object_len() != object_size_bytes {
        return Err(EncryptedStorage::auth_error(
            location,
            format!(
                "it is {object_size_bytes} bytes, but its header implies {} (it was cut short or extended)",
                header.object_len()
            ),
        ));
    }
    Ok(())
}

fn auth_io_error(location: &str, reason: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        AuthenticationError { key: location.to_owned(), reason: reason.to_string() },
    )
}

/// Reads the header from the start of `body`; returns it, its bytes, and the rest of the body.
async fn read_header(mut body: ByteStream, location: &str) -> Result<(Header, Bytes, ByteStream), RemoteStorageError> {
    let mut buf = BytesMut::new();
    loop {
        match Header::decode(&buf) {
            Err(e) => return Err(EncryptedStorage::auth_error(location, e)),
            Ok(Some((header, header_len))) => {
                let header_bytes = buf.split_to(header_len).freeze();
                let rest = buf.freeze();
                let body: ByteStream = Box::pin(futures::stream::once(async move { Ok(rest) }).chain(body));
                return Ok((header, header_bytes, body));
            }
            Ok(None) => {}
        }
        match body.next().await {
            Some(Ok(bytes)) => buf.extend_from_slice(&bytes),
            Some(Err(e)) => return Err(RemoteStorageError::from_body_error("get", location, e)),
            None => {
                return Err(EncryptedStorage::auth_error(
                    location,
                    format!("it ends inside its header ({} bytes)", buf.len()),
                ))
            }
        }
    }
}

/// Polls the first piece of `body` before handing it out, so that a tampered header or first
/// chunk fails the `get` itself with an authentication error, not only a later body read.
async fn verify_first_chunk(mut body: ByteStream, location: &str) -> Result<ByteStream, RemoteStorageError> {
    match body.next().await {
        None => Ok(crate::byte_stream_from_bytes(Bytes::new())),
        Some(Err(e)) => Err(RemoteStorageError::from_body_error("get", location, e)),
        Some(Ok(first)) => Ok(Box::pin(futures::stream::once(async move { Ok(first) }).chain(body))),
    }
}

/// Encrypts `body` (exactly `plaintext_len` bytes) into header ‖ chunks, one chunk in memory at
/// a time. A body of another length ends the stream with an error, which fails the backend's
/// put (so the old object stays).
fn encrypt_stream(cipher: ObjectCipher, header_bytes: Vec<u8>, body: ByteStream) -> ByteStream {
    struct State {
        cipher: ObjectCipher,
        body: ByteStream,
        header: Option<Bytes>,
        pending: Bytes,
        read_bytes: u64,
        index: u64,
        done: bool,
    }

    impl State {
        /// Next plaintext bytes from the body (`None` at its end).
        async fn pull(&mut self) -> io::Result<Option<Bytes>> {
            if !self.pending.is_empty() {
                return Ok(Some(std::mem::take(&mut self.pending)));
            }
            loop {
                match self.body.next().await {
                    None => return Ok(None),
                    Some(Err(e)) => return Err(e),
                    Some(Ok(bytes)) if bytes.is_empty() => continue,
                    Some(Ok(bytes)) => return Ok(Some(bytes)),
                }
            }
        }

        async fn next_chunk(&mut self) -> io::Result<Bytes> {
            let header = self.cipher.header();
            let (declared, count) = (header.plaintext_len, header.chunk_count());
            let chunk_len = header.chunk_plaintext_len(self.index);
            let mut chunk = Vec::with_capacity(chunk_len + TAG_LEN);
            while chunk.len() < chunk_len {
                let Some(mut bytes) = self.pull().await? else {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "body ended after {} bytes, but {declared} were declared",
                            self.read_bytes + chunk.len() as u64
                        ),
                    ));
                };
                let take = (chunk_len - chunk.len()).min(bytes.len());
                chunk.extend_from_slice(&bytes.split_to(take));
                self.pending = bytes;
            }
            self.read_bytes += chunk_len as u64;
            if self.index + 1 == count && self.pull().await?.is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("body is longer than the declared {declared} bytes"),
                ));
            }
            self.cipher.seal_chunk(self.index, &mut chunk);
            self.index += 1;
            Ok(Bytes::from(chunk))
        }
    }

    let state = State {
        cipher,
        body,
        header: Some(Bytes::from(header_bytes)),
        pending: Bytes::new(),
        read_bytes: 0,
        index: 0,
        done: false,
    };
    Box::pin(futures::stream::unfold(state, |mut state| async move {
        if let Some(header) = state.header.take() {
            return Some((Ok(header), state));
        }
        if state.done || state.index == state.cipher.header().chunk_count() {
            return None;
        }
        let item = state.next_chunk().await;
        state.done = item.is_err();
        Some((item, state))
    }))
}

/// Decrypts chunks `first..=last` read from `body` (which starts at chunk `first`), dropping
/// `skip` plaintext bytes at the start and returning `take` bytes in all. No byte is returned
/// before its chunk verifies; a body that ends early or runs long is an authentication error.
fn decrypt_stream(
    cipher: Arc<ObjectCipher>,
    body: ByteStream,
    first: u64,
    last: u64,
    skip: usize,
    take: u64,
    location: String,
) -> ByteStream {
    struct State {
        cipher: Arc<ObjectCipher>,
        body: ByteStream,
        buf: BytesMut,
        index: u64,
        last: u64,
        skip: usize,
        remaining: u64,
        location: String,
        done: bool,
    }

    impl State {
        /// The next non-empty piece of plaintext, or `None` after the last chunk.
        async fn next_plaintext(&mut self) -> io::Result<Option<Bytes>> {
            while self.index <= self.last {
                let needed = self.cipher.header().chunk_plaintext_len(self.index) + TAG_LEN;
                while self.buf.len() < needed {
                    match self.body.next().await {
                        Some(Ok(bytes)) => self.buf.extend_from_slice(&bytes),
                        Some(Err(e)) => return Err(e),
                        None => {
                            return Err(auth_io_error(
                                &self.location,
                                format!("it ends inside chunk {} (cut short)", self.index),
                            ))
                        }
                    }
                }
                let mut chunk = self.buf.split_to(needed).to_vec();
                self.cipher
                    .open_chunk(self.index, &mut chunk)
                    .map_err(|FormatError(reason)| auth_io_error(&self.location, reason))?;
                self.index += 1;
                let mut plaintext = Bytes::from(chunk);
                let _ = plaintext.split_to(self.skip.min(plaintext.len()));
                self.skip = 0;
                plaintext.truncate(self.remaining.min(plaintext.len() as u64) as usize);
                self.remaining -= plaintext.len() as u64;
                if !plaintext.is_empty() {
                    return Ok(Some(plaintext));
                }
            }
            // The backend returned exactly the requested range, so anything more is not ours.
            if !self.buf.is_empty() {
                return Err(auth_io_error(&self.location, "it has data after its last chunk (extended)"));
            }
            loop {
                match self.body.next().await {
                    None => return Ok(None),
                    Some(Err(e)) => return Err(e),
                    Some(Ok(bytes)) if bytes.is_empty() => continue,
                    Some(Ok(_)) => {
                        return Err(auth_io_error(&self.location, "it has data after its last chunk (extended)"))
                    }
                }
            }
        }
    }

    let state =
        State { cipher, body, buf: BytesMut::new(), index: first, last, skip, remaining: take, location, done: false };
    Box::pin(futures::stream::unfold(state, |mut state| async move {
        if state.done {
            return None;
        }
        match state.next_plaintext().await {
            Ok(Some(bytes)) => Some((Ok(bytes), state)),
            Ok(None) => None,
            Err(e) => {
                state.done = true;
                Some((Err(e), state))
            }
        }
    }))
}

#[async_trait]
impl RemoteStorage for EncryptedStorage {
    async fn put(
        &self,
        path: &RemotePath,
        body: ByteStream,
        content_length_bytes: u64,
    ) -> Result<(), RemoteStorageError> {
        self.check_not_reserved("put", path)?;
        let backend = &self.inner.backend;
        let key = self.inner.keys.active_key(backend, &key_scope(path)).await?;
        let header = Header::new(content_length_bytes, &key.kek_id, &key.id)
            .map_err(|e| RemoteStorageError::permanent("put", backend.location(path), anyhow::anyhow!("{e}")))?;
        let header_bytes = header.encode();
        let object_len = header.object_len();
        let cipher = ObjectCipher::new(&key.bytes, header, &header_bytes, path.as_str());
        backend.put(path, encrypt_stream(cipher, header_bytes, body), object_len).await
    }

    async fn get(&self, path: &RemotePath, range: Option<(u64, Option<u64>)>) -> Result<Download, RemoteStorageError> {
        self.check_not_reserved("get", path)?;
        if let Some((start, end)) = range {
            return self.get_range(path, start, end).await;
        }
        let backend = &self.inner.backend;
        let location = backend.location(path);
        let download = backend.get(path, None).await?;
        let object_size_bytes = download.object_size_bytes;
        let (header, header_bytes, body) = read_header(download.body, &location).await?;
        check_object_size(&header, object_size_bytes, &location)?;
        let (plaintext_len, last) = (header.plaintext_len, header.chunk_count() - 1);
        let cipher = self.read_cipher(header, &header_bytes, path, &location).await?;
        let body = decrypt_stream(cipher, body, 0, last, 0, plaintext_len, location.clone());
        Ok(Download {
            body: verify_first_chunk(body, &location).await?,
            content_length_bytes: plaintext_len,
            object_size_bytes: plaintext_len,
        })
    }

    async fn list(
        &self,
        prefix: Option<&RemotePath>,
        mode: ListingMode,
        max_keys: Option<usize>,
    ) -> Result<Listing, RemoteStorageError> {
        let backend = &self.inner.backend;
        let may_cover_keys = match prefix {
            Some(prefix) if is_reserved(prefix.as_str()) => return Ok(Listing::default()),
            None => true,
            Some(prefix) => mode == ListingMode::NoDelimiter && KEYS_PREFIX.starts_with(prefix.as_str()),
        };
        if !may_cover_keys {
            return backend.list(prefix, mode, max_keys).await;
        }
        // The key objects must not count against `max_keys`: list everything, drop them, and
        // cut afterwards. Only listings from the root get here, which nothing does often.
        let listing = backend.list(prefix, mode, None).await?;
        let mut list_prefix = prefix.map(|p| p.as_str().to_owned()).unwrap_or_default();
        if mode == ListingMode::WithDelimiter && !list_prefix.is_empty() {
            list_prefix.push('/');
        }
        let keys = listing.keys.into_iter().map(String::from).filter(|k| !is_reserved(k)).collect();
        let prefixes =
            listing.prefixes.into_iter().map(String::from).filter(|p| !is_reserved(p)).map(|p| p + "/").collect();
        Ok(finish_listing(keys, prefixes, &list_prefix, mode, max_keys))
    }

    async fn delete(&self, path: &RemotePath) -> Result<(), RemoteStorageError> {
        self.check_not_reserved("delete", path)?;
        self.inner.backend.delete(path).await
    }

    async fn delete_many(&self, paths: &[RemotePath]) -> Result<(), RemoteStorageError> {
        for path in paths {
            self.check_not_reserved("delete_many", path)?;
        }
        self.inner.backend.delete_many(paths).await
    }

    /// Decrypts and re-encrypts: an object is bound to its path (and to its tenant's key), so
    /// the backend's server-side copy would produce an object that does not verify.
    async fn copy(&self, from: &RemotePath, to: &RemotePath) -> Result<(), RemoteStorageError> {
        self.check_not_reserved("copy", to)?;
        let download = self.get(from, None).await?;
        self.put(to, download.body, download.content_length_bytes).await
    }
}

#[cfg(test)]
mod tests;
