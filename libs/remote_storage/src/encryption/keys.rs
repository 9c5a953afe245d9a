//! Data keys and the key-encryption keys (KEKs) that wrap them.
//!
//! Every object is encrypted under a data key of its *scope* (one per tenant, one for objects
//! outside any tenant). A data key is 32 random bytes, stored only wrapped by a KEK, as a small
//! JSON object of its own at `_encryption_keys/<scope>/<kek id>/<random>.json`, and cached in
//! memory once unwrapped. Writers use a data key of the active KEK (the first one found under
//! `<scope>/<active kek id>/`, or a new one); readers use whichever data key an object's header
//! names, so after a KEK rotation old objects stay readable while their KEK is configured.
//!
//! [`KeyEncryptionKey`] is the seam for a KMS: the local implementation wraps with AES-256-GCM,
//! a KMS one would call the KMS's Encrypt/Decrypt; the key object stores the wrapped bytes
//! opaquely, with the algorithm name, so both can live side by side.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use async_trait::async_trait;
use bytes::Bytes;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;
use zeroize::Zeroizing;

use super::format::{is_valid_data_key_id, is_valid_scope};
use crate::config::{is_valid_kek_id, parse_kek_hex, KekConfig, KekSource};
use crate::{AuthenticationError, GenericRemoteStorage, ListingMode, RemotePath, RemoteStorage, RemoteStorageError};

/// Top-level prefix of the key objects; [`super::EncryptedStorage`] hides it from listings and
/// refuses user operations under it.
pub const KEYS_PREFIX: &str = "_encryption_keys";

/// A 256-bit key that is wiped from memory when dropped.
pub type KeyBytes = Zeroizing<[u8; 32]>;

/// Wraps and unwraps data keys. `context` is bound into the wrapping (associated data), so a
/// wrapped key only unwraps for the data key id and KEK id it was made for.
#[async_trait]
pub trait KeyEncryptionKey: Send + Sync + 'static {
    /// The id recorded with every data key this KEK wraps.
    fn id(&self) -> &str;
    /// Stored with the wrapped key (e.g. "local-aes-256-gcm", later "aws-kms").
    fn algorithm(&self) -> &str;
    async fn wrap(&self, data_key: &[u8; 32], context: &[u8]) -> anyhow::Result<Vec<u8>>;
    /// Fails if `wrapped` was not made by this key with this `context`, or was modified.
    async fn unwrap(&self, wrapped: &[u8], context: &[u8]) -> anyhow::Result<KeyBytes>;
}

/// A KEK held in memory: AES-256-GCM with a random 96-bit nonce per wrap (a KEK wraps a few
/// keys per tenant, far below the 2^32 random-nonce limit). Wrapped form: nonce ‖ ciphertext ‖ tag.
pub struct LocalKek {
    id: String,
    key: KeyBytes,
}

const LOCAL_KEK_ALGORITHM: &str = "local-aes-256-gcm";
const WRAP_NONCE_LEN: usize = 12;

impl LocalKek {
    pub fn new(id: &str, key: [u8; 32]) -> anyhow::Result<LocalKek> {
        anyhow::ensure!(is_valid_kek_id(id), "KEK id {id:?} must be 1 to 64 ASCII letters, digits, '_', '-' or '.'");
        Ok(LocalKek { id: id.to_owned(), key: Zeroizing::new(key) })
    }

    /// Loads the key `config` describes (reading `kek_file` if it is a file).
    pub fn from_config(config: &KekConfig) -> anyhow::Result<LocalKek> {
        let key = match &config.source {
            KekSource::Hex(hex_digits) => parse_kek_hex(hex_digits)
                .map_err(|e| anyhow::anyhow!("encryption KEK {:?}: kek_hex {e}", config.kek_id))?,
            KekSource::File(path) => read_kek_file(path)
                .map_err(|e| anyhow::anyhow!("encryption KEK {:?}: kek_file {}: {e}", config.kek_id, path.display()))?,
        };
        LocalKek::new(&config.kek_id, key)
    }
}

/// A KEK file holds 32 raw bytes or 64 hex digits (whitespace around them ignored).
fn read_kek_file(path: &Path) -> Result<[u8; 32], String> {
    let contents = Zeroizing::new(std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?);
    #[cfg(unix)]
    if let Ok(metadata) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        if metadata.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                "encryption key file {} can be read by other users (mode {:o}); chmod 600 it",
                path.display(),
                metadata.permissions().mode() & 0o777
            );
        }
    }
    if contents.len() == 32 {
        let mut key = [0u8; 32];
        key.copy_from_slice(&contents);
        return Ok(key);
    }
    let text = std::str::from_utf8(&contents)
        .map_err(|_| format!("it is {} bytes; expected 32 raw bytes or 64 hex digits", contents.len()))?;
    parse_kek_hex(text)
}

#[async_trait]
impl KeyEncryptionKey for LocalKek {
    fn id(&self) -> &str {
        &self.id
    }

    fn algorithm(&self) -> &str {
        LOCAL_KEK_ALGORITHM
    }

    async fn wrap(&self, data_key: &[u8; 32], context: &[u8]) -> anyhow::Result<Vec<u8>> {
        let aead = Aes256Gcm::new_from_slice(self.key.as_ref()).expect("the key is 32 bytes");
        let mut nonce = [0u8; WRAP_NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let sealed = aead
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: data_key, aad: context })
            .map_err(|_| anyhow::anyhow!("AES-GCM refused to wrap a 32-byte key"))?;
        Ok([&nonce[..], &sealed].concat())
    }

    async fn unwrap(&self, wrapped: &[u8], context: &[u8]) -> anyhow::Result<KeyBytes> {
        anyhow::ensure!(
            wrapped.len() == WRAP_NONCE_LEN + 32 + 16,
            "the wrapped key is {} bytes, expected {}",
            wrapped.len(),
            WRAP_NONCE_LEN + 32 + 16
        );
        let aead = Aes256Gcm::new_from_slice(self.key.as_ref()).expect("the key is 32 bytes");
        let (nonce, sealed) = wrapped.split_at(WRAP_NONCE_LEN);
        let plain = Zeroizing::new(
            aead.decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad: context })
                .map_err(|_| anyhow::anyhow!("AES-GCM tag mismatch"))?,
        );
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&plain);
        Ok(key)
    }
}

/// The key object stored for each data key.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WrappedDataKey {
    pub format_version: u32,
    pub data_key_id: String,
    pub kek_id: String,
    pub algorithm: String,
    /// The KEK's output, hex.
    pub wrapped_key: String,
}

const WRAPPED_KEY_FORMAT_VERSION: u32 = 1;

/// What the KEK binds a wrapped data key to.
pub(crate) fn wrap_context(data_key_id: &str, kek_id: &str) -> Vec<u8> {
    [b"neon remote storage data key v1\0".as_slice(), data_key_id.as_bytes(), b"\0", kek_id.as_bytes()].concat()
}

/// An unwrapped data key.
pub struct DataKey {
    /// `<scope>/<32 hex digits>`.
    pub id: String,
    pub kek_id: String,
    pub bytes: KeyBytes,
}

/// Where the key object of `data_key_id` (wrapped by `kek_id`) lives.
fn key_object_path(data_key_id: &str, kek_id: &str) -> Result<RemotePath, RemoteStorageError> {
    let (scope, random) = data_key_id.split_once('/').unwrap_or((data_key_id, ""));
    RemotePath::new(&format!("{KEYS_PREFIX}/{scope}/{kek_id}/{random}.json"))
        .map_err(|e| RemoteStorageError::permanent("key lookup", data_key_id, e))
}

/// The configured KEKs and the data keys in use.
pub struct KeyRing {
    keks: HashMap<String, Arc<dyn KeyEncryptionKey>>,
    /// KEK ids as configured, the active one first.
    kek_order: Vec<String>,
    active_kek: String,
    /// Unwrapped data keys by id, for reading.
    by_id: Mutex<HashMap<String, Arc<DataKey>>>,
    /// The data key new objects of a scope use; a cell per scope so that concurrent first writes
    /// of a tenant create one key, not one each.
    active_by_scope: Mutex<HashMap<String, Arc<OnceCell<Arc<DataKey>>>>>,
}

impl KeyRing {
    /// `keks[0]` is the active KEK; the others only unwrap.
    pub fn new(keks: Vec<Arc<dyn KeyEncryptionKey>>) -> anyhow::Result<KeyRing> {
        let active_kek = keks.first().map(|k| k.id().to_owned()).ok_or_else(|| anyhow::anyhow!("no KEK configured"))?;
        let kek_order: Vec<String> = keks.iter().map(|k| k.id().to_owned()).collect();
        let mut by_id = HashMap::new();
        for kek in keks {
            let id = kek.id().to_owned();
            anyhow::ensure!(is_valid_kek_id(&id), "KEK id {id:?} is not valid");
            anyhow::ensure!(by_id.insert(id.clone(), kek).is_none(), "KEK id {id:?} is configured twice");
        }
        Ok(KeyRing {
            keks: by_id,
            kek_order,
            active_kek,
            by_id: Mutex::new(HashMap::new()),
            active_by_scope: Mutex::new(HashMap::new()),
        })
    }

    pub fn active_kek_id(&self) -> &str {
        &self.active_kek
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<DataKey>>> {
        self.by_id.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The data key for new objects of `scope`.
    pub async fn active_key(
        &self,
        storage: &GenericRemoteStorage,
        scope: &str,
    ) -> Result<Arc<DataKey>, RemoteStorageError> {
        assert!(is_valid_scope(scope), "scope {scope:?} comes from key_scope, which only makes valid ones");
        let cell = {
            let mut scopes = self.active_by_scope.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            Arc::clone(scopes.entry(scope.to_owned()).or_default())
        };
        // A failed attempt leaves the cell empty, so the next write tries again.
        let key = cell.get_or_try_init(|| self.find_or_create_active(storage, scope)).await?;
        Ok(Arc::clone(key))
    }

    /// Reuses a data key of `scope` wrapped by the active KEK if one exists, so restarts do not
    /// pile up key objects; otherwise makes one.
    async fn find_or_create_active(
        &self,
        storage: &GenericRemoteStorage,
        scope: &str,
    ) -> Result<Arc<DataKey>, RemoteStorageError> {
        let dir = RemotePath::new(&format!("{KEYS_PREFIX}/{scope}/{}", self.active_kek))
            .map_err(|e| RemoteStorageError::permanent("key lookup", scope, e))?;
        let listing = storage.list(Some(&dir), ListingMode::WithDelimiter, None).await?;
        for key_path in &listing.keys {
            let Some(random) = key_path.object_name().strip_suffix(".json") else { continue };
            let data_key_id = format!("{scope}/{random}");
            if !is_valid_data_key_id(&data_key_id) {
                continue;
            }
            match self.key_for_read(storage, &self.active_kek, &data_key_id, key_path.as_str()).await {
                Ok(key) => return Ok(key),
                // A damaged key object must not stop writes: objects get a fresh key instead.
                Err(e) if e.is_authentication() => tracing::warn!("not reusing data key {data_key_id}: {e}"),
                Err(e) => return Err(e),
            }
        }
        self.create(storage, scope).await
    }

    async fn create(&self, storage: &GenericRemoteStorage, scope: &str) -> Result<Arc<DataKey>, RemoteStorageError> {
        let kek = &self.keks[&self.active_kek];
        let mut random = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut random);
        let data_key_id = format!("{scope}/{}", hex::encode(random));
        let mut bytes = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(bytes.as_mut());
        let path = key_object_path(&data_key_id, kek.id())?;
        let wrapped = kek
            .wrap(&bytes, &wrap_context(&data_key_id, kek.id()))
            .await
            .map_err(|e| RemoteStorageError::permanent("wrapping a new data key", path.as_str(), e))?;
        let record = WrappedDataKey {
            format_version: WRAPPED_KEY_FORMAT_VERSION,
            data_key_id: data_key_id.clone(),
            kek_id: kek.id().to_owned(),
            algorithm: kek.algorithm().to_owned(),
            wrapped_key: hex::encode(wrapped),
        };
        let json = serde_json::to_vec_pretty(&record).expect("a struct of strings serializes");
        storage.put_bytes(&path, Bytes::from(json)).await?;
        tracing::info!("created data key {data_key_id} wrapped by KEK {:?} at {path}", kek.id());
        let key = Arc::new(DataKey { id: data_key_id.clone(), kek_id: kek.id().to_owned(), bytes });
        self.cache().insert(data_key_id, Arc::clone(&key));
        Ok(key)
    }

    /// The data key an object's header names; `object` (its location) is what errors name.
    /// A missing KEK, a missing or damaged key object, or a key that does not unwrap are
    /// authentication errors; failures to reach the storage are not.
    ///
    /// The header's KEK is tried first, then every other configured KEK: a data key may also be
    /// wrapped by a newer KEK under the same id (`<scope>/<new kek>/<random>.json`), so a later
    /// rewrap of the data keys can retire an old KEK without rewriting any object.
    pub async fn key_for_read(
        &self,
        storage: &GenericRemoteStorage,
        header_kek_id: &str,
        data_key_id: &str,
        object: &str,
    ) -> Result<Arc<DataKey>, RemoteStorageError> {
        // Every wrapping of a data key holds the same bytes, so the cache is by data key id.
        if let Some(key) = self.cache().get(data_key_id) {
            return Ok(Arc::clone(key));
        }
        let mut candidates: Vec<&Arc<dyn KeyEncryptionKey>> = self.keks.get(header_kek_id).into_iter().collect();
        candidates.extend(self.kek_order.iter().filter(|id| *id != header_kek_id).map(|id| &self.keks[id]));
        let mut first_failure = None;
        for kek in candidates {
            match self.unwrap_with(storage, kek.as_ref(), data_key_id).await {
                Ok(Some(bytes)) => {
                    let key = Arc::new(DataKey { id: data_key_id.to_owned(), kek_id: kek.id().to_owned(), bytes });
                    self.cache().insert(data_key_id.to_owned(), Arc::clone(&key));
                    return Ok(key);
                }
                Ok(None) => {}
                Err(UnwrapFailure::Storage(e)) => return Err(e),
                Err(UnwrapFailure::Invalid(reason)) => {
                    first_failure.get_or_insert(reason);
                }
            }
        }
        let reason = match first_failure {
            Some(reason) => reason,
            None if !self.keks.contains_key(header_kek_id) => format!(
                "it was encrypted under key-encryption key {header_kek_id:?}, which is not configured here \
                 (configured: {}); add it to encryption.old_keks",
                self.kek_order.join(", ")
            ),
            None => format!(
                "its data key {data_key_id} does not exist (no key object {})",
                key_object_path(data_key_id, header_kek_id)?
            ),
        };
        Err(RemoteStorageError::Authentication(AuthenticationError { key: object.to_owned(), reason }))
    }

    /// Unwraps `data_key_id` with `kek` from its key object; `None` if `kek` wraps no such key.
    async fn unwrap_with(
        &self,
        storage: &GenericRemoteStorage,
        kek: &dyn KeyEncryptionKey,
        data_key_id: &str,
    ) -> Result<Option<KeyBytes>, UnwrapFailure> {
        let kek_id = kek.id();
        let path = key_object_path(data_key_id, kek_id).map_err(UnwrapFailure::Storage)?;
        let json = match storage.get_bytes(&path).await {
            Ok(json) => json,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(UnwrapFailure::Storage(e)),
        };
        let invalid = |reason: String| UnwrapFailure::Invalid(reason);
        let record: WrappedDataKey = serde_json::from_slice(&json)
            .map_err(|e| invalid(format!("its data key object {path} is not valid: {e}")))?;
        if record.format_version != WRAPPED_KEY_FORMAT_VERSION
            || record.data_key_id != data_key_id
            || record.kek_id != kek_id
            || record.algorithm != kek.algorithm()
        {
            return Err(invalid(format!(
                "its data key object {path} describes key {:?} (format {}, KEK {:?}, {}), not {data_key_id:?} \
                 wrapped by KEK {kek_id:?} with {}",
                record.data_key_id,
                record.format_version,
                record.kek_id,
                record.algorithm,
                kek.algorithm()
            )));
        }
        let wrapped = hex::decode(&record.wrapped_key)
            .map_err(|e| invalid(format!("its data key object {path} holds a malformed wrapped key: {e}")))?;
        let bytes = kek.unwrap(&wrapped, &wrap_context(data_key_id, kek_id)).await.map_err(|e| {
            invalid(format!(
                "its data key {data_key_id} could not be unwrapped with key-encryption key {kek_id:?} ({e:#}): the \
                 key configured under that id is not the one that wrapped it, or {path} was modified"
            ))
        })?;
        Ok(Some(bytes))
    }
}

/// Why one KEK could not provide a data key.
enum UnwrapFailure {
    /// The storage could not be read (not the key's fault; not an authentication error).
    Storage(RemoteStorageError),
    /// The key object is there but damaged, or does not unwrap.
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_kek_wrap_unwrap() {
        let kek = LocalKek::new("k1", [1; 32]).unwrap();
        let wrapped = kek.wrap(&[9; 32], b"ctx").await.unwrap();
        assert_eq!(*kek.unwrap(&wrapped, b"ctx").await.unwrap(), [9; 32]);
        assert!(kek.unwrap(&wrapped, b"other").await.is_err());
        let other = LocalKek::new("k1", [2; 32]).unwrap();
        assert!(other.unwrap(&wrapped, b"ctx").await.is_err());
        for i in 0..wrapped.len() {
            let mut bad = wrapped.clone();
            bad[i] ^= 1;
            assert!(kek.unwrap(&bad, b"ctx").await.is_err(), "flip of byte {i}");
        }
        assert!(kek.unwrap(&wrapped[..10], b"ctx").await.is_err());
        assert!(LocalKek::new("a/b", [0; 32]).is_err());
    }

    #[test]
    fn kek_files() {
        let dir = tempfile::tempdir().unwrap();
        let hex_file = dir.path().join("hex.key");
        std::fs::write(&hex_file, format!("{}\n", "ab".repeat(32))).unwrap();
        let raw_file = dir.path().join("raw.key");
        std::fs::write(&raw_file, [0xab; 32]).unwrap();
        for file in [&hex_file, &raw_file] {
            let config = KekConfig { kek_id: "k".into(), source: KekSource::File(file.clone()) };
            assert_eq!(*LocalKek::from_config(&config).unwrap().key, [0xab; 32]);
        }
        let bad_file = dir.path().join("bad.key");
        std::fs::write(&bad_file, "too short").unwrap();
        for (file, expected) in [(bad_file, "64 hex digits"), (dir.path().join("missing"), "cannot read it")] {
            let config = KekConfig { kek_id: "k".into(), source: KekSource::File(file.clone()) };
            let err = LocalKek::from_config(&config).err().unwrap().to_string();
            assert!(err.contains(expected) && err.contains(&file.display().to_string()), "{err}");
        }
    }
}
