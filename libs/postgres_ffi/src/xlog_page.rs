//! WAL page headers (`XLogPageHeaderData`, `XLogLongPageHeaderData` in xlog_internal.h).
//!
//! Every 8 KiB WAL page starts with a 24-byte short header (20 bytes of fields, MAXALIGNed);
//! the first page of each segment has the 40-byte long header that also carries the system
//! identifier and the segment and page sizes, so a segment file can be checked on its own.
//! `xlp_rem_len` and `XLP_FIRST_IS_CONTRECORD` describe the tail of a record that continues
//! from the previous page; readers starting at a page boundary use them to skip to a record.

use utils::Lsn;

use crate::XLOG_BLCKSZ;

/// `XLOG_PAGE_MAGIC` for Postgres 15.
pub const XLOG_PAGE_MAGIC: u16 = 0xD110;

pub const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
pub const XLP_LONG_HEADER: u16 = 0x0002;
pub const XLP_BKP_REMOVABLE: u16 = 0x0004;
pub const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x0008;
pub const XLP_ALL_FLAGS: u16 = 0x000F;

/// `SizeOfXLogShortPHD` and `SizeOfXLogLongPHD`.
pub const SIZE_OF_XLOG_SHORT_PHD: usize = 24;
pub const SIZE_OF_XLOG_LONG_PHD: usize = 40;

/// The fields of a WAL page header; `long` holds the extra long-header fields if present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XLogPageHeader {
    pub xlp_magic: u16,
    pub xlp_info: u16,
    pub xlp_tli: u32,
    pub xlp_pageaddr: Lsn,
    pub xlp_rem_len: u32,
    pub long: Option<XLogLongPageHeaderFields>,
}

/// The fields only the long header (first page of a segment) has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XLogLongPageHeaderFields {
    pub xlp_sysid: u64,
    pub xlp_seg_size: u32,
    pub xlp_xlog_blcksz: u32,
}

/// Why a page header is not acceptable at the place it was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageHeaderError {
    #[error("need {need} bytes for the page header, have {have}")]
    Short { need: usize, have: usize },
    #[error("invalid magic number {found:04X} (expected {XLOG_PAGE_MAGIC:04X})")]
    BadMagic { found: u16 },
    #[error("invalid info bits {0:04X}")]
    BadInfo(u16),
    #[error("first page of a segment has no long header (info bits {0:04X})")]
    MissingLongHeader(u16),
    #[error("long header on a page that does not start a segment")]
    UnexpectedLongHeader,
    #[error("unexpected pageaddr {found} (expected {expected})")]
    WrongPageAddr { found: Lsn, expected: Lsn },
    #[error("WAL file is from different database system: system identifier {found}, expected {expected}")]
    WrongSystemId { found: u64, expected: u64 },
    #[error("WAL file has segment size {found} in its page header, expected {expected}")]
    WrongSegmentSize { found: u32, expected: u32 },
    #[error("WAL file has XLOG_BLCKSZ {0} in its page header, expected 8192")]
    WrongBlockSize(u32),
}

impl XLogPageHeader {
    /// A short header; `rem_len > 0` sets `XLP_FIRST_IS_CONTRECORD`.
    pub fn short(tli: u32, pageaddr: Lsn, rem_len: u32) -> Self {
        XLogPageHeader {
            xlp_magic: XLOG_PAGE_MAGIC,
            xlp_info: if rem_len > 0 { XLP_FIRST_IS_CONTRECORD } else { 0 },
            xlp_tli: tli,
            xlp_pageaddr: pageaddr,
            xlp_rem_len: rem_len,
            long: None,
        }
    }

    /// A long header for the first page of a segment.
    pub fn long(tli: u32, pageaddr: Lsn, rem_len: u32, sysid: u64, seg_size_bytes: u32) -> Self {
        let mut h = Self::short(tli, pageaddr, rem_len);
        h.xlp_info |= XLP_LONG_HEADER;
        h.long = Some(XLogLongPageHeaderFields {
            xlp_sysid: sysid,
            xlp_seg_size: seg_size_bytes,
            xlp_xlog_blcksz: XLOG_BLCKSZ as u32,
        });
        h
    }

    /// Header size implied by `xlp_info` (`XLogPageHeaderSize`).
    pub fn size_for_info(xlp_info: u16) -> usize {
        if xlp_info & XLP_LONG_HEADER != 0 {
            SIZE_OF_XLOG_LONG_PHD
        } else {
            SIZE_OF_XLOG_SHORT_PHD
        }
    }

    pub fn size(&self) -> usize {
        Self::size_for_info(self.xlp_info)
    }

    pub fn is_contrecord(&self) -> bool {
        self.xlp_info & XLP_FIRST_IS_CONTRECORD != 0
    }

    /// Decodes a header; needs 24 bytes, or 40 if `XLP_LONG_HEADER` is set. Checks nothing
    /// beyond length: see [`XLogPageHeader::validate`].
    pub fn decode(buf: &[u8]) -> Result<XLogPageHeader, PageHeaderError> {
        if buf.len() < SIZE_OF_XLOG_SHORT_PHD {
            return Err(PageHeaderError::Short { need: SIZE_OF_XLOG_SHORT_PHD, have: buf.len() });
        }
        let u16_at = |o: usize| u16::from_le_bytes([buf[o], buf[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        let u64_at = |o: usize| (u32_at(o) as u64) | ((u32_at(o + 4) as u64) << 32);
        let xlp_info = u16_at(2);
        let size = Self::size_for_info(xlp_info);
        if buf.len() < size {
            return Err(PageHeaderError::Short { need: size, have: buf.len() });
        }
        Ok(XLogPageHeader {
            xlp_magic: u16_at(0),
            xlp_info,
            xlp_tli: u32_at(4),
            xlp_pageaddr: Lsn(u64_at(8)),
            xlp_rem_len: u32_at(16),
            long: (size == SIZE_OF_XLOG_LONG_PHD).then(|| XLogLongPageHeaderFields {
                xlp_sysid: u64_at(24),
                xlp_seg_size: u32_at(32),
                xlp_xlog_blcksz: u32_at(36),
            }),
        })
    }

    /// Encodes to 24 or 40 bytes (padding zeroed).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.size()];
        out[0..2].copy_from_slice(&self.xlp_magic.to_le_bytes());
        out[2..4].copy_from_slice(&self.xlp_info.to_le_bytes());
        out[4..8].copy_from_slice(&self.xlp_tli.to_le_bytes());
        out[8..16].copy_from_slice(&self.xlp_pageaddr.0.to_le_bytes());
        out[16..20].copy_from_slice(&self.xlp_rem_len.to_le_bytes());
        if let (Some(l), true) = (self.long, out.len() == SIZE_OF_XLOG_LONG_PHD) {
            out[24..32].copy_from_slice(&l.xlp_sysid.to_le_bytes());
            out[32..36].copy_from_slice(&l.xlp_seg_size.to_le_bytes());
            out[36..40].copy_from_slice(&l.xlp_xlog_blcksz.to_le_bytes());
        }
        out
    }

    /// The checks of `XLogReaderValidatePageHeader` for a header read at `page_lsn`: magic,
    /// flag bits, long header exactly on segment starts (with matching sizes and, if given,
    /// system id), and `xlp_pageaddr == page_lsn`.
    pub fn validate(&self, page_lsn: Lsn, seg_size_bytes: usize, sysid: Option<u64>) -> Result<(), PageHeaderError> {
        if self.xlp_magic != XLOG_PAGE_MAGIC {
            return Err(PageHeaderError::BadMagic { found: self.xlp_magic });
        }
        if self.xlp_info & !XLP_ALL_FLAGS != 0 {
            return Err(PageHeaderError::BadInfo(self.xlp_info));
        }
        let at_segment_start = page_lsn.0 % seg_size_bytes as u64 == 0;
        match (self.long, at_segment_start) {
            (Some(l), true) => {
                if let Some(expected) = sysid {
                    if l.xlp_sysid != expected {
                        return Err(PageHeaderError::WrongSystemId { found: l.xlp_sysid, expected });
                    }
                }
                if l.xlp_seg_size as usize != seg_size_bytes {
                    return Err(PageHeaderError::WrongSegmentSize {
                        found: l.xlp_seg_size,
                        expected: seg_size_bytes as u32,
                    });
                }
                if l.xlp_xlog_blcksz as usize != XLOG_BLCKSZ {
                    return Err(PageHeaderError::WrongBlockSize(l.xlp_xlog_blcksz));
                }
            }
            (None, true) => return Err(PageHeaderError::MissingLongHeader(self.xlp_info)),
            (Some(_), false) => return Err(PageHeaderError::UnexpectedLongHeader),
            (None, false) => {}
        }
        if self.xlp_pageaddr != page_lsn {
            return Err(PageHeaderError::WrongPageAddr { found: self.xlp_pageaddr, expected: page_lsn });
        }
        Ok(())
    }
}

/// Size of the page header at `page_lsn` (which must be page-aligned): long on segment starts.
pub fn page_header_size_at(page_lsn: Lsn, seg_size_bytes: usize) -> usize {
    if page_lsn.0 % seg_size_bytes as u64 == 0 {
        SIZE_OF_XLOG_LONG_PHD
    } else {
        SIZE_OF_XLOG_SHORT_PHD
    }
}

/// `XRecOffIsValid` plus the long-header case: can a record start at `lsn`?
pub fn is_valid_record_start(lsn: Lsn, seg_size_bytes: usize) -> bool {
    let page_off = lsn.0 % XLOG_BLCKSZ as u64;
    lsn.0 % 8 == 0 && page_off as usize >= page_header_size_at(lsn.page_start(), seg_size_bytes)
}

/// Moves an LSN that points at a page boundary past that page's header, where the next
/// record really starts (Postgres reports end-of-record positions at page boundaries).
pub fn skip_page_header(lsn: Lsn, seg_size_bytes: usize) -> Lsn {
    if lsn.0 % XLOG_BLCKSZ as u64 == 0 {
        Lsn(lsn.0 + page_header_size_at(lsn, seg_size_bytes) as u64)
    } else {
        lsn
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::WAL_SEGMENT_SIZE;

    #[test]
    fn encode_decode_validate() {
        let seg = WAL_SEGMENT_SIZE;
        let long = XLogPageHeader::long(1, Lsn(0x100_0000), 0, 42, seg as u32);
        let bytes = long.encode();
        assert_eq!(bytes.len(), 40);
        assert_eq!(&bytes[0..4], &[0x10, 0xD1, 0x02, 0x00]);
        let back = XLogPageHeader::decode(&bytes).unwrap();
        assert_eq!(back, long);
        back.validate(Lsn(0x100_0000), seg, Some(42)).unwrap();
        assert_eq!(
            back.validate(Lsn(0x100_0000), seg, Some(7)),
            Err(PageHeaderError::WrongSystemId { found: 42, expected: 7 })
        );
        assert_eq!(back.validate(Lsn(0x100_2000), seg, None), Err(PageHeaderError::UnexpectedLongHeader));

        let short = XLogPageHeader::short(1, Lsn(0x100_2000), 100);
        assert!(short.is_contrecord());
        let bytes = short.encode();
        assert_eq!(bytes.len(), 24);
        let back = XLogPageHeader::decode(&bytes).unwrap();
        assert_eq!(back.xlp_rem_len, 100);
        back.validate(Lsn(0x100_2000), seg, None).unwrap();
        assert!(matches!(back.validate(Lsn(0x100_4000), seg, None), Err(PageHeaderError::WrongPageAddr { .. })));
        assert!(matches!(back.validate(Lsn(0x200_0000), seg, None), Err(PageHeaderError::MissingLongHeader(_))));
        assert!(matches!(XLogPageHeader::decode(&bytes[..20]), Err(PageHeaderError::Short { .. })));
        let mut bad = bytes.clone();
        bad[0] = 0;
        assert!(matches!(
            XLogPageHeader::decode(&bad).unwrap().validate(Lsn(0x100_2000), seg, None),
            Err(PageHeaderError::BadMagic { .. })
        ));
        bad = bytes.clone();
        bad[2] = 0x21;
        assert!(matches!(
            XLogPageHeader::decode(&bad).unwrap().validate(Lsn(0x100_2000), seg, None),
            Err(PageHeaderError::BadInfo(_))
        ));
    }

    #[test]
    fn record_start_rules() {
        let seg = WAL_SEGMENT_SIZE;
        assert!(!is_valid_record_start(Lsn(0x100_0018), seg));
        assert!(is_valid_record_start(Lsn(0x100_0028), seg));
        assert!(is_valid_record_start(Lsn(0x100_2018), seg));
        assert!(!is_valid_record_start(Lsn(0x100_2000), seg));
        assert!(!is_valid_record_start(Lsn(0x100_201C), seg));
        assert_eq!(skip_page_header(Lsn(0x100_0000), seg), Lsn(0x100_0028));
        assert_eq!(skip_page_header(Lsn(0x100_2000), seg), Lsn(0x100_2018));
        assert_eq!(skip_page_header(Lsn(0x100_2030), seg), Lsn(0x100_2030));
    }
}
