//! The pipe protocol of `postgres --wal-redo` (`pgxn/neon_walredo/README.md`), request side.
//!
//! Every message is `u8 tag`, `u32` big-endian length (counting its own 4 bytes and the
//! payload, not the tag), payload. Answers carry no framing: a page is exactly 8192 bytes, a
//! ping answer one byte.

use std::fmt;

use bytes::BufMut;
use postgres_ffi::{BlockNumber, RelTag, BLCKSZ};
use utils::Lsn;

/// Size of an encoded [`BufferTag`]: fork u8, spcnode, dbnode, relnode, blkno (u32 each).
pub const BUFFER_TAG_SIZE_BYTES: usize = 17;
/// Tag byte and length field in front of every payload.
pub const MESSAGE_HEADER_SIZE_BYTES: usize = 5;
/// The end LSN in front of the record in an `A` message.
pub const APPLY_LSN_SIZE_BYTES: usize = 8;
/// The largest record the redo process accepts (Postgres 16's `XLogRecordMaxSize`).
pub const RECORD_SIZE_BYTES_MAX: usize = 1020 * 1024 * 1024;

pub const TAG_BEGIN: u8 = b'B';
pub const TAG_PUSH_PAGE: u8 = b'P';
pub const TAG_APPLY: u8 = b'A';
pub const TAG_GET_PAGE: u8 = b'G';
pub const TAG_PING: u8 = b'H';
/// What the redo process answers to a ping.
pub const PING_ANSWER: u8 = b'H';

/// One block of one relation fork: what a redo request reconstructs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BufferTag {
    pub rel: RelTag,
    pub blkno: BlockNumber,
}

impl BufferTag {
    pub fn new(rel: RelTag, blkno: BlockNumber) -> BufferTag {
        BufferTag { rel, blkno }
    }

    pub fn encode(&self) -> [u8; BUFFER_TAG_SIZE_BYTES] {
        let mut out = [0u8; BUFFER_TAG_SIZE_BYTES];
        out[0] = self.rel.forknum;
        out[1..5].copy_from_slice(&self.rel.spcnode.to_be_bytes());
        out[5..9].copy_from_slice(&self.rel.dbnode.to_be_bytes());
        out[9..13].copy_from_slice(&self.rel.relnode.to_be_bytes());
        out[13..17].copy_from_slice(&self.blkno.to_be_bytes());
        out
    }
}

/// `spc/db/rel[_fork] block N`, e.g. `1663/5/16384 block 7`.
impl fmt::Display for BufferTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} block {}", self.rel, self.blkno)
    }
}

/// Writes the 5-byte message header. `payload_size_bytes` is at most
/// [`APPLY_LSN_SIZE_BYTES`] + [`RECORD_SIZE_BYTES_MAX`] (the caller validated the request), so
/// the length always fits in a `u32`.
pub fn put_header(buf: &mut impl BufMut, tag: u8, payload_size_bytes: usize) {
    debug_assert!(payload_size_bytes <= APPLY_LSN_SIZE_BYTES + RECORD_SIZE_BYTES_MAX);
    buf.put_u8(tag);
    buf.put_u32((payload_size_bytes + 4) as u32);
}

pub fn put_begin(buf: &mut impl BufMut, tag: &BufferTag) {
    put_header(buf, TAG_BEGIN, BUFFER_TAG_SIZE_BYTES);
    buf.put_slice(&tag.encode());
}

/// `page` must be [`BLCKSZ`] bytes (validated by the caller).
pub fn put_push_page(buf: &mut impl BufMut, tag: &BufferTag, page: &[u8]) {
    debug_assert_eq!(page.len(), BLCKSZ);
    put_header(buf, TAG_PUSH_PAGE, BUFFER_TAG_SIZE_BYTES + page.len());
    buf.put_slice(&tag.encode());
    buf.put_slice(page);
}

/// The header and LSN of an `A` message; the record bytes follow.
pub fn put_apply_header(buf: &mut impl BufMut, end_lsn: Lsn, record_size_bytes: usize) {
    put_header(buf, TAG_APPLY, APPLY_LSN_SIZE_BYTES + record_size_bytes);
    buf.put_u64(end_lsn.0);
}

pub fn put_get_page(buf: &mut impl BufMut, tag: &BufferTag) {
    put_header(buf, TAG_GET_PAGE, BUFFER_TAG_SIZE_BYTES);
    buf.put_slice(&tag.encode());
}

pub fn put_ping(buf: &mut impl BufMut) {
    put_header(buf, TAG_PING, 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_ffi::reltag::VISIBILITYMAP_FORKNUM;

    #[test]
    fn walredo_protocol_encoding() {
        let tag = BufferTag::new(
            RelTag { spcnode: 1663, dbnode: 5, relnode: 0x0102_0304, forknum: VISIBILITYMAP_FORKNUM },
            0x0A0B_0C0D,
        );
        assert_eq!(tag.to_string(), "1663/5/16909060_vm block 168496141");
        let mut buf = Vec::new();
        put_begin(&mut buf, &tag);
        assert_eq!(
            buf,
            [
                b'B', 0, 0, 0, 21, // tag, length = 4 + 17
                2, 0, 0, 0x06, 0x7F, 0, 0, 0, 5, 1, 2, 3, 4, 0x0A, 0x0B, 0x0C, 0x0D
            ]
        );

        let mut buf = Vec::new();
        put_apply_header(&mut buf, Lsn(0x1_0000_0028), 24);
        assert_eq!(buf, [b'A', 0, 0, 0, 36, 0, 0, 0, 1, 0, 0, 0, 0x28]);

        let mut buf = Vec::new();
        put_push_page(&mut buf, &tag, &[7u8; BLCKSZ]);
        assert_eq!(buf.len(), MESSAGE_HEADER_SIZE_BYTES + BUFFER_TAG_SIZE_BYTES + BLCKSZ);
        assert_eq!(&buf[1..5], &((4 + 17 + 8192) as u32).to_be_bytes());

        let mut buf = Vec::new();
        put_ping(&mut buf);
        assert_eq!(buf, [b'H', 0, 0, 0, 4]);
    }
}
