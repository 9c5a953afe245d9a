//! Layer file tests: round trips against an in-memory model, corruption and truncation.

use std::collections::BTreeMap;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use utils::{Lsn, TenantId, TimelineId};

use super::*;
use crate::key::{Key, KeyRange};
use crate::value::{Value, WalRecord};
use postgres_ffi::RelTag;

type Model = BTreeMap<(Key, Lsn), Value>;

const TENANT: TenantId = TenantId([0x11; 16]);
const TIMELINE: TimelineId = TimelineId([0x22; 16]);

fn test_key(n: u32) -> Key {
    // Spread over a few relations so keys differ in several fields, not just the block number.
    let rel = RelTag { spcnode: 1663, dbnode: 5, relnode: 16384 + n % 7, forknum: (n % 3) as u8 };
    Key::rel_block(rel, n / 7)
}

/// Mostly small values, some up to 8 KiB; large ones half compressible, half noise.
fn random_bytes(rng: &mut StdRng, large_fraction: f64) -> Bytes {
    let len = if rng.gen_bool(large_fraction) { rng.gen_range(0..=8192) } else { rng.gen_range(0..200) };
    let mut v = vec![0u8; len];
    if rng.gen_bool(0.5) {
        rng.fill_bytes(&mut v);
    } else {
        let b = rng.gen::<u8>();
        v.iter_mut().enumerate().for_each(|(i, x)| *x = b.wrapping_add((i / 64) as u8));
    }
    Bytes::from(v)
}

fn random_value(rng: &mut StdRng, large_fraction: f64) -> Value {
    match rng.gen_range(0..20) {
        0 => Value::Image(random_bytes(rng, large_fraction)),
        1 | 2 => Value::WalRecord(WalRecord::Postgres { will_init: true, rec: random_bytes(rng, large_fraction) }),
        3 => Value::WalRecord(WalRecord::ClogSetCommitted { xids: vec![rng.gen(), rng.gen()], timestamp: rng.gen() }),
        _ => Value::WalRecord(WalRecord::Postgres { will_init: false, rec: random_bytes(rng, large_fraction) }),
    }
}

/// What a delta lookup must return, computed from the model.
fn expected_lookup(model: &Model, key: Key, lsn_range: Range<Lsn>) -> Vec<(Lsn, Value)> {
    let mut out = Vec::new();
    if lsn_range.start >= lsn_range.end {
        return out;
    }
    for ((_, lsn), value) in model.range((key, lsn_range.start)..(key, lsn_range.end)).rev() {
        out.push((*lsn, value.clone()));
        if value.will_init() {
            break;
        }
    }
    out
}

fn write_delta(dir: &Path, model: &Model, key_range: KeyRange, lsn_range: Range<Lsn>) -> PersistentLayerDesc {
    let mut w = DeltaLayerWriter::new(dir, TENANT, TIMELINE, key_range.start, lsn_range).expect("writer");
    for ((key, lsn), value) in model {
        w.put(*key, *lsn, value).expect("put");
    }
    w.finish(key_range.end).expect("finish")
}

fn random_model(rng: &mut StdRng, entries: usize, keys: u32, lsn_range: Range<Lsn>, large_fraction: f64) -> Model {
    let mut model = Model::new();
    while model.len() < entries {
        let key = test_key(rng.gen_range(0..keys));
        let lsn = Lsn(rng.gen_range(lsn_range.start.0..lsn_range.end.0));
        model.insert((key, lsn), random_value(rng, large_fraction));
    }
    model
}

fn cache() -> Arc<BlockCache> {
    Arc::new(BlockCache::new(256))
}

/// 60k entries (enough for a three-level index), values 0..8 KiB: every kind of lookup and scan
/// agrees with a BTreeMap model. Fixed seed, so a failure reproduces.
#[test]
fn delta_layer_matches_model() {
    let mut rng = StdRng::seed_from_u64(0xde17a);
    let dir = tempfile::tempdir().expect("tempdir");
    let layer_lsns = Lsn(1000)..Lsn(1_000_000);
    let model = random_model(&mut rng, 60_000, 3000, layer_lsns.clone(), 0.03);
    let key_range = KeyRange::new(Key::MIN.next(), Key::MAX);
    let desc = write_delta(dir.path(), &model, key_range, layer_lsns.clone());
    assert_eq!(desc.value_count, 60_000);
    assert_eq!(desc.layer_name().to_string(), desc.path.file_name().and_then(|n| n.to_str()).unwrap_or_default());
    assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 1, "temp file left behind");

    // A small cache, so lookups also exercise eviction.
    let layer = DeltaLayer::open(&desc.path, &Arc::new(BlockCache::new(64))).expect("open");
    assert_eq!(layer.desc(), &desc);

    let keys: Vec<Key> = model.keys().map(|(k, _)| *k).collect();
    for i in 0..20_000 {
        let key = if i % 10 == 0 { test_key(rng.gen_range(3000..3100)) } else { keys[rng.gen_range(0..keys.len())] };
        let a = rng.gen_range(0..1_100_000u64);
        let b = rng.gen_range(0..1_100_000u64);
        let range = match i % 4 {
            0 => Lsn(0)..Lsn(a.max(1)),
            1 => Lsn(a)..Lsn::MAX,
            _ => Lsn(a.min(b))..Lsn(a.max(b)),
        };
        let got = layer.get_value_reconstruct_data(key, range.clone()).expect("lookup");
        let clamped = range.start.max(layer_lsns.start)..range.end.min(layer_lsns.end);
        assert_eq!(got, expected_lookup(&model, key, clamped), "key {key:?} range {range:?}");
    }

    // Full scan and key scan.
    let all: Vec<DeltaEntry> = layer.iter(KeyRange::full()).collect::<Result<_, _>>().expect("scan");
    assert_eq!(all.len(), model.len());
    for (entry, ((key, lsn), value)) in all.iter().zip(&model) {
        assert_eq!((&entry.key, &entry.lsn, &entry.value), (key, lsn, value));
    }
    let key_scan: Vec<(Key, Lsn, bool)> = layer.iter_keys(KeyRange::full()).collect::<Result<_, _>>().expect("scan");
    let expected: Vec<(Key, Lsn, bool)> = model.iter().map(|((k, l), v)| (*k, *l, v.will_init())).collect();
    assert_eq!(key_scan, expected);

    // Range scans, including empty ones and ones that start between keys.
    for _ in 0..200 {
        let mut a = keys[rng.gen_range(0..keys.len())];
        let mut b = keys[rng.gen_range(0..keys.len())];
        if a > b {
            std::mem::swap(&mut a, &mut b);
        }
        if rng.gen_bool(0.3) {
            a = a.next();
        }
        let range = KeyRange::new(a.min(b), b);
        let got: Vec<(Key, Lsn)> =
            layer.iter(range).map(|e| e.map(|e| (e.key, e.lsn))).collect::<Result<_, _>>().expect("scan");
        let want: Vec<(Key, Lsn)> = model.keys().filter(|(k, _)| range.contains(k)).copied().collect();
        assert_eq!(got, want, "range {range:?}");
    }
    assert_eq!(layer.iter(KeyRange::new(keys[5], keys[5])).count(), 0);
}

#[test]
fn image_layer_matches_model() {
    let mut rng = StdRng::seed_from_u64(0x1a6e);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut model: BTreeMap<Key, Bytes> = BTreeMap::new();
    while model.len() < 20_000 {
        model.insert(test_key(rng.gen_range(0..40_000)), random_bytes(&mut rng, 0.05));
    }
    let key_range = KeyRange::new(Key::MIN, Key::MAX);
    let mut w = ImageLayerWriter::new(dir.path(), TENANT, TIMELINE, key_range.start, Lsn(5000)).expect("writer");
    for (key, img) in &model {
        w.put(*key, img).expect("put");
    }
    let desc = w.finish(key_range.end).expect("finish");
    assert_eq!(desc.image_lsn(), Some(Lsn(5000)));
    let layer = ImageLayer::open(&desc.path, &cache()).expect("open");
    for i in 0..40_000 {
        let key = test_key(i);
        assert_eq!(layer.get(key).expect("get"), model.get(&key).cloned(), "{key:?}");
    }
    let key = *model.keys().next().expect("non-empty");
    let img = Value::Image(model[&key].clone());
    assert_eq!(layer.get_value_reconstruct_data(key, Lsn(5000)..Lsn(5001)).expect("get"), [(Lsn(5000), img)]);
    assert!(layer.get_value_reconstruct_data(key, Lsn(0)..Lsn(5000)).expect("get").is_empty());
    assert!(layer.get_value_reconstruct_data(key, Lsn(5001)..Lsn(9000)).expect("get").is_empty());

    let all: Vec<(Key, Bytes)> = layer.iter(KeyRange::full()).collect::<Result<_, _>>().expect("scan");
    assert_eq!(all, model.iter().map(|(k, v)| (*k, v.clone())).collect::<Vec<_>>());
    let keys: Vec<Key> = model.keys().copied().collect();
    for _ in 0..100 {
        let (a, b) = (rng.gen_range(0..keys.len()), rng.gen_range(0..keys.len()));
        let range = KeyRange::new(keys[a.min(b)], keys[a.max(b)]);
        let got: Vec<Key> = layer.iter_keys(range).collect::<Result<_, _>>().expect("scan");
        assert_eq!(got, keys[a.min(b)..a.max(b)]);
    }
}

#[test]
fn single_key_layers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = test_key(42);
    let mut model = Model::new();
    model.insert((key, Lsn(10)), Value::Image(Bytes::from_static(b"base")));
    model.insert((key, Lsn(20)), Value::WalRecord(WalRecord::ClogSetAborted { xids: vec![7] }));
    model.insert((key, Lsn(30)), Value::WalRecord(WalRecord::Postgres { will_init: false, rec: Bytes::new() }));
    let desc = write_delta(dir.path(), &model, KeyRange::single(key), Lsn(10)..Lsn(31));
    let layer = DeltaLayer::open(&desc.path, &cache()).expect("open");
    for end in 0..40 {
        for start in 0..end {
            let range = Lsn(start)..Lsn(end);
            let got = layer.get_value_reconstruct_data(key, range.clone()).expect("lookup");
            assert_eq!(got, expected_lookup(&model, key, range));
        }
    }
    assert!(layer.get_value_reconstruct_data(key.next(), Lsn(0)..Lsn(100)).expect("lookup").is_empty());
    assert!(layer.get_value_reconstruct_data(test_key(41), Lsn(0)..Lsn(100)).expect("lookup").is_empty());

    let mut w = ImageLayerWriter::new(dir.path(), TENANT, TIMELINE, key, Lsn(7)).expect("writer");
    w.put(key, b"only").expect("put");
    let image = ImageLayer::open(&w.finish(key.next()).expect("finish").path, &cache()).expect("open");
    assert_eq!(image.get(key).expect("get").as_deref(), Some(&b"only"[..]));
    assert_eq!(image.get(key.next()).expect("get"), None);
}

#[test]
fn empty_layers_and_ranges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let desc = write_delta(dir.path(), &Model::new(), KeyRange::full(), Lsn(1)..Lsn(2));
    assert_eq!(desc.value_count, 0);
    assert!(desc.is_l0());
    let layer = DeltaLayer::open(&desc.path, &cache()).expect("open");
    assert!(layer.get_value_reconstruct_data(test_key(1), Lsn(0)..Lsn::MAX).expect("lookup").is_empty());
    assert_eq!(layer.iter(KeyRange::full()).count(), 0);

    let w = ImageLayerWriter::new(dir.path(), TENANT, TIMELINE, Key::MIN, Lsn(9)).expect("writer");
    let image = ImageLayer::open(&w.finish(Key::MAX).expect("finish").path, &cache()).expect("open");
    assert_eq!(image.get(test_key(1)).expect("get"), None);
    assert_eq!(image.iter(KeyRange::full()).count(), 0);

    // Empty LSN and key ranges on a non-empty layer.
    let mut model = Model::new();
    model.insert((test_key(1), Lsn(5)), Value::Image(Bytes::from_static(b"x")));
    let desc = write_delta(dir.path(), &model, KeyRange::full(), Lsn(5)..Lsn(6));
    let layer = PersistentLayer::open(&desc.path, &cache()).expect("open");
    assert!(layer.get_value_reconstruct_data(test_key(1), Lsn(5)..Lsn(5)).expect("lookup").is_empty());
    let PersistentLayer::Delta(delta) = layer else { panic!("opened as the wrong kind") };
    assert_eq!(delta.iter(KeyRange::new(test_key(1), test_key(1))).count(), 0);
    assert_eq!(delta.iter(KeyRange::single(test_key(1))).count(), 1);
}

#[test]
fn repeated_lookups_hit_the_cache() {
    let mut rng = StdRng::seed_from_u64(7);
    let dir = tempfile::tempdir().expect("tempdir");
    let model = random_model(&mut rng, 2000, 500, Lsn(1)..Lsn(1000), 0.0);
    let desc = write_delta(dir.path(), &model, KeyRange::full(), Lsn(1)..Lsn(1000));
    let cache = cache();
    let layer = DeltaLayer::open(&desc.path, &cache).expect("open");
    let key = model.keys().next().expect("non-empty").0;
    let first = layer.get_value_reconstruct_data(key, Lsn(0)..Lsn::MAX).expect("lookup");
    let (_, misses) = cache.hit_miss_counts();
    for _ in 0..10 {
        assert_eq!(layer.get_value_reconstruct_data(key, Lsn(0)..Lsn::MAX).expect("lookup"), first);
    }
    assert_eq!(cache.hit_miss_counts().1, misses, "repeated lookups went to the disk");
}

#[test]
fn finish_refuses_to_replace_a_layer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut model = Model::new();
    model.insert((test_key(1), Lsn(5)), Value::Image(Bytes::from_static(b"x")));
    write_delta(dir.path(), &model, KeyRange::full(), Lsn(5)..Lsn(6));
    let mut w = DeltaLayerWriter::new(dir.path(), TENANT, TIMELINE, Key::MIN, Lsn(5)..Lsn(6)).expect("writer");
    w.put(test_key(2), Lsn(5), &Value::Image(Bytes::new())).expect("put");
    let err = w.finish(Key::MAX).expect_err("a second layer of the same name");
    assert!(err.to_string().contains("final name"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 1, "temp file left behind");
}

#[test]
#[should_panic(expected = "out of order")]
fn delta_writer_rejects_unsorted_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = DeltaLayerWriter::new(dir.path(), TENANT, TIMELINE, Key::MIN, Lsn(1)..Lsn(100)).expect("writer");
    let v = Value::Image(Bytes::new());
    w.put(test_key(2), Lsn(5), &v).expect("put");
    w.put(test_key(2), Lsn(4), &v).expect("put");
}

#[test]
fn wrong_kind_and_renamed_files_are_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut model = Model::new();
    model.insert((test_key(1), Lsn(5)), Value::Image(Bytes::from_static(b"x")));
    let desc = write_delta(dir.path(), &model, KeyRange::full(), Lsn(5)..Lsn(6));
    let err = ImageLayer::open(&desc.path, &cache()).err().expect("a delta is not an image");
    assert!(err.to_string().contains(&desc.path.display().to_string()), "{err}");
    let renamed =
        dir.path().join(LayerName::Delta { key_range: KeyRange::full(), lsn_range: Lsn(5)..Lsn(7) }.to_string());
    std::fs::rename(&desc.path, &renamed).expect("rename");
    let err = DeltaLayer::open(&renamed, &cache()).err().expect("name and summary disagree");
    assert!(err.to_string().contains("file name says"), "{err}");
}

#[test]
fn truncated_or_extended_file_fails_to_open() {
    let mut rng = StdRng::seed_from_u64(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let model = random_model(&mut rng, 500, 100, Lsn(1)..Lsn(1000), 0.1);
    let desc = write_delta(dir.path(), &model, KeyRange::full(), Lsn(1)..Lsn(1000));
    let original = std::fs::read(&desc.path).expect("read");
    let len = original.len();
    assert!(len > 4 * BLOCK_SIZE_BYTES);
    for cut in [0, 1, 100, BLOCK_SIZE_BYTES - 1, BLOCK_SIZE_BYTES, len / 2, len - BLOCK_SIZE_BYTES, len - 1, len + 1] {
        let mut bytes = original.clone();
        bytes.resize(cut, 0);
        std::fs::write(&desc.path, &bytes).expect("write");
        let err = DeltaLayer::open(&desc.path, &cache()).err().unwrap_or_else(|| panic!("length {cut} opened"));
        let msg = err.to_string();
        assert!(msg.contains(&desc.path.display().to_string()), "{msg}");
        assert!(err.is_corruption(), "{msg}");
    }
}

/// Flip one byte at a time (a few thousand positions across the summary, blobs and index) and
/// read everything: each read returns exactly the right data or an error naming the file.
#[test]
fn single_byte_corruption_is_detected_never_served() {
    let mut rng = StdRng::seed_from_u64(0xc0ffee);
    let dir = tempfile::tempdir().expect("tempdir");
    // > 240 entries: two leaves and a root. Large values: some zstd blobs, some spanning blocks.
    let model = random_model(&mut rng, 300, 60, Lsn(100)..Lsn(10_000), 0.05);
    let desc = write_delta(dir.path(), &model, KeyRange::full(), Lsn(100)..Lsn(10_000));
    let path = desc.path.clone();
    let path_str = path.display().to_string();
    let file_len = std::fs::metadata(&path).expect("stat").len();
    let index_start = {
        let layer = DeltaLayer::open(&path, &cache()).expect("open");
        layer.summary().index_start_block as u64 * BLOCK_SIZE_BYTES as u64
    };
    assert!(file_len - index_start >= 3 * BLOCK_SIZE_BYTES as u64, "expected a two-level index");
    let keys: Vec<Key> = {
        let mut k: Vec<Key> = model.keys().map(|(k, _)| *k).collect();
        k.dedup();
        k
    };
    let cache = cache();
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).expect("open rw");
    let (mut detected, mut harmless) = (0usize, 0usize);
    for i in 0..3000 {
        let pos = match i % 3 {
            0 => rng.gen_range(0..summary::SUMMARY_SIZE_BYTES as u64),
            1 => rng.gen_range(BLOCK_SIZE_BYTES as u64..index_start),
            _ => rng.gen_range(index_start..file_len),
        };
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, pos).expect("read byte");
        let flipped = [byte[0] ^ rng.gen_range(1..=255u8)];
        file.write_all_at(&flipped, pos).expect("flip");

        let mut saw_error = false;
        let mut check_err = |e: LayerError| {
            let msg = e.to_string();
            assert!(msg.contains(&path_str), "error does not name the file: {msg}");
            saw_error = true;
        };
        match DeltaLayer::open(&path, &cache) {
            Err(e) => check_err(e),
            Ok(layer) => {
                for key in &keys {
                    let range = Lsn(0)..Lsn(rng.gen_range(100..11_000));
                    match layer.get_value_reconstruct_data(*key, range.clone()) {
                        Ok(got) => assert_eq!(got, expected_lookup(&model, *key, range), "flip at {pos}: wrong data"),
                        Err(e) => check_err(e),
                    }
                }
                let mut expected = model.iter();
                for entry in layer.iter(KeyRange::full()) {
                    match entry {
                        Ok(e) => {
                            let ((key, lsn), value) = expected.next().expect("scan returned too many entries");
                            assert_eq!((&e.key, &e.lsn, &e.value), (key, lsn, value), "flip at {pos}: wrong data");
                        }
                        Err(e) => check_err(e),
                    }
                }
            }
        }
        if saw_error {
            detected += 1;
        } else {
            harmless += 1;
        }
        file.write_all_at(&byte, pos).expect("restore");
    }
    // Most flips land on checksummed bytes; the rest are padding that no read depends on.
    assert!(detected > 2000, "only {detected} of 3000 flips were detected ({harmless} harmless)");
    // The restored file reads cleanly again.
    let layer = DeltaLayer::open(&path, &cache).expect("open restored");
    assert_eq!(layer.iter(KeyRange::full()).filter(|e| e.is_err()).count(), 0);
}

/// Image layers get the same protection.
#[test]
fn image_layer_corruption_is_detected() {
    let mut rng = StdRng::seed_from_u64(0x1337);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut model: BTreeMap<Key, Bytes> = BTreeMap::new();
    while model.len() < 400 {
        model.insert(test_key(rng.gen_range(0..1000)), random_bytes(&mut rng, 0.05));
    }
    let mut w = ImageLayerWriter::new(dir.path(), TENANT, TIMELINE, Key::MIN, Lsn(77)).expect("writer");
    for (k, v) in &model {
        w.put(*k, v).expect("put");
    }
    let path = w.finish(Key::MAX).expect("finish").path;
    let path_str = path.display().to_string();
    let file_len = std::fs::metadata(&path).expect("stat").len();
    let cache = cache();
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).expect("open rw");
    for _ in 0..1000 {
        let pos = rng.gen_range(0..file_len);
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, pos).expect("read byte");
        file.write_all_at(&[byte[0] ^ rng.gen_range(1..=255u8)], pos).expect("flip");
        match ImageLayer::open(&path, &cache) {
            Err(e) => assert!(e.to_string().contains(&path_str), "{e}"),
            Ok(layer) => {
                for k in 0..1000 {
                    let key = test_key(k);
                    match layer.get(key) {
                        Ok(got) => assert_eq!(got.as_ref(), model.get(&key), "flip at {pos}: wrong data"),
                        Err(e) => assert!(e.to_string().contains(&path_str), "{e}"),
                    }
                }
            }
        }
        file.write_all_at(&byte, pos).expect("restore");
    }
}
