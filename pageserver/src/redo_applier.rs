//! The seam between the read path and WAL redo (DESIGN D5).
//!
//! A read collects a base image and the records above it ([`crate::reconstruct`]); something
//! must then turn them into the value at the requested LSN. That something is a
//! [`RedoApplier`]. The timeline only knows this trait, so the storage engine, the datadir
//! mapping and ingest can be built and tested without Postgres.
//!
//! Implementations:
//! - [`RustRedoApplier`] (here): applies the records whose effect is simple and exact — clog
//!   commit/abort bits, multixact offsets and members, visibility-map bit clears — and returns
//!   [`RedoError::NeedsPostgres`] for a raw Postgres record.
//! - [`PostgresRedoApplier`] (here): the redo manager of [`crate::walredo`] (a pool of
//!   `postgres --wal-redo` processes) behind this synchronous trait. Chains of Rust-applicable
//!   records never reach Postgres; in a mixed chain, runs of `WalRecord::Postgres` go to the
//!   process pool and the other records to [`apply_rust_record`], so both paths share one
//!   definition of the Rust-applied records.

use std::future::Future;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use postgres_ffi::page::vm_clear_bits;
use postgres_ffi::slru::{
    clog_set_status, clog_xid_to_page, multixact_id_to_offsets_byte, multixact_id_to_offsets_page,
    mx_offset_to_flags_bitshift, mx_offset_to_flags_offset, mx_offset_to_member_offset, mx_offset_to_member_page,
    SlruKind, SLRU_PAGES_PER_SEGMENT, TRANSACTION_STATUS_ABORTED, TRANSACTION_STATUS_COMMITTED,
};
use postgres_ffi::BLCKSZ;
use utils::Lsn;

use crate::key::Key;
use crate::value::WalRecord;
use crate::walredo::{BufferTag, WalRedoManager};

/// Builds a key's value at an LSN from a base image and the records above it.
pub trait RedoApplier: Send + Sync {
    /// The value of `key` at `lsn`: `base_img` (the newest image at or below the oldest record,
    /// with its LSN) with `records` applied, **oldest first**. `base_img` is `None` only when the
    /// first record initialises the value by itself (`will_init`). Callers skip the applier when
    /// there are no records.
    fn apply(
        &self,
        key: Key,
        lsn: Lsn,
        base_img: Option<(Lsn, Bytes)>,
        records: Vec<(Lsn, WalRecord)>,
    ) -> Result<Bytes, RedoError>;
}

/// Why a value could not be rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum RedoError {
    /// The record must be replayed by Postgres, and this applier has no redo process.
    #[error(
        "the record at LSN {lsn} is a Postgres WAL record; applying it needs the Postgres WAL redo \
         process, which this applier does not have"
    )]
    NeedsPostgres { lsn: Lsn },
    /// The first record needs an older version, and there is none.
    #[error("the record at LSN {lsn} modifies an existing page, but no base image was found below it")]
    NoBaseImage { lsn: Lsn },
    /// The record does not fit the page or key it is stored under: a bug in ingest or corruption.
    #[error("record at LSN {lsn} cannot be applied to key {key}: {detail}")]
    Invalid { key: Key, lsn: Lsn, detail: String },
    /// Any other failure of an applier (a redo process crashed, timed out, ...).
    #[error("WAL redo failed: {0}")]
    Other(String),
}

/// Applies the Rust-applicable records; fails on raw Postgres records. Enough for SLRU pages and
/// for pages whose history is images only; the default in tests and tools without Postgres.
#[derive(Debug, Default, Clone, Copy)]
pub struct RustRedoApplier;

impl RedoApplier for RustRedoApplier {
    fn apply(
        &self,
        key: Key,
        _lsn: Lsn,
        base_img: Option<(Lsn, Bytes)>,
        records: Vec<(Lsn, WalRecord)>,
    ) -> Result<Bytes, RedoError> {
        let mut page = match base_img {
            Some((_, img)) => BytesMut::from(&img[..]),
            None => {
                let first_lsn = records.first().map(|(lsn, _)| *lsn).unwrap_or(Lsn::INVALID);
                match records.first() {
                    Some((_, WalRecord::Postgres { .. })) => return Err(RedoError::NeedsPostgres { lsn: first_lsn }),
                    _ => return Err(RedoError::NoBaseImage { lsn: first_lsn }),
                }
            }
        };
        for (rec_lsn, rec) in &records {
            apply_rust_record(key, *rec_lsn, &mut page, rec)?;
        }
        Ok(page.freeze())
    }
}

/// [`RedoApplier`] on top of the Postgres redo process pool ([`WalRedoManager`], async) for the
/// synchronous read path. A chain without `WalRecord::Postgres` records is applied in Rust
/// ([`RustRedoApplier`]); otherwise the chain is split into runs: each run of Postgres records is
/// one redo request on the page so far, each other record is applied in Rust in between.
///
/// Blocking: called outside any tokio runtime, it drives the request with `runtime.block_on`;
/// called from a worker of a multi-thread runtime, inside `block_in_place`. A current-thread
/// runtime cannot be blocked that way (its only thread drives the pipes): such a call fails
/// with an error saying so; call the read path from `spawn_blocking` there.
pub struct PostgresRedoApplier {
    manager: Arc<WalRedoManager>,
    /// The runtime whose I/O and timer drivers serve the redo processes' pipes and timeouts;
    /// it must be a multi-thread runtime (its workers drive I/O while we block).
    runtime: tokio::runtime::Handle,
}

impl PostgresRedoApplier {
    pub fn new(manager: Arc<WalRedoManager>, runtime: tokio::runtime::Handle) -> PostgresRedoApplier {
        PostgresRedoApplier { manager, runtime }
    }

    pub fn manager(&self) -> &Arc<WalRedoManager> {
        &self.manager
    }

    fn block_on<F: Future>(&self, fut: F) -> Result<F::Output, RedoError> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        match Handle::try_current() {
            Err(_) => Ok(self.runtime.block_on(fut)),
            Ok(current) if current.runtime_flavor() == RuntimeFlavor::MultiThread => {
                Ok(tokio::task::block_in_place(|| self.runtime.block_on(fut)))
            }
            Ok(_) => Err(RedoError::Other(
                "Postgres WAL redo was called from a current-thread tokio runtime, which it would block; \
                 run the read path in spawn_blocking or on a multi-thread runtime"
                    .to_string(),
            )),
        }
    }
}

impl RedoApplier for PostgresRedoApplier {
    fn apply(
        &self,
        key: Key,
        lsn: Lsn,
        base_img: Option<(Lsn, Bytes)>,
        records: Vec<(Lsn, WalRecord)>,
    ) -> Result<Bytes, RedoError> {
        let is_postgres = |r: &WalRecord| matches!(r, WalRecord::Postgres { .. });
        if !records.iter().any(|(_, r)| is_postgres(r)) {
            return RustRedoApplier.apply(key, lsn, base_img, records);
        }
        let first_lsn = records.first().map_or(Lsn::INVALID, |(l, _)| *l);
        let Some((rel, blkno)) = key.to_rel_block() else {
            return Err(RedoError::Invalid {
                key,
                lsn: first_lsn,
                detail: "a Postgres WAL record is stored under a key that is not a relation block".to_string(),
            });
        };
        let tag = BufferTag::new(rel, blkno);
        let mut page = base_img;
        let mut rest = &records[..];
        while let Some((rec_lsn, rec)) = rest.first() {
            if is_postgres(rec) {
                let run_len = rest.iter().take_while(|(_, r)| is_postgres(r)).count();
                let run: Vec<(Lsn, Bytes)> = rest[..run_len]
                    .iter()
                    .map(|(l, r)| match r {
                        WalRecord::Postgres { rec, .. } => (*l, rec.clone()),
                        _ => unreachable!("the run holds Postgres records only"),
                    })
                    .collect();
                let run_end = run[run_len - 1].0;
                let result = self
                    .block_on(self.manager.request_redo(tag, page.take(), &run))?
                    .map_err(|e| RedoError::Other(e.to_string()))?;
                page = Some((run_end, result));
                rest = &rest[run_len..];
            } else {
                let Some((_, img)) = page.take() else {
                    return Err(RedoError::NoBaseImage { lsn: *rec_lsn });
                };
                let mut buf = BytesMut::from(&img[..]);
                apply_rust_record(key, *rec_lsn, &mut buf, rec)?;
                page = Some((*rec_lsn, buf.freeze()));
                rest = &rest[1..];
            }
        }
        Ok(page.map(|(_, p)| p).expect("records is not empty, so a page was produced"))
    }
}

/// Applies one Rust-applicable record to `page` (the value of `key`, one 8 KiB block).
/// Everything is checked against the key first: a record that names a transaction, multixact
/// or heap block not on this page is an error, never a write to the wrong place.
pub fn apply_rust_record(key: Key, lsn: Lsn, page: &mut [u8], rec: &WalRecord) -> Result<(), RedoError> {
    let invalid = |detail: String| RedoError::Invalid { key, lsn, detail };
    if page.len() != BLCKSZ {
        return Err(invalid(format!("the base page is {} bytes, not {BLCKSZ}", page.len())));
    }
    match rec {
        WalRecord::Postgres { .. } => Err(RedoError::NeedsPostgres { lsn }),
        WalRecord::ClearVisibilityMapFlags { new_heap_blkno, old_heap_blkno, flags } => {
            let Some((rel, vm_blkno)) = key.to_rel_block() else {
                return Err(invalid("visibility-map record stored under a key that is not a relation block".into()));
            };
            if rel.forknum != postgres_ffi::reltag::VISIBILITYMAP_FORKNUM {
                return Err(invalid(format!("visibility-map record stored under fork {} of {rel}", rel.forknum)));
            }
            // As `visibilitymap_clear` in heap redo: clear the bits, leave the page LSN alone.
            for heap_blkno in [new_heap_blkno, old_heap_blkno].into_iter().flatten() {
                if !vm_clear_bits(page, vm_blkno, *heap_blkno, *flags) {
                    return Err(invalid(format!("heap block {heap_blkno} is not covered by VM block {vm_blkno}")));
                }
            }
            Ok(())
        }
        WalRecord::ClogSetCommitted { xids, .. } | WalRecord::ClogSetAborted { xids } => {
            let pageno =
                slru_pageno(key, SlruKind::Clog).ok_or_else(|| invalid("clog record on a non-clog key".into()))?;
            let status = if matches!(rec, WalRecord::ClogSetCommitted { .. }) {
                TRANSACTION_STATUS_COMMITTED
            } else {
                TRANSACTION_STATUS_ABORTED
            };
            for xid in xids {
                if clog_xid_to_page(*xid) != pageno {
                    return Err(invalid(format!("xid {xid} is not on clog page {pageno}")));
                }
                clog_set_status(page, *xid, status);
            }
            Ok(())
        }
        WalRecord::MultixactOffsetCreate { mid, moff } => {
            let pageno = slru_pageno(key, SlruKind::MultiXactOffsets)
                .ok_or_else(|| invalid("multixact offset record on a non-offsets key".into()))?;
            if multixact_id_to_offsets_page(*mid) != pageno {
                return Err(invalid(format!("multixact {mid} is not on offsets page {pageno}")));
            }
            let at = multixact_id_to_offsets_byte(*mid);
            page[at..at + 4].copy_from_slice(&moff.to_le_bytes());
            Ok(())
        }
        WalRecord::MultixactMembersCreate { moff, members } => {
            let pageno = slru_pageno(key, SlruKind::MultiXactMembers)
                .ok_or_else(|| invalid("multixact members record on a non-members key".into()))?;
            for (i, member) in members.iter().enumerate() {
                let offset = moff.wrapping_add(i as u32);
                if mx_offset_to_member_page(offset) != pageno {
                    return Err(invalid(format!("member offset {offset} is not on members page {pageno}")));
                }
                if member.status > 0xFF {
                    return Err(invalid(format!("member status {} does not fit its 8 flag bits", member.status)));
                }
                // RecordNewMultiXact: status in the group's flag word, xid in its slot.
                let flags_at = mx_offset_to_flags_offset(offset);
                let shift = mx_offset_to_flags_bitshift(offset);
                let mut flags =
                    u32::from_le_bytes([page[flags_at], page[flags_at + 1], page[flags_at + 2], page[flags_at + 3]]);
                flags &= !(0xFFu32 << shift);
                flags |= member.status << shift;
                page[flags_at..flags_at + 4].copy_from_slice(&flags.to_le_bytes());
                let xid_at = mx_offset_to_member_offset(offset);
                page[xid_at..xid_at + 4].copy_from_slice(&member.xid.to_le_bytes());
            }
            Ok(())
        }
    }
}

/// The SLRU page number (segment × 32 + page in segment) of an SLRU block key of `kind`.
fn slru_pageno(key: Key, kind: SlruKind) -> Option<u32> {
    let (k, segno, blkno) = key.to_slru_block()?;
    (k == kind && blkno < SLRU_PAGES_PER_SEGMENT).then(|| segno * SLRU_PAGES_PER_SEGMENT + blkno)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::MultiXactMember;
    use postgres_ffi::page::{vm_bit_location, VISIBILITYMAP_VALID_BITS};
    use postgres_ffi::slru::{clog_get_status, MULTIXACT_MEMBERS_PER_PAGE};
    use postgres_ffi::RelTag;

    fn zero() -> Option<(Lsn, Bytes)> {
        Some((Lsn(1), Bytes::from(vec![0u8; BLCKSZ])))
    }

    #[test]
    fn clog_bits() {
        let key = Key::slru_block(SlruKind::Clog, 0, 1);
        let xid = 32768 + 5;
        let recs = vec![
            (Lsn(10), WalRecord::ClogSetCommitted { xids: vec![xid, xid + 1], timestamp: 7 }),
            (Lsn(20), WalRecord::ClogSetAborted { xids: vec![xid + 1] }),
        ];
        let page = RustRedoApplier.apply(key, Lsn(20), zero(), recs).expect("apply");
        assert_eq!(clog_get_status(&page, xid), Some(TRANSACTION_STATUS_COMMITTED));
        assert_eq!(clog_get_status(&page, xid + 1), Some(TRANSACTION_STATUS_ABORTED));
        // An xid of another page is refused, not written somewhere else.
        let wrong = vec![(Lsn(10), WalRecord::ClogSetCommitted { xids: vec![5], timestamp: 0 })];
        assert!(matches!(RustRedoApplier.apply(key, Lsn(10), zero(), wrong), Err(RedoError::Invalid { .. })));
    }

    #[test]
    fn multixact_pages() {
        let key = Key::slru_block(SlruKind::MultiXactOffsets, 0, 2);
        let mid = 2 * 2048 + 3;
        let recs = vec![(Lsn(5), WalRecord::MultixactOffsetCreate { mid, moff: 0xABCD })];
        let page = RustRedoApplier.apply(key, Lsn(5), zero(), recs).expect("apply");
        assert_eq!(&page[12..16], &0xABCDu32.to_le_bytes());

        let key = Key::slru_block(SlruKind::MultiXactMembers, 0, 1);
        let moff = MULTIXACT_MEMBERS_PER_PAGE + 5;
        let members = vec![MultiXactMember { xid: 900, status: 1 }, MultiXactMember { xid: 901, status: 5 }];
        let recs = vec![(Lsn(5), WalRecord::MultixactMembersCreate { moff, members })];
        let page = RustRedoApplier.apply(key, Lsn(5), zero(), recs).expect("apply");
        // Offset 5 in the page: group 1 (bytes 20..40), slot 1: flags byte 21, xid at 28.
        assert_eq!(page[21], 1);
        assert_eq!(page[22], 5);
        assert_eq!(&page[28..32], &900u32.to_le_bytes());
        assert_eq!(&page[32..36], &901u32.to_le_bytes());
    }

    #[test]
    fn vm_clear_and_postgres_records() {
        let rel = RelTag { spcnode: 1663, dbnode: 5, relnode: 16384, forknum: 2 };
        let key = Key::rel_block(rel, 0);
        let base = Some((Lsn(1), Bytes::from(vec![0xFFu8; BLCKSZ])));
        let recs = vec![(
            Lsn(9),
            WalRecord::ClearVisibilityMapFlags {
                new_heap_blkno: Some(5),
                old_heap_blkno: Some(6),
                flags: VISIBILITYMAP_VALID_BITS,
            },
        )];
        let page = RustRedoApplier.apply(key, Lsn(9), base.clone(), recs).expect("apply");
        let (_, byte, _) = vm_bit_location(5);
        assert_eq!(page[byte], 0b1100_0011);
        assert_eq!(&page[0..8], &[0xFF; 8], "the page LSN is left alone, as in Postgres redo");

        let pg = vec![(Lsn(9), WalRecord::Postgres { will_init: false, rec: Bytes::new() })];
        assert!(matches!(RustRedoApplier.apply(key, Lsn(9), base, pg.clone()), Err(RedoError::NeedsPostgres { .. })));
        assert!(matches!(RustRedoApplier.apply(key, Lsn(9), None, pg), Err(RedoError::NeedsPostgres { .. })));
        let vm = vec![(
            Lsn(9),
            WalRecord::ClearVisibilityMapFlags { new_heap_blkno: Some(1), old_heap_blkno: None, flags: 1 },
        )];
        assert!(matches!(RustRedoApplier.apply(key, Lsn(9), None, vm), Err(RedoError::NoBaseImage { .. })));
    }
}
