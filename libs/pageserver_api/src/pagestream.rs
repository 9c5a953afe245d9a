//! The page service protocol: after `pagestream <tenant_id> <timeline_id>` on a libpq
//! connection, the compute and the pageserver exchange one request or response per CopyData.
//!
//! All integers are big-endian. A request is
//! `u8 tag, u64 request_id, u64 lsn, body`; a response is `u8 tag, u64 request_id, body`, the
//! request id echoed so a client can pipeline requests (prefetch) and match answers.
//!
//! | tag | request body | response tag | response body |
//! |---|---|---|---|
//! | 0 Exists | RelTag | 100 | u8 (0/1) |
//! | 1 Nblocks | RelTag | 101 | u32 |
//! | 2 GetPage | RelTag, u32 blkno | 102 | 8192 bytes |
//! | 3 DbSize | u32 dbnode | 104 | i64 bytes |
//! | 4 GetSlruSegment | u8 kind, u32 segno | 105 | u32 n, n × 8192 bytes |
//! | any | | 103 Error | NUL-terminated message |
//!
//! RelTag is `u32 spcnode, u32 dbnode, u32 relnode, u8 forknum`. `lsn` is the LSN to read at: a
//! compute reads at its start LSN (DESIGN D3).

use bytes::{BufMut, Bytes, BytesMut};
use utils::Lsn;

pub const BLCKSZ: usize = 8192;
/// Largest SLRU segment answer: 32 pages.
pub const SLRU_PAGES_PER_SEGMENT: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelTagWire {
    pub spcnode: u32,
    pub dbnode: u32,
    pub relnode: u32,
    pub forknum: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlruKind {
    Clog = 0,
    MultiXactMembers = 1,
    MultiXactOffsets = 2,
}

impl SlruKind {
    pub fn from_u8(v: u8) -> Option<SlruKind> {
        match v {
            0 => Some(SlruKind::Clog),
            1 => Some(SlruKind::MultiXactMembers),
            2 => Some(SlruKind::MultiXactOffsets),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PagestreamRequest {
    Exists { request_id: u64, lsn: Lsn, rel: RelTagWire },
    Nblocks { request_id: u64, lsn: Lsn, rel: RelTagWire },
    GetPage { request_id: u64, lsn: Lsn, rel: RelTagWire, blkno: u32 },
    DbSize { request_id: u64, lsn: Lsn, dbnode: u32 },
    GetSlruSegment { request_id: u64, lsn: Lsn, kind: SlruKind, segno: u32 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PagestreamResponse {
    Exists { request_id: u64, exists: bool },
    Nblocks { request_id: u64, n_blocks: u32 },
    Page { request_id: u64, page: Bytes },
    Error { request_id: u64, message: String },
    DbSize { request_id: u64, db_size_bytes: i64 },
    SlruSegment { request_id: u64, segment: Bytes },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PagestreamDecodeError {
    #[error("empty pagestream message")]
    Empty,
    #[error("unknown pagestream message tag {0}")]
    UnknownTag(u8),
    #[error("pagestream message (tag {tag}) is {len} bytes, expected {expected}")]
    BadLength { tag: u8, len: usize, expected: String },
    #[error("pagestream message (tag {tag}): {what}")]
    Invalid { tag: u8, what: String },
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("length checked"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("length checked"))
}

fn rel_at(b: &[u8], at: usize) -> RelTagWire {
    RelTagWire { spcnode: u32_at(b, at), dbnode: u32_at(b, at + 4), relnode: u32_at(b, at + 8), forknum: b[at + 12] }
}

fn put_rel(b: &mut BytesMut, r: &RelTagWire) {
    b.put_u32(r.spcnode);
    b.put_u32(r.dbnode);
    b.put_u32(r.relnode);
    b.put_u8(r.forknum);
}

const REQ_HEADER: usize = 1 + 8 + 8;
const RESP_HEADER: usize = 1 + 8;

impl PagestreamRequest {
    pub fn request_id(&self) -> u64 {
        match self {
            PagestreamRequest::Exists { request_id, .. }
            | PagestreamRequest::Nblocks { request_id, .. }
            | PagestreamRequest::GetPage { request_id, .. }
            | PagestreamRequest::DbSize { request_id, .. }
            | PagestreamRequest::GetSlruSegment { request_id, .. } => *request_id,
        }
    }

    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(40);
        match self {
            PagestreamRequest::Exists { request_id, lsn, rel } => {
                b.put_u8(0);
                b.put_u64(*request_id);
                b.put_u64(lsn.0);
                put_rel(&mut b, rel);
            }
            PagestreamRequest::Nblocks { request_id, lsn, rel } => {
                b.put_u8(1);
                b.put_u64(*request_id);
                b.put_u64(lsn.0);
                put_rel(&mut b, rel);
            }
            PagestreamRequest::GetPage { request_id, lsn, rel, blkno } => {
                b.put_u8(2);
                b.put_u64(*request_id);
                b.put_u64(lsn.0);
                put_rel(&mut b, rel);
                b.put_u32(*blkno);
            }
            PagestreamRequest::DbSize { request_id, lsn, dbnode } => {
                b.put_u8(3);
                b.put_u64(*request_id);
                b.put_u64(lsn.0);
                b.put_u32(*dbnode);
            }
            PagestreamRequest::GetSlruSegment { request_id, lsn, kind, segno } => {
                b.put_u8(4);
                b.put_u64(*request_id);
                b.put_u64(lsn.0);
                b.put_u8(*kind as u8);
                b.put_u32(*segno);
            }
        }
        b.freeze()
    }

    pub fn decode(buf: &[u8]) -> Result<Self, PagestreamDecodeError> {
        let tag = *buf.first().ok_or(PagestreamDecodeError::Empty)?;
        let expect = |n: usize| -> Result<(), PagestreamDecodeError> {
            if buf.len() != n {
                return Err(PagestreamDecodeError::BadLength { tag, len: buf.len(), expected: n.to_string() });
            }
            Ok(())
        };
        let body_len = match tag {
            0 | 1 => 13,
            2 => 17,
            3 => 4,
            4 => 5,
            t => return Err(PagestreamDecodeError::UnknownTag(t)),
        };
        expect(REQ_HEADER + body_len)?;
        let request_id = u64_at(buf, 1);
        let lsn = Lsn(u64_at(buf, 9));
        let b = REQ_HEADER;
        let check_fork = |rel: RelTagWire| -> Result<RelTagWire, PagestreamDecodeError> {
            if rel.forknum > 3 {
                return Err(PagestreamDecodeError::Invalid {
                    tag,
                    what: format!("fork number {} (valid: 0..=3)", rel.forknum),
                });
            }
            Ok(rel)
        };
        Ok(match tag {
            0 => PagestreamRequest::Exists { request_id, lsn, rel: check_fork(rel_at(buf, b))? },
            1 => PagestreamRequest::Nblocks { request_id, lsn, rel: check_fork(rel_at(buf, b))? },
            2 => PagestreamRequest::GetPage {
                request_id,
                lsn,
                rel: check_fork(rel_at(buf, b))?,
                blkno: u32_at(buf, b + 13),
            },
            3 => PagestreamRequest::DbSize { request_id, lsn, dbnode: u32_at(buf, b) },
            _ => PagestreamRequest::GetSlruSegment {
                request_id,
                lsn,
                kind: SlruKind::from_u8(buf[b])
                    .ok_or_else(|| PagestreamDecodeError::Invalid { tag, what: format!("SLRU kind {}", buf[b]) })?,
                segno: u32_at(buf, b + 1),
            },
        })
    }
}

impl PagestreamResponse {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::new();
        match self {
            PagestreamResponse::Exists { request_id, exists } => {
                b.put_u8(100);
                b.put_u64(*request_id);
                b.put_u8(*exists as u8);
            }
            PagestreamResponse::Nblocks { request_id, n_blocks } => {
                b.put_u8(101);
                b.put_u64(*request_id);
                b.put_u32(*n_blocks);
            }
            PagestreamResponse::Page { request_id, page } => {
                b.reserve(RESP_HEADER + page.len());
                b.put_u8(102);
                b.put_u64(*request_id);
                b.put_slice(page);
            }
            PagestreamResponse::Error { request_id, message } => {
                b.put_u8(103);
                b.put_u64(*request_id);
                b.put_slice(message.replace('\0', " ").as_bytes());
                b.put_u8(0);
            }
            PagestreamResponse::DbSize { request_id, db_size_bytes } => {
                b.put_u8(104);
                b.put_u64(*request_id);
                b.put_i64(*db_size_bytes);
            }
            PagestreamResponse::SlruSegment { request_id, segment } => {
                b.put_u8(105);
                b.put_u64(*request_id);
                b.put_u32((segment.len() / BLCKSZ) as u32);
                b.put_slice(segment);
            }
        }
        b.freeze()
    }

    pub fn decode(buf: &Bytes) -> Result<Self, PagestreamDecodeError> {
        let tag = *buf.first().ok_or(PagestreamDecodeError::Empty)?;
        if buf.len() < RESP_HEADER {
            return Err(PagestreamDecodeError::BadLength {
                tag,
                len: buf.len(),
                expected: format!(">= {RESP_HEADER}"),
            });
        }
        let request_id = u64_at(buf, 1);
        let body = &buf[RESP_HEADER..];
        let expect = |n: usize| -> Result<(), PagestreamDecodeError> {
            if body.len() != n {
                return Err(PagestreamDecodeError::BadLength {
                    tag,
                    len: buf.len(),
                    expected: (RESP_HEADER + n).to_string(),
                });
            }
            Ok(())
        };
        Ok(match tag {
            100 => {
                expect(1)?;
                PagestreamResponse::Exists { request_id, exists: body[0] != 0 }
            }
            101 => {
                expect(4)?;
                PagestreamResponse::Nblocks { request_id, n_blocks: u32_at(body, 0) }
            }
            102 => {
                expect(BLCKSZ)?;
                PagestreamResponse::Page { request_id, page: buf.slice(RESP_HEADER..) }
            }
            103 => {
                let end = body.iter().position(|&c| c == 0).ok_or_else(|| PagestreamDecodeError::Invalid {
                    tag,
                    what: "error message is not NUL-terminated".into(),
                })?;
                expect(end + 1)?;
                PagestreamResponse::Error { request_id, message: String::from_utf8_lossy(&body[..end]).into_owned() }
            }
            104 => {
                expect(8)?;
                PagestreamResponse::DbSize { request_id, db_size_bytes: u64_at(body, 0) as i64 }
            }
            105 => {
                if body.len() < 4 {
                    return Err(PagestreamDecodeError::BadLength {
                        tag,
                        len: buf.len(),
                        expected: "at least 13".into(),
                    });
                }
                let n = u32_at(body, 0) as usize;
                if n > SLRU_PAGES_PER_SEGMENT {
                    return Err(PagestreamDecodeError::Invalid { tag, what: format!("{n} pages in an SLRU segment") });
                }
                expect(4 + n * BLCKSZ)?;
                PagestreamResponse::SlruSegment { request_id, segment: buf.slice(RESP_HEADER + 4..) }
            }
            t => return Err(PagestreamDecodeError::UnknownTag(t)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rel() -> RelTagWire {
        RelTagWire { spcnode: 1663, dbnode: 5, relnode: 16384, forknum: 0 }
    }

    #[test]
    fn round_trips() {
        let reqs = vec![
            PagestreamRequest::Exists { request_id: 1, lsn: Lsn(10), rel: rel() },
            PagestreamRequest::Nblocks { request_id: 2, lsn: Lsn(11), rel: rel() },
            PagestreamRequest::GetPage { request_id: 3, lsn: Lsn(12), rel: rel(), blkno: 7 },
            PagestreamRequest::DbSize { request_id: 4, lsn: Lsn(13), dbnode: 5 },
            PagestreamRequest::GetSlruSegment { request_id: 5, lsn: Lsn(14), kind: SlruKind::Clog, segno: 2 },
        ];
        for r in reqs {
            assert_eq!(PagestreamRequest::decode(&r.encode()).unwrap(), r);
        }
        let resps = vec![
            PagestreamResponse::Exists { request_id: 1, exists: true },
            PagestreamResponse::Nblocks { request_id: 2, n_blocks: 9 },
            PagestreamResponse::Page { request_id: 3, page: Bytes::from(vec![7u8; BLCKSZ]) },
            PagestreamResponse::Error { request_id: 4, message: "relation 1663/5/16384 not found".into() },
            PagestreamResponse::DbSize { request_id: 5, db_size_bytes: 8192 * 3 },
            PagestreamResponse::SlruSegment { request_id: 6, segment: Bytes::from(vec![1u8; 2 * BLCKSZ]) },
        ];
        for r in resps {
            assert_eq!(PagestreamResponse::decode(&r.encode()).unwrap(), r);
        }
    }

    #[test]
    fn malformed_requests_are_errors() {
        assert_eq!(PagestreamRequest::decode(&[]), Err(PagestreamDecodeError::Empty));
        assert_eq!(PagestreamRequest::decode(&[9]), Err(PagestreamDecodeError::UnknownTag(9)));
        let mut good =
            PagestreamRequest::GetPage { request_id: 3, lsn: Lsn(12), rel: rel(), blkno: 7 }.encode().to_vec();
        good.pop();
        assert!(matches!(PagestreamRequest::decode(&good), Err(PagestreamDecodeError::BadLength { .. })));
        let mut bad_fork = PagestreamRequest::Nblocks { request_id: 2, lsn: Lsn(11), rel: rel() }.encode().to_vec();
        *bad_fork.last_mut().unwrap() = 9;
        assert!(matches!(PagestreamRequest::decode(&bad_fork), Err(PagestreamDecodeError::Invalid { .. })));
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..20_000 {
            let len = rng.gen_range(0..64);
            let v: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let _ = PagestreamRequest::decode(&v);
            let _ = PagestreamResponse::decode(&Bytes::from(v));
        }
    }
}
