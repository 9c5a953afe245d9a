//! Writing WAL: record encoding (`XLogRecordAssemble`), a WAL stream builder that lays
//! records across pages and segments with correct page headers, and the segment holding a
//! single shutdown checkpoint that lets a compute start at an arbitrary LSN (DESIGN D4), or
//! the WAL that starts a hot standby at a running-xacts record.

use utils::Lsn;

use crate::checkpoint::CheckPoint;
use crate::crc::xlog_record_crc;
use crate::record::{
    ImageCompression, XLogRecordHeader, BKPBLOCK_HAS_DATA, BKPBLOCK_HAS_IMAGE, BKPBLOCK_SAME_REL, BKPBLOCK_WILL_INIT,
    BKPIMAGE_APPLY, BKPIMAGE_HAS_HOLE, SIZE_OF_XLOG_RECORD, XLOG_RECORD_MAX_SIZE, XLR_BLOCK_ID_DATA_LONG,
    XLR_BLOCK_ID_DATA_SHORT, XLR_BLOCK_ID_ORIGIN, XLR_BLOCK_ID_TOPLEVEL_XID, XLR_MAX_BLOCK_ID, XL_CRC_OFFSET,
};
use crate::records::standby::XLOG_RUNNING_XACTS;
use crate::records::xlog::{XLOG_CHECKPOINT_ONLINE, XLOG_CHECKPOINT_SHUTDOWN, XLOG_SWITCH};
use crate::reltag::{RelFileNode, MAX_FORKNUM};
use crate::rmgr::{RM_STANDBY_ID, RM_XLOG_ID};
use crate::xlog_page::{is_valid_record_start, XLogPageHeader};
use crate::{BlockNumber, TransactionId, BLCKSZ, WAL_SEGMENT_SIZE_MAX, WAL_SEGMENT_SIZE_MIN, XLOG_BLCKSZ};

const PAGE: u64 = XLOG_BLCKSZ as u64;

/// A record or stream could not be written as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot write WAL: {0}")]
pub struct WalWriteError(pub String);

fn werr(msg: impl Into<String>) -> WalWriteError {
    WalWriteError(msg.into())
}

/// A full-page image to put in a block reference, already in its stored form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// The page without its hole, compressed with `compression` (or not).
    pub stored: Vec<u8>,
    pub hole_offset: u16,
    pub hole_length: u16,
    pub compression: ImageCompression,
    pub apply: bool,
}

impl ImageSpec {
    /// An uncompressed image of `page`, leaving out `hole_length` bytes at `hole_offset`.
    pub fn uncompressed(page: &[u8], hole_offset: u16, hole_length: u16) -> ImageSpec {
        let (o, l) = (hole_offset as usize, hole_length as usize);
        let mut stored = page[..o.min(page.len())].to_vec();
        stored.extend_from_slice(page.get(o + l..).unwrap_or(&[]));
        ImageSpec { stored, hole_offset, hole_length, compression: ImageCompression::None, apply: true }
    }
}

/// One block reference to encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSpec {
    pub block_id: u8,
    pub rel: RelFileNode,
    pub forknum: u8,
    pub blkno: BlockNumber,
    pub will_init: bool,
    pub image: Option<ImageSpec>,
    pub data: Vec<u8>,
}

/// A record to encode: what `XLogBeginInsert`/`XLogRegister*`/`XLogInsert` would be given.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecordSpec {
    pub rmid: u8,
    /// Full `xl_info` (resource manager bits and `XLR_*` flags).
    pub info: u8,
    pub xid: TransactionId,
    pub blocks: Vec<BlockSpec>,
    pub main_data: Vec<u8>,
    pub origin: Option<u16>,
    pub toplevel_xid: Option<TransactionId>,
}

impl RecordSpec {
    /// A record with only main data.
    pub fn main_data_only(rmid: u8, info: u8, xid: TransactionId, main_data: &[u8]) -> RecordSpec {
        RecordSpec { rmid, info, xid, main_data: main_data.to_vec(), ..Default::default() }
    }
}

/// Encodes a record with `xl_prev = prev` and a correct CRC, in the layout of
/// `XLogRecordAssemble`: block headers (with `BKPBLOCK_SAME_REL` when a block's relation
/// equals the previous one's), origin, toplevel xid, main data header; then the payloads.
pub fn encode_record(spec: &RecordSpec, prev: Lsn) -> Result<Vec<u8>, WalWriteError> {
    let mut headers = Vec::new();
    let mut payload = Vec::new();
    let mut last_rel: Option<RelFileNode> = None;
    let mut last_id: Option<u8> = None;
    for b in &spec.blocks {
        if b.block_id > XLR_MAX_BLOCK_ID || last_id.is_some_and(|l| b.block_id <= l) {
            return Err(werr(format!("block id {} out of range or not ascending", b.block_id)));
        }
        if b.forknum > MAX_FORKNUM {
            return Err(werr(format!("fork number {} is not valid", b.forknum)));
        }
        last_id = Some(b.block_id);
        let data_len: u16 = b.data.len().try_into().map_err(|_| werr("block data longer than 65535 bytes"))?;
        let mut fork_flags = b.forknum;
        if b.image.is_some() {
            fork_flags |= BKPBLOCK_HAS_IMAGE;
        }
        if !b.data.is_empty() {
            fork_flags |= BKPBLOCK_HAS_DATA;
        }
        if b.will_init {
            fork_flags |= BKPBLOCK_WILL_INIT;
        }
        let same_rel = last_rel == Some(b.rel);
        if same_rel {
            fork_flags |= BKPBLOCK_SAME_REL;
        }
        headers.push(b.block_id);
        headers.push(fork_flags);
        headers.extend_from_slice(&data_len.to_le_bytes());
        if let Some(img) = &b.image {
            let compressed = img.compression != ImageCompression::None;
            let has_hole = img.hole_length > 0;
            let expected_len = BLCKSZ.saturating_sub(img.hole_length as usize);
            if img.hole_offset as usize + img.hole_length as usize > BLCKSZ
                || (!compressed && img.stored.len() != expected_len)
                || (compressed && img.stored.len() >= BLCKSZ)
                || (has_hole && img.hole_offset == 0)
            {
                return Err(werr(format!(
                    "image of {} bytes with hole {}+{} is not consistent",
                    img.stored.len(),
                    img.hole_offset,
                    img.hole_length
                )));
            }
            let mut bimg_info = img.compression.flag();
            if has_hole {
                bimg_info |= BKPIMAGE_HAS_HOLE;
            }
            if img.apply {
                bimg_info |= BKPIMAGE_APPLY;
            }
            headers.extend_from_slice(&(img.stored.len() as u16).to_le_bytes());
            headers.extend_from_slice(&(if has_hole { img.hole_offset } else { 0 }).to_le_bytes());
            headers.push(bimg_info);
            if compressed && has_hole {
                headers.extend_from_slice(&img.hole_length.to_le_bytes());
            }
            payload.extend_from_slice(&img.stored);
        }
        if !same_rel {
            headers.extend_from_slice(&b.rel.encode());
        }
        headers.extend_from_slice(&b.blkno.to_le_bytes());
        payload.extend_from_slice(&b.data);
        last_rel = Some(b.rel);
    }
    if let Some(origin) = spec.origin {
        headers.push(XLR_BLOCK_ID_ORIGIN);
        headers.extend_from_slice(&origin.to_le_bytes());
    }
    if let Some(xid) = spec.toplevel_xid {
        headers.push(XLR_BLOCK_ID_TOPLEVEL_XID);
        headers.extend_from_slice(&xid.to_le_bytes());
    }
    if !spec.main_data.is_empty() {
        if spec.main_data.len() <= u8::MAX as usize {
            headers.push(XLR_BLOCK_ID_DATA_SHORT);
            headers.push(spec.main_data.len() as u8);
        } else {
            headers.push(XLR_BLOCK_ID_DATA_LONG);
            headers.extend_from_slice(&(spec.main_data.len() as u32).to_le_bytes());
        }
        payload.extend_from_slice(&spec.main_data);
    }
    let total_len = SIZE_OF_XLOG_RECORD + headers.len() + payload.len();
    if total_len > XLOG_RECORD_MAX_SIZE as usize {
        return Err(werr(format!("record of {total_len} bytes exceeds the maximum record size")));
    }
    let header = XLogRecordHeader {
        xl_tot_len: total_len as u32,
        xl_xid: spec.xid,
        xl_prev: prev,
        xl_info: spec.info,
        xl_rmid: spec.rmid,
        xl_crc: 0,
    };
    let mut out = Vec::with_capacity(total_len);
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(&headers);
    out.extend_from_slice(&payload);
    let crc = xlog_record_crc(&out[..XL_CRC_OFFSET], &out[SIZE_OF_XLOG_RECORD..]);
    out[XL_CRC_OFFSET..SIZE_OF_XLOG_RECORD].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Lays records out as WAL: page headers (long at segment starts), continuation flags and
/// `xlp_rem_len` on pages a record spills onto, MAXALIGN padding, `XLOG_SWITCH` padding.
/// The output starts at `start_lsn`, which is a page boundary or a record boundary.
pub struct WalBuilder {
    seg_size_bytes: usize,
    system_id: u64,
    timeline: u32,
    start_lsn: Lsn,
    out: Vec<u8>,
    prev_record: Lsn,
}

impl WalBuilder {
    pub fn new(
        start_lsn: Lsn,
        prev_record: Lsn,
        system_id: u64,
        timeline: u32,
        seg_size_bytes: usize,
    ) -> Result<Self, WalWriteError> {
        if !seg_size_bytes.is_power_of_two() || !(WAL_SEGMENT_SIZE_MIN..=WAL_SEGMENT_SIZE_MAX).contains(&seg_size_bytes)
        {
            return Err(werr(format!("segment size {seg_size_bytes} is not a power of two between 1 MiB and 1 GiB")));
        }
        if start_lsn.0 % PAGE != 0 && !is_valid_record_start(start_lsn, seg_size_bytes) {
            return Err(werr(format!("start {start_lsn} is neither a page boundary nor a record boundary")));
        }
        Ok(WalBuilder { seg_size_bytes, system_id, timeline, start_lsn, out: Vec::new(), prev_record })
    }

    /// LSN just past the bytes written so far.
    pub fn end_lsn(&self) -> Lsn {
        Lsn(self.start_lsn.0 + self.out.len() as u64)
    }

    pub fn start_lsn(&self) -> Lsn {
        self.start_lsn
    }

    /// Start LSN of the last record written (the next record's `xl_prev`).
    pub fn prev_record(&self) -> Lsn {
        self.prev_record
    }

    pub fn bytes(&self) -> &[u8] {
        &self.out
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.out
    }

    /// Writes a page header if the output is at a page boundary. `rem_len > 0` marks the page
    /// as continuing a record with that many bytes left.
    fn page_header_if_at_boundary(&mut self, rem_len: u32) {
        let pos = self.end_lsn();
        if pos.0 % PAGE != 0 {
            return;
        }
        let hdr = if pos.0 % self.seg_size_bytes as u64 == 0 {
            XLogPageHeader::long(self.timeline, pos, rem_len, self.system_id, self.seg_size_bytes as u32)
        } else {
            XLogPageHeader::short(self.timeline, pos, rem_len)
        };
        self.out.extend_from_slice(&hdr.encode());
    }

    fn zero_fill_to(&mut self, lsn: Lsn) {
        let target = (lsn.0 - self.start_lsn.0) as usize;
        if target > self.out.len() {
            self.out.resize(target, 0);
        }
    }

    /// Encodes `spec` with the right `xl_prev` and appends it; returns (start, end) where end
    /// is Postgres's `EndRecPtr` (next segment start for `XLOG_SWITCH`).
    pub fn append(&mut self, spec: &RecordSpec) -> Result<(Lsn, Lsn), WalWriteError> {
        let record = encode_record(spec, self.prev_record)?;
        Ok(self.append_encoded(&record))
    }

    /// Appends an already encoded record as is (its `xl_prev` is not touched).
    pub fn append_encoded(&mut self, record: &[u8]) -> (Lsn, Lsn) {
        self.page_header_if_at_boundary(0);
        let start = self.end_lsn();
        let mut written = 0;
        while written < record.len() {
            self.page_header_if_at_boundary((record.len() - written) as u32);
            let page_left = (PAGE - self.end_lsn().0 % PAGE) as usize;
            let n = page_left.min(record.len() - written);
            self.out.extend_from_slice(&record[written..written + n]);
            written += n;
        }
        let mut end = self.end_lsn().align();
        self.zero_fill_to(end);
        let is_switch = XLogRecordHeader::decode(record).is_some_and(|h| h.is_xlog_switch());
        if is_switch {
            // The rest of the segment is unused: pages with plain headers and zeros.
            let seg = self.seg_size_bytes as u64;
            let seg_end = Lsn(end.0.div_ceil(seg) * seg);
            while self.end_lsn() < seg_end {
                self.page_header_if_at_boundary(0);
                let next_page = Lsn((self.end_lsn().0 / PAGE + 1) * PAGE);
                self.zero_fill_to(next_page);
            }
            end = seg_end;
        }
        self.prev_record = start;
        (start, end)
    }

    /// Appends an `XLOG_SWITCH` record.
    pub fn append_switch(&mut self) -> Result<(Lsn, Lsn), WalWriteError> {
        self.append(&RecordSpec::main_data_only(RM_XLOG_ID, XLOG_SWITCH, 0, &[]))
    }

    /// Appends `XLOG_NOOP` records so that the next record starts exactly at `target`, for
    /// placing records at chosen positions (header split across pages, segment ends).
    /// Fails if `target` is behind, or only 8 or 16 bytes ahead on the same page.
    pub fn append_noops_until(&mut self, target: Lsn) -> Result<(), WalWriteError> {
        loop {
            let pos = crate::xlog_page::skip_page_header(self.end_lsn(), self.seg_size_bytes);
            if pos == target {
                return Ok(());
            }
            if pos > target {
                return Err(werr(format!("next record position {pos} is already past {target}")));
            }
            let page_end = pos.page_start().0 + PAGE;
            let room = if target.0 < page_end { target.0 - pos.0 } else { page_end - pos.0 };
            let total = if room >= SIZE_OF_XLOG_RECORD as u64 {
                room as usize
            } else if target.0 < page_end {
                return Err(werr(format!("{target} is only {room} bytes after {pos}: too close for a record")));
            } else {
                64 // cross into the next page
            };
            let data_len = match total - SIZE_OF_XLOG_RECORD {
                0 => 0,
                n if n >= 2 && n - 2 <= u8::MAX as usize => n - 2,
                n => n - 5,
            };
            let spec =
                RecordSpec::main_data_only(RM_XLOG_ID, crate::records::xlog::XLOG_NOOP, 0, &vec![0x4E; data_len]);
            self.append(&spec)?;
        }
    }

    /// Writes page headers and zeros up to `lsn` (from a page boundary) so that the pages
    /// before it look like the tail of one long record ending at `lsn`: each page is marked
    /// `XLP_FIRST_IS_CONTRECORD` with `xlp_rem_len` = the continuation bytes left from that
    /// page on (page headers excluded). A reader that scans from a page start (pg_waldump,
    /// `XLogFindNextRecord`, our decoder) then lands exactly on `lsn`.
    pub fn continuation_gap_to(&mut self, lsn: Lsn) -> Result<(), WalWriteError> {
        let first_page = self.end_lsn();
        if first_page.0 % PAGE != 0 || lsn < first_page || !is_valid_record_start(lsn, self.seg_size_bytes) {
            return Err(werr(format!("{lsn} is not a record boundary at or after the page boundary {first_page}")));
        }
        let seg_size_bytes = self.seg_size_bytes;
        let header_size = move |page: u64| crate::xlog_page::page_header_size_at(Lsn(page), seg_size_bytes) as u64;
        let content_before_lsn = |page: u64| (lsn.0.min(page + PAGE)) - (page + header_size(page));
        let mut remaining: u64 =
            (first_page.0..=lsn.page_start().0).step_by(PAGE as usize).map(content_before_lsn).sum();
        let mut page = first_page.0;
        while page <= lsn.page_start().0 {
            self.page_header_if_at_boundary(u32::try_from(remaining).map_err(|_| werr("gap longer than 4 GiB"))?);
            remaining -= content_before_lsn(page);
            self.zero_fill_to(Lsn((page + PAGE).min(lsn.0)));
            page += PAGE;
        }
        Ok(())
    }
}

/// The WAL that starts a compute at `lsn` with no replay (DESIGN D4).
#[derive(Debug, Clone)]
pub struct CheckpointSegments {
    /// (segment number, whole segment bytes); usually one, two if the record crosses into
    /// the next segment.
    pub segments: Vec<(u64, Vec<u8>)>,
    /// The checkpoint as written (with `redo = lsn`).
    pub checkpoint: CheckPoint,
    /// `EndRecPtr` of the checkpoint record: where the compute will write next.
    pub end_lsn: Lsn,
}

/// Builds zeroed segment(s) holding one `CHECKPOINT_SHUTDOWN` record at `lsn`, whose
/// `xl_prev` is `prev_record_lsn` and whose `CheckPoint` is `checkpoint` with `redo = lsn`.
/// The first page of the segment has a long header, and every page up to the one holding
/// `lsn` has a header that marks its contents as the tail of a record ending at `lsn`.
pub fn shutdown_checkpoint_segments(
    lsn: Lsn,
    prev_record_lsn: Lsn,
    checkpoint: &CheckPoint,
    system_id: u64,
    seg_size_bytes: usize,
) -> Result<CheckpointSegments, WalWriteError> {
    if !is_valid_record_start(lsn, seg_size_bytes) {
        return Err(werr(format!(
            "{lsn} is not a valid record start (must be 8-aligned and past the page header; use xlog_page::skip_page_header)"
        )));
    }
    if prev_record_lsn >= lsn {
        return Err(werr(format!("previous record {prev_record_lsn} is not before {lsn}")));
    }
    let seg = seg_size_bytes as u64;
    let seg_start = Lsn(lsn.0 / seg * seg);
    let mut cp = *checkpoint;
    cp.redo = lsn;
    let mut builder = WalBuilder::new(seg_start, prev_record_lsn, system_id, cp.this_timeline_id, seg_size_bytes)?;
    builder.continuation_gap_to(lsn)?;
    let spec = RecordSpec::main_data_only(RM_XLOG_ID, XLOG_CHECKPOINT_SHUTDOWN, 0, &cp.encode());
    let (start, end_lsn) = builder.append(&spec)?;
    debug_assert_eq!(start, lsn);
    let mut bytes = builder.into_bytes();
    let total = (bytes.len() as u64).div_ceil(seg) * seg;
    bytes.resize(total as usize, 0);
    let first_segno = seg_start.0 / seg;
    let segments =
        bytes.chunks(seg_size_bytes).enumerate().map(|(i, chunk)| (first_segno + i as u64, chunk.to_vec())).collect();
    Ok(CheckpointSegments { segments, checkpoint: cp, end_lsn })
}

/// The WAL that starts a hot standby (see [`standby_start_segments`]).
#[derive(Debug, Clone)]
pub struct StandbyStartSegments {
    /// (segment number, whole segment bytes), from the segment holding the running-xacts record.
    pub segments: Vec<(u64, Vec<u8>)>,
    /// The online checkpoint as written (`redo` = the running-xacts record's start).
    pub checkpoint: CheckPoint,
    /// Where the checkpoint record is: pg_control's checkpoint location.
    pub checkpoint_lsn: Lsn,
}

/// Builds zeroed segment(s) that start a hot standby at `rx_lsn`, the start of a real
/// `XLOG_RUNNING_XACTS` record whose exact bytes are `rx_record`. The record is copied to
/// `rx_lsn`; an `XLOG_CHECKPOINT_ONLINE` record with `redo = rx_lsn` (and
/// `oldestActiveXid` from the caller's `checkpoint`) goes two pages past the record's end.
///
/// Postgres reads the checkpoint first, then begins replay at its redo pointer (an earlier
/// position, so no `xl_prev` check applies to the first record): it replays the running-xacts
/// record, which makes its snapshot ready for queries, and finds nothing but zeros where the next
/// record starts, so it turns to streaming replication for the real WAL from there on (which
/// overwrites the whole segment, synthetic checkpoint included). The two pages of distance keep
/// the checkpoint from being taken for the record that follows the running-xacts record.
pub fn standby_start_segments(
    rx_lsn: Lsn,
    rx_record: &[u8],
    checkpoint: &CheckPoint,
    system_id: u64,
    seg_size_bytes: usize,
) -> Result<StandbyStartSegments, WalWriteError> {
    if !is_valid_record_start(rx_lsn, seg_size_bytes) {
        return Err(werr(format!("{rx_lsn} is not a valid record start")));
    }
    let header = XLogRecordHeader::decode(rx_record).ok_or_else(|| werr("the running-xacts record is too short"))?;
    if header.xl_rmid != RM_STANDBY_ID
        || header.rmgr_info() != XLOG_RUNNING_XACTS
        || header.xl_tot_len as usize != rx_record.len()
    {
        return Err(werr(format!(
            "the record at {rx_lsn} is not a whole XLOG_RUNNING_XACTS record (rmgr {}, info {:#x}, {} of {} bytes)",
            header.xl_rmid,
            header.rmgr_info(),
            rx_record.len(),
            header.xl_tot_len
        )));
    }
    let seg = seg_size_bytes as u64;
    let seg_start = Lsn(rx_lsn.0 / seg * seg);
    let mut builder =
        WalBuilder::new(seg_start, header.xl_prev, system_id, checkpoint.this_timeline_id, seg_size_bytes)?;
    builder.continuation_gap_to(rx_lsn)?;
    let (start, rx_end) = builder.append_encoded(rx_record);
    debug_assert_eq!(start, rx_lsn);
    let checkpoint_page = Lsn(rx_end.page_start().0 + 2 * PAGE);
    builder.zero_fill_to(checkpoint_page);
    let mut cp = *checkpoint;
    cp.redo = rx_lsn;
    let spec = RecordSpec::main_data_only(RM_XLOG_ID, XLOG_CHECKPOINT_ONLINE, 0, &cp.encode());
    let (checkpoint_lsn, _) = builder.append(&spec)?;
    let mut bytes = builder.into_bytes();
    let total = (bytes.len() as u64).div_ceil(seg) * seg;
    bytes.resize(total as usize, 0);
    let first_segno = seg_start.0 / seg;
    let segments =
        bytes.chunks(seg_size_bytes).enumerate().map(|(i, chunk)| (first_segno + i as u64, chunk.to_vec())).collect();
    Ok(StandbyStartSegments { segments, checkpoint: cp, checkpoint_lsn })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::decode_record;
    use crate::wal_decoder::{WalDecoderConfig, WalStreamDecoder};
    use crate::xlog_page::XLP_FIRST_IS_CONTRECORD;
    use crate::WAL_SEGMENT_SIZE;
    use bytes::Bytes;

    fn checkpoint() -> CheckPoint {
        CheckPoint {
            this_timeline_id: 1,
            prev_timeline_id: 1,
            full_page_writes: true,
            next_xid: 800,
            next_oid: 24576,
            next_multi: 1,
            oldest_xid: 716,
            oldest_xid_db: 1,
            oldest_multi: 1,
            oldest_multi_db: 1,
            time: 1_700_000_000,
            ..Default::default()
        }
    }

    /// Decodes the segment(s) from their very first byte: the reader must skip the
    /// continuation headers and land exactly on the checkpoint.
    fn read_back(out: &CheckpointSegments, seg: usize) -> Vec<crate::wal_decoder::WalRecordBytes> {
        let start = Lsn(out.segments[0].0 * seg as u64);
        let cfg = WalDecoderConfig { segment_size_bytes: seg, system_id: Some(42), prev_record_lsn: None };
        let mut d = WalStreamDecoder::with_config(start, cfg).unwrap();
        let mut recs = Vec::new();
        for (_, bytes) in &out.segments {
            d.feed(bytes);
        }
        loop {
            match d.poll_record() {
                Ok(Some(r)) => recs.push(r),
                Ok(None) => panic!("ran out of input"),
                Err(e) => {
                    assert!(e.is_end_of_wal(), "{e}");
                    break;
                }
            }
        }
        recs
    }

    /// Reads the records from `at` onwards (a record start) out of the built segments.
    fn records_from(
        segments: &[(u64, Vec<u8>)],
        at: Lsn,
        seg: usize,
        n: usize,
    ) -> Vec<crate::wal_decoder::WalRecordBytes> {
        let first = segments[0].0 * seg as u64;
        let all: Vec<u8> = segments.iter().flat_map(|(_, b)| b.iter().copied()).collect();
        let cfg = WalDecoderConfig { segment_size_bytes: seg, system_id: Some(42), prev_record_lsn: None };
        let mut d = WalStreamDecoder::with_config(at, cfg).unwrap();
        d.feed(&all[(at.0 - first) as usize..]);
        (0..n).map(|_| d.poll_record().unwrap().expect("a record")).collect()
    }

    #[test]
    fn standby_start_has_the_running_xacts_record_then_a_checkpoint_two_pages_on() {
        let seg = WAL_SEGMENT_SIZE;
        let base = 7 * seg as u64;
        let mut main = Vec::new();
        for v in [1u32, 0, 0, 900, 850, 899] {
            main.extend_from_slice(&v.to_le_bytes()); // xcnt, subxcnt, overflow, next, oldest, latest
        }
        main.extend_from_slice(&850u32.to_le_bytes());
        let spec = RecordSpec::main_data_only(RM_STANDBY_ID, XLOG_RUNNING_XACTS, 0, &main);
        for pos in [base + 40, base + 8192 - 40, base + seg as u64 - 8192 + 24, base + 3 * 8192 + 4000] {
            let rx_lsn = Lsn(pos);
            let rx = encode_record(&spec, Lsn(pos - 64)).unwrap();
            let mut cp = checkpoint();
            cp.oldest_active_xid = 850;
            let out = standby_start_segments(rx_lsn, &rx, &cp, 42, seg).unwrap();
            assert!(out.segments.iter().all(|(_, b)| b.len() == seg));
            let got = records_from(&out.segments, rx_lsn, seg, 1);
            assert_eq!(&got[0].record[..], &rx[..], "the running-xacts record is copied byte for byte");
            assert!(out.checkpoint_lsn.0 >= got[0].end_lsn.page_start().0 + 2 * 8192);
            let ck = records_from(&out.segments, out.checkpoint_lsn, seg, 1);
            let h = XLogRecordHeader::decode(&ck[0].record).unwrap();
            assert_eq!((h.xl_rmid, h.rmgr_info()), (RM_XLOG_ID, XLOG_CHECKPOINT_ONLINE));
            let decoded = decode_record(ck[0].record.clone(), out.checkpoint_lsn).unwrap();
            let body = CheckPoint::decode(&decoded.main_data, out.checkpoint_lsn).unwrap();
            assert_eq!((body.redo, body.oldest_active_xid), (rx_lsn, 850));
            // What follows the running-xacts record is zeros: Postgres must turn to streaming.
            let first = out.segments[0].0 * seg as u64;
            let all: Vec<u8> = out.segments.iter().flat_map(|(_, b)| b.iter().copied()).collect();
            let next = crate::xlog_page::skip_page_header(got[0].end_lsn, seg);
            assert!(all[(next.0 - first) as usize..][..24].iter().all(|b| *b == 0));
        }
        let not_rx = encode_record(&RecordSpec::main_data_only(RM_XLOG_ID, XLOG_SWITCH, 0, &[]), Lsn(0)).unwrap();
        assert!(standby_start_segments(Lsn(base + 40), &not_rx, &checkpoint(), 42, seg).is_err());
    }

    #[test]
    fn checkpoint_segment_for_many_positions() {
        let seg = WAL_SEGMENT_SIZE;
        let base = 5 * seg as u64;
        let positions = [
            base + 40,
            base + 8192 + 24,
            base + 8192 + 24 + 8,
            base + 3 * 8192 + 4000,
            base + 8192 - 8,
            base + 8192 - 16,
            base + 8192 - 112,
            base + seg as u64 - 8,
            base + seg as u64 - 8192 + 24,
        ];
        for pos in positions {
            let l = Lsn(pos);
            let out = shutdown_checkpoint_segments(l, Lsn(pos - 200), &checkpoint(), 42, seg).unwrap();
            assert_eq!(out.segments[0].0, 5);
            assert!(out.segments.iter().all(|(_, b)| b.len() == seg));
            assert_eq!(out.segments.len(), if out.end_lsn.0 > base + seg as u64 { 2 } else { 1 }, "{l}");
            let recs = read_back(&out, seg);
            assert_eq!(recs.len(), 1, "{l}");
            assert_eq!(recs[0].start_lsn, l);
            assert_eq!(recs[0].end_lsn, out.end_lsn);
            assert_eq!(recs[0].record.len(), 114);
            let rec = decode_record(recs[0].record.clone(), l).unwrap();
            assert_eq!(rec.header.xl_prev, Lsn(pos - 200));
            assert_eq!(rec.header.xl_info, XLOG_CHECKPOINT_SHUTDOWN);
            let cp = CheckPoint::decode(&rec.main_data, l).unwrap();
            assert_eq!(cp.redo, l);
            assert_eq!(cp, out.checkpoint);
            // The page holding L says its first bytes continue a record up to L.
            let page_start = l.page_start();
            let seg_off = (page_start.0 - base) as usize;
            let hdr = XLogPageHeader::decode(&out.segments[0].1[seg_off..]).unwrap();
            let hdr_size = hdr.size() as u64;
            assert_eq!(hdr.xlp_rem_len as u64, pos - page_start.0 - hdr_size);
            assert_eq!(hdr.xlp_info & XLP_FIRST_IS_CONTRECORD != 0, hdr.xlp_rem_len > 0);
        }
        // Page-boundary and unaligned positions are refused.
        assert!(shutdown_checkpoint_segments(Lsn(base + 8192), Lsn(8), &checkpoint(), 42, seg).is_err());
        assert!(shutdown_checkpoint_segments(Lsn(base + 8192 + 28), Lsn(8), &checkpoint(), 42, seg).is_err());
        assert!(shutdown_checkpoint_segments(Lsn(base + 100), Lsn(base + 100), &checkpoint(), 42, seg).is_err());
    }

    #[test]
    fn record_encoding_checks_its_input() {
        let rel = RelFileNode { spcnode: 1, dbnode: 2, relnode: 3 };
        let block =
            |id| BlockSpec { block_id: id, rel, forknum: 0, blkno: 0, will_init: false, image: None, data: vec![] };
        let spec = RecordSpec { blocks: vec![block(2), block(1)], ..Default::default() };
        assert!(encode_record(&spec, Lsn(0)).is_err());
        let spec = RecordSpec { blocks: vec![block(33)], ..Default::default() };
        assert!(encode_record(&spec, Lsn(0)).is_err());
        let mut b = block(0);
        b.image = Some(ImageSpec::uncompressed(&[0u8; 8192], 0, 0));
        let spec = RecordSpec { blocks: vec![b], main_data: vec![7; 1000], ..Default::default() };
        let raw = encode_record(&spec, Lsn(0)).unwrap();
        let rec = decode_record(Bytes::from(raw), Lsn(8)).unwrap();
        assert_eq!(rec.main_data.len(), 1000);
        assert_eq!(rec.blocks[0].image.as_ref().unwrap().data.len(), 8192);
    }
}
