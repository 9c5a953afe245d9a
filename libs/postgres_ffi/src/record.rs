//! `XLogRecord` decoding (xlogreader.c `DecodeXLogRecord`): the 24-byte header, then block
//! reference headers, then the block data/images and the main data, in that order.
//!
//! The result keeps [`Bytes`] slices of the original record so block data, images and main
//! data are not copied. The checks are Postgres's (HAS_DATA iff data_length > 0, hole
//! consistency, ascending block ids, `SAME_REL` needs an earlier rel, lengths add up) plus a
//! few Postgres leaves to the redo routine (fork number in range, hole inside the page).

use bytes::Bytes;
use utils::Lsn;

use crate::error::DecodeError;
use crate::reader::Reader;
use crate::reltag::{RelFileNode, RelTag, MAX_FORKNUM};
use crate::rmgr::{rmgr_id_is_valid, rmgr_name, RM_XLOG_ID};
use crate::{BlockNumber, TransactionId, BLCKSZ};

/// `SizeOfXLogRecord`: header size including the 2 padding bytes and the CRC.
pub const SIZE_OF_XLOG_RECORD: usize = 24;
/// Offset of `xl_crc`; the CRC covers the header bytes before it.
pub const XL_CRC_OFFSET: usize = 20;
/// Largest record we accept (`XLogRecordMaxSize` in later releases: 1020 MiB). Bounds what a
/// corrupt `xl_tot_len` can make a reader allocate.
pub const XLOG_RECORD_MAX_SIZE: u32 = 1020 * 1024 * 1024;

pub const XLR_INFO_MASK: u8 = 0x0F;
pub const XLR_RMGR_INFO_MASK: u8 = 0xF0;
pub const XLR_SPECIAL_REL_UPDATE: u8 = 0x01;
pub const XLR_CHECK_CONSISTENCY: u8 = 0x02;

pub const XLR_MAX_BLOCK_ID: u8 = 32;
pub const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
pub const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
pub const XLR_BLOCK_ID_ORIGIN: u8 = 253;
pub const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;

pub const BKPBLOCK_FORK_MASK: u8 = 0x0F;
pub const BKPBLOCK_FLAG_MASK: u8 = 0xF0;
pub const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
pub const BKPBLOCK_HAS_DATA: u8 = 0x20;
pub const BKPBLOCK_WILL_INIT: u8 = 0x40;
pub const BKPBLOCK_SAME_REL: u8 = 0x80;

pub const BKPIMAGE_HAS_HOLE: u8 = 0x01;
pub const BKPIMAGE_APPLY: u8 = 0x02;
pub const BKPIMAGE_COMPRESS_PGLZ: u8 = 0x04;
pub const BKPIMAGE_COMPRESS_LZ4: u8 = 0x08;
pub const BKPIMAGE_COMPRESS_ZSTD: u8 = 0x10;
const BKPIMAGE_COMPRESS_MASK: u8 = BKPIMAGE_COMPRESS_PGLZ | BKPIMAGE_COMPRESS_LZ4 | BKPIMAGE_COMPRESS_ZSTD;

/// The fixed record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct XLogRecordHeader {
    /// Total length of the record, header included.
    pub xl_tot_len: u32,
    pub xl_xid: TransactionId,
    /// Start LSN of the previous record.
    pub xl_prev: Lsn,
    /// Low 4 bits: `XLR_*` flags; high 4 bits: the resource manager's record kind.
    pub xl_info: u8,
    pub xl_rmid: u8,
    pub xl_crc: u32,
}

impl XLogRecordHeader {
    /// Decodes the first 24 bytes of `buf`; `None` if it is shorter.
    pub fn decode(buf: &[u8]) -> Option<XLogRecordHeader> {
        let b = buf.get(..SIZE_OF_XLOG_RECORD)?;
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        Some(XLogRecordHeader {
            xl_tot_len: u32_at(0),
            xl_xid: u32_at(4),
            xl_prev: Lsn(u32_at(8) as u64 | ((u32_at(12) as u64) << 32)),
            xl_info: b[16],
            xl_rmid: b[17],
            xl_crc: u32_at(20),
        })
    }

    pub fn encode(&self) -> [u8; SIZE_OF_XLOG_RECORD] {
        let mut out = [0u8; SIZE_OF_XLOG_RECORD];
        out[0..4].copy_from_slice(&self.xl_tot_len.to_le_bytes());
        out[4..8].copy_from_slice(&self.xl_xid.to_le_bytes());
        out[8..16].copy_from_slice(&self.xl_prev.0.to_le_bytes());
        out[16] = self.xl_info;
        out[17] = self.xl_rmid;
        out[20..24].copy_from_slice(&self.xl_crc.to_le_bytes());
        out
    }

    /// The resource manager's record kind (`xl_info & XLR_RMGR_INFO_MASK`).
    pub fn rmgr_info(&self) -> u8 {
        self.xl_info & XLR_RMGR_INFO_MASK
    }

    /// `pg_waldump`'s name for the resource manager, or `custom<id>` / `invalid<id>`.
    pub fn rmgr_name(&self) -> String {
        match rmgr_name(self.xl_rmid) {
            Some(n) => n.to_string(),
            None if rmgr_id_is_valid(self.xl_rmid) => format!("custom{:03}", self.xl_rmid),
            None => format!("invalid{}", self.xl_rmid),
        }
    }

    pub fn is_xlog_switch(&self) -> bool {
        self.xl_rmid == RM_XLOG_ID && self.rmgr_info() == crate::records::xlog::XLOG_SWITCH
    }

    /// The header checks of `ValidXLogRecordHeader` that need no context: length within
    /// bounds and a known resource manager. `xl_prev` is checked by the stream decoder.
    pub fn validate(&self, lsn: Lsn) -> Result<(), DecodeError> {
        if (self.xl_tot_len as usize) < SIZE_OF_XLOG_RECORD {
            return Err(DecodeError::new(
                lsn,
                format!("invalid record length: wanted at least {SIZE_OF_XLOG_RECORD}, got {}", self.xl_tot_len),
            ));
        }
        if self.xl_tot_len > XLOG_RECORD_MAX_SIZE {
            return Err(DecodeError::new(
                lsn,
                format!("record length {} exceeds the maximum {XLOG_RECORD_MAX_SIZE}", self.xl_tot_len),
            ));
        }
        if !rmgr_id_is_valid(self.xl_rmid) {
            return Err(DecodeError::new(lsn, format!("invalid resource manager ID {}", self.xl_rmid)));
        }
        Ok(())
    }
}

/// Computes the CRC `xl_crc` must hold for the whole record `raw` (header included).
pub fn compute_record_crc(raw: &[u8]) -> Option<u32> {
    if raw.len() < SIZE_OF_XLOG_RECORD {
        return None;
    }
    Some(crate::crc::xlog_record_crc(&raw[..XL_CRC_OFFSET], &raw[SIZE_OF_XLOG_RECORD..]))
}

/// `ValidXLogRecord`: checks `xl_crc` of a complete record.
pub fn verify_record_crc(raw: &[u8], lsn: Lsn) -> Result<(), DecodeError> {
    let header = XLogRecordHeader::decode(raw)
        .ok_or_else(|| DecodeError::new(lsn, format!("record of {} bytes is shorter than its header", raw.len())))?;
    let crc = compute_record_crc(raw).unwrap_or(0);
    if crc != header.xl_crc {
        return Err(DecodeError::new(
            lsn,
            format!("incorrect resource manager data checksum: stored {:08X}, computed {crc:08X}", header.xl_crc),
        ));
    }
    Ok(())
}

/// How a full-page image is compressed (`BKPIMAGE_COMPRESS_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageCompression {
    None,
    Pglz,
    Lz4,
    Zstd,
}

impl ImageCompression {
    /// The name `pg_waldump --bkp-details` prints after `method:`.
    pub fn name(self) -> &'static str {
        match self {
            ImageCompression::None => "none",
            ImageCompression::Pglz => "pglz",
            ImageCompression::Lz4 => "lz4",
            ImageCompression::Zstd => "zstd",
        }
    }

    pub fn flag(self) -> u8 {
        match self {
            ImageCompression::None => 0,
            ImageCompression::Pglz => BKPIMAGE_COMPRESS_PGLZ,
            ImageCompression::Lz4 => BKPIMAGE_COMPRESS_LZ4,
            ImageCompression::Zstd => BKPIMAGE_COMPRESS_ZSTD,
        }
    }
}

/// A full-page image carried by a block reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockImage {
    /// `bimg_info` flags as stored.
    pub bimg_info: u8,
    /// Bytes before the "hole" (the unused middle of the page that was left out).
    pub hole_offset: u16,
    /// Length of the hole; the image holds `BLCKSZ - hole_length` bytes once decompressed.
    pub hole_length: u16,
    pub compression: ImageCompression,
    /// `BKPIMAGE_APPLY`: redo restores the page from the image. Without it the image is only
    /// there for `wal_consistency_checking`.
    pub apply: bool,
    /// The stored image bytes (`bimg_len` of them), possibly compressed.
    pub data: Bytes,
}

/// One block reference (`DecodedBkpBlock`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRef {
    pub block_id: u8,
    pub rel: RelFileNode,
    pub forknum: u8,
    pub blkno: BlockNumber,
    /// `fork_flags` as stored (fork in the low nibble, `BKPBLOCK_*` in the high one).
    pub flags: u8,
    /// `BKPBLOCK_WILL_INIT`: redo initialises the page from scratch, no base image needed.
    pub will_init: bool,
    pub image: Option<BlockImage>,
    /// Per-block payload for the resource manager's redo routine (may be empty).
    pub data: Bytes,
}

impl BlockRef {
    pub fn rel_tag(&self) -> RelTag {
        self.rel.with_fork(self.forknum)
    }

    pub fn has_image(&self) -> bool {
        self.image.is_some()
    }

    /// An image that redo will restore the page from.
    pub fn apply_image(&self) -> bool {
        self.image.as_ref().is_some_and(|i| i.apply)
    }
}

/// A decoded record: header, block references, main data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedXLogRecord {
    /// The LSN this record was decoded at (its start, when the caller knows it).
    pub lsn: Lsn,
    pub header: XLogRecordHeader,
    /// Block references in ascending `block_id` order (ids may have gaps).
    pub blocks: Vec<BlockRef>,
    pub main_data: Bytes,
    /// `XLR_BLOCK_ID_ORIGIN`: the replication origin that produced the record.
    pub origin: Option<u16>,
    /// `XLR_BLOCK_ID_TOPLEVEL_XID`: the top-level xid of a subtransaction's first record.
    pub toplevel_xid: Option<TransactionId>,
    /// The whole record as it was in the WAL.
    pub raw: Bytes,
}

impl DecodedXLogRecord {
    pub fn rmid(&self) -> u8 {
        self.header.xl_rmid
    }

    /// `XLogRecGetInfo(record) & ~XLR_INFO_MASK`.
    pub fn rmgr_info(&self) -> u8 {
        self.header.rmgr_info()
    }

    pub fn xid(&self) -> TransactionId {
        self.header.xl_xid
    }

    pub fn block(&self, block_id: u8) -> Option<&BlockRef> {
        self.blocks.iter().find(|b| b.block_id == block_id)
    }

    /// Bytes of full-page images in the record (pg_waldump's `fpi_len`).
    pub fn fpi_len(&self) -> usize {
        self.blocks.iter().filter_map(|b| b.image.as_ref()).map(|i| i.data.len()).sum()
    }
}

/// Decodes a complete record (`raw.len()` must equal `xl_tot_len`). `lsn` is only used in
/// error messages and stored in the result. The CRC is not checked here: the stream decoder
/// has done it; use [`verify_record_crc`] for records from elsewhere.
pub fn decode_record(raw: Bytes, lsn: Lsn) -> Result<DecodedXLogRecord, DecodeError> {
    let header = XLogRecordHeader::decode(&raw).ok_or_else(|| {
        DecodeError::new(lsn, format!("record of {} bytes is shorter than its 24-byte header", raw.len()))
    })?;
    header.validate(lsn)?;
    if header.xl_tot_len as usize != raw.len() {
        return Err(DecodeError::new(
            lsn,
            format!("xl_tot_len {} does not match the {} record bytes given", header.xl_tot_len, raw.len()),
        ));
    }

    struct PendingBlock {
        block: BlockRef,
        bimg_len: usize,
        data_len: usize,
    }

    let body = &raw[SIZE_OF_XLOG_RECORD..];
    let mut r = Reader::new(body, lsn, "XLogRecord block headers");
    let mut pending: Vec<PendingBlock> = Vec::new();
    let mut main_data_len = 0usize;
    let mut origin = None;
    let mut toplevel_xid = None;
    let mut datatotal = 0usize;
    let mut last_rel: Option<RelFileNode> = None;

    while r.remaining() > datatotal {
        let block_id = r.u8("block_id")?;
        match block_id {
            XLR_BLOCK_ID_DATA_SHORT => {
                main_data_len = r.u8("main data length (short)")? as usize;
                datatotal += main_data_len;
                break; // by convention the main data header is last
            }
            XLR_BLOCK_ID_DATA_LONG => {
                main_data_len = r.u32("main data length (long)")? as usize;
                datatotal += main_data_len;
                break;
            }
            XLR_BLOCK_ID_ORIGIN => origin = Some(r.u16("record origin")?),
            XLR_BLOCK_ID_TOPLEVEL_XID => toplevel_xid = Some(r.u32("toplevel xid")?),
            id if id <= XLR_MAX_BLOCK_ID => {
                if let Some(prev) = pending.last() {
                    if id <= prev.block.block_id {
                        return Err(r.error(format_args!("out-of-order block_id {id} after {}", prev.block.block_id)));
                    }
                }
                let fork_flags = r.u8("fork_flags")?;
                let forknum = fork_flags & BKPBLOCK_FORK_MASK;
                if forknum > MAX_FORKNUM {
                    return Err(r.error(format_args!("block {id} has invalid fork number {forknum}")));
                }
                let has_data = fork_flags & BKPBLOCK_HAS_DATA != 0;
                let data_len = r.u16("data_length")? as usize;
                if has_data && data_len == 0 {
                    return Err(r.error(format_args!("block {id}: BKPBLOCK_HAS_DATA set, but no data included")));
                }
                if !has_data && data_len != 0 {
                    return Err(
                        r.error(format_args!("block {id}: BKPBLOCK_HAS_DATA not set, but data length is {data_len}"))
                    );
                }
                datatotal += data_len;

                let mut image = None;
                let mut bimg_len = 0usize;
                if fork_flags & BKPBLOCK_HAS_IMAGE != 0 {
                    bimg_len = r.u16("bimg_len")? as usize;
                    let hole_offset = r.u16("hole_offset")?;
                    let bimg_info = r.u8("bimg_info")?;
                    let compressed = bimg_info & BKPIMAGE_COMPRESS_MASK != 0;
                    let has_hole = bimg_info & BKPIMAGE_HAS_HOLE != 0;
                    let hole_length = if compressed {
                        if has_hole {
                            r.u16("hole_length")?
                        } else {
                            0
                        }
                    } else {
                        // Uncompressed: the hole is whatever the image leaves out.
                        BLCKSZ.saturating_sub(bimg_len) as u16
                    };
                    datatotal += bimg_len;
                    if has_hole && (hole_offset == 0 || hole_length == 0 || bimg_len == BLCKSZ) {
                        return Err(r.error(format_args!(
                            "block {id}: BKPIMAGE_HAS_HOLE set, but hole offset {hole_offset} length {hole_length} block image length {bimg_len}"
                        )));
                    }
                    if !has_hole && (hole_offset != 0 || hole_length != 0) {
                        return Err(r.error(format_args!(
                            "block {id}: BKPIMAGE_HAS_HOLE not set, but hole offset {hole_offset} length {hole_length}"
                        )));
                    }
                    if compressed && bimg_len == BLCKSZ {
                        return Err(r.error(format_args!(
                            "block {id}: BKPIMAGE_COMPRESSED set, but block image length {bimg_len}"
                        )));
                    }
                    if !has_hole && !compressed && bimg_len != BLCKSZ {
                        return Err(r.error(format_args!(
                            "block {id}: neither BKPIMAGE_HAS_HOLE nor BKPIMAGE_COMPRESSED set, but block image length is {bimg_len}"
                        )));
                    }
                    if bimg_len > BLCKSZ || hole_offset as usize + hole_length as usize > BLCKSZ {
                        return Err(r.error(format_args!(
                            "block {id}: image length {bimg_len}, hole offset {hole_offset} and length {hole_length} do not fit in a {BLCKSZ}-byte page"
                        )));
                    }
                    let compression = match bimg_info & BKPIMAGE_COMPRESS_MASK {
                        0 => ImageCompression::None,
                        BKPIMAGE_COMPRESS_PGLZ => ImageCompression::Pglz,
                        BKPIMAGE_COMPRESS_LZ4 => ImageCompression::Lz4,
                        BKPIMAGE_COMPRESS_ZSTD => ImageCompression::Zstd,
                        other => {
                            return Err(r.error(format_args!(
                                "block {id}: several compression methods set in bimg_info ({other:#04x})"
                            )))
                        }
                    };
                    image = Some(BlockImage {
                        bimg_info,
                        hole_offset,
                        hole_length,
                        compression,
                        apply: bimg_info & BKPIMAGE_APPLY != 0,
                        data: Bytes::new(),
                    });
                }
                let rel = if fork_flags & BKPBLOCK_SAME_REL == 0 {
                    let rel = RelFileNode {
                        spcnode: r.u32("rnode.spcNode")?,
                        dbnode: r.u32("rnode.dbNode")?,
                        relnode: r.u32("rnode.relNode")?,
                    };
                    last_rel = Some(rel);
                    rel
                } else {
                    last_rel
                        .ok_or_else(|| r.error(format_args!("block {id}: BKPBLOCK_SAME_REL set but no previous rel")))?
                };
                let blkno = r.u32("blkno")?;
                pending.push(PendingBlock {
                    block: BlockRef {
                        block_id: id,
                        rel,
                        forknum,
                        blkno,
                        flags: fork_flags,
                        will_init: fork_flags & BKPBLOCK_WILL_INIT != 0,
                        image,
                        data: Bytes::new(),
                    },
                    bimg_len,
                    data_len,
                });
            }
            other => return Err(r.error(format_args!("invalid block_id {other}"))),
        }
    }
    if r.remaining() != datatotal {
        return Err(r.error(format_args!(
            "record with invalid length: headers announce {datatotal} payload bytes, {} remain",
            r.remaining()
        )));
    }

    // Payloads follow in block order (image, then data), then the main data.
    let mut offset = SIZE_OF_XLOG_RECORD + r.pos();
    let mut blocks = Vec::with_capacity(pending.len());
    for p in pending {
        let mut block = p.block;
        if let Some(img) = block.image.as_mut() {
            img.data = raw.slice(offset..offset + p.bimg_len);
            offset += p.bimg_len;
        }
        block.data = raw.slice(offset..offset + p.data_len);
        offset += p.data_len;
        blocks.push(block);
    }
    let main_data = raw.slice(offset..offset + main_data_len);
    Ok(DecodedXLogRecord { lsn, header, blocks, main_data, origin, toplevel_xid, raw })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fpi::restore_block_image;
    use crate::rmgr::{RM_BTREE_ID, RM_HEAP_ID};
    use crate::wal_writer::{encode_record, BlockSpec, ImageSpec, RecordSpec};

    fn rel(n: u32) -> RelFileNode {
        RelFileNode { spcnode: 1663, dbnode: 5, relnode: n }
    }

    fn page(seed: u8) -> Vec<u8> {
        let mut p = crate::page::page_init(0);
        for (i, b) in p.iter_mut().enumerate().skip(6000) {
            *b = (i as u8).wrapping_add(seed);
        }
        p
    }

    #[test]
    fn round_trip_with_blocks_images_and_extras() {
        let p = page(3);
        let mut without_hole = p[..24].to_vec();
        without_hole.extend_from_slice(&p[6000..]);
        let spec = RecordSpec {
            rmid: RM_HEAP_ID,
            info: 0x20 | XLR_SPECIAL_REL_UPDATE,
            xid: 901,
            blocks: vec![
                BlockSpec {
                    block_id: 0,
                    rel: rel(16384),
                    forknum: 0,
                    blkno: 7,
                    will_init: false,
                    image: Some(ImageSpec::uncompressed(&p, 24, 5976)),
                    data: vec![1, 2, 3],
                },
                BlockSpec {
                    block_id: 1,
                    rel: rel(16384),
                    forknum: 0,
                    blkno: 8,
                    will_init: true,
                    image: None,
                    data: vec![],
                },
                BlockSpec {
                    block_id: 3,
                    rel: rel(16390),
                    forknum: 2,
                    blkno: 0,
                    will_init: false,
                    image: Some(ImageSpec {
                        stored: lz4_flex::block::compress(&without_hole),
                        hole_offset: 24,
                        hole_length: 5976,
                        compression: ImageCompression::Lz4,
                        apply: false,
                    }),
                    data: vec![9; 300],
                },
            ],
            main_data: vec![0xAB; 300],
            origin: Some(4),
            toplevel_xid: Some(900),
        };
        let raw = encode_record(&spec, Lsn(0x1000)).unwrap();
        verify_record_crc(&raw, Lsn(0x2000)).unwrap();
        let rec = decode_record(Bytes::from(raw.clone()), Lsn(0x2000)).unwrap();
        assert_eq!(rec.header.xl_prev, Lsn(0x1000));
        assert_eq!(rec.header.xl_xid, 901);
        assert_eq!(rec.rmgr_info(), 0x20);
        assert_eq!(rec.origin, Some(4));
        assert_eq!(rec.toplevel_xid, Some(900));
        assert_eq!(&rec.main_data[..], &[0xAB; 300][..]);
        assert_eq!(rec.blocks.len(), 3);
        let b0 = &rec.blocks[0];
        assert_eq!((b0.blkno, &b0.data[..], b0.apply_image()), (7, &[1u8, 2, 3][..], true));
        assert_eq!(restore_block_image(b0, rec.lsn).unwrap(), p);
        let b1 = &rec.blocks[1];
        assert!(b1.will_init && !b1.has_image() && b1.data.is_empty());
        assert_ne!(b1.flags & BKPBLOCK_SAME_REL, 0);
        assert_eq!(b1.rel, rel(16384));
        let b3 = rec.block(3).unwrap();
        assert_eq!(b3.rel_tag().to_string(), "1663/5/16390_vm");
        assert_eq!(b3.image.as_ref().unwrap().compression, ImageCompression::Lz4);
        assert!(!b3.apply_image());
        assert_eq!(restore_block_image(b3, rec.lsn).unwrap(), p);
        assert_eq!(rec.fpi_len(), 8192 - 5976 + b3.image.as_ref().unwrap().data.len());

        // Truncations never panic. Almost all are errors; a few cuts happen to end exactly
        // where the remaining headers' payloads do, which is a valid (shorter) record.
        let mut ok = 0;
        for cut in 0..raw.len() {
            let mut r = raw[..cut].to_vec();
            if r.len() >= 4 {
                r[0..4].copy_from_slice(&(cut as u32).to_le_bytes());
            }
            if let Ok(rec) = decode_record(Bytes::from(r), Lsn(0x2000)) {
                assert!(rec.main_data.len() < 300, "cut {cut}");
                ok += 1;
            }
        }
        assert!(ok <= 8, "{ok}");
        let mut bad = raw.clone();
        bad[100] ^= 1;
        assert!(verify_record_crc(&bad, Lsn(0x2000)).is_err());
    }

    #[test]
    fn postgres_consistency_checks() {
        let spec = RecordSpec {
            rmid: RM_BTREE_ID,
            info: 0,
            xid: 5,
            blocks: vec![BlockSpec {
                block_id: 0,
                rel: rel(1),
                forknum: 0,
                blkno: 1,
                will_init: false,
                image: None,
                data: vec![1],
            }],
            main_data: vec![1, 2],
            ..Default::default()
        };
        let raw = encode_record(&spec, Lsn(8)).unwrap();
        let err = |mutate: &dyn Fn(&mut Vec<u8>)| {
            let mut r = raw.clone();
            mutate(&mut r);
            decode_record(Bytes::from(r), Lsn(0x40)).unwrap_err().to_string()
        };
        // Block header starts at 24: id, fork_flags, data_length.
        assert!(err(&|r| r[25] &= !BKPBLOCK_HAS_DATA).contains("BKPBLOCK_HAS_DATA not set"));
        assert!(err(&|r| r[25] |= BKPBLOCK_SAME_REL).contains("no previous rel"));
        assert!(err(&|r| r[25] = (r[25] & 0xF0) | 5).contains("invalid fork number"));
        assert!(err(&|r| r[24] = 40).contains("invalid block_id 40"));
        assert!(err(&|r| r[17] = 50).contains("invalid resource manager ID 50"));
        assert!(err(&|r| r[0] = 200).contains("does not match"));
        assert!(err(&|r| r[26] = 9).contains("invalid length"));
        assert!(err(&|r| r.truncate(10)).contains("shorter than its 24-byte header"));
    }
}
