//! Property test: the stream decoder, the record decoder and the body parsers return errors,
//! never panic, on truncated, bit-flipped, overwritten and random input; and corruption never
//! yields a record that differs from the one that was written (the CRC catches it).
//!
//! Seeds are small WAL streams built with our writer, positioned so records cross page and
//! segment boundaries, split their headers across pages, start inside a continuation, and
//! include XLOG_SWITCH; plus encoded records with block references, images (plain, hole,
//! lz4, zstd, pglz-looking garbage) and every typed body the crate parses.

use bytes::Bytes;
use postgres_ffi::checkpoint::CheckPoint;
use postgres_ffi::fpi::restore_block_image;
use postgres_ffi::record::decode_record;
use postgres_ffi::records::{self, parse_record_body};
use postgres_ffi::reltag::RelFileNode;
use postgres_ffi::rmgr::*;
use postgres_ffi::wal_writer::{BlockSpec, ImageSpec, RecordSpec, WalBuilder};
use postgres_ffi::{ImageCompression, WalDecoderConfig, WalRecordBytes, WalStreamDecoder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use utils::Lsn;

const SEG: usize = 1024 * 1024;
const SYSID: u64 = 7_123_456_789;
const STREAM_CASES: usize = 80_000;
const RECORD_CASES: usize = 120_000;
const _: () = assert!(STREAM_CASES + RECORD_CASES >= 100_000, "the brief asks for at least 100k cases");

fn rel(n: u32) -> RelFileNode {
    RelFileNode { spcnode: 1663, dbnode: 5, relnode: n }
}

fn words(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn sample_page(seed: u8) -> Vec<u8> {
    let mut p = postgres_ffi::page::page_init(16);
    postgres_ffi::page::page_set_lsn(&mut p, Lsn(0x100_0000));
    for (i, b) in p.iter_mut().enumerate().skip(7000).take(1000) {
        *b = (i as u8).wrapping_mul(seed);
    }
    p
}

/// Records whose bodies exercise every typed parser, with assorted block references.
fn seed_records() -> Vec<RecordSpec> {
    let page = sample_page(3);
    let mut without_hole = page[..24].to_vec();
    without_hole.extend_from_slice(&page[7000..]);
    let block = |id: u8, relnode: u32, blkno: u32, image: Option<ImageSpec>, data: Vec<u8>| BlockSpec {
        block_id: id,
        rel: rel(relnode),
        forknum: 0,
        blkno,
        will_init: false,
        image,
        data,
    };
    let lz4 = ImageSpec {
        stored: lz4_flex::block::compress(&without_hole),
        hole_offset: 24,
        hole_length: 6976,
        compression: ImageCompression::Lz4,
        apply: true,
    };
    let zstd = ImageSpec {
        stored: zstd::bulk::compress(&without_hole, 1).unwrap(),
        hole_offset: 24,
        hole_length: 6976,
        compression: ImageCompression::Zstd,
        apply: true,
    };
    let pglz = ImageSpec {
        stored: vec![0u8, 1, 2, 3, 4, 5, 6, 7, 8, 0xFF, 0x0F, 0x01, 0x20],
        hole_offset: 24,
        hole_length: 6976,
        compression: ImageCompression::Pglz,
        apply: true,
    };
    let cp = CheckPoint { redo: Lsn(0x100_0028), this_timeline_id: 1, next_xid: 800, ..Default::default() };
    let mut commit = 1234i64.to_le_bytes().to_vec();
    commit.extend_from_slice(&words(&[0x1F, 5, 1663, 3, 801, 802, 803, 1, 1663, 5, 16390, 1]));
    commit.extend_from_slice(&[7u8; 16]);
    commit.extend_from_slice(&words(&[777]));
    // xl_xact_prepare: magic, total_len, xid, database, prepared_at, owner, nsubxacts,
    // ncommitrels, nabortrels, ncommitstats, nabortstats, ninvalmsgs, initfileinval, gidlen,
    // origin lsn/time; then the MAXALIGNed gid, subxacts, commit rels, abort rels.
    let mut prepare = words(&[0x57F9_4534, 200, 800, 5]);
    prepare.extend_from_slice(&99i64.to_le_bytes());
    prepare.extend_from_slice(&words(&[10, 1, 1, 1, 0, 0, 0]));
    prepare.extend_from_slice(&[0, 0, 3, 0]);
    prepare.extend_from_slice(&[0u8; 16]);
    assert_eq!(prepare.len(), 72);
    prepare.extend_from_slice(b"g1\0\0\0\0\0\0");
    prepare.extend_from_slice(&words(&[801, 0]));
    prepare.extend_from_slice(&words(&[1663, 5, 16400, 0]));
    prepare.extend_from_slice(&words(&[1663, 5, 16401, 0]));
    let mut running = words(&[2, 1]);
    running.extend_from_slice(&[0, 0, 0, 0]);
    running.extend_from_slice(&words(&[900, 700, 899, 701, 702, 703]));
    let mut relmap = words(&[5, 1663, 16]);
    relmap.extend_from_slice(&[1u8; 16]);
    let mut upd = vec![0u8; 14];
    upd[7] = 3;
    vec![
        RecordSpec::main_data_only(RM_XLOG_ID, records::xlog::XLOG_CHECKPOINT_ONLINE, 0, &cp.encode()),
        RecordSpec::main_data_only(RM_XLOG_ID, records::xlog::XLOG_NEXTOID, 0, &words(&[24576])),
        RecordSpec::main_data_only(RM_XACT_ID, records::xact::XLOG_XACT_COMMIT_PREPARED | 0x80, 0, &commit),
        RecordSpec::main_data_only(RM_XACT_ID, records::xact::XLOG_XACT_ABORT | 0x80, 700, &commit),
        RecordSpec::main_data_only(RM_XACT_ID, records::xact::XLOG_XACT_PREPARE, 800, &prepare),
        RecordSpec::main_data_only(RM_XACT_ID, records::xact::XLOG_XACT_ASSIGNMENT, 0, &words(&[700, 2, 701, 702])),
        RecordSpec::main_data_only(RM_SMGR_ID, records::smgr::XLOG_SMGR_CREATE, 0, &words(&[1663, 5, 16384, 0])),
        RecordSpec::main_data_only(RM_SMGR_ID, records::smgr::XLOG_SMGR_TRUNCATE, 0, &words(&[3, 1663, 5, 16384, 7])),
        RecordSpec::main_data_only(
            RM_DBASE_ID,
            records::dbase::XLOG_DBASE_CREATE_FILE_COPY,
            0,
            &words(&[16384, 1663, 1, 1663]),
        ),
        RecordSpec::main_data_only(RM_DBASE_ID, records::dbase::XLOG_DBASE_CREATE_WAL_LOG, 0, &words(&[16385, 1663])),
        RecordSpec::main_data_only(RM_DBASE_ID, records::dbase::XLOG_DBASE_DROP, 0, &words(&[16384, 2, 1663, 1664])),
        RecordSpec::main_data_only(RM_CLOG_ID, records::clog::CLOG_ZEROPAGE, 0, &words(&[1])),
        RecordSpec::main_data_only(RM_CLOG_ID, records::clog::CLOG_TRUNCATE, 0, &words(&[1, 700, 5])),
        RecordSpec::main_data_only(RM_MULTIXACT_ID, records::multixact::XLOG_MULTIXACT_ZERO_OFF_PAGE, 0, &words(&[0])),
        RecordSpec::main_data_only(
            RM_MULTIXACT_ID,
            records::multixact::XLOG_MULTIXACT_CREATE_ID,
            700,
            &words(&[5, 9, 2, 700, 0, 701, 1]),
        ),
        RecordSpec::main_data_only(
            RM_MULTIXACT_ID,
            records::multixact::XLOG_MULTIXACT_TRUNCATE_ID,
            0,
            &words(&[1, 2, 3, 4, 5]),
        ),
        RecordSpec::main_data_only(RM_RELMAP_ID, records::relmap::XLOG_RELMAP_UPDATE, 0, &relmap),
        RecordSpec::main_data_only(RM_STANDBY_ID, records::standby::XLOG_RUNNING_XACTS, 0, &running),
        RecordSpec::main_data_only(RM_STANDBY_ID, records::standby::XLOG_STANDBY_LOCK, 0, &words(&[1, 700, 5, 16384])),
        RecordSpec {
            rmid: RM_HEAP_ID,
            info: records::heap::XLOG_HEAP_UPDATE,
            xid: 700,
            blocks: vec![block(0, 16384, 9, None, vec![1; 40]), block(1, 16384, 3, Some(lz4), vec![])],
            main_data: upd,
            ..Default::default()
        },
        RecordSpec {
            rmid: RM_HEAP_ID,
            info: records::heap::XLOG_HEAP_INSERT,
            xid: 700,
            blocks: vec![block(0, 16384, 2, Some(ImageSpec::uncompressed(&page, 24, 6976)), vec![5; 30])],
            main_data: vec![1, 0, 1],
            origin: Some(3),
            toplevel_xid: Some(699),
        },
        RecordSpec {
            rmid: RM_BTREE_ID,
            info: 0,
            xid: 700,
            blocks: vec![block(0, 16390, 1, Some(zstd), vec![]), block(2, 16390, 4, Some(pglz), vec![9; 3])],
            main_data: vec![0; 300],
            ..Default::default()
        },
        RecordSpec {
            rmid: RM_HEAP2_ID,
            info: records::heap::XLOG_HEAP2_MULTI_INSERT,
            xid: 700,
            blocks: vec![block(0, 16384, 5, Some(ImageSpec::uncompressed(&page, 0, 0)), vec![])],
            main_data: vec![1, 2, 0, 1, 0, 2, 0],
            ..Default::default()
        },
    ]
}

struct StreamSeed {
    start: Lsn,
    bytes: Vec<u8>,
    records: Vec<WalRecordBytes>,
}

fn decode_stream(
    start: Lsn,
    bytes: &[u8],
    rng: Option<&mut StdRng>,
) -> (Vec<WalRecordBytes>, Option<postgres_ffi::WalDecodeError>) {
    let cfg = WalDecoderConfig { segment_size_bytes: SEG, system_id: Some(SYSID), prev_record_lsn: None };
    let mut d = WalStreamDecoder::with_config(start, cfg).expect("decoder");
    let mut out = Vec::new();
    let mut pos = 0;
    let mut rng = rng;
    while pos < bytes.len() {
        let n = match rng.as_mut() {
            Some(r) => r.gen_range(1..=bytes.len() - pos),
            None => bytes.len() - pos,
        };
        d.feed(&bytes[pos..pos + n]);
        pos += n;
        loop {
            match d.poll_record() {
                Ok(Some(r)) => out.push(r),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, None)
}

fn stream_seeds() -> Vec<StreamSeed> {
    let specs = seed_records();
    let page = 8192u64;
    let base = 3 * SEG as u64 + 5 * page;
    let seg_end = 4 * SEG as u64;
    let mut seeds = Vec::new();
    let layouts: Vec<(Lsn, Option<Lsn>, bool)> = vec![
        (Lsn(base + page - 16), None, false), // header split 16/8
        (Lsn(base + page - 8), None, false),  // header split 8/16
        (Lsn(base + page - 400), None, false),
        (Lsn(seg_end - 600), None, false),         // across a segment boundary
        (Lsn(seg_end - 3000), None, true),         // XLOG_SWITCH, then the next segment
        (Lsn(base), Some(Lsn(base + 304)), false), // start inside a continuation
    ];
    for (i, (start, gap_to, switch)) in layouts.into_iter().enumerate() {
        let mut b = WalBuilder::new(start, Lsn(0x10), SYSID, 1, SEG).unwrap();
        if let Some(target) = gap_to {
            b.continuation_gap_to(target).unwrap();
        }
        for k in 0..5 {
            b.append(&specs[(i * 5 + k) % specs.len()]).unwrap();
        }
        if switch {
            b.append_switch().unwrap();
            b.append(&specs[i]).unwrap();
        }
        let bytes = b.into_bytes();
        let (records, err) = decode_stream(start, &bytes, None);
        assert_eq!(err, None, "seed {i} must decode cleanly");
        assert!(records.len() >= 5, "seed {i}");
        seeds.push(StreamSeed { start, bytes, records });
    }
    seeds
}

/// Everything downstream of the stream decoder, on whatever record came out.
fn exercise_record(raw: Bytes, lsn: Lsn) -> bool {
    let Ok(rec) = decode_record(raw, lsn) else { return false };
    let _ = parse_record_body(&rec);
    for b in &rec.blocks {
        if let Ok(page) = restore_block_image(b, lsn) {
            assert_eq!(page.len(), 8192);
        }
    }
    true
}

#[test]
fn decoders_survive_corrupt_input() {
    let mut rng = StdRng::seed_from_u64(0x5EED_F00D);
    let seeds = stream_seeds();
    let started = std::time::Instant::now();

    let mut stream_errors = 0usize;
    for case in 0..STREAM_CASES {
        let seed = &seeds[case % seeds.len()];
        let mut bytes = seed.bytes.clone();
        let kind = rng.gen_range(0..5);
        match kind {
            0 => bytes.truncate(rng.gen_range(0..bytes.len())),
            1 => {
                for _ in 0..rng.gen_range(1..=8) {
                    let i = rng.gen_range(0..bytes.len());
                    bytes[i] ^= 1 << rng.gen_range(0..8);
                }
            }
            2 => {
                let i = rng.gen_range(0..bytes.len());
                let n = rng.gen_range(1..=64).min(bytes.len() - i);
                rng.fill(&mut bytes[i..i + n]);
            }
            3 => {
                // Interesting values in length-like positions.
                let i = rng.gen_range(0..bytes.len().saturating_sub(4)) & !3;
                let v: u32 = [0, 1, 23, 24, 25, 8192, 0xFFFF, 0x7FFF_FFFF, u32::MAX][rng.gen_range(0..9)];
                bytes[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            _ => {
                let n = rng.gen_range(0..4096);
                bytes = (0..n).map(|_| rng.gen()).collect();
            }
        }
        let (recs, err) = decode_stream(seed.start, &bytes, Some(&mut rng));
        if err.is_some() {
            stream_errors += 1;
        }
        match kind {
            0 => {
                // A truncated stream is not an error: a prefix of the records, then "need more".
                assert_eq!(err, None, "case {case}: truncation must not be an error");
                assert_eq!(&recs[..], &seed.records[..recs.len()], "case {case}");
            }
            1..=3 => {
                for r in &recs {
                    let orig = seed.records.iter().find(|o| o.start_lsn == r.start_lsn);
                    assert_eq!(Some(r), orig, "case {case}: corrupted stream produced a record that was never written");
                }
            }
            _ => {}
        }
        for r in recs {
            exercise_record(r.record, r.start_lsn);
        }
    }

    let specs = seed_records();
    let raws: Vec<Vec<u8>> =
        specs.iter().map(|s| postgres_ffi::wal_writer::encode_record(s, Lsn(0x10)).unwrap()).collect();
    for raw in &raws {
        assert!(exercise_record(Bytes::from(raw.clone()), Lsn(0x100)), "seed records decode");
    }
    let mut record_errors = 0usize;
    for case in 0..RECORD_CASES {
        let mut raw = raws[case % raws.len()].clone();
        match rng.gen_range(0..4) {
            0 => {
                raw.truncate(rng.gen_range(0..raw.len()));
                if raw.len() >= 4 {
                    let n = raw.len() as u32;
                    raw[0..4].copy_from_slice(&n.to_le_bytes());
                }
            }
            1 => {
                for _ in 0..rng.gen_range(1..=6) {
                    let i = rng.gen_range(0..raw.len());
                    raw[i] ^= 1 << rng.gen_range(0..8);
                }
            }
            2 => {
                // Corrupt only the main data or block payload region, keeping lengths sane:
                // this is what reaches the body parsers and decompressors.
                let i = rng.gen_range(24..raw.len());
                let n = rng.gen_range(1..=16).min(raw.len() - i);
                rng.fill(&mut raw[i..i + n]);
            }
            _ => {
                let n = rng.gen_range(0..600);
                raw = (0..n).map(|_| rng.gen()).collect();
                if raw.len() >= 18 && rng.gen_bool(0.5) {
                    let n = raw.len() as u32;
                    raw[0..4].copy_from_slice(&n.to_le_bytes());
                    raw[17] = rng.gen_range(0..22);
                }
            }
        }
        if !exercise_record(Bytes::from(raw), Lsn(0x100)) {
            record_errors += 1;
        }
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{} stream cases ({stream_errors} errors), {} record cases ({record_errors} errors) in {elapsed:?}",
        STREAM_CASES, RECORD_CASES
    );
    assert!(stream_errors > STREAM_CASES / 3 && record_errors > RECORD_CASES / 4);
}
