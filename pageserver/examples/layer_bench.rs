//! Delta layer micro-benchmark: write throughput for a ~100 MB delta layer, then point-lookup
//! latency (p50/p99/p99.9) with a cache that holds the whole file and with a small one.
//! Not part of the test suite (timings are not assertions); run it by hand:
//!
//! ```text
//! cargo run --release -p pageserver --example layer_bench [-- --no-compression] [--dir PATH]
//! ```

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pageserver::key::Key;
use pageserver::layer::{BlockCache, DeltaLayer, DeltaLayerWriter, BLOCK_SIZE_BYTES};
use pageserver::value::{Value, WalRecord};
use postgres_ffi::RelTag;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use utils::{Lsn, TenantId, TimelineId};

const TARGET_SIZE_BYTES: u64 = 100 * 1024 * 1024;
const KEYS: u32 = 20_000;
const LOOKUPS: usize = 100_000;

/// A page-like image: a populated part of random bytes, then zeros (free space), so it
/// compresses about as much as a real heap page.
fn page(rng: &mut StdRng) -> Bytes {
    let mut p = vec![0u8; 8192];
    let used = rng.gen_range(1024..8192);
    rng.fill_bytes(&mut p[..used]);
    Bytes::from(p)
}

fn record(rng: &mut StdRng) -> Bytes {
    let mut r = vec![0u8; rng.gen_range(60..400)];
    rng.fill_bytes(&mut r);
    Bytes::from(r)
}

fn percentiles(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    format!(
        "p50 {:>6.1} µs  p99 {:>6.1} µs  p99.9 {:>6.1} µs",
        at(0.5).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6,
        at(0.999).as_secs_f64() * 1e6
    )
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let compress = !args.iter().any(|a| a == "--no-compression");
    let tempdir = tempfile::tempdir()?;
    let dir = match args.iter().position(|a| a == "--dir") {
        Some(i) => std::path::PathBuf::from(args.get(i + 1).ok_or_else(|| anyhow::anyhow!("--dir needs a path"))?),
        None => tempdir.path().to_path_buf(),
    };
    let mut rng = StdRng::seed_from_u64(42);
    let rel = RelTag { spcnode: 1663, dbnode: 5, relnode: 16384, forknum: 0 };

    // Versions per key: a page image, then WAL records; LSNs increase per key.
    let lsn_range: Range<Lsn> = Lsn(0x1000)..Lsn(0x1000 + 1_000_000_000);
    let versions_per_key = 20u64;
    let lsn_step = (lsn_range.end.0 - lsn_range.start.0) / (versions_per_key + 1);
    let mut writer = DeltaLayerWriter::new(
        &dir,
        TenantId::generate(),
        TimelineId::generate(),
        Key::rel_block(rel, 0),
        lsn_range.clone(),
    )?;
    if !compress {
        writer.set_compression(None);
    }
    let started = Instant::now();
    let mut value_bytes = 0u64;
    let mut entries = 0u64;
    let mut keys_written = 0u32;
    'outer: for blkno in 0..KEYS {
        keys_written = blkno + 1;
        for v in 0..versions_per_key {
            let lsn = Lsn(lsn_range.start.0 + v * lsn_step + blkno as u64 % lsn_step);
            let value = if v % 8 == 0 {
                Value::Image(page(&mut rng))
            } else {
                Value::WalRecord(WalRecord::Postgres { will_init: false, rec: record(&mut rng) })
            };
            value_bytes += value.encoded_size_bytes() as u64;
            writer.put(Key::rel_block(rel, blkno), lsn, &value)?;
            entries += 1;
            if writer.size_bytes() >= TARGET_SIZE_BYTES {
                break 'outer;
            }
        }
    }
    let desc = writer.finish(Key::rel_block(rel, keys_written))?;
    let write_secs = started.elapsed().as_secs_f64();
    println!(
        "write: {entries} entries, {:.1} MB of values -> {:.1} MB file in {write_secs:.2} s: {:.0} MB/s of values \
         (zstd {})",
        value_bytes as f64 / 1e6,
        desc.file_size_bytes as f64 / 1e6,
        value_bytes as f64 / 1e6 / write_secs,
        if compress { "on" } else { "off" },
    );

    let file_blocks = (desc.file_size_bytes / BLOCK_SIZE_BYTES as u64) as usize;
    for (label, cache_blocks) in [("whole file cached", file_blocks + 16), ("8 MiB cache      ", 1024)] {
        let cache = Arc::new(BlockCache::new(cache_blocks));
        let layer = DeltaLayer::open(&desc.path, &cache)?;
        let mut run = |n: usize| -> anyhow::Result<Vec<Duration>> {
            let mut samples = Vec::with_capacity(n);
            for _ in 0..n {
                let key = Key::rel_block(rel, rng.gen_range(0..keys_written));
                let lsn = Lsn(rng.gen_range(lsn_range.start.0..lsn_range.end.0));
                let t = Instant::now();
                let versions = layer.get_value_reconstruct_data(key, lsn_range.start..lsn)?;
                samples.push(t.elapsed());
                std::hint::black_box(versions);
            }
            Ok(samples)
        };
        run(LOOKUPS / 2)?; // warm the cache (and the OS page cache)
        let samples = run(LOOKUPS)?;
        let (hits, misses) = cache.hit_miss_counts();
        println!(
            "lookup, {label}: {}  (block cache hit rate {:.1}%)",
            percentiles(samples),
            100.0 * hits as f64 / (hits + misses).max(1) as f64
        );
    }
    Ok(())
}
