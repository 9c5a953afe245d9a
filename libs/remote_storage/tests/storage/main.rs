//! The same cases against every backend: LocalFs in a temp dir, and S3 against moto's server.
//!
//! Each case is an `async fn(&Fixture)`; `storage_cases!` turns it into `local::<case>` and
//! `s3::<case>` tests, and `local_encrypted::<case>`, `s3_encrypted::<case>` for the same
//! backends behind `EncryptedStorage` (which must behave exactly alike). S3 tests get their own
//! bucket (named after the case) on a moto server shared by the whole binary, and store keys
//! under a `prefix_in_bucket` to exercise it.

mod moto;

use std::collections::BTreeSet;
use std::sync::Arc;

use aws_sdk_s3::config::{BehaviorVersion, Region};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use remote_storage::{
    ByteStream, EncryptedStorage, GenericRemoteStorage, KeyEncryptionKey, ListingMode, LocalFs, LocalFsConfig,
    LocalKek, RemotePath, RemoteStorage, RemoteStorageConfig, RemoteStorageError, S3Bucket, S3Config, S3Credentials,
};

const PREFIX_IN_BUCKET: &str = "test/prefix";
const REGION: &str = "us-east-1";

/// A storage plus whatever keeps its backing alive, and a way to peek behind the API.
struct Fixture {
    storage: GenericRemoteStorage,
    /// How the storage spells a key's location in error messages.
    location_prefix: String,
    _temp_dir: Option<tempfile::TempDir>,
    raw_s3: Option<(aws_sdk_s3::Client, String)>,
}

impl Fixture {
    async fn local() -> Fixture {
        let temp_dir = tempfile::tempdir().unwrap();
        let root = temp_dir.path().join("remote_storage");
        let storage = GenericRemoteStorage::from_config(&RemoteStorageConfig::LocalFs(LocalFsConfig {
            local_path: root.clone(),
        }))
        .await
        .unwrap();
        Fixture { storage, location_prefix: format!("{}/", root.display()), _temp_dir: Some(temp_dir), raw_s3: None }
    }

    /// The same fixture with every object encrypted.
    fn encrypted(mut self) -> Fixture {
        let kek: Arc<dyn KeyEncryptionKey> = Arc::new(LocalKek::new("test-kek", [0x42; 32]).unwrap());
        self.storage = GenericRemoteStorage::Encrypted(EncryptedStorage::new(self.storage, vec![kek]).unwrap());
        self
    }

    async fn s3(case: &str) -> Fixture {
        let moto = moto::MotoServer::shared();
        let bucket = format!("test-{}", case.replace('_', "-"));
        let client = raw_client(&moto.endpoint);
        client
            .create_bucket()
            .bucket(&bucket)
            .send()
            .await
            .unwrap_or_else(|e| panic!("creating bucket {bucket} in moto: {e:?}"));
        let mut config = S3Config::new(&bucket, REGION);
        config.endpoint = Some(moto.endpoint.clone());
        config.prefix_in_bucket = Some(PREFIX_IN_BUCKET.to_owned());
        // The smallest part size S3 allows, so the ~5 MiB case goes through multipart upload.
        config.upload_part_size_bytes = 5 * 1024 * 1024;
        let storage = S3Bucket::with_credentials(&config, credentials()).await.unwrap();
        Fixture {
            storage: GenericRemoteStorage::S3(storage),
            location_prefix: format!("s3://{bucket}/{PREFIX_IN_BUCKET}/"),
            _temp_dir: None,
            raw_s3: Some((client, bucket)),
        }
    }
}

/// Dummy credentials, passed explicitly: tests run in parallel threads, so no env mutation.
fn credentials() -> S3Credentials {
    S3Credentials::new("test", "test", None, None, "remote_storage_tests")
}

fn raw_client(endpoint: &str) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .credentials_provider(credentials())
        .endpoint_url(endpoint)
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

fn path(key: &str) -> RemotePath {
    RemotePath::new(key).unwrap()
}

/// Deterministic, non-repeating-ish content so a misplaced range shows up.
fn content(len: usize) -> Bytes {
    (0..len).map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8).collect::<Vec<_>>().into()
}

/// `bytes` as a stream of uneven chunks, like a file read.
fn chunked(bytes: Bytes, chunk_bytes: usize) -> ByteStream {
    let chunks: Vec<std::io::Result<Bytes>> = (0..bytes.len())
        .step_by(chunk_bytes.max(1))
        .map(|start| Ok(bytes.slice(start..(start + chunk_bytes).min(bytes.len()))))
        .collect();
    Box::pin(futures::stream::iter(chunks))
}

async fn get_range(
    storage: &GenericRemoteStorage,
    key: &RemotePath,
    range: Option<(u64, Option<u64>)>,
) -> (Bytes, u64, u64) {
    let download = storage.get(key, range).await.unwrap();
    let (length, size) = (download.content_length_bytes, download.object_size_bytes);
    let bytes = download.collect().await.unwrap();
    assert_eq!(bytes.len() as u64, length, "content_length_bytes of {key} {range:?}");
    (bytes, length, size)
}

macro_rules! storage_cases {
    ($($case:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test]
                async fn $case() {
                    let fixture = super::Fixture::local().await;
                    super::$case(&fixture).await;
                }
            )*
        }
        mod s3 {
            $(
                #[tokio::test]
                async fn $case() {
                    let fixture = super::Fixture::s3(stringify!($case)).await;
                    super::$case(&fixture).await;
                }
            )*
        }
        mod local_encrypted {
            $(
                #[tokio::test]
                async fn $case() {
                    let fixture = super::Fixture::local().await.encrypted();
                    super::$case(&fixture).await;
                }
            )*
        }
        mod s3_encrypted {
            $(
                #[tokio::test]
                async fn $case() {
                    let fixture = super::Fixture::s3(concat!("enc-", stringify!($case))).await.encrypted();
                    super::$case(&fixture).await;
                }
            )*
        }
    };
}

storage_cases!(
    put_get_round_trip,
    put_with_wrong_length_keeps_old_object,
    ranged_get,
    list_paginates_and_delete_many_batches,
    list_with_delimiter,
    delete,
    delete_many,
    copy,
    missing_key_is_not_found,
);

async fn put_get_round_trip(fx: &Fixture) {
    let storage = &fx.storage;
    for (key, len) in [
        ("tenants/t1/small", 1000),
        ("tenants/t1/empty", 0),
        // Above the 5 MiB part size: a multipart upload on S3.
        ("tenants/t1/timelines/tl/layer", 5 * 1024 * 1024 + 123),
    ] {
        let key = path(key);
        let body = content(len);
        storage.put(&key, chunked(body.clone(), 100_000), len as u64).await.unwrap();
        let (got, length, size) = get_range(storage, &key, None).await;
        assert_eq!((length, size), (len as u64, len as u64));
        assert!(got == body, "{key}: content differs");
    }

    // Overwriting replaces the whole object.
    let key = path("tenants/t1/small");
    storage.put_bytes(&key, Bytes::from_static(b"new")).await.unwrap();
    assert_eq!(storage.get_bytes(&key).await.unwrap(), "new");
}

async fn put_with_wrong_length_keeps_old_object(fx: &Fixture) {
    let storage = &fx.storage;
    let key = path("obj");
    storage.put_bytes(&key, Bytes::from_static(b"old")).await.unwrap();
    for (body_len, declared_len) in [(10, 11), (10, 9), (6 * 1024 * 1024, 6 * 1024 * 1024 + 1)] {
        let err = storage.put(&key, chunked(content(body_len), 4096), declared_len).await.unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, RemoteStorageError::Permanent { .. }), "{message}");
        assert!(message.contains(&format!("{}obj", fx.location_prefix)), "{message}");
        assert!(message.contains("declared"), "{message}");
    }
    assert_eq!(storage.get_bytes(&key).await.unwrap(), "old");
}

async fn ranged_get(fx: &Fixture) {
    let storage = &fx.storage;
    let key = path("ranged");
    let body = content(100);
    storage.put_bytes(&key, body.clone()).await.unwrap();

    let (got, _, size) = get_range(storage, &key, Some((10, None))).await;
    assert_eq!((got, size), (body.slice(10..), 100));
    let (got, _, size) = get_range(storage, &key, Some((10, Some(20)))).await;
    assert_eq!((got, size), (body.slice(10..20), 100));
    let (got, _, _) = get_range(storage, &key, Some((0, Some(1)))).await;
    assert_eq!(got, body.slice(0..1));
    // The end is clamped to the object.
    let (got, _, size) = get_range(storage, &key, Some((90, Some(1000)))).await;
    assert_eq!((got, size), (body.slice(90..), 100));
    // Ranges at or past the end, and empty ranges, read nothing.
    for range in [(100, None), (200, Some(300)), (5, Some(5)), (7, Some(3))] {
        let (got, length, size) = get_range(storage, &key, Some((range.0, range.1))).await;
        assert_eq!((got.len(), length, size), (0, 0, 100), "range {range:?}");
    }

    let empty = path("ranged-empty");
    storage.put_bytes(&empty, Bytes::new()).await.unwrap();
    let (got, _, size) = get_range(storage, &empty, Some((0, None))).await;
    assert_eq!((got.len(), size), (0, 0));

    let err = storage.get(&path("ranged-missing"), Some((0, Some(10)))).await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    let err = storage.get(&path("ranged-missing"), Some((5, Some(5)))).await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
}

async fn list_paginates_and_delete_many_batches(fx: &Fixture) {
    let storage = &fx.storage;
    const COUNT: usize = 1100;
    let mut keys: Vec<RemotePath> = (0..COUNT).map(|i| path(&format!("many/obj-{i:04}"))).collect();
    let others = [path("many-not/x"), path("other/y"), path("manz")];
    futures::stream::iter(keys.iter().chain(&others))
        .map(|key| async move { storage.put_bytes(key, Bytes::from(key.as_str().to_owned())).await })
        .buffer_unordered(32)
        .try_collect::<()>()
        .await
        .unwrap();
    keys.sort();

    // More than one S3 page, all returned, sorted.
    let listing = storage.list(Some(&path("many")), ListingMode::WithDelimiter, None).await.unwrap();
    assert_eq!(listing.keys, keys);
    assert!(listing.prefixes.is_empty());

    // Without a delimiter the prefix is a plain string prefix.
    let listing = storage.list(Some(&path("many")), ListingMode::NoDelimiter, None).await.unwrap();
    let mut expected = keys.clone();
    expected.push(path("many-not/x"));
    expected.sort();
    assert_eq!(listing.keys, expected);

    let listing = storage.list(Some(&path("many")), ListingMode::NoDelimiter, Some(1050)).await.unwrap();
    assert_eq!(listing.keys, expected[..1050]);

    let everything = storage.list(None, ListingMode::NoDelimiter, None).await.unwrap();
    assert_eq!(everything.keys.len(), COUNT + others.len());
    let is_sorted = everything.keys.windows(2).all(|w| w[0] < w[1]);
    assert!(is_sorted, "listing is not sorted");

    // More than one DeleteObjects batch, with missing keys mixed in.
    let mut to_delete = keys.clone();
    to_delete.push(path("many/never-existed"));
    storage.delete_many(&to_delete).await.unwrap();
    let listing = storage.list(Some(&path("many")), ListingMode::WithDelimiter, None).await.unwrap();
    assert_eq!(listing.keys, Vec::<RemotePath>::new());
    let remaining = storage.list(None, ListingMode::NoDelimiter, None).await.unwrap();
    let remaining: BTreeSet<_> = remaining.keys.into_iter().collect();
    assert_eq!(remaining, others.into_iter().collect());
}

async fn list_with_delimiter(fx: &Fixture) {
    let storage = &fx.storage;
    for key in [
        "tenants/a/timelines/x/layer1",
        "tenants/a/timelines/x/layer2",
        "tenants/a/timelines/y/index_part.json",
        "tenants/a/tenant.json",
        "tenants/b/timelines/z/layer",
        "tenants/b-other/file",
        "top",
    ] {
        storage.put_bytes(&path(key), Bytes::from_static(b"x")).await.unwrap();
    }
    let as_strs = |paths: &[RemotePath]| paths.iter().map(|p| p.to_string()).collect::<Vec<_>>();

    let root = storage.list(None, ListingMode::WithDelimiter, None).await.unwrap();
    assert_eq!(as_strs(&root.keys), ["top"]);
    assert_eq!(as_strs(&root.prefixes), ["tenants"]);

    let tenants = storage.list(Some(&path("tenants")), ListingMode::WithDelimiter, None).await.unwrap();
    assert!(tenants.keys.is_empty());
    assert_eq!(as_strs(&tenants.prefixes), ["tenants/a", "tenants/b-other", "tenants/b"]);

    let tenant_a = storage.list(Some(&path("tenants/a")), ListingMode::WithDelimiter, None).await.unwrap();
    assert_eq!(as_strs(&tenant_a.keys), ["tenants/a/tenant.json"]);
    assert_eq!(as_strs(&tenant_a.prefixes), ["tenants/a/timelines"]);

    let timelines = storage.list(Some(&path("tenants/a/timelines")), ListingMode::WithDelimiter, None).await.unwrap();
    assert_eq!(as_strs(&timelines.prefixes), ["tenants/a/timelines/x", "tenants/a/timelines/y"]);

    let recursive = storage.list(Some(&path("tenants/a")), ListingMode::NoDelimiter, None).await.unwrap();
    assert_eq!(
        as_strs(&recursive.keys),
        [
            "tenants/a/tenant.json",
            "tenants/a/timelines/x/layer1",
            "tenants/a/timelines/x/layer2",
            "tenants/a/timelines/y/index_part.json",
        ]
    );

    let missing = storage.list(Some(&path("nothing/here")), ListingMode::WithDelimiter, None).await.unwrap();
    assert_eq!(missing, Default::default());
}

async fn delete(fx: &Fixture) {
    let storage = &fx.storage;
    let key = path("dir/sub/obj");
    storage.put_bytes(&key, Bytes::from_static(b"x")).await.unwrap();
    storage.put_bytes(&path("dir/keep"), Bytes::from_static(b"y")).await.unwrap();
    storage.delete(&key).await.unwrap();
    assert!(storage.get(&key, None).await.unwrap_err().is_not_found());
    // Deleting again, or something that never existed, is fine (as on S3).
    storage.delete(&key).await.unwrap();
    storage.delete(&path("never/existed")).await.unwrap();
    // A "directory" is not an object.
    storage.delete(&path("dir")).await.unwrap();
    assert_eq!(storage.get_bytes(&path("dir/keep")).await.unwrap(), "y");
    let listing = storage.list(None, ListingMode::NoDelimiter, None).await.unwrap();
    assert_eq!(listing.keys, [path("dir/keep")]);
}

async fn delete_many(fx: &Fixture) {
    let storage = &fx.storage;
    let keys = [path("a/1"), path("a/2"), path("b/3")];
    for key in &keys {
        storage.put_bytes(key, Bytes::from_static(b"x")).await.unwrap();
    }
    storage.delete_many(&[]).await.unwrap();
    storage.delete_many(&[keys[0].clone(), path("a/missing"), keys[2].clone()]).await.unwrap();
    let listing = storage.list(None, ListingMode::NoDelimiter, None).await.unwrap();
    assert_eq!(listing.keys, [keys[1].clone()]);
}

async fn copy(fx: &Fixture) {
    let storage = &fx.storage;
    let source = path("src/with space+plus ü");
    let body = content(3000);
    storage.put_bytes(&source, body.clone()).await.unwrap();
    let target = path("dst/copy");
    storage.copy(&source, &target).await.unwrap();
    assert_eq!(storage.get_bytes(&target).await.unwrap(), body);
    assert_eq!(storage.get_bytes(&source).await.unwrap(), body);

    // Copy replaces an existing target.
    storage.put_bytes(&source, Bytes::from_static(b"v2")).await.unwrap();
    storage.copy(&source, &target).await.unwrap();
    assert_eq!(storage.get_bytes(&target).await.unwrap(), "v2");

    let err = storage.copy(&path("src/missing"), &target).await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(err.to_string().contains(&format!("{}src/missing", fx.location_prefix)), "{err}");
    assert_eq!(storage.get_bytes(&target).await.unwrap(), "v2");
}

async fn missing_key_is_not_found(fx: &Fixture) {
    let storage = &fx.storage;
    let key = path("tenants/t1/missing-layer");
    let err = storage.get(&key, None).await.unwrap_err();
    match &err {
        RemoteStorageError::NotFound { key } => {
            assert_eq!(key, &format!("{}tenants/t1/missing-layer", fx.location_prefix))
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert_eq!(err.to_string(), format!("object {}tenants/t1/missing-layer not found", fx.location_prefix));
    assert!(storage.get_bytes(&key).await.unwrap_err().is_not_found());
}

#[test]
fn invalid_remote_paths_are_rejected() {
    for key in ["", "/abs", "a/../b", "a//b", "trailing/", "./a"] {
        let err = RemotePath::new(key).unwrap_err();
        assert!(err.to_string().contains(&format!("{key:?}")), "{err}");
    }
}

#[tokio::test]
async fn s3_keys_live_under_prefix_in_bucket() {
    let fx = Fixture::s3("prefix_in_bucket").await;
    fx.storage.put_bytes(&path("a/b"), Bytes::from_static(b"x")).await.unwrap();
    let (client, bucket) = fx.raw_s3.as_ref().unwrap();
    let listed = client.list_objects_v2().bucket(bucket).send().await.unwrap();
    let keys: Vec<_> = listed.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(keys, [format!("{PREFIX_IN_BUCKET}/a/b")]);

    // A key outside the prefix is invisible to the storage.
    client.put_object().bucket(bucket).key("outside").body(Bytes::from_static(b"z").into()).send().await.unwrap();
    let listing = fx.storage.list(None, ListingMode::NoDelimiter, None).await.unwrap();
    assert_eq!(listing.keys, [path("a/b")]);
}

#[tokio::test]
async fn s3_missing_bucket_is_a_permanent_error_naming_the_bucket() {
    let moto = moto::MotoServer::shared();
    let mut config = S3Config::new("no-such-bucket", REGION);
    config.endpoint = Some(moto.endpoint.clone());
    let storage = S3Bucket::with_credentials(&config, credentials()).await.unwrap();
    let err = storage.get(&path("k"), None).await.unwrap_err();
    assert!(matches!(err, RemoteStorageError::Permanent { .. }), "{err}");
    assert!(err.to_string().contains("s3://no-such-bucket/k"), "{err}");
}

#[tokio::test]
async fn local_fs_put_is_atomic_and_delete_cleans_directories() {
    let temp_dir = tempfile::tempdir().unwrap();
    let storage = LocalFs::new(temp_dir.path().join("root")).unwrap();
    let root = storage.root().to_owned();
    storage.put_bytes(&path("t/tl/layer"), Bytes::from_static(b"x")).await.unwrap();
    // A leftover temp file (e.g. from a crash mid-put) is not an object.
    std::fs::write(root.join("t/tl/layer2.___temp.0123456789abcdef"), b"partial").unwrap();
    let listing = storage.list(None, ListingMode::NoDelimiter, None).await.unwrap();
    assert_eq!(listing.keys, [path("t/tl/layer")]);
    let err = storage.put_bytes(&path("t/x.___temp.1"), Bytes::new()).await.unwrap_err();
    assert!(err.to_string().contains("reserved"), "{err}");

    std::fs::remove_file(root.join("t/tl/layer2.___temp.0123456789abcdef")).unwrap();
    storage.delete(&path("t/tl/layer")).await.unwrap();
    assert!(!root.join("t").exists(), "empty directories should be removed");
    assert!(root.exists(), "the root stays");
}

/// Encrypted on S3: no object in the bucket holds the plaintext (the bucket is scanned through
/// the raw client), and a byte changed in the bucket fails the read with an authentication error.
#[tokio::test]
async fn s3_encrypted_objects_hold_no_plaintext_and_detect_tampering() {
    const MARKER: &[u8] = b"KNOWN-MARKER-0xC0FFEE";
    let fx = Fixture::s3("encrypted_at_rest").await.encrypted();
    let body: Bytes = MARKER.iter().copied().cycle().take(6 * 1024 * 1024).collect::<Vec<u8>>().into();
    let key = path("tenants/3a0c11b1aa9b4bf2a1f5c1d2e3f40516/timelines/tl/layer");
    fx.storage.put(&key, chunked(body.clone(), 1 << 20), body.len() as u64).await.unwrap();
    assert!(fx.storage.get_bytes(&key).await.unwrap() == body);

    let (client, bucket) = fx.raw_s3.as_ref().unwrap();
    let listed = client.list_objects_v2().bucket(bucket).send().await.unwrap();
    let keys: Vec<String> = listed.contents().iter().filter_map(|o| o.key().map(str::to_owned)).collect();
    assert_eq!(keys.len(), 2, "the object and its tenant's data key: {keys:?}");
    for raw_key in &keys {
        let object = client.get_object().bucket(bucket).key(raw_key).send().await.unwrap();
        let bytes = object.body.collect().await.unwrap().into_bytes();
        assert!(!bytes.windows(MARKER.len()).any(|w| w == MARKER), "{raw_key} holds the plaintext marker");
    }
    // The storage's own listing shows only the object.
    let listing = fx.storage.list(None, ListingMode::NoDelimiter, None).await.unwrap();
    assert_eq!(listing.keys, std::slice::from_ref(&key));

    // Flip one byte in the middle of the stored object.
    let raw_key = format!("{PREFIX_IN_BUCKET}/{key}");
    let object = client.get_object().bucket(bucket).key(&raw_key).send().await.unwrap();
    let mut bytes = object.body.collect().await.unwrap().into_bytes().to_vec();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    client.put_object().bucket(bucket).key(&raw_key).body(Bytes::from(bytes).into()).send().await.unwrap();
    let err = fx.storage.get_bytes(&key).await.unwrap_err();
    assert!(err.is_authentication(), "{err}");
    assert!(err.to_string().contains(&format!("s3://{bucket}/{raw_key} failed authentication")), "{err}");
    // A ranged read of the untouched start still works: only the chunks read are verified.
    let head = fx.storage.get(&key, Some((0, Some(1000)))).await.unwrap().collect().await.unwrap();
    assert!(head == body.slice(0..1000));
}
