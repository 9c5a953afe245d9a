//! What is stored under a key at an LSN: a full image, or a WAL record to apply on top of an older
//! version. Reconstructing a page = the newest image (or will-init record) at or below the
//! requested LSN, then every record above it, oldest first (DESIGN D5, D6).
//!
//! Encoding (hand-written, so the on-disk format is ours and not a serde library's):
//!
//! ```text
//!  u8 format version (1) | u8 tag | body
//!  tag 0 Image                     body = page bytes (to the end)
//!  tag 1 Postgres record           u8 will_init (0|1) | record bytes (to the end)
//!  tag 2 ClearVisibilityMapFlags   u8 presence bits (1 = new, 2 = old) | u32 new | u32 old | u8 flags
//!  tag 3 ClogSetCommitted          i64 timestamp | u32 n | n × u32 xid
//!  tag 4 ClogSetAborted            u32 n | n × u32 xid
//!  tag 5 MultixactOffsetCreate     u32 mid | u32 moff
//!  tag 6 MultixactMembersCreate    u32 moff | u32 n | n × (u32 xid, u32 status)
//! ```
//!
//! All integers big-endian. The value's length comes from its container (a blob or a buffer),
//! which is why images and raw records carry no length of their own. Decoding checks every length
//! against the bytes present before allocating, and never panics.

use bytes::{BufMut, Bytes, BytesMut};
use postgres_ffi::{BlockNumber, MultiXactId, MultiXactOffset, TimestampTz, TransactionId};

/// Current value encoding version; decoders reject others.
pub const VALUE_FORMAT_VERSION: u8 = 1;

const TAG_IMAGE: u8 = 0;
const TAG_POSTGRES: u8 = 1;
const TAG_CLEAR_VM: u8 = 2;
const TAG_CLOG_COMMITTED: u8 = 3;
const TAG_CLOG_ABORTED: u8 = 4;
const TAG_MULTIXACT_OFFSET: u8 = 5;
const TAG_MULTIXACT_MEMBERS: u8 = 6;

/// A version of a key's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// The complete value (an 8 KiB page for block keys; a serialized structure for metadata keys).
    Image(Bytes),
    /// A change to apply to the previous version.
    WalRecord(WalRecord),
}

impl Value {
    /// True if this version does not need any older version to be reconstructed.
    pub fn will_init(&self) -> bool {
        match self {
            Value::Image(_) => true,
            Value::WalRecord(rec) => rec.will_init(),
        }
    }

    pub fn is_image(&self) -> bool {
        matches!(self, Value::Image(_))
    }

    /// Exact size of [`Value::encode`]'s output.
    pub fn encoded_size_bytes(&self) -> usize {
        2 + match self {
            Value::Image(img) => img.len(),
            Value::WalRecord(WalRecord::Postgres { rec, .. }) => 1 + rec.len(),
            Value::WalRecord(WalRecord::ClearVisibilityMapFlags { .. }) => 1 + 4 + 4 + 1,
            Value::WalRecord(WalRecord::ClogSetCommitted { xids, .. }) => 8 + 4 + 4 * xids.len(),
            Value::WalRecord(WalRecord::ClogSetAborted { xids }) => 4 + 4 * xids.len(),
            Value::WalRecord(WalRecord::MultixactOffsetCreate { .. }) => 8,
            Value::WalRecord(WalRecord::MultixactMembersCreate { members, .. }) => 8 + 8 * members.len(),
        }
    }

    pub fn encode(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.encoded_size_bytes());
        self.encode_into(&mut buf);
        debug_assert_eq!(buf.len(), self.encoded_size_bytes());
        buf.freeze()
    }

    pub fn encode_into(&self, buf: &mut impl BufMut) {
        buf.put_u8(VALUE_FORMAT_VERSION);
        match self {
            Value::Image(img) => {
                buf.put_u8(TAG_IMAGE);
                buf.put_slice(img);
            }
            Value::WalRecord(WalRecord::Postgres { will_init, rec }) => {
                buf.put_u8(TAG_POSTGRES);
                buf.put_u8(u8::from(*will_init));
                buf.put_slice(rec);
            }
            Value::WalRecord(WalRecord::ClearVisibilityMapFlags { new_heap_blkno, old_heap_blkno, flags }) => {
                buf.put_u8(TAG_CLEAR_VM);
                buf.put_u8(u8::from(new_heap_blkno.is_some()) | (u8::from(old_heap_blkno.is_some()) << 1));
                buf.put_u32(new_heap_blkno.unwrap_or(0));
                buf.put_u32(old_heap_blkno.unwrap_or(0));
                buf.put_u8(*flags);
            }
            Value::WalRecord(WalRecord::ClogSetCommitted { xids, timestamp }) => {
                buf.put_u8(TAG_CLOG_COMMITTED);
                buf.put_i64(*timestamp);
                put_u32_list(buf, xids);
            }
            Value::WalRecord(WalRecord::ClogSetAborted { xids }) => {
                buf.put_u8(TAG_CLOG_ABORTED);
                put_u32_list(buf, xids);
            }
            Value::WalRecord(WalRecord::MultixactOffsetCreate { mid, moff }) => {
                buf.put_u8(TAG_MULTIXACT_OFFSET);
                buf.put_u32(*mid);
                buf.put_u32(*moff);
            }
            Value::WalRecord(WalRecord::MultixactMembersCreate { moff, members }) => {
                buf.put_u8(TAG_MULTIXACT_MEMBERS);
                buf.put_u32(*moff);
                buf.put_u32(u32::try_from(members.len()).expect("more than 2^32 multixact members in one record"));
                for m in members {
                    buf.put_u32(m.xid);
                    buf.put_u32(m.status);
                }
            }
        }
    }

    /// Decodes a value; images and raw records share `buf`'s memory instead of copying.
    pub fn decode(buf: &Bytes) -> Result<Value, ValueDecodeError> {
        let mut r = Reader { buf, pos: 0 };
        let version = r.u8("format version")?;
        if version != VALUE_FORMAT_VERSION {
            return Err(ValueDecodeError::UnsupportedVersion(version));
        }
        let tag = r.u8("tag")?;
        let value = match tag {
            TAG_IMAGE => Value::Image(r.rest()),
            TAG_POSTGRES => {
                let will_init = match r.u8("will_init flag")? {
                    0 => false,
                    1 => true,
                    other => return Err(ValueDecodeError::Invalid(format!("will_init flag is {other}, not 0 or 1"))),
                };
                Value::WalRecord(WalRecord::Postgres { will_init, rec: r.rest() })
            }
            TAG_CLEAR_VM => {
                let presence = r.u8("presence bits")?;
                if presence & !0b11 != 0 {
                    return Err(ValueDecodeError::Invalid(format!("unknown presence bits {presence:#04x}")));
                }
                let new = r.u32("new heap block")?;
                let old = r.u32("old heap block")?;
                let flags = r.u8("flags")?;
                // An absent block must be encoded as 0, so every value has exactly one encoding.
                if (presence & 1 == 0 && new != 0) || (presence & 2 == 0 && old != 0) {
                    return Err(ValueDecodeError::Invalid("absent heap block number is not 0".to_string()));
                }
                Value::WalRecord(WalRecord::ClearVisibilityMapFlags {
                    new_heap_blkno: (presence & 1 != 0).then_some(new),
                    old_heap_blkno: (presence & 2 != 0).then_some(old),
                    flags,
                })
            }
            TAG_CLOG_COMMITTED => {
                let timestamp = r.i64("timestamp")?;
                let xids = r.u32_list("xids")?;
                Value::WalRecord(WalRecord::ClogSetCommitted { xids, timestamp })
            }
            TAG_CLOG_ABORTED => Value::WalRecord(WalRecord::ClogSetAborted { xids: r.u32_list("xids")? }),
            TAG_MULTIXACT_OFFSET => {
                let mid = r.u32("multixact id")?;
                let moff = r.u32("multixact offset")?;
                Value::WalRecord(WalRecord::MultixactOffsetCreate { mid, moff })
            }
            TAG_MULTIXACT_MEMBERS => {
                let moff = r.u32("multixact offset")?;
                let n = r.u32("member count")? as usize;
                r.check_remaining(n, 8, "members")?;
                let mut members = Vec::with_capacity(n);
                for _ in 0..n {
                    members.push(MultiXactMember { xid: r.u32("member xid")?, status: r.u32("member status")? });
                }
                Value::WalRecord(WalRecord::MultixactMembersCreate { moff, members })
            }
            other => return Err(ValueDecodeError::UnknownTag(other)),
        };
        if r.pos != buf.len() {
            return Err(ValueDecodeError::TrailingBytes(buf.len() - r.pos));
        }
        Ok(value)
    }
}

/// A change to a key's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalRecord {
    /// A Postgres WAL record (the whole `XLogRecord`), applied by a `--wal-redo` process.
    /// `will_init` means the record rebuilds the page from nothing (e.g. `XLOG_HEAP_INIT_PAGE`).
    Postgres { will_init: bool, rec: Bytes },
    /// Clear visibility-map bits for up to two heap blocks (the VM page is the key).
    ClearVisibilityMapFlags { new_heap_blkno: Option<BlockNumber>, old_heap_blkno: Option<BlockNumber>, flags: u8 },
    /// Mark transactions committed on a clog page; the commit time is kept for LSN-by-time lookups.
    ClogSetCommitted { xids: Vec<TransactionId>, timestamp: TimestampTz },
    /// Mark transactions aborted on a clog page.
    ClogSetAborted { xids: Vec<TransactionId> },
    /// Set one multixact's starting member offset on an offsets page.
    MultixactOffsetCreate { mid: MultiXactId, moff: MultiXactOffset },
    /// Store members starting at `moff` on a members page.
    MultixactMembersCreate { moff: MultiXactOffset, members: Vec<MultiXactMember> },
}

impl WalRecord {
    /// True if applying this record does not read the previous version.
    pub fn will_init(&self) -> bool {
        match self {
            WalRecord::Postgres { will_init, .. } => *will_init,
            _ => false,
        }
    }
}

/// One member of a multixact (`MultiXactMember`: xid and lock status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultiXactMember {
    pub xid: TransactionId,
    pub status: u32,
}

/// Why bytes are not a valid [`Value`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValueDecodeError {
    #[error("value truncated: {0} missing")]
    Truncated(&'static str),
    #[error("value format version {0} is not supported (this build reads version {VALUE_FORMAT_VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown value tag {0}")]
    UnknownTag(u8),
    #[error("{0} unexpected bytes after the value")]
    TrailingBytes(usize),
    #[error("invalid value: {0}")]
    Invalid(String),
}

fn put_u32_list(buf: &mut impl BufMut, items: &[u32]) {
    buf.put_u32(u32::try_from(items.len()).expect("more than 2^32 xids in one record"));
    for x in items {
        buf.put_u32(*x);
    }
}

/// Bounds-checked cursor over the encoded bytes.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], ValueDecodeError> {
        let end = self.pos.checked_add(N).filter(|e| *e <= self.buf.len()).ok_or(ValueDecodeError::Truncated(what))?;
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[self.pos..end]);
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, ValueDecodeError> {
        Ok(self.take::<1>(what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, ValueDecodeError> {
        Ok(u32::from_be_bytes(self.take(what)?))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, ValueDecodeError> {
        Ok(i64::from_be_bytes(self.take(what)?))
    }

    /// Fails unless `count` items of `item_size_bytes` fit in what is left: checked before any
    /// allocation so a corrupt count cannot make us allocate gigabytes.
    fn check_remaining(
        &self,
        count: usize,
        item_size_bytes: usize,
        what: &'static str,
    ) -> Result<(), ValueDecodeError> {
        let needed = count.checked_mul(item_size_bytes).ok_or(ValueDecodeError::Truncated(what))?;
        if needed > self.buf.len() - self.pos {
            return Err(ValueDecodeError::Truncated(what));
        }
        Ok(())
    }

    fn u32_list(&mut self, what: &'static str) -> Result<Vec<u32>, ValueDecodeError> {
        let n = self.u32("count")? as usize;
        self.check_remaining(n, 4, what)?;
        (0..n).map(|_| self.u32(what)).collect()
    }

    fn rest(&mut self) -> Bytes {
        let out = self.buf.slice(self.pos..);
        self.pos = self.buf.len();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, RngCore, SeedableRng};

    pub(crate) fn samples() -> Vec<Value> {
        vec![
            Value::Image(Bytes::new()),
            Value::Image(Bytes::from(vec![7u8; 8192])),
            Value::WalRecord(WalRecord::Postgres { will_init: true, rec: Bytes::from_static(b"init record") }),
            Value::WalRecord(WalRecord::Postgres { will_init: false, rec: Bytes::new() }),
            Value::WalRecord(WalRecord::ClearVisibilityMapFlags {
                new_heap_blkno: Some(5),
                old_heap_blkno: None,
                flags: 3,
            }),
            Value::WalRecord(WalRecord::ClearVisibilityMapFlags {
                new_heap_blkno: None,
                old_heap_blkno: Some(u32::MAX),
                flags: 1,
            }),
            Value::WalRecord(WalRecord::ClogSetCommitted { xids: vec![3, 4, 100_000], timestamp: -17 }),
            Value::WalRecord(WalRecord::ClogSetAborted { xids: vec![] }),
            Value::WalRecord(WalRecord::MultixactOffsetCreate { mid: 9, moff: 1 << 31 }),
            Value::WalRecord(WalRecord::MultixactMembersCreate {
                moff: 77,
                members: vec![MultiXactMember { xid: 1, status: 2 }, MultiXactMember { xid: 3, status: 4 }],
            }),
        ]
    }

    #[test]
    fn round_trip() {
        for v in samples() {
            let enc = v.encode();
            assert_eq!(enc.len(), v.encoded_size_bytes(), "{v:?}");
            assert_eq!(Value::decode(&enc).as_ref(), Ok(&v));
        }
        assert!(samples()[1].will_init() && samples()[2].will_init() && !samples()[3].will_init());
        assert!(!samples()[6].will_init());
    }

    #[test]
    fn specific_errors() {
        assert_eq!(Value::decode(&Bytes::new()), Err(ValueDecodeError::Truncated("format version")));
        assert_eq!(Value::decode(&Bytes::from_static(&[2, 0])), Err(ValueDecodeError::UnsupportedVersion(2)));
        assert_eq!(Value::decode(&Bytes::from_static(&[1, 99])), Err(ValueDecodeError::UnknownTag(99)));
        assert!(matches!(Value::decode(&Bytes::from_static(&[1, 1, 2])), Err(ValueDecodeError::Invalid(_))));
        // A huge count with few bytes behind it fails before allocating.
        let huge = Bytes::from_static(&[1, 4, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 1]);
        assert_eq!(Value::decode(&huge), Err(ValueDecodeError::Truncated("xids")));
        let trailing = Bytes::from_static(&[1, 5, 0, 0, 0, 1, 0, 0, 0, 2, 9]);
        assert_eq!(Value::decode(&trailing), Err(ValueDecodeError::TrailingBytes(1)));
    }

    /// ≥ 10k random and bit-flipped inputs: decoding returns a value or an error, never panics,
    /// and any value it returns re-encodes to the same bytes (no silent reinterpretation).
    #[test]
    fn fuzz_decode_never_panics() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x76616c7565);
        let encoded: Vec<Bytes> = samples().iter().map(Value::encode).collect();
        let mut ok_count = 0usize;
        for i in 0..30_000 {
            let input: Vec<u8> = match i % 3 {
                0 => {
                    let len = rng.gen_range(0..64);
                    let mut v = vec![0u8; len];
                    rng.fill_bytes(&mut v);
                    if len >= 2 && rng.gen_bool(0.7) {
                        v[0] = VALUE_FORMAT_VERSION;
                        v[1] = rng.gen_range(0..8);
                    }
                    v
                }
                1 => {
                    let mut v = encoded[rng.gen_range(0..encoded.len())].to_vec();
                    if !v.is_empty() {
                        for _ in 0..rng.gen_range(1..4) {
                            let pos = rng.gen_range(0..v.len());
                            v[pos] ^= 1 << rng.gen_range(0..8);
                        }
                    }
                    v
                }
                _ => {
                    let v = encoded[rng.gen_range(0..encoded.len())].to_vec();
                    let cut = rng.gen_range(0..=v.len());
                    v[..cut].to_vec()
                }
            };
            let bytes = Bytes::from(input);
            if let Ok(v) = Value::decode(&bytes) {
                ok_count += 1;
                assert_eq!(v.encode(), bytes, "decoded value does not re-encode to its input");
            }
        }
        assert!(ok_count > 0, "the fuzzer never produced a valid value; it is not exercising decode");
    }
}
