//! [`EncryptedStorage`] over LocalFs: round trips, what the bytes at rest look like, tampering,
//! wrong and rotated keys. (The backend-independent cases also run encrypted, against LocalFs
//! and moto, in `tests/storage`.)

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::*;
use crate::LocalFs;

const MARKER: &[u8] = b"PLAINTEXT-MARKER-8f3a";

fn path(key: &str) -> RemotePath {
    RemotePath::new(key).unwrap()
}

fn kek(id: &str, byte: u8) -> Arc<dyn KeyEncryptionKey> {
    Arc::new(LocalKek::new(id, [byte; 32]).unwrap())
}

fn storage(root: &Path, keks: Vec<Arc<dyn KeyEncryptionKey>>) -> GenericRemoteStorage {
    let backend = GenericRemoteStorage::LocalFs(LocalFs::new(root.to_path_buf()).unwrap());
    GenericRemoteStorage::Encrypted(EncryptedStorage::new(backend, keks).unwrap())
}

/// A body with the marker repeated through it, like a table full of marked rows.
fn marked_body(len: usize) -> Bytes {
    MARKER.iter().copied().cycle().take(len).collect::<Vec<u8>>().into()
}

fn chunked(bytes: Bytes, chunk_bytes: usize) -> ByteStream {
    let chunks: Vec<io::Result<Bytes>> = (0..bytes.len())
        .step_by(chunk_bytes)
        .map(|start| Ok(bytes.slice(start..(start + chunk_bytes).min(bytes.len()))))
        .collect();
    Box::pin(futures::stream::iter(chunks))
}

/// Every file under `root`, with its bytes.
fn files(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, &mut out);
    out.sort();
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn read_all(storage: &GenericRemoteStorage, key: &RemotePath) -> Result<Bytes, RemoteStorageError> {
    storage.get_bytes(key).await
}

#[tokio::test]
async fn round_trip_with_no_plaintext_at_rest() {
    let dir = tempfile::tempdir().unwrap();
    let storage = storage(dir.path(), vec![kek("k1", 1)]);
    let tenant = "3a0c11b1aa9b4bf2a1f5c1d2e3f40516";
    let cases = [
        (format!("tenants/{tenant}/timelines/tl/layer"), 1_000_000),
        (format!("tenants/{tenant}/timelines/tl/index_part.json"), 900),
        (format!("wal/{tenant}/tl/000000010000000000000001"), 200_000),
        ("top-level-object".to_owned(), 65_536),
        ("empty".to_owned(), 0),
    ];
    for (key, len) in &cases {
        let body = marked_body(*len);
        storage.put(&path(key), chunked(body.clone(), 10_000), *len as u64).await.unwrap();
        let download = storage.get(&path(key), None).await.unwrap();
        assert_eq!((download.content_length_bytes, download.object_size_bytes), (*len as u64, *len as u64), "{key}");
        assert!(download.collect().await.unwrap() == body, "{key}: content differs");
    }
    let at_rest = files(dir.path());
    for (file, bytes) in &at_rest {
        assert!(!contains(bytes, MARKER), "{} holds the plaintext marker", file.display());
    }
    // One data key per scope: the tenant (shared by its layers and WAL) and "global".
    let key_objects: Vec<_> = at_rest.iter().filter(|(f, _)| f.starts_with(dir.path().join(KEYS_PREFIX))).collect();
    assert_eq!(key_objects.len(), 2, "{key_objects:?}");
    assert!(key_objects
        .iter()
        .any(|(f, _)| f.starts_with(dir.path().join(KEYS_PREFIX).join(format!("tenant-{tenant}/k1")))));
    assert!(key_objects.iter().any(|(f, _)| f.starts_with(dir.path().join(KEYS_PREFIX).join("global/k1"))));
    // Ciphertext is the plaintext plus a small header and 16 bytes per 64 KiB.
    let layer = std::fs::read(dir.path().join(&cases[0].0)).unwrap();
    let overhead = layer.len() - 1_000_000;
    assert!(overhead < 200 + 16 * 16, "overhead {overhead}");
}

#[tokio::test]
async fn listing_hides_key_objects_and_key_paths_are_reserved() {
    let dir = tempfile::tempdir().unwrap();
    let storage = storage(dir.path(), vec![kek("k1", 1)]);
    for key in ["tenants/t1/a", "tenants/t1/b", "x"] {
        storage.put_bytes(&path(key), Bytes::from_static(b"v")).await.unwrap();
    }
    let all = storage.list(None, ListingMode::NoDelimiter, None).await.unwrap();
    assert_eq!(all.keys, [path("tenants/t1/a"), path("tenants/t1/b"), path("x")]);
    let root = storage.list(None, ListingMode::WithDelimiter, None).await.unwrap();
    assert_eq!((root.keys, root.prefixes), (vec![path("x")], vec![path("tenants")]));
    let capped = storage.list(None, ListingMode::NoDelimiter, Some(2)).await.unwrap();
    assert_eq!(capped.keys, [path("tenants/t1/a"), path("tenants/t1/b")]);
    let under = storage.list(Some(&path("_enc")), ListingMode::NoDelimiter, None).await.unwrap();
    assert!(under.keys.is_empty());
    let inside = storage.list(Some(&path(KEYS_PREFIX)), ListingMode::WithDelimiter, None).await.unwrap();
    assert_eq!(inside, Listing::default());
    let tenant = storage.list(Some(&path("tenants/t1")), ListingMode::WithDelimiter, Some(1)).await.unwrap();
    assert_eq!(tenant.keys, [path("tenants/t1/a")]);

    let reserved = path(&format!("{KEYS_PREFIX}/global/k1/x.json"));
    for err in [
        storage.put_bytes(&reserved, Bytes::new()).await.unwrap_err(),
        storage.delete(&reserved).await.unwrap_err(),
        storage.get(&reserved, None).await.unwrap_err(),
        storage.copy(&path("x"), &reserved).await.unwrap_err(),
    ] {
        assert!(err.to_string().contains("reserved for the encryption keys"), "{err}");
    }
}

#[tokio::test]
async fn ranged_reads_decrypt_only_what_they_cover() {
    let dir = tempfile::tempdir().unwrap();
    let storage = storage(dir.path(), vec![kek("k1", 1)]);
    let key = path("tenants/t/obj");
    let body: Bytes = (0..300_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>().into();
    storage.put_bytes(&key, body.clone()).await.unwrap();
    for (start, end) in [
        (0, Some(1)),
        (0, None),
        (65_535, Some(65_537)),
        (65_536, Some(131_072)),
        (100, Some(250_000)),
        (299_999, None),
        (299_000, Some(400_000)),
        (300_000, None),
        (5, Some(5)),
        (7, Some(3)),
    ] {
        let download = storage.get(&key, Some((start, end))).await.unwrap();
        assert_eq!(download.object_size_bytes, 300_000);
        let got = download.collect().await.unwrap();
        let end_clamped = end.unwrap_or(300_000).min(300_000) as usize;
        let start_clamped = (start as usize).min(end_clamped);
        assert!(got == body.slice(start_clamped..end_clamped), "range {start}..{end:?}");
    }
}

#[tokio::test]
async fn every_flipped_byte_and_every_truncation_is_an_authentication_error() {
    let dir = tempfile::tempdir().unwrap();
    let storage = storage(dir.path(), vec![kek("k1", 1)]);
    let key = path("tenants/t/layer");
    // Two chunks and a bit, so that tampering in a later chunk is tried too.
    let body = marked_body(140_000);
    storage.put_bytes(&key, body.clone()).await.unwrap();
    let file = dir.path().join(key.as_str());
    let good = std::fs::read(&file).unwrap();
    let location = file.display().to_string();
    let (header, header_len) = Header::decode(&good).unwrap().unwrap();
    let last_chunk_offset = header.chunk_offset(2) as usize;

    let check = |what: String, result: Result<Bytes, RemoteStorageError>| match result {
        Ok(_) => panic!("{what}: read succeeded"),
        Err(RemoteStorageError::Authentication(auth)) => {
            assert_eq!(auth.key, location, "{what}");
            let message = RemoteStorageError::Authentication(auth).to_string();
            assert!(message.contains("failed authentication") && message.contains("encryption.kek_file"), "{message}");
        }
        Err(other) => panic!("{what}: expected an authentication error, got {other}"),
    };
    // Every header byte, and a sample of body bytes in each chunk (all 140 KB would be slow).
    let positions: Vec<usize> = (0..200).chain((200..good.len()).step_by(997)).chain([good.len() - 1]).collect();
    for i in positions {
        let mut bad = good.clone();
        bad[i] ^= 0x04;
        std::fs::write(&file, &bad).unwrap();
        check(format!("flip at {i}"), read_all(&storage, &key).await);
        // A ranged read of the last chunk: the header is bound into every chunk's key, so a
        // flip there fails it too; chunks 0 and 1 it does not read.
        if i < header_len || i >= last_chunk_offset {
            let ranged = async {
                let download = storage.get(&key, Some((135_000, None))).await?;
                download.collect().await.map_err(|e| RemoteStorageError::from_body_error("get", &location, e))
            };
            check(format!("flip at {i}, ranged"), ranged.await);
        }
    }
    for len in [0, 3, 10, 60, 100, 65_000, good.len() - 17, good.len() - 1] {
        std::fs::write(&file, &good[..len]).unwrap();
        check(format!("truncated to {len}"), read_all(&storage, &key).await);
    }
    let mut longer = good.clone();
    longer.extend_from_slice(b"extra");
    std::fs::write(&file, &longer).unwrap();
    check("extended".into(), read_all(&storage, &key).await);

    // Not encrypted at all (e.g. written before encryption was turned on).
    std::fs::write(&file, b"plain bytes").unwrap();
    let err = read_all(&storage, &key).await.unwrap_err();
    assert!(err.is_authentication() && err.to_string().contains("unencrypted"), "{err}");

    std::fs::write(&file, &good).unwrap();
    assert_eq!(read_all(&storage, &key).await.unwrap(), body);
}

#[tokio::test]
async fn a_different_kek_is_an_authentication_error_naming_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let writer = storage(dir.path(), vec![kek("k1", 1)]);
    let key = path("tenants/t/index_part.json");
    writer.put_bytes(&key, Bytes::from_static(b"{}")).await.unwrap();

    // Same id, different key bytes.
    let err = read_all(&storage(dir.path(), vec![kek("k1", 2)]), &key).await.unwrap_err();
    assert!(err.is_authentication(), "{err}");
    assert!(err.to_string().contains("could not be unwrapped with key-encryption key \"k1\""), "{err}");
    // A KEK id that is not configured at all.
    let err = read_all(&storage(dir.path(), vec![kek("k2", 1)]), &key).await.unwrap_err();
    assert!(err.is_authentication(), "{err}");
    assert!(
        err.to_string()
            .contains("\"k1\", which is not configured here (configured: k2); add it to encryption.old_keks"),
        "{err}"
    );
    // The key object was deleted.
    std::fs::remove_dir_all(dir.path().join(KEYS_PREFIX)).unwrap();
    let err = read_all(&storage(dir.path(), vec![kek("k1", 1)]), &key).await.unwrap_err();
    assert!(err.is_authentication() && err.to_string().contains("does not exist"), "{err}");
}

#[tokio::test]
async fn a_tampered_key_object_fails_reads_and_writers_make_a_new_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = path("tenants/t/obj");
    storage(dir.path(), vec![kek("k1", 1)]).put_bytes(&key, Bytes::from_static(b"v1")).await.unwrap();
    let key_files: Vec<_> = files(&dir.path().join(KEYS_PREFIX));
    assert_eq!(key_files.len(), 1);
    let (key_file, json) = &key_files[0];
    let mut record: serde_json::Value = serde_json::from_slice(json).unwrap();
    let wrapped = record["wrapped_key"].as_str().unwrap().to_owned();
    let flipped = format!("{}{}", if wrapped.starts_with('0') { "1" } else { "0" }, &wrapped[1..]);
    record["wrapped_key"] = flipped.into();
    std::fs::write(key_file, serde_json::to_vec(&record).unwrap()).unwrap();

    let fresh = storage(dir.path(), vec![kek("k1", 1)]);
    let err = read_all(&fresh, &key).await.unwrap_err();
    assert!(err.is_authentication(), "{err}");
    // New writes do not depend on the damaged key.
    let other = path("tenants/t/other");
    fresh.put_bytes(&other, Bytes::from_static(b"v2")).await.unwrap();
    assert_eq!(read_all(&fresh, &other).await.unwrap(), "v2");
    assert_eq!(files(&dir.path().join(KEYS_PREFIX)).len(), 2);
}

#[tokio::test]
async fn rotation_keeps_old_objects_readable() {
    let dir = tempfile::tempdir().unwrap();
    let old = path("tenants/t/old");
    let new = path("tenants/t/new");
    let v1 = storage(dir.path(), vec![kek("k1", 1)]);
    v1.put_bytes(&old, Bytes::from_static(b"written under k1")).await.unwrap();
    // A restart with the same KEK reuses the tenant's data key.
    storage(dir.path(), vec![kek("k1", 1)])
        .put_bytes(&path("tenants/t/again"), Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert_eq!(files(&dir.path().join(KEYS_PREFIX)).len(), 1);

    // Rotate: k2 active, k1 kept for reading.
    let v2 = storage(dir.path(), vec![kek("k2", 2), kek("k1", 1)]);
    v2.put_bytes(&new, Bytes::from_static(b"written under k2")).await.unwrap();
    assert_eq!(read_all(&v2, &old).await.unwrap(), "written under k1");
    assert_eq!(read_all(&v2, &new).await.unwrap(), "written under k2");
    let scope_dir = dir.path().join(KEYS_PREFIX).join("tenant-t");
    assert!(scope_dir.join("k1").is_dir() && scope_dir.join("k2").is_dir());
    // The new object names k2 in its header.
    let header = Header::decode(&std::fs::read(dir.path().join(new.as_str())).unwrap()).unwrap().unwrap().0;
    assert_eq!(header.kek_id, "k2");

    // Once k1 is dropped from the config, only its objects become unreadable.
    let v3 = storage(dir.path(), vec![kek("k2", 2)]);
    assert_eq!(read_all(&v3, &new).await.unwrap(), "written under k2");
    assert!(read_all(&v3, &old).await.unwrap_err().is_authentication());
    // Copying an object re-encrypts it under the active KEK, which is how old objects move on.
    v2.copy(&old, &path("tenants/t/old-reencrypted")).await.unwrap();
    assert_eq!(read_all(&v3, &path("tenants/t/old-reencrypted")).await.unwrap(), "written under k1");
}

/// A data key wrapped again by the new KEK (what a rewrap tool would do) keeps objects whose
/// header names the old KEK readable once the old KEK is gone, without rewriting them.
#[tokio::test]
async fn a_rewrapped_data_key_lets_the_old_kek_go() {
    let dir = tempfile::tempdir().unwrap();
    let old = path("tenants/t/old");
    storage(dir.path(), vec![kek("k1", 1)]).put_bytes(&old, Bytes::from_static(b"under k1")).await.unwrap();
    let (key_file, json) = files(&dir.path().join(KEYS_PREFIX)).remove(0);
    let record: keys::WrappedDataKey = serde_json::from_slice(&json).unwrap();
    let k1 = LocalKek::new("k1", [1; 32]).unwrap();
    let k2 = LocalKek::new("k2", [2; 32]).unwrap();
    let data_key = k1
        .unwrap(&hex::decode(&record.wrapped_key).unwrap(), &keys::wrap_context(&record.data_key_id, "k1"))
        .await
        .unwrap();
    let rewrapped = keys::WrappedDataKey {
        kek_id: "k2".into(),
        wrapped_key: hex::encode(k2.wrap(&data_key, &keys::wrap_context(&record.data_key_id, "k2")).await.unwrap()),
        ..record
    };
    let k2_dir = key_file.parent().unwrap().parent().unwrap().join("k2");
    std::fs::create_dir_all(&k2_dir).unwrap();
    std::fs::write(k2_dir.join(key_file.file_name().unwrap()), serde_json::to_vec(&rewrapped).unwrap()).unwrap();
    std::fs::remove_file(&key_file).unwrap();

    let only_k2 = storage(dir.path(), vec![kek("k2", 2)]);
    assert_eq!(read_all(&only_k2, &old).await.unwrap(), "under k1");
}

#[tokio::test]
async fn objects_are_bound_to_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let storage = storage(dir.path(), vec![kek("k1", 1)]);
    storage.put_bytes(&path("tenants/t/a"), Bytes::from_static(b"aaa")).await.unwrap();
    storage.put_bytes(&path("tenants/t/b"), Bytes::from_static(b"bbb")).await.unwrap();
    // Swapping two objects of the same tenant (same data key) behind the storage's back.
    std::fs::copy(dir.path().join("tenants/t/a"), dir.path().join("tenants/t/b")).unwrap();
    assert!(read_all(&storage, &path("tenants/t/b")).await.unwrap_err().is_authentication());
}

#[tokio::test]
async fn put_with_wrong_length_fails_and_keeps_the_old_object() {
    let dir = tempfile::tempdir().unwrap();
    let storage = storage(dir.path(), vec![kek("k1", 1)]);
    let key = path("tenants/t/obj");
    storage.put_bytes(&key, Bytes::from_static(b"old")).await.unwrap();
    for (body_len, declared) in [(10usize, 11u64), (10, 9), (200_000, 200_001), (200_000, 70_000)] {
        let err = storage.put(&key, chunked(marked_body(body_len), 4096), declared).await.unwrap_err();
        assert!(err.to_string().contains("declared"), "{err}");
    }
    assert_eq!(read_all(&storage, &key).await.unwrap(), "old");
}

#[test]
fn scopes_follow_tenant_prefixes() {
    for (key, scope) in [
        ("tenants/3a0c/timelines/x/layer", "tenant-3a0c"),
        ("wal/3a0c/tl/000000010000000000000001", "tenant-3a0c"),
        ("tenants/3a0c", "global"),
        ("tenants/a.b/x", "global"),
        ("other/3a0c/x", "global"),
        ("x", "global"),
    ] {
        assert_eq!(key_scope(&path(key)), scope, "{key}");
    }
}

/// Prints the encrypt and decrypt throughput of the chunk cipher (no I/O).
#[test]
fn chunk_cipher_throughput() {
    let len = 32 << 20;
    let header = Header::new(len as u64, "k1", "global/0123456789abcdef0123456789abcdef").unwrap();
    let plaintext = vec![0x5au8; len];
    let started = Instant::now();
    let object = format::seal_object(&[1; 32], header, "x", &plaintext);
    let seal_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let opened = format::open_object(|_| Some([1; 32]), "x", &object).unwrap();
    let open_s = started.elapsed().as_secs_f64();
    assert!(opened == plaintext);
    println!(
        "AES-256-GCM in 64 KiB chunks: encrypt {:.0} MB/s, decrypt {:.0} MB/s ({} MiB; debug builds are slower)",
        len as f64 / seal_s / 1e6,
        len as f64 / open_s / 1e6,
        len >> 20
    );
}
