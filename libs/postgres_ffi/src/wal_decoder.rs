//! Streaming WAL decoder: bytes in, whole records out.
//!
//! WAL arrives in arbitrary chunks (a replication stream, a segment file read in pieces), and
//! records cross page and segment boundaries, sometimes with the record header itself split
//! across pages. The decoder keeps only the bytes it has not consumed plus the record being
//! reassembled, validates every page header it crosses (magic, flags, long header placement,
//! `xlp_pageaddr`, continuation flag and `xlp_rem_len`), the record header
//! (`ValidXLogRecordHeader`) and the record CRC (`ValidXLogRecord`), and follows the reading
//! rules of xlogreader.c `XLogDecodeNextRecord`, including `XLOG_SWITCH` (the rest of the
//! segment is padding) and `XLP_FIRST_IS_OVERWRITE_CONTRECORD`.
//!
//! Errors are sticky: once `poll` has failed it keeps returning the same error; start a new
//! decoder at a known record boundary to resume. A zero `xl_tot_len` (or an all-zero page
//! header) where a record should start is reported as [`WalDecodeError::EndOfWal`], which
//! readers of segment files treat as the normal end of the WAL rather than corruption.

use bytes::{Buf, Bytes, BytesMut};
use utils::Lsn;

use crate::record::{verify_record_crc, XLogRecordHeader, SIZE_OF_XLOG_RECORD};
use crate::xlog_page::{PageHeaderError, XLogPageHeader, SIZE_OF_XLOG_SHORT_PHD, XLP_FIRST_IS_OVERWRITE_CONTRECORD};
use crate::{WAL_SEGMENT_SIZE, WAL_SEGMENT_SIZE_MAX, WAL_SEGMENT_SIZE_MIN, XLOG_BLCKSZ};

const PAGE: u64 = XLOG_BLCKSZ as u64;
/// Initial reassembly buffer; it grows only as record bytes actually arrive, so a corrupt
/// `xl_tot_len` costs nothing until the bytes exist.
const INITIAL_RECORD_BUF_BYTES: usize = 8192;

/// What the decoder checks beyond the format itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalDecoderConfig {
    /// `wal_segment_size` of the cluster (a power of two between 1 MiB and 1 GiB).
    pub segment_size_bytes: usize,
    /// If set, long page headers must carry this system identifier.
    pub system_id: Option<u64>,
    /// If set, the first record's `xl_prev` must equal it and every later record's `xl_prev`
    /// must be the start of the record before it (the sequential-read check of Postgres).
    /// Without it, `xl_prev` only has to point before the record (the random-access check).
    pub prev_record_lsn: Option<Lsn>,
}

impl Default for WalDecoderConfig {
    fn default() -> Self {
        WalDecoderConfig { segment_size_bytes: WAL_SEGMENT_SIZE, system_id: None, prev_record_lsn: None }
    }
}

/// Why decoding stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalDecodeError {
    /// No record starts at `lsn`: the WAL ends there (zero length or an unwritten page).
    #[error("end of WAL at {lsn}: {reason}")]
    EndOfWal { lsn: Lsn, reason: &'static str },
    /// The bytes at `lsn` are not valid WAL.
    #[error("invalid WAL at {lsn}: {reason}")]
    Invalid { lsn: Lsn, reason: String },
}

impl WalDecodeError {
    pub fn lsn(&self) -> Lsn {
        match self {
            WalDecodeError::EndOfWal { lsn, .. } | WalDecodeError::Invalid { lsn, .. } => *lsn,
        }
    }

    pub fn is_end_of_wal(&self) -> bool {
        matches!(self, WalDecodeError::EndOfWal { .. })
    }
}

fn invalid(lsn: Lsn, reason: impl Into<String>) -> WalDecodeError {
    WalDecodeError::Invalid { lsn, reason: reason.into() }
}

/// One reassembled record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalRecordBytes {
    /// Where the record starts (after any page header).
    pub start_lsn: Lsn,
    /// Where reading continues (Postgres's `EndRecPtr`): the MAXALIGNed end of the record, or
    /// the next segment start after `XLOG_SWITCH`. May point at a page boundary.
    pub end_lsn: Lsn,
    /// The whole record, header included (`xl_tot_len` bytes).
    pub record: Bytes,
}

enum State {
    /// At a record boundary; at a page boundary a page header comes first.
    RecordStart,
    /// Reassembling the record that starts at `start_lsn`.
    Record { start_lsn: Lsn, total_len: u32, buf: Vec<u8>, header_checked: bool },
    /// Skipping the tail of a record that began before the decoder's start position.
    SkipContinuation { remaining: u32 },
    /// Discarding bytes up to `until`: alignment padding, or the rest of a switched segment.
    Skip { until: Lsn },
}

enum Step {
    Record(WalRecordBytes),
    NeedMore,
    Continue,
}

pub struct WalStreamDecoder {
    config: WalDecoderConfig,
    /// LSN of `input[0]`.
    pos: Lsn,
    input: BytesMut,
    state: State,
    /// The decoder started at a page boundary and has not read that page's header yet: a
    /// continuation flag there means "skip to the first record", not an error.
    at_start_page: bool,
    /// Expected `xl_prev` of the next record, when checking is enabled.
    expected_prev: Option<Lsn>,
    failed: Option<WalDecodeError>,
}

impl WalStreamDecoder {
    /// A decoder for 16 MiB segments whose input starts at `start_lsn`, a record boundary
    /// (mid-page, or a page boundary where the page header comes first). An unusable
    /// `start_lsn` is reported by the first `poll`.
    pub fn new(start_lsn: Lsn) -> WalStreamDecoder {
        match Self::with_config(start_lsn, WalDecoderConfig::default()) {
            Ok(d) => d,
            Err(e) => {
                let mut d = Self::unchecked(start_lsn, WalDecoderConfig::default());
                d.failed = Some(e);
                d
            }
        }
    }

    pub fn with_config(start_lsn: Lsn, config: WalDecoderConfig) -> Result<WalStreamDecoder, WalDecodeError> {
        let seg = config.segment_size_bytes;
        if !seg.is_power_of_two() || !(WAL_SEGMENT_SIZE_MIN..=WAL_SEGMENT_SIZE_MAX).contains(&seg) {
            return Err(invalid(
                start_lsn,
                format!("segment size {seg} is not a power of two between 1 MiB and 1 GiB"),
            ));
        }
        let page_off = start_lsn.0 % PAGE;
        let header_size = crate::xlog_page::page_header_size_at(start_lsn.page_start(), seg) as u64;
        if start_lsn.0 % 8 != 0 || (page_off != 0 && page_off < header_size) {
            return Err(invalid(
                start_lsn,
                "start position is not a record boundary (unaligned or inside a page header)",
            ));
        }
        Ok(Self::unchecked(start_lsn, config))
    }

    fn unchecked(start_lsn: Lsn, config: WalDecoderConfig) -> WalStreamDecoder {
        WalStreamDecoder {
            config,
            pos: start_lsn,
            input: BytesMut::new(),
            state: State::RecordStart,
            at_start_page: start_lsn.0 % PAGE == 0,
            expected_prev: config.prev_record_lsn,
            failed: None,
        }
    }

    /// Appends the next bytes of the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
    }

    /// The LSN just past the last byte fed so far.
    pub fn fed_up_to(&self) -> Lsn {
        Lsn(self.pos.0.saturating_add(self.input.len() as u64))
    }

    /// The next complete record as `(end_lsn, record bytes)`, or `None` if more input is
    /// needed. See [`WalRecordBytes::end_lsn`].
    pub fn poll(&mut self) -> Result<Option<(Lsn, Bytes)>, WalDecodeError> {
        Ok(self.poll_record()?.map(|r| (r.end_lsn, r.record)))
    }

    /// Like [`WalStreamDecoder::poll`], also giving the record's start LSN.
    pub fn poll_record(&mut self) -> Result<Option<WalRecordBytes>, WalDecodeError> {
        loop {
            if let Some(e) = &self.failed {
                return Err(e.clone());
            }
            match self.step() {
                Ok(Step::Record(r)) => return Ok(Some(r)),
                Ok(Step::NeedMore) => return Ok(None),
                Ok(Step::Continue) => {}
                Err(e) => {
                    self.failed = Some(e.clone());
                    return Err(e);
                }
            }
        }
    }

    fn consume(&mut self, n: usize) {
        self.input.advance(n);
        self.pos = Lsn(self.pos.0.saturating_add(n as u64));
    }

    /// Advances by at most one page-bounded piece. Takes the state by value and always puts
    /// a state back, so there is no half-updated state on any return path.
    fn step(&mut self) -> Result<Step, WalDecodeError> {
        let state = std::mem::replace(&mut self.state, State::RecordStart);
        if let State::Skip { until } = state {
            let n = (until.0 - self.pos.0).min(self.input.len() as u64) as usize;
            self.consume(n);
            if self.pos == until {
                return Ok(Step::Continue);
            }
            self.state = State::Skip { until };
            return Ok(Step::NeedMore);
        }
        if self.pos.0 % PAGE == 0 {
            self.state = state;
            return self.page_header();
        }
        let page_left = (PAGE - self.pos.0 % PAGE) as usize;
        match state {
            State::Skip { .. } => Ok(Step::Continue),
            State::SkipContinuation { remaining } => {
                let n = (remaining as usize).min(page_left).min(self.input.len());
                self.consume(n);
                let remaining = remaining - n as u32;
                if remaining == 0 {
                    self.state = State::Skip { until: align8(self.pos) };
                    return Ok(Step::Continue);
                }
                self.state = State::SkipContinuation { remaining };
                Ok(if n == 0 { Step::NeedMore } else { Step::Continue })
            }
            State::RecordStart => {
                if self.input.len() < 4 {
                    return Ok(Step::NeedMore);
                }
                // Records are MAXALIGNed, so xl_tot_len is always on this page.
                let total_len = u32::from_le_bytes([self.input[0], self.input[1], self.input[2], self.input[3]]);
                if total_len == 0 {
                    return Err(WalDecodeError::EndOfWal { lsn: self.pos, reason: "record length is zero" });
                }
                let header_on_page = page_left >= SIZE_OF_XLOG_RECORD;
                if header_on_page && self.input.len() < SIZE_OF_XLOG_RECORD {
                    return Ok(Step::NeedMore);
                }
                if (total_len as usize) < SIZE_OF_XLOG_RECORD {
                    return Err(invalid(
                        self.pos,
                        format!("invalid record length: wanted at least {SIZE_OF_XLOG_RECORD}, got {total_len}"),
                    ));
                }
                let start_lsn = self.pos;
                if header_on_page {
                    self.check_header(start_lsn, &self.input[..SIZE_OF_XLOG_RECORD])?;
                } else if total_len > crate::record::XLOG_RECORD_MAX_SIZE {
                    return Err(invalid(start_lsn, format!("record length {total_len} exceeds the maximum")));
                }
                self.state = State::Record {
                    start_lsn,
                    total_len,
                    buf: Vec::with_capacity((total_len as usize).min(INITIAL_RECORD_BUF_BYTES)),
                    header_checked: header_on_page,
                };
                Ok(Step::Continue)
            }
            State::Record { start_lsn, total_len, mut buf, mut header_checked } => {
                let need = total_len as usize - buf.len();
                let n = need.min(page_left).min(self.input.len());
                buf.extend_from_slice(&self.input[..n]);
                self.consume(n);
                if !header_checked && buf.len() >= SIZE_OF_XLOG_RECORD {
                    self.check_header(start_lsn, &buf[..SIZE_OF_XLOG_RECORD])?;
                    header_checked = true;
                }
                if buf.len() == total_len as usize {
                    return self.finish_record(start_lsn, buf).map(Step::Record);
                }
                self.state = State::Record { start_lsn, total_len, buf, header_checked };
                Ok(if n == 0 { Step::NeedMore } else { Step::Continue })
            }
        }
    }

    /// Header checks of `ValidXLogRecordHeader`: length, resource manager, prev-link.
    fn check_header(&self, start_lsn: Lsn, header_bytes: &[u8]) -> Result<(), WalDecodeError> {
        let header =
            XLogRecordHeader::decode(header_bytes).ok_or_else(|| invalid(start_lsn, "record header is incomplete"))?;
        header.validate(start_lsn).map_err(|e| invalid(start_lsn, e.what))?;
        if header.xl_prev >= start_lsn {
            return Err(invalid(
                start_lsn,
                format!("record with incorrect prev-link {} (not before the record)", header.xl_prev),
            ));
        }
        if let Some(expected) = self.expected_prev {
            if header.xl_prev != expected {
                return Err(invalid(
                    start_lsn,
                    format!("record with incorrect prev-link {}, expected {expected}", header.xl_prev),
                ));
            }
        }
        Ok(())
    }

    fn finish_record(&mut self, start_lsn: Lsn, buf: Vec<u8>) -> Result<WalRecordBytes, WalDecodeError> {
        verify_record_crc(&buf, start_lsn).map_err(|e| invalid(start_lsn, e.what))?;
        let header = XLogRecordHeader::decode(&buf).ok_or_else(|| invalid(start_lsn, "record header is incomplete"))?;
        let mut end_lsn = align8(self.pos);
        if header.is_xlog_switch() {
            // Pretend the record extends to the end of the segment, like XLogDecodeNextRecord.
            let seg = self.config.segment_size_bytes as u64;
            end_lsn = Lsn(end_lsn.0.div_ceil(seg).saturating_mul(seg));
        }
        self.state = State::Skip { until: end_lsn };
        if self.expected_prev.is_some() {
            self.expected_prev = Some(start_lsn);
        }
        Ok(WalRecordBytes { start_lsn, end_lsn, record: Bytes::from(buf) })
    }

    /// Reads and checks the page header at `self.pos` (a page boundary).
    fn page_header(&mut self) -> Result<Step, WalDecodeError> {
        let page_lsn = self.pos;
        if self.input.len() < SIZE_OF_XLOG_SHORT_PHD {
            return Ok(Step::NeedMore);
        }
        let info = u16::from_le_bytes([self.input[2], self.input[3]]);
        if self.input.len() < XLogPageHeader::size_for_info(info) {
            return Ok(Step::NeedMore);
        }
        let at_record_start = matches!(self.state, State::RecordStart);
        if at_record_start && self.input[..SIZE_OF_XLOG_SHORT_PHD].iter().all(|&b| b == 0) {
            return Err(WalDecodeError::EndOfWal {
                lsn: page_lsn,
                reason: "page was never written (all-zero page header)",
            });
        }
        let hdr = XLogPageHeader::decode(&self.input).map_err(|e| invalid(page_lsn, format!("page header: {e}")))?;
        let context = match &self.state {
            State::Record { start_lsn, .. } => format!(" (while reading the record at {start_lsn})"),
            _ => String::new(),
        };
        match hdr.validate(page_lsn, self.config.segment_size_bytes, self.config.system_id) {
            Ok(()) => {}
            // An older page address where a new record would start is a recycled segment
            // that was never overwritten: the normal end of WAL after a crash.
            Err(PageHeaderError::WrongPageAddr { found, expected }) if at_record_start && found < expected => {
                return Err(WalDecodeError::EndOfWal {
                    lsn: page_lsn,
                    reason: "page is left over from a recycled segment",
                });
            }
            Err(e) => return Err(invalid(page_lsn, format!("page header: {e}{context}"))),
        }
        self.consume(hdr.size());
        let first_page = std::mem::replace(&mut self.at_start_page, false);

        if matches!(self.state, State::Record { .. }) && hdr.xlp_info & XLP_FIRST_IS_OVERWRITE_CONTRECORD != 0 {
            // The record we were reading was never finished; a new record overwrote its
            // continuation. Drop it and read from here, as XLogDecodeNextRecord does.
            self.state = State::RecordStart;
            self.expected_prev = None;
        }
        match &mut self.state {
            State::RecordStart => {
                if hdr.is_contrecord() {
                    if !first_page {
                        return Err(invalid(
                            page_lsn,
                            "page header has XLP_FIRST_IS_CONTRECORD but a new record should start here",
                        ));
                    }
                    // Started at a page boundary inside a record: skip its tail.
                    self.state = State::SkipContinuation { remaining: hdr.xlp_rem_len };
                }
            }
            State::Record { start_lsn, total_len, buf, .. } => {
                let expected = *total_len as usize - buf.len();
                if !hdr.is_contrecord() {
                    return Err(invalid(
                        page_lsn,
                        format!("there is no contrecord flag; record at {start_lsn} continues here"),
                    ));
                }
                if hdr.xlp_rem_len == 0 || hdr.xlp_rem_len as usize != expected {
                    return Err(invalid(
                        page_lsn,
                        format!(
                            "invalid contrecord length {} (expected {expected}) for record at {start_lsn}",
                            hdr.xlp_rem_len
                        ),
                    ));
                }
            }
            State::SkipContinuation { remaining } => {
                if !hdr.is_contrecord() || hdr.xlp_rem_len != *remaining {
                    return Err(invalid(
                        page_lsn,
                        format!(
                            "continuation flag {} with xlp_rem_len {}, expected a continuation of {} bytes",
                            hdr.is_contrecord(),
                            hdr.xlp_rem_len,
                            remaining
                        ),
                    ));
                }
            }
            // Skipping ends before any page header is read (see `step`).
            State::Skip { .. } => {}
        }
        Ok(Step::Continue)
    }
}

/// Rounds up to the next MAXALIGN boundary, saturating instead of panicking at the top of the
/// LSN space (which real WAL never reaches, but input bytes could claim).
fn align8(lsn: Lsn) -> Lsn {
    lsn.align_up(crate::MAXALIGN as u64).unwrap_or(Lsn(!7))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::decode_record;
    use crate::rmgr::{RM_HEAP_ID, RM_XLOG_ID};
    use crate::wal_writer::{RecordSpec, WalBuilder};

    const SEG: usize = 1024 * 1024;
    const SYSID: u64 = 7_000_000_000_000_000_001;

    /// Records of assorted sizes laid out from `start`, including headers split across page
    /// boundaries, multi-page records, a segment boundary and an XLOG_SWITCH.
    /// (start, end, bytes) of each record a test wrote.
    type Written = Vec<(Lsn, Lsn, Vec<u8>)>;

    fn sample_wal(start: Lsn) -> (Vec<u8>, Written) {
        let mut b = WalBuilder::new(start, Lsn(0x10), SYSID, 1, SEG).unwrap();
        let mut expected = Vec::new();
        fn push(b: &mut WalBuilder, expected: &mut Written, len: usize, seed: u8) {
            let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
            let spec = RecordSpec::main_data_only(RM_HEAP_ID, 0x10, 700 + seed as u32, &data);
            let prev = b.prev_record();
            let (s, e) = b.append(&spec).unwrap();
            expected.push((s, e, crate::wal_writer::encode_record(&spec, prev).unwrap()));
        }
        for (i, len) in [10usize, 100, 3000, 20000, 5, 255, 256, 8200].iter().enumerate() {
            push(&mut b, &mut expected, *len, i as u8);
        }
        // Headers split at every possible offset near a page end.
        for back in [8u64, 16] {
            let target = Lsn((b.end_lsn().0 / 8192 + 1) * 8192 - back);
            b.append_noops_until(target).unwrap();
            push(&mut b, &mut expected, 50, 9);
        }
        // Up to the end of the first segment and across it.
        let seg_end = Lsn((b.end_lsn().0 / SEG as u64 + 1) * SEG as u64);
        b.append_noops_until(Lsn(seg_end.0 - 8)).unwrap();
        push(&mut b, &mut expected, 40, 10);
        push(&mut b, &mut expected, 9000, 11);
        let (_, switch_end) = b.append_switch().unwrap();
        assert_eq!(switch_end.0 % SEG as u64, 0);
        push(&mut b, &mut expected, 70, 12);
        (b.into_bytes(), expected)
    }

    fn decode_all(start: Lsn, wal: &[u8], chunk: usize) -> (Vec<WalRecordBytes>, Option<WalDecodeError>) {
        let cfg = WalDecoderConfig { segment_size_bytes: SEG, system_id: Some(SYSID), prev_record_lsn: None };
        let mut d = WalStreamDecoder::with_config(start, cfg).unwrap();
        let mut out = Vec::new();
        for piece in wal.chunks(chunk.max(1)) {
            d.feed(piece);
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

    #[test]
    fn reassembles_across_pages_and_segments_in_any_chunking() {
        let start = Lsn(SEG as u64 * 3);
        let (wal, expected) = sample_wal(start);
        let (all, err) = decode_all(start, &wal, wal.len());
        assert_eq!(err, None);
        for chunk in [1usize, 7, 8, 24, 100, 8191, 8192, 8193, 65536] {
            let (recs, err) = decode_all(start, &wal, chunk);
            assert_eq!(err, None, "chunk {chunk}");
            assert_eq!(recs, all, "chunk {chunk}");
        }
        // Every record the builder wrote is decoded at the same place with the same bytes.
        for (s, e, bytes) in &expected {
            let got = all.iter().find(|r| r.start_lsn == *s).expect("record found");
            assert_eq!(got.end_lsn, *e);
            assert_eq!(got.record.len(), bytes.len());
            assert_eq!(&got.record[..], &bytes[..]);
        }
        for r in &all {
            decode_record(r.record.clone(), r.start_lsn).unwrap();
        }
        // Split headers really happened.
        assert!(all.iter().any(|r| 8192 - r.start_lsn.0 % 8192 == 8));
        assert!(all.iter().any(|r| 8192 - r.start_lsn.0 % 8192 == 16));
        // Records were chained by xl_prev.
        for w in all.windows(2) {
            assert_eq!(XLogRecordHeader::decode(&w[1].record).unwrap().xl_prev, w[0].start_lsn);
        }
        // After XLOG_SWITCH, reading resumes at the next segment.
        let switch = all.iter().position(|r| XLogRecordHeader::decode(&r.record).unwrap().is_xlog_switch()).unwrap();
        assert_eq!(all[switch].end_lsn.0 % SEG as u64, 0);
        assert_eq!(all[switch + 1].start_lsn, Lsn(all[switch].end_lsn.0 + 40));
    }

    #[test]
    fn starts_mid_page_and_at_a_page_boundary_inside_a_record() {
        let start = Lsn(SEG as u64 * 3);
        let (wal, _) = sample_wal(start);
        let (all, _) = decode_all(start, &wal, wal.len());
        // Mid-page start at each record boundary.
        for r in all.iter().skip(1).take(12) {
            let off = (r.start_lsn.0 - start.0) as usize;
            let (recs, err) = decode_all(r.start_lsn, &wal[off..], 333);
            assert_eq!(err, None);
            assert_eq!(recs[0], *r);
            assert_eq!(recs.len(), all.len() - all.iter().position(|x| x == r).unwrap());
        }
        // Page-boundary starts inside multi-page records skip the continuation.
        let big = all.iter().find(|r| r.record.len() > 16384).unwrap();
        let page = Lsn((big.start_lsn.0 / 8192 + 1) * 8192);
        let off = (page.0 - start.0) as usize;
        let (recs, err) = decode_all(page, &wal[off..], 4096);
        assert_eq!(err, None);
        assert!(recs[0].start_lsn >= big.end_lsn);
        assert_eq!(recs.last(), all.last());
    }

    #[test]
    fn end_of_wal_and_corruption_are_reported_with_lsns() {
        let start = Lsn(SEG as u64 * 3);
        let (mut wal, _) = sample_wal(start);
        let (all, _) = decode_all(start, &wal, wal.len());
        let last_end = all.last().unwrap().end_lsn;
        wal.resize(wal.len() + 10000, 0);
        let (recs, err) = decode_all(start, &wal, 1000);
        assert_eq!(recs.len(), all.len());
        assert_eq!(err, Some(WalDecodeError::EndOfWal { lsn: last_end, reason: "record length is zero" }));

        // Flip a byte inside the 4th record: CRC error at its start.
        let victim = &all[3];
        let off = (victim.start_lsn.0 - start.0) as usize + 100;
        wal[off] ^= 0x40;
        let (recs, err) = decode_all(start, &wal, 512);
        assert_eq!(recs.len(), 3);
        let err = err.unwrap();
        assert_eq!(err.lsn(), victim.start_lsn);
        assert!(err.to_string().contains("checksum"), "{err}");
        wal[off] ^= 0x40;

        // A wrong xlp_pageaddr on a continuation page.
        let page = Lsn((victim.start_lsn.0 / 8192 + 1) * 8192);
        let poff = (page.0 - start.0) as usize + 8;
        wal[poff] ^= 0x01;
        let (_, err) = decode_all(start, &wal, 512);
        let err = err.unwrap();
        assert_eq!(err.lsn(), page);
        assert!(err.to_string().contains("pageaddr"), "{err}");
        wal[poff] ^= 0x01;

        // Errors are sticky.
        let mut d = WalStreamDecoder::new(Lsn(0x100_0004));
        assert!(d.poll().is_err());
        d.feed(&[0u8; 100]);
        assert!(d.poll().is_err());
    }

    #[test]
    fn overwrite_contrecord_abandons_the_partial_record() {
        let start = Lsn(SEG as u64 * 3 + 8192 + 24);
        let mut b = WalBuilder::new(start, Lsn(0x10), SYSID, 1, SEG).unwrap();
        let (r0, _) = b.append(&RecordSpec::main_data_only(RM_HEAP_ID, 0, 700, &[1; 100])).unwrap();
        b.append(&RecordSpec::main_data_only(RM_HEAP_ID, 0, 701, &[2; 9000])).unwrap();
        // Keep the torn record's first page only, then a page that overwrites its continuation.
        let page2 = Lsn(SEG as u64 * 3 + 2 * 8192);
        let mut wal = b.bytes()[..(page2.0 - start.0) as usize].to_vec();
        let mut b2 = WalBuilder::new(page2, r0, SYSID, 1, SEG).unwrap();
        let overwrite = RecordSpec::main_data_only(RM_XLOG_ID, 0xD0, 0, &[0; 16]);
        let (ow, _) = b2.append(&overwrite).unwrap();
        let mut tail = b2.into_bytes();
        tail[2] |= XLP_FIRST_IS_OVERWRITE_CONTRECORD as u8;
        wal.extend_from_slice(&tail);
        let (recs, err) = decode_all(start, &wal, 100);
        assert_eq!(err, None);
        assert_eq!(recs.iter().map(|r| r.start_lsn).collect::<Vec<_>>(), vec![r0, ow]);
        // Without the flag, the same bytes are an error naming the missing continuation.
        wal[(page2.0 - start.0) as usize + 2] &= !(XLP_FIRST_IS_OVERWRITE_CONTRECORD as u8);
        let (_, err) = decode_all(start, &wal, 100);
        assert!(err.unwrap().to_string().contains("no contrecord flag"));
    }

    #[test]
    fn recycled_segment_is_end_of_wal() {
        let start = Lsn(SEG as u64 * 3 + 8192 - 200);
        let mut b = WalBuilder::new(start, Lsn(0x10), SYSID, 1, SEG).unwrap();
        b.append(&RecordSpec::main_data_only(RM_HEAP_ID, 0, 700, &[1; 100])).unwrap();
        b.append_noops_until(Lsn(SEG as u64 * 3 + 8192 + 24)).unwrap();
        let mut wal = b.into_bytes();
        // The next page is an old page from a recycled segment.
        let old = crate::xlog_page::XLogPageHeader::short(1, Lsn(SEG as u64 + 8192), 0);
        let cut = (SEG as u64 * 3 + 8192 - start.0) as usize;
        assert_eq!(wal.len(), cut, "the builder stopped at the page boundary");
        wal.resize(cut, 0);
        wal.extend_from_slice(&old.encode());
        wal.extend_from_slice(&[0xAA; 100]);
        let (recs, err) = decode_all(start, &wal, 64);
        assert!(!recs.is_empty());
        let err = err.unwrap();
        assert!(err.is_end_of_wal(), "{err}");
        assert_eq!(err.lsn(), Lsn(SEG as u64 * 3 + 8192));
    }

    #[test]
    fn prev_link_checking() {
        let start = Lsn(SEG as u64 * 3);
        let (wal, _) = sample_wal(start);
        let cfg = WalDecoderConfig { segment_size_bytes: SEG, system_id: None, prev_record_lsn: Some(Lsn(0x10)) };
        let mut d = WalStreamDecoder::with_config(start, cfg).unwrap();
        d.feed(&wal);
        let mut n = 0;
        while let Some(_r) = d.poll().unwrap() {
            n += 1;
        }
        assert!(n > 10);
        let cfg = WalDecoderConfig { prev_record_lsn: Some(Lsn(0x18)), ..cfg };
        let mut d = WalStreamDecoder::with_config(start, cfg).unwrap();
        d.feed(&wal);
        assert!(d.poll().unwrap_err().to_string().contains("prev-link"));
        // Wrong system id in the long header.
        let cfg = WalDecoderConfig { segment_size_bytes: SEG, system_id: Some(1), prev_record_lsn: None };
        let mut d = WalStreamDecoder::with_config(start, cfg).unwrap();
        d.feed(&wal);
        assert!(d.poll().unwrap_err().to_string().contains("different database system"));
        // Wrong segment size: with 16 MiB segments, 3 MiB is not a segment start.
        let mut d = WalStreamDecoder::new(start);
        d.feed(&wal);
        assert!(d.poll().unwrap_err().to_string().contains("long header on a page that does not start a segment"));
        let mut d = WalStreamDecoder::new(Lsn(0));
        d.feed(&wal);
        assert!(d.poll().unwrap_err().to_string().contains("segment size 1048576"));
        let _ = RM_XLOG_ID;
    }
}
