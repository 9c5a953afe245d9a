//! Storage keys: every piece of state the pageserver keeps for a timeline is a value under an
//! 18-byte [`Key`], versioned by LSN (DESIGN D6).
//!
//! A key is six fixed-width fields compared in order, which is the same order as their
//! big-endian encoding, so sorted layer files and B-tree indexes work on raw bytes:
//!
//! ```text
//!  field1 u8 | field2 u32 | field3 u32 | field4 u32 | field5 u8 | field6 u32      (18 bytes, BE)
//!
//!  relation block       00 | spcnode | dbnode | relnode (≠0) | fork | blkno
//!  relation size        00 | spcnode | dbnode | relnode (≠0) | fork | FFFFFFFF
//!  relmapper file       00 | spcnode | dbnode | 00000000     | 00   | 00000000
//!  relation directory   00 | spcnode | dbnode | 00000000     | 00   | 00000001
//!  database directory   00 | 00000000| 00000000| 00000000    | 00   | 00000000   (= Key::MIN)
//!  SLRU directory       01 | kind    | 00000000| 00000000    | 00   | 00000000
//!  SLRU block           01 | kind    | 00000001| segno       | 00   | blkno
//!  SLRU segment size    01 | kind    | 00000001| segno       | 00   | FFFFFFFF
//!  twophase directory   02 | 0       | 0       | 0           | 00   | 00000000
//!  twophase file        02 | 0       | 0       | 0           | 01   | xid
//!  control file         03 | 0       | 0       | 0           | 00   | 00000000
//!  checkpoint           03 | 0       | 0       | 0           | 00   | 00000001
//!  last commit          03 | 0       | 0       | 0           | 00   | 00000002
//! ```
//!
//! Why this shape: all keys of one relation fork (its blocks, then its size) are contiguous, all
//! keys of one database (relmapper, relation directory, every relation) are contiguous, so
//! "drop database" and "truncate relation" are key-range operations and compaction partitions
//! by key range without splitting a relation needlessly. `relnode` 0 (`InvalidOid`) never names a
//! relation in Postgres, which is what frees that slot for per-database metadata; ingest must
//! reject a WAL block reference with relnode 0 before building a key from it.
//! `blkno` 0xFFFFFFFF is `InvalidBlockNumber`, so the size key cannot collide with a block.
//! [`Key::MAX`] (all 0xFF) is never stored: it is the exclusive end of the full key range.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use postgres_ffi::slru::SlruKind;
use postgres_ffi::{BlockNumber, Oid, RelTag, TransactionId};

/// Encoded size of a [`Key`].
pub const KEY_SIZE_BYTES: usize = 18;

const KIND_REL: u8 = 0x00;
const KIND_SLRU: u8 = 0x01;
const KIND_TWOPHASE: u8 = 0x02;
const KIND_CONTROL: u8 = 0x03;

const REL_SIZE_BLKNO: u32 = u32::MAX;
const RELMAP_FIELD6: u32 = 0;
const RELDIR_FIELD6: u32 = 1;
const SLRU_DIR_FIELD3: u32 = 0;
const SLRU_SEGMENT_FIELD3: u32 = 1;
const TWOPHASE_FILE_FIELD5: u8 = 1;
const CONTROLFILE_FIELD6: u32 = 0;
const CHECKPOINT_FIELD6: u32 = 1;
const LAST_COMMIT_FIELD6: u32 = 2;
const STANDBY_START_FIELD6: u32 = 3;

/// An 18-byte storage key; see the module docs for the layout. Field order = sort order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Key {
    pub field1: u8,
    pub field2: u32,
    pub field3: u32,
    pub field4: u32,
    pub field5: u8,
    pub field6: u32,
}

/// Error from decoding a key from bytes or hex.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyParseError {
    #[error("key must be {KEY_SIZE_BYTES} bytes, got {0}")]
    WrongLength(usize),
    #[error("key must be 36 hex digits: '{0}'")]
    BadHex(String),
}

impl Key {
    /// The smallest key (also the database directory key).
    pub const MIN: Key = Key { field1: 0, field2: 0, field3: 0, field4: 0, field5: 0, field6: 0 };
    /// The largest encodable key; reserved as the exclusive end of the full key range, never stored.
    pub const MAX: Key =
        Key { field1: 0xFF, field2: u32::MAX, field3: u32::MAX, field4: u32::MAX, field5: 0xFF, field6: u32::MAX };

    /// Big-endian encoding; byte order equals key order.
    pub fn to_be_bytes(&self) -> [u8; KEY_SIZE_BYTES] {
        let mut out = [0u8; KEY_SIZE_BYTES];
        out[0] = self.field1;
        out[1..5].copy_from_slice(&self.field2.to_be_bytes());
        out[5..9].copy_from_slice(&self.field3.to_be_bytes());
        out[9..13].copy_from_slice(&self.field4.to_be_bytes());
        out[13] = self.field5;
        out[14..18].copy_from_slice(&self.field6.to_be_bytes());
        out
    }

    /// Inverse of [`Key::to_be_bytes`]; every 18-byte string is a valid key.
    pub fn from_be_bytes(b: &[u8; KEY_SIZE_BYTES]) -> Key {
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Key { field1: b[0], field2: u32_at(1), field3: u32_at(5), field4: u32_at(9), field5: b[13], field6: u32_at(14) }
    }

    /// Decodes from a slice that must be exactly [`KEY_SIZE_BYTES`] long.
    pub fn from_slice(b: &[u8]) -> Result<Key, KeyParseError> {
        let arr: &[u8; KEY_SIZE_BYTES] = b.try_into().map_err(|_| KeyParseError::WrongLength(b.len()))?;
        Ok(Key::from_be_bytes(arr))
    }

    /// The key right after this one (as an 18-byte big-endian integer plus one).
    ///
    /// Panics on [`Key::MAX`]: nothing follows the reserved end-of-range key, and asking for it is
    /// a bug in the caller, not a data problem.
    pub fn next(&self) -> Key {
        self.checked_next().expect("Key::MAX has no successor")
    }

    /// [`Key::next`] without the panic.
    pub fn checked_next(&self) -> Option<Key> {
        let mut bytes = self.to_be_bytes();
        for b in bytes.iter_mut().rev() {
            let (v, overflow) = b.overflowing_add(1);
            *b = v;
            if !overflow {
                return Some(Key::from_be_bytes(&bytes));
            }
        }
        None
    }

    // --- relations

    /// Block `blkno` of relation fork `rel`. `rel.relnode` must not be 0 (see module docs).
    pub fn rel_block(rel: RelTag, blkno: BlockNumber) -> Key {
        debug_assert!(rel.relnode != 0, "relnode 0 is reserved for per-database metadata");
        debug_assert!(blkno != REL_SIZE_BLKNO, "InvalidBlockNumber is the relation size key");
        Key {
            field1: KIND_REL,
            field2: rel.spcnode,
            field3: rel.dbnode,
            field4: rel.relnode,
            field5: rel.forknum,
            field6: blkno,
        }
    }

    /// The size (in blocks) of relation fork `rel`.
    pub fn rel_size(rel: RelTag) -> Key {
        debug_assert!(rel.relnode != 0, "relnode 0 is reserved for per-database metadata");
        Key {
            field1: KIND_REL,
            field2: rel.spcnode,
            field3: rel.dbnode,
            field4: rel.relnode,
            field5: rel.forknum,
            field6: REL_SIZE_BLKNO,
        }
    }

    /// All keys of one relation fork: its blocks and its size key.
    pub fn rel_key_range(rel: RelTag) -> KeyRange {
        let start = Key { field6: 0, ..Key::rel_size(rel) };
        KeyRange::new(start, Key::rel_size(rel).next())
    }

    /// All keys of one database: relmapper, relation directory and every relation in it.
    pub fn db_key_range(spcnode: Oid, dbnode: Oid) -> KeyRange {
        let start = Key::relmap_file(spcnode, dbnode);
        let end = Key { field4: u32::MAX, field5: u8::MAX, field6: u32::MAX, ..start }.next();
        KeyRange::new(start, end)
    }

    /// The directory of databases: which (spcnode, dbnode) pairs exist.
    pub const fn dbdir() -> Key {
        Key::MIN
    }

    /// The directory of relations in one database.
    pub fn rel_dir(spcnode: Oid, dbnode: Oid) -> Key {
        Key { field1: KIND_REL, field2: spcnode, field3: dbnode, field4: 0, field5: 0, field6: RELDIR_FIELD6 }
    }

    /// The `pg_filenode.map` of one database (spcnode = global tablespace, dbnode 0 for shared).
    pub fn relmap_file(spcnode: Oid, dbnode: Oid) -> Key {
        Key { field1: KIND_REL, field2: spcnode, field3: dbnode, field4: 0, field5: 0, field6: RELMAP_FIELD6 }
    }

    pub fn is_rel_block_key(&self) -> bool {
        self.field1 == KIND_REL && self.field4 != 0 && self.field6 != REL_SIZE_BLKNO
    }

    pub fn is_rel_size_key(&self) -> bool {
        self.field1 == KIND_REL && self.field4 != 0 && self.field6 == REL_SIZE_BLKNO
    }

    pub fn is_dbdir_key(&self) -> bool {
        *self == Key::dbdir()
    }

    pub fn is_rel_dir_key(&self) -> bool {
        self.field1 == KIND_REL
            && self.field4 == 0
            && self.field5 == 0
            && self.field6 == RELDIR_FIELD6
            && (self.field2, self.field3) != (0, 0)
    }

    pub fn is_relmap_key(&self) -> bool {
        self.field1 == KIND_REL
            && self.field4 == 0
            && self.field5 == 0
            && self.field6 == RELMAP_FIELD6
            && (self.field2, self.field3) != (0, 0)
    }

    /// For a relation block or size key: the relation fork it belongs to.
    pub fn rel_tag(&self) -> Option<RelTag> {
        (self.field1 == KIND_REL && self.field4 != 0).then_some(RelTag {
            spcnode: self.field2,
            dbnode: self.field3,
            relnode: self.field4,
            forknum: self.field5,
        })
    }

    /// For a relation block key: (relation fork, block number).
    pub fn to_rel_block(&self) -> Option<(RelTag, BlockNumber)> {
        if !self.is_rel_block_key() {
            return None;
        }
        Some((self.rel_tag()?, self.field6))
    }

    /// For a relmapper or relation-directory key: (spcnode, dbnode).
    pub fn db_of_metadata_key(&self) -> Option<(Oid, Oid)> {
        (self.is_rel_dir_key() || self.is_relmap_key()).then_some((self.field2, self.field3))
    }

    // --- SLRUs

    /// Which segments exist for one SLRU.
    pub fn slru_dir(kind: SlruKind) -> Key {
        Key {
            field1: KIND_SLRU,
            field2: slru_kind_to_u32(kind),
            field3: SLRU_DIR_FIELD3,
            field4: 0,
            field5: 0,
            field6: 0,
        }
    }

    /// Page `blkno` (within the segment) of SLRU segment `segno`.
    pub fn slru_block(kind: SlruKind, segno: u32, blkno: BlockNumber) -> Key {
        debug_assert!(blkno != REL_SIZE_BLKNO, "0xFFFFFFFF is the segment size key");
        Key {
            field1: KIND_SLRU,
            field2: slru_kind_to_u32(kind),
            field3: SLRU_SEGMENT_FIELD3,
            field4: segno,
            field5: 0,
            field6: blkno,
        }
    }

    /// Size in pages of SLRU segment `segno`.
    pub fn slru_segment_size(kind: SlruKind, segno: u32) -> Key {
        Key {
            field1: KIND_SLRU,
            field2: slru_kind_to_u32(kind),
            field3: SLRU_SEGMENT_FIELD3,
            field4: segno,
            field5: 0,
            field6: REL_SIZE_BLKNO,
        }
    }

    /// All keys of one SLRU segment: its pages and its size key.
    pub fn slru_segment_key_range(kind: SlruKind, segno: u32) -> KeyRange {
        KeyRange::new(Key::slru_block(kind, segno, 0), Key::slru_segment_size(kind, segno).next())
    }

    pub fn is_slru_dir_key(&self) -> bool {
        self.field1 == KIND_SLRU
            && slru_kind_from_u32(self.field2).is_some()
            && self.field3 == SLRU_DIR_FIELD3
            && (self.field4, self.field5, self.field6) == (0, 0, 0)
    }

    pub fn is_slru_block_key(&self) -> bool {
        self.field1 == KIND_SLRU
            && slru_kind_from_u32(self.field2).is_some()
            && self.field3 == SLRU_SEGMENT_FIELD3
            && self.field5 == 0
            && self.field6 != REL_SIZE_BLKNO
    }

    pub fn is_slru_segment_size_key(&self) -> bool {
        self.field1 == KIND_SLRU
            && slru_kind_from_u32(self.field2).is_some()
            && self.field3 == SLRU_SEGMENT_FIELD3
            && self.field5 == 0
            && self.field6 == REL_SIZE_BLKNO
    }

    /// For an SLRU directory key: its kind.
    pub fn to_slru_dir(&self) -> Option<SlruKind> {
        if !self.is_slru_dir_key() {
            return None;
        }
        slru_kind_from_u32(self.field2)
    }

    /// For an SLRU block key: (kind, segno, blkno).
    pub fn to_slru_block(&self) -> Option<(SlruKind, u32, BlockNumber)> {
        if !self.is_slru_block_key() {
            return None;
        }
        Some((slru_kind_from_u32(self.field2)?, self.field4, self.field6))
    }

    /// For an SLRU segment size key: (kind, segno).
    pub fn to_slru_segment_size(&self) -> Option<(SlruKind, u32)> {
        if !self.is_slru_segment_size_key() {
            return None;
        }
        Some((slru_kind_from_u32(self.field2)?, self.field4))
    }

    // --- twophase, control file, checkpoint

    /// Which prepared transactions exist.
    pub const fn twophase_dir() -> Key {
        Key { field1: KIND_TWOPHASE, field2: 0, field3: 0, field4: 0, field5: 0, field6: 0 }
    }

    /// The state file of prepared transaction `xid`.
    pub const fn twophase_file(xid: TransactionId) -> Key {
        Key { field1: KIND_TWOPHASE, field2: 0, field3: 0, field4: 0, field5: TWOPHASE_FILE_FIELD5, field6: xid }
    }

    /// `global/pg_control`.
    pub const fn controlfile() -> Key {
        Key { field1: KIND_CONTROL, field2: 0, field3: 0, field4: 0, field5: 0, field6: CONTROLFILE_FIELD6 }
    }

    /// The latest `CheckPoint` struct seen in WAL.
    pub const fn checkpoint() -> Key {
        Key { field1: KIND_CONTROL, field2: 0, field3: 0, field4: 0, field5: 0, field6: CHECKPOINT_FIELD6 }
    }

    /// The latest transaction commit (its timestamp and LSNs), written at every commit so the
    /// LSN of a point in time can be found (see `pgdatadir_mapping`'s `find_lsn_by_timestamp`).
    pub const fn last_commit() -> Key {
        Key { field1: KIND_CONTROL, field2: 0, field3: 0, field4: 0, field5: 0, field6: LAST_COMMIT_FIELD6 }
    }

    /// The latest `XLOG_RUNNING_XACTS` record (its start LSN and exact bytes): where a hot
    /// standby can begin replay with a snapshot ready (see `basebackup`'s standby backups).
    pub const fn standby_start() -> Key {
        Key { field1: KIND_CONTROL, field2: 0, field3: 0, field4: 0, field5: 0, field6: STANDBY_START_FIELD6 }
    }

    pub fn is_standby_start_key(&self) -> bool {
        *self == Key::standby_start()
    }

    pub fn is_twophase_dir_key(&self) -> bool {
        *self == Key::twophase_dir()
    }

    /// For a twophase file key: the prepared transaction's xid.
    pub fn to_twophase_file(&self) -> Option<TransactionId> {
        (self.field1 == KIND_TWOPHASE
            && (self.field2, self.field3, self.field4) == (0, 0, 0)
            && self.field5 == TWOPHASE_FILE_FIELD5)
            .then_some(self.field6)
    }

    pub fn is_controlfile_key(&self) -> bool {
        *self == Key::controlfile()
    }

    pub fn is_checkpoint_key(&self) -> bool {
        *self == Key::checkpoint()
    }

    pub fn is_last_commit_key(&self) -> bool {
        *self == Key::last_commit()
    }
}

fn slru_kind_to_u32(kind: SlruKind) -> u32 {
    match kind {
        SlruKind::Clog => 0,
        SlruKind::MultiXactOffsets => 1,
        SlruKind::MultiXactMembers => 2,
    }
}

fn slru_kind_from_u32(v: u32) -> Option<SlruKind> {
    match v {
        0 => Some(SlruKind::Clog),
        1 => Some(SlruKind::MultiXactOffsets),
        2 => Some(SlruKind::MultiXactMembers),
        _ => None,
    }
}

/// 36 lowercase hex digits: the form used in layer file names.
impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.to_be_bytes()))
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02X}.{:08X}.{:08X}.{:08X}.{:02X}.{:08X}",
            self.field1, self.field2, self.field3, self.field4, self.field5, self.field6
        )
    }
}

impl FromStr for Key {
    type Err = KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; KEY_SIZE_BYTES];
        if s.len() != KEY_SIZE_BYTES * 2 {
            return Err(KeyParseError::BadHex(s.chars().take(80).collect()));
        }
        hex::decode_to_slice(s, &mut out).map_err(|_| KeyParseError::BadHex(s.to_string()))?;
        Ok(Key::from_be_bytes(&out))
    }
}

/// A half-open range of keys `[start, end)`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyRange {
    pub start: Key,
    pub end: Key,
}

impl KeyRange {
    /// Panics if `start > end` (an empty range, `start == end`, is allowed).
    pub fn new(start: Key, end: Key) -> KeyRange {
        assert!(start <= end, "key range start {start} is after its end {end}");
        KeyRange { start, end }
    }

    /// Every storable key.
    pub const fn full() -> KeyRange {
        KeyRange { start: Key::MIN, end: Key::MAX }
    }

    /// The range holding just `key`.
    pub fn single(key: Key) -> KeyRange {
        KeyRange::new(key, key.next())
    }

    pub fn is_full(&self) -> bool {
        *self == KeyRange::full()
    }

    pub fn is_empty(&self) -> bool {
        self.start >= self.end
    }

    pub fn contains(&self, key: &Key) -> bool {
        self.start <= *key && *key < self.end
    }

    /// True if `other` lies entirely inside this range (an empty `other` always does).
    pub fn contains_range(&self, other: &KeyRange) -> bool {
        other.is_empty() || (self.start <= other.start && other.end <= self.end)
    }

    pub fn overlaps(&self, other: &KeyRange) -> bool {
        !self.is_empty() && !other.is_empty() && self.start < other.end && other.start < self.end
    }

    /// The overlap of two ranges (empty, anchored at the larger start, if they do not overlap).
    pub fn intersect(&self, other: &KeyRange) -> KeyRange {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end).max(start);
        KeyRange { start, end }
    }
}

impl From<Range<Key>> for KeyRange {
    fn from(r: Range<Key>) -> KeyRange {
        KeyRange::new(r.start, r.end)
    }
}

impl fmt::Display for KeyRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

impl fmt::Debug for KeyRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}..{:?}", self.start, self.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_ffi::reltag::{FSM_FORKNUM, MAIN_FORKNUM, VISIBILITYMAP_FORKNUM};
    use rand::{Rng, SeedableRng};

    fn rel(spc: u32, db: u32, relnode: u32, fork: u8) -> RelTag {
        RelTag { spcnode: spc, dbnode: db, relnode, forknum: fork }
    }

    fn random_key(rng: &mut impl Rng) -> Key {
        // Small alphabets per field make equal prefixes (and so the later fields) matter.
        let pick = |rng: &mut dyn rand::RngCore, choices: &[u32]| -> u32 {
            if rng.gen_bool(0.5) {
                choices[rng.gen_range(0..choices.len())]
            } else {
                rng.next_u32()
            }
        };
        Key {
            field1: pick(rng, &[0, 1, 0xFF]) as u8,
            field2: pick(rng, &[0, 1663, u32::MAX]),
            field3: pick(rng, &[0, 5, u32::MAX]),
            field4: pick(rng, &[0, 16384, u32::MAX]),
            field5: pick(rng, &[0, 1, 0xFF]) as u8,
            field6: pick(rng, &[0, 1, u32::MAX]),
        }
    }

    #[test]
    fn encode_decode_property() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b6579);
        let mut prev: Option<Key> = None;
        for _ in 0..20_000 {
            let k = random_key(&mut rng);
            let bytes = k.to_be_bytes();
            assert_eq!(Key::from_be_bytes(&bytes), k);
            assert_eq!(Key::from_slice(&bytes), Ok(k));
            assert_eq!(k.to_string().parse::<Key>(), Ok(k));
            if let Some(p) = prev {
                // Field order and byte order agree.
                assert_eq!(p.cmp(&k), p.to_be_bytes().cmp(&bytes), "{p:?} vs {k:?}");
            }
            if let Some(n) = k.checked_next() {
                assert!(n > k);
                // Nothing lies strictly between a key and its successor: as a 144-bit integer
                // (16-bit high part, 128-bit low part) the successor is exactly one more.
                let split = |k: &Key| {
                    let b = k.to_be_bytes();
                    let lo: [u8; 16] = b[2..].try_into().expect("16 bytes");
                    (u16::from_be_bytes([b[0], b[1]]), u128::from_be_bytes(lo))
                };
                let (k_hi, k_lo) = split(&k);
                let expected = match k_lo.checked_add(1) {
                    Some(lo) => (k_hi, lo),
                    None => (k_hi + 1, 0),
                };
                assert_eq!(split(&n), expected);
            } else {
                assert_eq!(k, Key::MAX);
            }
            prev = Some(k);
        }
        assert_eq!(Key::from_slice(&[0u8; 17]), Err(KeyParseError::WrongLength(17)));
        assert!("zz".parse::<Key>().is_err());
        assert!("g".repeat(36).parse::<Key>().is_err());
    }

    #[test]
    fn next_carries_across_fields() {
        let k = Key { field6: u32::MAX, ..Key::MIN };
        assert_eq!(k.next(), Key { field5: 1, ..Key::MIN });
        assert_eq!(Key::MIN.next(), Key { field6: 1, ..Key::MIN });
        assert_eq!(Key::MAX.checked_next(), None);
    }

    #[test]
    fn ordering_groups_relations_and_databases() {
        let r = rel(1663, 5, 16384, MAIN_FORKNUM);
        let blocks: Vec<Key> = (0..10).map(|b| Key::rel_block(r, b)).collect();
        assert!(blocks.windows(2).all(|w| w[0] < w[1]));
        let size = Key::rel_size(r);
        assert!(blocks.iter().all(|b| *b < size));
        // Relation range holds exactly this fork's keys.
        let range = Key::rel_key_range(r);
        assert!(blocks.iter().all(|b| range.contains(b)) && range.contains(&size));
        assert!(!range.contains(&Key::rel_block(rel(1663, 5, 16384, FSM_FORKNUM), 0)));
        assert!(!range.contains(&Key::rel_block(rel(1663, 5, 16385, MAIN_FORKNUM), 0)));
        // Database range holds its metadata and relations, not its neighbours'.
        let db = Key::db_key_range(1663, 5);
        for k in [Key::relmap_file(1663, 5), Key::rel_dir(1663, 5), size, blocks[3]] {
            assert!(db.contains(&k), "{k:?}");
        }
        for k in [Key::rel_dir(1663, 6), Key::relmap_file(1663, 4), Key::dbdir(), Key::slru_dir(SlruKind::Clog)] {
            assert!(!db.contains(&k), "{k:?}");
        }
        // Kinds are ordered: relations < SLRU < twophase < control.
        assert!(size < Key::slru_dir(SlruKind::Clog));
        assert!(Key::slru_segment_size(SlruKind::MultiXactMembers, 9) < Key::twophase_dir());
        assert!(Key::twophase_file(u32::MAX) < Key::controlfile());
        assert!(Key::controlfile() < Key::checkpoint() && Key::checkpoint() < Key::MAX);
    }

    #[test]
    fn classifiers() {
        let r = rel(1663, 5, 16384, VISIBILITYMAP_FORKNUM);
        let all = [
            Key::rel_block(r, 7),
            Key::rel_size(r),
            Key::dbdir(),
            Key::rel_dir(1663, 5),
            Key::relmap_file(1664, 0),
            Key::slru_dir(SlruKind::MultiXactOffsets),
            Key::slru_block(SlruKind::Clog, 3, 31),
            Key::slru_segment_size(SlruKind::MultiXactMembers, 2),
            Key::twophase_dir(),
            Key::twophase_file(777),
            Key::controlfile(),
            Key::checkpoint(),
            Key::last_commit(),
            Key::standby_start(),
        ];
        let classify = |k: &Key| -> Vec<&'static str> {
            let mut v = vec![];
            let checks: [(&str, bool); 14] = [
                ("relblock", k.is_rel_block_key()),
                ("relsize", k.is_rel_size_key()),
                ("dbdir", k.is_dbdir_key()),
                ("reldir", k.is_rel_dir_key()),
                ("relmap", k.is_relmap_key()),
                ("slrudir", k.is_slru_dir_key()),
                ("slrublock", k.is_slru_block_key()),
                ("slrusize", k.is_slru_segment_size_key()),
                ("twophasedir", k.is_twophase_dir_key()),
                ("twophasefile", k.to_twophase_file().is_some()),
                ("control", k.is_controlfile_key()),
                ("checkpoint", k.is_checkpoint_key()),
                ("lastcommit", k.is_last_commit_key()),
                ("standbystart", k.is_standby_start_key()),
            ];
            for (name, hit) in checks {
                if hit {
                    v.push(name);
                }
            }
            v
        };
        let expected = [
            "relblock",
            "relsize",
            "dbdir",
            "reldir",
            "relmap",
            "slrudir",
            "slrublock",
            "slrusize",
            "twophasedir",
            "twophasefile",
            "control",
            "checkpoint",
            "lastcommit",
            "standbystart",
        ];
        for (k, name) in all.iter().zip(expected) {
            assert_eq!(classify(k), vec![name], "{k:?}");
        }
        assert_eq!(all[0].to_rel_block(), Some((r, 7)));
        assert_eq!(all[1].rel_tag(), Some(r));
        assert_eq!(all[1].to_rel_block(), None);
        assert_eq!(all[3].db_of_metadata_key(), Some((1663, 5)));
        assert_eq!(all[4].db_of_metadata_key(), Some((1664, 0)));
        assert_eq!(all[5].to_slru_dir(), Some(SlruKind::MultiXactOffsets));
        assert_eq!(all[6].to_slru_block(), Some((SlruKind::Clog, 3, 31)));
        assert_eq!(all[7].to_slru_segment_size(), Some((SlruKind::MultiXactMembers, 2)));
        assert_eq!(all[9].to_twophase_file(), Some(777));
        // Unknown kinds classify as nothing.
        assert!(classify(&Key { field1: 0x7F, ..Key::MIN }).is_empty());
        assert!(classify(&Key { field2: 9, ..Key::slru_dir(SlruKind::Clog) }).is_empty());
        let seg = Key::slru_segment_key_range(SlruKind::Clog, 3);
        assert!(seg.contains(&all[6]) && !seg.contains(&Key::slru_block(SlruKind::Clog, 4, 0)));
        assert!(seg.contains(&Key::slru_segment_size(SlruKind::Clog, 3)));
    }

    #[test]
    fn key_range_ops() {
        let k = |n: u32| Key { field6: n, ..Key::MIN };
        let a = KeyRange::new(k(10), k(20));
        assert!(a.contains(&k(10)) && a.contains(&k(19)) && !a.contains(&k(20)));
        assert!(a.overlaps(&KeyRange::new(k(19), k(30))));
        assert!(!a.overlaps(&KeyRange::new(k(20), k(30))));
        assert!(!a.overlaps(&KeyRange::new(k(15), k(15))));
        assert_eq!(a.intersect(&KeyRange::new(k(15), k(30))), KeyRange::new(k(15), k(20)));
        assert!(a.intersect(&KeyRange::new(k(25), k(30))).is_empty());
        assert!(KeyRange::full().contains_range(&a) && !a.contains_range(&KeyRange::full()));
        assert!(KeyRange::single(k(5)).contains(&k(5)) && !KeyRange::single(k(5)).contains(&k(6)));
        assert_eq!(a.to_string(), format!("{}-{}", k(10), k(20)));
    }
}
