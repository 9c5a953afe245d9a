//! Value blobs: how one value is stored in the value area of a layer file.
//!
//! ```text
//!  u32 BE  stored length (bits 0..31) | zstd flag (bit 31)
//!  u32 BE  crc32c over the 4 length bytes, then the stored payload
//!  ...     stored payload: the value bytes, or (zstd flag) u32 BE raw length ++ zstd frame
//! ```
//!
//! The crc covers the length too, so a damaged length cannot make us return a neighbouring
//! blob's bytes. Large values are compressed when that saves space: 8 KiB pages often shrink
//! several-fold, which is both disk and cache capacity.

use bytes::Bytes;

pub const BLOB_HEADER_SIZE_BYTES: usize = 8;
const ZSTD_FLAG: u32 = 1 << 31;
/// Largest payload a blob can hold (the length field has 31 bits).
pub const BLOB_MAX_SIZE_BYTES: usize = (ZSTD_FLAG - 1) as usize;
/// Values at least this long are tried with zstd; smaller ones rarely gain enough to pay for it.
pub const COMPRESSION_THRESHOLD_BYTES: usize = 1024;

/// Blob header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobHeader {
    pub stored_len_bytes: u32,
    pub compressed: bool,
    pub crc: u32,
}

impl BlobHeader {
    pub fn decode(b: &[u8; BLOB_HEADER_SIZE_BYTES]) -> BlobHeader {
        let len_flags = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        BlobHeader {
            stored_len_bytes: len_flags & !ZSTD_FLAG,
            compressed: len_flags & ZSTD_FLAG != 0,
            crc: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
        }
    }

    fn len_flags(&self) -> u32 {
        self.stored_len_bytes | if self.compressed { ZSTD_FLAG } else { 0 }
    }
}

/// Builds the header and the stored payload for `raw`, compressing with zstd at `zstd_level`
/// when the value is large and compression saves at least an eighth.
///
/// Panics if `raw` is longer than [`BLOB_MAX_SIZE_BYTES`] (Postgres records stop at 1 GiB).
pub fn encode_blob(raw: &[u8], zstd_level: Option<i32>) -> ([u8; BLOB_HEADER_SIZE_BYTES], Option<Vec<u8>>) {
    assert!(raw.len() <= BLOB_MAX_SIZE_BYTES, "value of {} bytes is too large for a blob", raw.len());
    let compressed = match zstd_level {
        Some(level) if raw.len() >= COMPRESSION_THRESHOLD_BYTES => {
            zstd::bulk::compress(raw, level).ok().and_then(|frame| {
                (frame.len() + 4 <= raw.len() - raw.len() / 8).then(|| {
                    let mut stored = Vec::with_capacity(4 + frame.len());
                    stored.extend_from_slice(&(raw.len() as u32).to_be_bytes());
                    stored.extend_from_slice(&frame);
                    stored
                })
            })
        }
        _ => None,
    };
    let stored: &[u8] = compressed.as_deref().unwrap_or(raw);
    let mut header = BlobHeader { stored_len_bytes: stored.len() as u32, compressed: compressed.is_some(), crc: 0 };
    header.crc = crc32c::crc32c_append(crc32c::crc32c(&header.len_flags().to_be_bytes()), stored);
    let mut out = [0u8; BLOB_HEADER_SIZE_BYTES];
    out[0..4].copy_from_slice(&header.len_flags().to_be_bytes());
    out[4..8].copy_from_slice(&header.crc.to_be_bytes());
    (out, compressed)
}

/// Checks the crc of a stored payload and undoes compression. The error says what is wrong.
pub fn decode_payload(header: &BlobHeader, stored: Vec<u8>) -> Result<Bytes, String> {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&header.len_flags().to_be_bytes()), &stored);
    if crc != header.crc {
        return Err(format!("checksum (crc32c) mismatch: stored {:08x}, computed {crc:08x}", header.crc));
    }
    if !header.compressed {
        return Ok(Bytes::from(stored));
    }
    let Some((raw_len, frame)) = stored.split_first_chunk::<4>() else {
        return Err("compressed blob shorter than its 4-byte raw length".to_string());
    };
    let raw_len = u32::from_be_bytes(*raw_len) as usize;
    if raw_len > BLOB_MAX_SIZE_BYTES {
        return Err(format!("compressed blob claims a raw length of {raw_len} bytes"));
    }
    let raw = zstd::bulk::decompress(frame, raw_len).map_err(|e| format!("zstd decompression failed: {e}"))?;
    if raw.len() != raw_len {
        return Err(format!("decompressed {} bytes, header says {raw_len}", raw.len()));
    }
    Ok(Bytes::from(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(raw: &[u8], level: Option<i32>) -> bool {
        let (h, stored) = encode_blob(raw, level);
        let header = BlobHeader::decode(&h);
        let stored = stored.unwrap_or_else(|| raw.to_vec());
        assert_eq!(header.stored_len_bytes as usize, stored.len());
        assert_eq!(decode_payload(&header, stored).as_deref(), Ok(raw));
        header.compressed
    }

    #[test]
    fn compresses_only_when_it_pays() {
        assert!(round_trip(&[0u8; 8192], Some(1)));
        assert!(!round_trip(&[0u8; 8192], None));
        assert!(!round_trip(&[0u8; 100], Some(1)));
        let mut noise = vec![0u8; 8192];
        rand::RngCore::fill_bytes(&mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1), &mut noise);
        assert!(!round_trip(&noise, Some(1)));
        assert!(!round_trip(&[], Some(1)));
    }

    #[test]
    fn damage_is_detected() {
        let raw = vec![5u8; 4096];
        let (h, stored) = encode_blob(&raw, Some(1));
        let stored = stored.expect("compressible");
        for pos in 0..stored.len() {
            let mut s = stored.clone();
            s[pos] ^= 1;
            assert!(decode_payload(&BlobHeader::decode(&h), s).is_err());
        }
        let mut h2 = h;
        h2[3] ^= 1;
        let header = BlobHeader::decode(&h2);
        assert!(decode_payload(&header, stored).is_err());
    }
}
