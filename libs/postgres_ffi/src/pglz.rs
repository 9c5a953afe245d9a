//! PGLZ decompression, written from `common/pg_lzcompress.c` (`pglz_decompress`).
//!
//! Format: a control byte announces the next 8 items, low bit first. A clear bit is one
//! literal byte; a set bit is a 2-byte tag (length-3 in the low nibble of the first byte,
//! 12-bit back offset in its high nibble plus the second byte) with an extra length byte when
//! the nibble is 0x0F. Matches may overlap their own output (run-length encoding).

/// Why a PGLZ stream did not decompress.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PglzError {
    #[error("pglz: match tag truncated at input offset {0}")]
    TruncatedTag(usize),
    #[error("pglz: match at input offset {input_offset} refers {back_offset} bytes back but only {produced} bytes were produced")]
    BadOffset { input_offset: usize, back_offset: usize, produced: usize },
    #[error(
        "pglz: produced {produced} of the expected {expected} bytes, consumed {consumed} of {input_len} input bytes"
    )]
    Incomplete { produced: usize, expected: usize, consumed: usize, input_len: usize },
}

/// Decompresses `src` into exactly `raw_size` bytes. Like `pglz_decompress(...,
/// check_complete = true)`, fails unless the whole input is consumed and the output filled.
pub fn pglz_decompress(src: &[u8], raw_size: usize) -> Result<Vec<u8>, PglzError> {
    let mut out: Vec<u8> = Vec::with_capacity(raw_size);
    let mut sp = 0usize;
    while sp < src.len() && out.len() < raw_size {
        let mut ctrl = src[sp];
        sp += 1;
        let mut item = 0;
        while item < 8 && sp < src.len() && out.len() < raw_size {
            if ctrl & 1 != 0 {
                if sp + 2 > src.len() {
                    return Err(PglzError::TruncatedTag(sp));
                }
                let tag_at = sp;
                let mut len = (src[sp] & 0x0F) as usize + 3;
                let off = (((src[sp] & 0xF0) as usize) << 4) | src[sp + 1] as usize;
                sp += 2;
                if len == 18 {
                    if sp >= src.len() {
                        return Err(PglzError::TruncatedTag(sp));
                    }
                    len += src[sp] as usize;
                    sp += 1;
                }
                if off == 0 || off > out.len() {
                    return Err(PglzError::BadOffset { input_offset: tag_at, back_offset: off, produced: out.len() });
                }
                len = len.min(raw_size - out.len());
                // Byte by byte so an overlapping match repeats its own output, as the C code's
                // doubling memcpy loop does.
                let start = out.len() - off;
                for i in 0..len {
                    let b = out[start + i];
                    out.push(b);
                }
            } else {
                out.push(src[sp]);
                sp += 1;
            }
            ctrl >>= 1;
            item += 1;
        }
    }
    if out.len() != raw_size || sp != src.len() {
        return Err(PglzError::Incomplete {
            produced: out.len(),
            expected: raw_size,
            consumed: sp,
            input_len: src.len(),
        });
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A simple greedy PGLZ compressor (brute-force match search) producing streams
    /// `pglz_decompress` in Postgres would accept; for tests only.
    pub(crate) fn pglz_compress_for_tests(src: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < src.len() {
            let ctrl_at = out.len();
            out.push(0u8);
            for bit in 0..8 {
                if pos >= src.len() {
                    break;
                }
                let mut best = (0usize, 0usize);
                let window_start = pos.saturating_sub(4095);
                for cand in window_start..pos {
                    let mut l = 0;
                    while l < 273 && pos + l < src.len() && src[cand + l] == src[pos + l] {
                        l += 1;
                    }
                    if l > best.1 {
                        best = (pos - cand, l);
                    }
                }
                if best.1 >= 3 {
                    let (off, len) = best;
                    out[ctrl_at] |= 1 << bit;
                    if len >= 18 {
                        out.push(((off >> 4) & 0xF0) as u8 | 0x0F);
                        out.push(off as u8);
                        out.push((len - 18) as u8);
                    } else {
                        out.push(((off >> 4) & 0xF0) as u8 | (len - 3) as u8);
                        out.push(off as u8);
                    }
                    pos += len;
                } else {
                    out.push(src[pos]);
                    pos += 1;
                }
            }
        }
        out
    }

    #[test]
    fn literals_and_overlapping_matches() {
        // "11234" then a tag: length 16, offset 4 (the example in pg_lzcompress.c).
        let compressed = [0b0010_0000, b'1', b'1', b'2', b'3', b'4', 0x0D, 0x04];
        assert_eq!(pglz_decompress(&compressed, 21).unwrap(), b"112341234123412341234");
        assert!(matches!(pglz_decompress(&compressed, 22), Err(PglzError::Incomplete { .. })));
        // Like Postgres, a match may be cut short by the end of the output.
        assert_eq!(pglz_decompress(&compressed, 20).unwrap(), b"11234123412341234123");
        assert!(matches!(pglz_decompress(&compressed, 4), Err(PglzError::Incomplete { .. })));
        assert!(matches!(pglz_decompress(&[0x01, 0x00, 0x01], 10), Err(PglzError::BadOffset { .. })));
        assert!(matches!(pglz_decompress(&[0x01, 0x0F], 10), Err(PglzError::TruncatedTag(_))));
    }

    #[test]
    fn round_trips_page_like_data() {
        let mut page = vec![0u8; 8192];
        for (i, b) in page.iter_mut().enumerate().skip(6000) {
            *b = (i % 13) as u8;
        }
        page[0..24].copy_from_slice(&[7u8; 24]);
        let compressed = pglz_compress_for_tests(&page);
        assert!(compressed.len() < 2000, "{}", compressed.len());
        assert_eq!(pglz_decompress(&compressed, 8192).unwrap(), page);
    }
}
