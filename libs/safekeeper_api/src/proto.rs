//! Messages of the proposer–acceptor protocol, carried in CopyData over a `START_WAL_PUSH`
//! connection. Big-endian, one message per CopyData, first byte a tag. Decoding is bounds-checked
//! and never panics; every length is checked against what the message can hold.

use bytes::{BufMut, Bytes, BytesMut};
use utils::{Lsn, TenantId, TimelineId};

use crate::term::{Term, TermHistory, TermLsn, MAX_TERM_HISTORY_ENTRIES};

/// Version of this protocol, sent in the proposer's greeting.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest WAL payload of one AppendRequest.
pub const MAX_APPEND_BYTES: usize = 128 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("message is empty")]
    Empty,
    #[error("unknown message tag {0:#04x}")]
    UnknownTag(u8),
    #[error("message '{tag}' is truncated: needs {needed} more bytes at offset {offset}")]
    Truncated { tag: char, offset: usize, needed: usize },
    #[error("message '{tag}' has {extra} trailing bytes")]
    Trailing { tag: char, extra: usize },
    #[error("message '{tag}': {what}")]
    Invalid { tag: char, what: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProposerGreeting {
    pub protocol_version: u32,
    pub pg_version: u32,
    pub proposer_id: [u8; 16],
    pub system_id: u64,
    pub tenant_id: TenantId,
    pub timeline_id: TimelineId,
    pub wal_seg_size: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VoteRequest {
    pub term: Term,
    pub proposer_id: [u8; 16],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProposerElected {
    pub term: Term,
    /// Where this acceptor's WAL stops agreeing with the proposer's: it truncates here and the
    /// proposer streams from here.
    pub start_streaming_at: Lsn,
    /// The proposer's history, ending with `(term, epoch start)`.
    pub term_history: TermHistory,
    pub timeline_start_lsn: Lsn,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendRequest {
    pub term: Term,
    pub begin_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_lsn: Lsn,
    /// WAL below this is on every acceptor and committed: acceptors may forget it.
    pub truncate_lsn: Lsn,
    pub wal: Bytes,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProposerMessage {
    Greeting(ProposerGreeting),
    VoteRequest(VoteRequest),
    Elected(ProposerElected),
    Append(AppendRequest),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcceptorGreeting {
    pub node_id: u64,
    pub term: Term,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VoteResponse {
    /// The acceptor's term after handling the request.
    pub term: Term,
    pub vote_given: bool,
    pub flush_lsn: Lsn,
    pub truncate_lsn: Lsn,
    pub term_history: TermHistory,
    pub timeline_start_lsn: Lsn,
}

/// Progress the WAL reader (pageserver) reported to the safekeeper.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageserverFeedback {
    pub last_received_lsn: Lsn,
    pub disk_consistent_lsn: Lsn,
    pub remote_consistent_lsn: Lsn,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendResponse {
    /// The acceptor's term: higher than the proposer's means the proposer was superseded.
    pub term: Term,
    pub flush_lsn: Lsn,
    pub commit_lsn: Lsn,
    pub pageserver_feedback: PageserverFeedback,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AcceptorMessage {
    Greeting(AcceptorGreeting),
    Vote(VoteResponse),
    Append(AppendResponse),
}

const TAG_P_GREETING: u8 = b'g';
const TAG_P_VOTE: u8 = b'v';
const TAG_P_ELECTED: u8 = b'e';
const TAG_P_APPEND: u8 = b'a';
const TAG_A_GREETING: u8 = b'G';
const TAG_A_VOTE: u8 = b'V';
const TAG_A_APPEND: u8 = b'A';

/// Size of an AppendRequest before its WAL bytes.
pub const APPEND_HEADER_BYTES: usize = 1 + 8 * 5;

fn put_history(b: &mut BytesMut, h: &TermHistory) {
    b.put_u32(h.0.len() as u32);
    for e in &h.0 {
        b.put_u64(e.term);
        b.put_u64(e.lsn.0);
    }
}

impl ProposerMessage {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::new();
        match self {
            ProposerMessage::Greeting(g) => {
                b.put_u8(TAG_P_GREETING);
                b.put_u32(g.protocol_version);
                b.put_u32(g.pg_version);
                b.put_slice(&g.proposer_id);
                b.put_u64(g.system_id);
                b.put_slice(g.tenant_id.as_bytes());
                b.put_slice(g.timeline_id.as_bytes());
                b.put_u32(g.wal_seg_size);
            }
            ProposerMessage::VoteRequest(v) => {
                b.put_u8(TAG_P_VOTE);
                b.put_u64(v.term);
                b.put_slice(&v.proposer_id);
            }
            ProposerMessage::Elected(e) => {
                b.put_u8(TAG_P_ELECTED);
                b.put_u64(e.term);
                b.put_u64(e.start_streaming_at.0);
                b.put_u64(e.timeline_start_lsn.0);
                put_history(&mut b, &e.term_history);
            }
            ProposerMessage::Append(a) => {
                b.reserve(APPEND_HEADER_BYTES + a.wal.len());
                b.put_u8(TAG_P_APPEND);
                b.put_u64(a.term);
                b.put_u64(a.begin_lsn.0);
                b.put_u64(a.end_lsn.0);
                b.put_u64(a.commit_lsn.0);
                b.put_u64(a.truncate_lsn.0);
                b.put_slice(&a.wal);
            }
        }
        b.freeze()
    }

    /// Decodes one message. `buf` is the whole CopyData payload.
    pub fn decode(buf: &Bytes) -> Result<ProposerMessage, DecodeError> {
        let mut r = Reader::new(buf)?;
        let msg = match r.tag {
            TAG_P_GREETING => ProposerMessage::Greeting(ProposerGreeting {
                protocol_version: r.u32()?,
                pg_version: r.u32()?,
                proposer_id: r.array16()?,
                system_id: r.u64()?,
                tenant_id: TenantId(r.array16()?),
                timeline_id: TimelineId(r.array16()?),
                wal_seg_size: r.u32()?,
            }),
            TAG_P_VOTE => ProposerMessage::VoteRequest(VoteRequest { term: r.u64()?, proposer_id: r.array16()? }),
            TAG_P_ELECTED => ProposerMessage::Elected(ProposerElected {
                term: r.u64()?,
                start_streaming_at: Lsn(r.u64()?),
                timeline_start_lsn: Lsn(r.u64()?),
                term_history: r.history()?,
            }),
            TAG_P_APPEND => {
                let term = r.u64()?;
                let begin_lsn = Lsn(r.u64()?);
                let end_lsn = Lsn(r.u64()?);
                let commit_lsn = Lsn(r.u64()?);
                let truncate_lsn = Lsn(r.u64()?);
                let wal = r.rest(buf);
                let expected = end_lsn
                    .checked_sub(begin_lsn)
                    .ok_or_else(|| r.invalid(format!("end {end_lsn} before begin {begin_lsn}")))?;
                if expected != wal.len() as u64 {
                    return Err(r.invalid(format!(
                        "carries {} WAL bytes but its range {begin_lsn}..{end_lsn} is {expected}",
                        wal.len()
                    )));
                }
                if wal.len() > MAX_APPEND_BYTES {
                    return Err(r.invalid(format!("carries {} WAL bytes, more than {MAX_APPEND_BYTES}", wal.len())));
                }
                ProposerMessage::Append(AppendRequest { term, begin_lsn, end_lsn, commit_lsn, truncate_lsn, wal })
            }
            other => return Err(DecodeError::UnknownTag(other)),
        };
        r.finish()?;
        Ok(msg)
    }

    pub fn name(&self) -> &'static str {
        match self {
            ProposerMessage::Greeting(_) => "ProposerGreeting",
            ProposerMessage::VoteRequest(_) => "VoteRequest",
            ProposerMessage::Elected(_) => "ProposerElected",
            ProposerMessage::Append(_) => "AppendRequest",
        }
    }
}

impl AcceptorMessage {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::new();
        match self {
            AcceptorMessage::Greeting(g) => {
                b.put_u8(TAG_A_GREETING);
                b.put_u64(g.node_id);
                b.put_u64(g.term);
            }
            AcceptorMessage::Vote(v) => {
                b.put_u8(TAG_A_VOTE);
                b.put_u64(v.term);
                b.put_u8(v.vote_given as u8);
                b.put_u64(v.flush_lsn.0);
                b.put_u64(v.truncate_lsn.0);
                b.put_u64(v.timeline_start_lsn.0);
                put_history(&mut b, &v.term_history);
            }
            AcceptorMessage::Append(a) => {
                b.put_u8(TAG_A_APPEND);
                b.put_u64(a.term);
                b.put_u64(a.flush_lsn.0);
                b.put_u64(a.commit_lsn.0);
                b.put_u64(a.pageserver_feedback.last_received_lsn.0);
                b.put_u64(a.pageserver_feedback.disk_consistent_lsn.0);
                b.put_u64(a.pageserver_feedback.remote_consistent_lsn.0);
            }
        }
        b.freeze()
    }

    pub fn decode(buf: &Bytes) -> Result<AcceptorMessage, DecodeError> {
        let mut r = Reader::new(buf)?;
        let msg = match r.tag {
            TAG_A_GREETING => AcceptorMessage::Greeting(AcceptorGreeting { node_id: r.u64()?, term: r.u64()? }),
            TAG_A_VOTE => {
                let term = r.u64()?;
                let vote_given = match r.u8()? {
                    0 => false,
                    1 => true,
                    v => return Err(r.invalid(format!("vote_given is {v}, not 0 or 1"))),
                };
                AcceptorMessage::Vote(VoteResponse {
                    term,
                    vote_given,
                    flush_lsn: Lsn(r.u64()?),
                    truncate_lsn: Lsn(r.u64()?),
                    timeline_start_lsn: Lsn(r.u64()?),
                    term_history: r.history()?,
                })
            }
            TAG_A_APPEND => AcceptorMessage::Append(AppendResponse {
                term: r.u64()?,
                flush_lsn: Lsn(r.u64()?),
                commit_lsn: Lsn(r.u64()?),
                pageserver_feedback: PageserverFeedback {
                    last_received_lsn: Lsn(r.u64()?),
                    disk_consistent_lsn: Lsn(r.u64()?),
                    remote_consistent_lsn: Lsn(r.u64()?),
                },
            }),
            other => return Err(DecodeError::UnknownTag(other)),
        };
        r.finish()?;
        Ok(msg)
    }
}

/// Bounds-checked big-endian reader over one message.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    tag: u8,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Result<Self, DecodeError> {
        let tag = *buf.first().ok_or(DecodeError::Empty)?;
        Ok(Reader { buf, pos: 1, tag })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let left = self.buf.len() - self.pos;
        if left < n {
            return Err(DecodeError::Truncated { tag: self.tag as char, offset: self.pos, needed: n - left });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn array16(&mut self) -> Result<[u8; 16], DecodeError> {
        Ok(self.take(16)?.try_into().expect("16 bytes"))
    }

    fn history(&mut self) -> Result<TermHistory, DecodeError> {
        let n = self.u32()? as usize;
        if n > MAX_TERM_HISTORY_ENTRIES || n * 16 > self.buf.len() - self.pos {
            return Err(self.invalid(format!("term history of {n} entries does not fit the message")));
        }
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(TermLsn { term: self.u64()?, lsn: Lsn(self.u64()?) });
        }
        let h = TermHistory(v);
        h.validate().map_err(|e| self.invalid(e))?;
        Ok(h)
    }

    fn rest(&mut self, whole: &Bytes) -> Bytes {
        let r = whole.slice(self.pos..);
        self.pos = self.buf.len();
        r
    }

    fn invalid(&self, what: String) -> DecodeError {
        DecodeError::Invalid { tag: self.tag as char, what }
    }

    fn finish(self) -> Result<(), DecodeError> {
        if self.pos != self.buf.len() {
            return Err(DecodeError::Trailing { tag: self.tag as char, extra: self.buf.len() - self.pos });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn samples() -> (Vec<ProposerMessage>, Vec<AcceptorMessage>) {
        let h = TermHistory(vec![TermLsn { term: 1, lsn: Lsn(0x100) }, TermLsn { term: 4, lsn: Lsn(0x2000) }]);
        let p = vec![
            ProposerMessage::Greeting(ProposerGreeting {
                protocol_version: PROTOCOL_VERSION,
                pg_version: 150018,
                proposer_id: [7; 16],
                system_id: 42,
                tenant_id: TenantId([1; 16]),
                timeline_id: TimelineId([2; 16]),
                wal_seg_size: 16 << 20,
            }),
            ProposerMessage::VoteRequest(VoteRequest { term: 9, proposer_id: [3; 16] }),
            ProposerMessage::Elected(ProposerElected {
                term: 4,
                start_streaming_at: Lsn(0x1000),
                term_history: h.clone(),
                timeline_start_lsn: Lsn(0x100),
            }),
            ProposerMessage::Append(AppendRequest {
                term: 4,
                begin_lsn: Lsn(0x2000),
                end_lsn: Lsn(0x2005),
                commit_lsn: Lsn(0x1000),
                truncate_lsn: Lsn(0x800),
                wal: Bytes::from_static(b"abcde"),
            }),
        ];
        let a = vec![
            AcceptorMessage::Greeting(AcceptorGreeting { node_id: 3, term: 8 }),
            AcceptorMessage::Vote(VoteResponse {
                term: 9,
                vote_given: true,
                flush_lsn: Lsn(5),
                truncate_lsn: Lsn(1),
                term_history: h,
                timeline_start_lsn: Lsn(0x100),
            }),
            AcceptorMessage::Append(AppendResponse {
                term: 4,
                flush_lsn: Lsn(0x2005),
                commit_lsn: Lsn(0x2000),
                pageserver_feedback: PageserverFeedback {
                    last_received_lsn: Lsn(1),
                    disk_consistent_lsn: Lsn(2),
                    remote_consistent_lsn: Lsn(3),
                },
            }),
        ];
        (p, a)
    }

    #[test]
    fn round_trip() {
        let (p, a) = samples();
        for m in p {
            assert_eq!(ProposerMessage::decode(&m.encode()).unwrap(), m);
        }
        for m in a {
            assert_eq!(AcceptorMessage::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn bad_messages_are_errors() {
        assert_eq!(ProposerMessage::decode(&Bytes::new()), Err(DecodeError::Empty));
        assert_eq!(ProposerMessage::decode(&Bytes::from_static(b"z")), Err(DecodeError::UnknownTag(b'z')));
        // Append whose range disagrees with its payload.
        let mut m = BytesMut::new();
        m.put_u8(b'a');
        for v in [1u64, 100, 90, 0, 0] {
            m.put_u64(v);
        }
        assert!(matches!(ProposerMessage::decode(&m.freeze()), Err(DecodeError::Invalid { .. })));
        // A history claiming 2^32-1 entries must not allocate.
        let mut m = BytesMut::new();
        m.put_u8(b'e');
        m.put_u64(1);
        m.put_u64(0);
        m.put_u64(0);
        m.put_u32(u32::MAX);
        assert!(matches!(ProposerMessage::decode(&m.freeze()), Err(DecodeError::Invalid { .. })));
    }

    /// Truncated, bit-flipped and random messages: errors, never panics.
    #[test]
    fn fuzz_decoders() {
        let (p, a) = samples();
        let mut seeds: Vec<Bytes> = p.iter().map(|m| m.encode()).collect();
        seeds.extend(a.iter().map(|m| m.encode()));
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5afe);
        for i in 0..100_000 {
            let seed = &seeds[i % seeds.len()];
            let mut v = seed.to_vec();
            match i % 3 {
                0 => v.truncate(rng.gen_range(0..=v.len())),
                1 => {
                    let n = rng.gen_range(1..4);
                    for _ in 0..n {
                        let at = rng.gen_range(0..v.len());
                        v[at] ^= 1 << rng.gen_range(0..8);
                    }
                }
                _ => {
                    let len = rng.gen_range(0..64);
                    v = (0..len).map(|_| rng.gen()).collect();
                    if !v.is_empty() {
                        v[0] = *[b'g', b'v', b'e', b'a', b'G', b'V', b'A'].get(rng.gen_range(0..7)).unwrap_or(&0);
                    }
                }
            }
            let b = Bytes::from(v);
            let _ = ProposerMessage::decode(&b);
            let _ = AcceptorMessage::decode(&b);
        }
    }
}
