//! Tests of the redo pool against our real Postgres build (`postgres/build.sh` must have run):
//! pages rebuilt from real WAL match the data files, and the pool survives crashes, timeouts
//! and concurrent use.
//!
//! Comparing with data files, we mask what Postgres's own WAL consistency checking masks
//! (`heap_mask`, `btree_mask` in Postgres 15), because it changes without WAL:
//! - every page: `pd_checksum`; `pd_prune_xid`; the `PD_PAGE_FULL`, `PD_HAS_FREE_LINES` and
//!   `PD_ALL_VISIBLE` flags; the unused space between `pd_lower` and `pd_upper`;
//! - heap tuples: the transaction hint bits of `t_infomask` (only the xmax ones for tuples
//!   with a frozen xmin), `t_cid` (redo writes `FirstCommandId`), the ctid of speculative
//!   insertions, and the alignment padding after each tuple;
//! - btree pages: line pointer flags on leaf pages (LP_DEAD hints), `BTP_HAS_GARBAGE`,
//!   `BTP_SPLIT_END` and `btpo_cycleid`.
//!
//! `pd_lsn` is not masked: the cluster is checkpointed and stopped cleanly, so every data file
//! page carries the LSN of the last record that changed it, and redo must reproduce it.

mod fixture;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use postgres_ffi::page::{PD_ALL_VISIBLE, PD_HAS_FREE_LINES, PD_PAGE_FULL};
use postgres_ffi::record::ImageCompression;
use postgres_ffi::records::xlog::XLOG_NOOP;
use postgres_ffi::rmgr::RM_XLOG_ID;
use postgres_ffi::wal_writer::{encode_record, RecordSpec};
use postgres_ffi::{RelTag, BLCKSZ};
use utils::Lsn;

use super::*;
use fixture::{fixture, PageKind, RedoCase};

fn manager(process_count: usize) -> WalRedoManager {
    let mut config = WalRedoConfig::new(fixture().install_dir.clone());
    config.process_count = process_count;
    WalRedoManager::new(config).unwrap_or_else(|e| panic!("{e}"))
}

async fn redo_case(mgr: &WalRedoManager, case: &RedoCase) -> Bytes {
    mgr.request_redo(case.tag, case.base.clone(), &case.records)
        .await
        .unwrap_or_else(|e| panic!("redo of {} failed: {e}", case.tag))
}

/// Cases that need the redo process (at least one record to apply).
fn cases_with_records() -> impl Iterator<Item = &'static RedoCase> {
    fixture().cases.iter().filter(|c| !c.records.is_empty())
}

/// The case with the most records: the slowest request the fixture has.
fn longest_case() -> &'static RedoCase {
    fixture().cases.iter().max_by_key(|c| c.records.len()).expect("the workload produced redo cases")
}

fn assert_matches_data_file(case: &RedoCase, page: &[u8]) {
    assert_eq!(page.len(), BLCKSZ, "{}: redo returned {} bytes", case.tag, page.len());
    let got_lsn = postgres_ffi::page::page_get_lsn(page);
    let want_lsn = postgres_ffi::page::page_get_lsn(&case.expected);
    assert_eq!(got_lsn, want_lsn, "{}: page LSN after redo differs from the data file", case.tag);
    let (mut got, mut want) = (page.to_vec(), case.expected.to_vec());
    mask_page(&mut got, case.kind, case.tag.blkno);
    mask_page(&mut want, case.kind, case.tag.blkno);
    if got != want {
        let first = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "{} ({:?}, {} records, base {:?}): redo result differs from the data file at byte {first} \
             (after masking): got {:02x?}, want {:02x?}",
            case.tag,
            case.kind,
            case.records.len(),
            case.base.as_ref().map(|(lsn, _)| *lsn),
            &got[first..(first + 16).min(BLCKSZ)],
            &want[first..(first + 16).min(BLCKSZ)],
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walredo_real_wal_matches_data_files() {
    let mgr = manager(2);
    let cases = &fixture().cases;
    let (mut compared, mut records_applied, mut fpi_only_checked) = (0usize, 0usize, 0usize);
    let mut kinds = HashSet::new();
    let (mut from_image, mut from_will_init, mut multi_block, mut compressed) = (0, 0, 0, 0);
    for case in cases {
        let page = redo_case(&mgr, case).await;
        assert_matches_data_file(case, &page);
        compared += 1;
        records_applied += case.records.len();
        if case.records.is_empty() {
            continue;
        }
        kinds.insert(format!("{:?}", case.kind));
        match &case.base {
            Some(_) => from_image += 1,
            None => from_will_init += 1,
        }
        multi_block += usize::from(case.has_multi_block_record);
        if matches!(case.base_compression, Some(c) if c != ImageCompression::None) {
            compressed += 1;
        }
        // The same chain without the base image, starting at the record that carries the
        // full-page image: Postgres restores the image itself, and the page must be the same.
        if let Some(base_record) = &case.base_record {
            let mut records = vec![base_record.clone()];
            records.extend(case.records.iter().cloned());
            let again = mgr
                .request_redo(case.tag, None, &records)
                .await
                .unwrap_or_else(|e| panic!("redo of {} from its image record failed: {e}", case.tag));
            assert_eq!(again, page, "{}: redo from the image record differs from redo from the image", case.tag);
            fpi_only_checked += 1;
        }
    }
    eprintln!(
        "walredo: compared {compared} blocks with the data files ({records_applied} records applied; \
         with records: {from_image} from an image, {from_will_init} from a will-init record, \
         {multi_block} with multi-block records, {compressed} from compressed images; \
         {fpi_only_checked} also replayed from the image record)"
    );
    assert!(kinds.contains("Heap") && kinds.contains("Btree"), "expected heap and btree blocks, got {kinds:?}");
    assert!(from_image >= 5, "only {from_image} blocks start from an image and have records");
    assert!(from_will_init >= 5, "only {from_will_init} blocks start from a will-init record");
    assert!(multi_block >= 1, "no block saw a record touching several blocks");
    assert!(compressed >= 1, "no block starts from a compressed image");
    assert!(compared >= 30, "only {compared} blocks compared");
    mgr.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walredo_crashed_process_is_replaced() {
    let mgr = manager(1);
    let case = longest_case();
    let good = redo_case(&mgr, case).await;
    assert_eq!(mgr.processes_started(), 1);

    // A record with a bad CRC: the process reports it and exits; only this request fails.
    let mut records = case.records.clone();
    let (lsn, rec) = records.last().cloned().expect("longest case has records");
    let mut corrupt = rec.to_vec();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xFF;
    *records.last_mut().expect("non-empty") = (lsn, Bytes::from(corrupt));
    let err = mgr.request_redo(case.tag, case.base.clone(), &records).await.expect_err("corrupt record must fail");
    let text = err.to_string();
    assert!(matches!(err, WalRedoError::Redo { .. }), "unexpected error kind: {text}");
    assert!(text.contains("bad CRC") && text.contains(&case.tag.to_string()), "error lacks the cause: {text}");
    assert_eq!(redo_case(&mgr, case).await, good);
    assert_eq!(mgr.processes_started(), 2);

    // A record that needs a base image sent without one: Postgres's redo PANICs.
    let non_init = cases_with_records().find(|c| c.base.is_some()).expect("a case starting from an image");
    let err = mgr.request_redo(non_init.tag, None, &non_init.records).await.expect_err("missing base must fail");
    assert!(matches!(err, WalRedoError::Redo { .. }), "unexpected error: {err}");
    assert_eq!(redo_case(&mgr, case).await, good);
    assert_eq!(mgr.processes_started(), 3);

    // A process killed while idle is noticed and replaced before the next request uses it.
    let pids = mgr.idle_pids();
    assert_eq!(pids.len(), 1);
    let status = std::process::Command::new("kill").args(["-9", &pids[0].to_string()]).status().expect("run kill");
    assert!(status.success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(redo_case(&mgr, case).await, good);
    assert_eq!(mgr.processes_started(), 4);
    mgr.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walredo_timeout_kills_the_process() {
    let mgr = manager(1);
    let case = longest_case();
    let good = redo_case(&mgr, case).await;

    // The case's records plus two 32 MiB XLOG_NOOP records: tens of milliseconds of piping
    // and CRC checking, far beyond a 1 ms timeout, and no change to the page.
    let mut records = case.records.clone();
    let mut lsn = records.last().expect("longest case has records").0;
    for _ in 0..2 {
        let spec = RecordSpec::main_data_only(RM_XLOG_ID, XLOG_NOOP, 0, &vec![0x4E; 32 << 20]);
        let noop = encode_record(&spec, lsn).expect("encode XLOG_NOOP");
        lsn = Lsn(lsn.0 + postgres_ffi::maxalign(noop.len()) as u64);
        records.push((lsn, Bytes::from(noop)));
    }

    mgr.set_request_timeout(Duration::from_millis(1));
    let err = mgr.request_redo(case.tag, case.base.clone(), &records).await.expect_err("must time out");
    assert!(matches!(err, WalRedoError::Timeout { .. }), "unexpected error: {err}");
    assert!(err.to_string().contains("SIGKILL"), "the process should have been killed: {err}");

    mgr.set_request_timeout(WalRedoConfig::DEFAULT_REQUEST_TIMEOUT);
    assert_eq!(mgr.request_redo(case.tag, case.base.clone(), &records).await.expect("redo with NOOPs"), good);
    assert_eq!(mgr.processes_started(), 2, "the timed-out process must have been replaced");
    mgr.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walredo_concurrent_requests_use_separate_processes() {
    let mgr = Arc::new(manager(2));
    let cases: Vec<&'static RedoCase> = cases_with_records().take(24).collect();
    assert!(cases.len() >= 8, "the workload produced only {} cases with records", cases.len());
    let mut tasks = tokio::task::JoinSet::new();
    for case in cases {
        let mgr = Arc::clone(&mgr);
        tasks.spawn(async move {
            let page = redo_case(&mgr, case).await;
            assert_matches_data_file(case, &page);
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("redo task panicked");
    }
    // Requests overlapped (both slots started a process) but never exceeded the pool.
    assert_eq!(mgr.processes_started(), 2);
    mgr.shut_down().await;
}

#[test]
fn walredo_rejects_invalid_requests_without_a_process() {
    let tag = BufferTag::new(RelTag { spcnode: 1663, dbnode: 5, relnode: 16384, forknum: 0 }, 3);
    let page = Bytes::from(vec![0u8; BLCKSZ]);
    let mut record = vec![0u8; 24];
    record[0] = 24; // xl_tot_len
    let record = Bytes::from(record);
    let check = |base: Option<(Lsn, Bytes)>, records: &[(Lsn, Bytes)], needle: &str| {
        let err = validate_request(&tag, base.as_ref(), records).expect_err("must be rejected");
        assert!(matches!(err, WalRedoError::InvalidRequest { .. }));
        let text = err.to_string();
        assert!(text.contains(needle) && text.contains("1663/5/16384 block 3"), "{text}");
    };
    check(None, &[], "nothing to reconstruct");
    check(Some((Lsn(0x100), Bytes::from(vec![0u8; 100]))), &[], "expected 8192");
    check(Some((Lsn(0x100), page.clone())), &[(Lsn(0x100), record.clone())], "not newer");
    check(None, &[(Lsn(0x200), record.clone()), (Lsn(0x100), record.clone())], "ascending");
    check(None, &[(Lsn(0x200), Bytes::from_static(&[1, 2, 3]))], "shorter than its 24-byte header");
    check(None, &[(Lsn(0x200), Bytes::from(vec![0u8; 30]))], "xl_tot_len");
    let bad_fork = BufferTag::new(RelTag { forknum: 9, ..tag.rel }, 3);
    assert!(validate_request(&bad_fork, Some(&(Lsn(1), page.clone())), &[]).is_err());
    assert!(validate_request(&tag, Some(&(Lsn(0x100), page)), &[(Lsn(0x200), record)]).is_ok());
}

// ---- masking (see the module comment) ----

const SIZE_OF_PAGE_HEADER: usize = 24;
const LP_UNUSED: u32 = 0;
const LP_NORMAL: u32 = 1;
const HEAP_XMIN_COMMITTED: u16 = 0x0100;
const HEAP_XMIN_INVALID: u16 = 0x0200;
const HEAP_XMIN_FROZEN: u16 = HEAP_XMIN_COMMITTED | HEAP_XMIN_INVALID;
const HEAP_XMAX_COMMITTED: u16 = 0x0400;
const HEAP_XMAX_INVALID: u16 = 0x0800;
const HEAP_XACT_MASK: u16 = 0xFFF0;
const SPEC_TOKEN_OFFSET_NUMBER: u16 = 0xFFFE;
const BTP_LEAF: u16 = 1 << 0;
const BTP_SPLIT_END: u16 = 1 << 5;
const BTP_HAS_GARBAGE: u16 = 1 << 6;

fn u16_at(p: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([p[o], p[o + 1]])
}

fn put_u16(p: &mut [u8], o: usize, v: u16) {
    p[o..o + 2].copy_from_slice(&v.to_le_bytes());
}

fn u32_at(p: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([p[o], p[o + 1], p[o + 2], p[o + 3]])
}

/// Line pointers: (offset of the ItemIdData, lp_off, lp_flags, lp_len).
fn line_pointers(p: &[u8]) -> Vec<(usize, usize, u32, usize)> {
    let pd_lower = u16_at(p, 12) as usize;
    let count = pd_lower.saturating_sub(SIZE_OF_PAGE_HEADER) / 4;
    (0..count)
        .map(|i| {
            let at = SIZE_OF_PAGE_HEADER + 4 * i;
            let v = u32_at(p, at);
            (at, (v & 0x7FFF) as usize, (v >> 15) & 0x3, (v >> 17) as usize)
        })
        .collect()
}

fn mask_page(p: &mut [u8], kind: PageKind, blkno: u32) {
    if p.iter().all(|&b| b == 0) {
        return;
    }
    let (pd_lower, pd_upper, pd_special) = (u16_at(p, 12) as usize, u16_at(p, 14) as usize, u16_at(p, 16) as usize);
    assert!(
        SIZE_OF_PAGE_HEADER <= pd_lower && pd_lower <= pd_upper && pd_upper <= pd_special && pd_special <= BLCKSZ,
        "page header is not sane: lower {pd_lower} upper {pd_upper} special {pd_special}"
    );
    // Header: checksum, hint flags, prune xid.
    put_u16(p, 8, 0);
    put_u16(p, 10, u16_at(p, 10) & !(PD_PAGE_FULL | PD_HAS_FREE_LINES | PD_ALL_VISIBLE));
    p[20..24].fill(0);
    p[pd_lower..pd_upper].fill(0);

    match kind {
        PageKind::Heap => {
            for (i, (_, off, flags, len)) in line_pointers(p).into_iter().enumerate() {
                if flags == LP_NORMAL && off + 24 <= BLCKSZ {
                    let infomask = u16_at(p, off + 20);
                    let masked = if infomask & HEAP_XMIN_FROZEN != HEAP_XMIN_FROZEN {
                        infomask & !HEAP_XACT_MASK
                    } else {
                        infomask & !(HEAP_XMAX_INVALID | HEAP_XMAX_COMMITTED)
                    };
                    put_u16(p, off + 20, masked);
                    p[off + 8..off + 12].fill(0); // t_cid
                    if u16_at(p, off + 16) == SPEC_TOKEN_OFFSET_NUMBER {
                        // ctid := (blkno, own offset)
                        put_u16(p, off + 12, (blkno >> 16) as u16);
                        put_u16(p, off + 14, blkno as u16);
                        put_u16(p, off + 16, (i + 1) as u16);
                    }
                }
                if len > 0 && flags != LP_UNUSED {
                    let padded = postgres_ffi::maxalign(len);
                    let end = (off + padded).min(BLCKSZ);
                    if off + len < end {
                        p[off + len..end].fill(0);
                    }
                }
            }
        }
        PageKind::Btree => {
            // BTPageOpaqueData: btpo_prev, btpo_next, btpo_level (u32), btpo_flags, btpo_cycleid (u16).
            let flags_at = pd_special + 12;
            if flags_at + 4 <= BLCKSZ {
                let flags = u16_at(p, flags_at);
                if flags & BTP_LEAF != 0 {
                    for (at, _, lp_flags, _) in line_pointers(p) {
                        if lp_flags != LP_UNUSED {
                            let v = u32_at(p, at) & !(0x3 << 15);
                            p[at..at + 4].copy_from_slice(&v.to_le_bytes());
                        }
                    }
                }
                put_u16(p, flags_at, flags & !(BTP_HAS_GARBAGE | BTP_SPLIT_END));
                put_u16(p, flags_at + 2, 0);
            }
        }
    }
}
