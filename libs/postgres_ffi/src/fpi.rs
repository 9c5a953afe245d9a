//! Full-page images back into pages (xlogreader.c `RestoreBlockImage`): decompress with the
//! method named in `bimg_info`, check the result is exactly `BLCKSZ - hole_length` bytes, and
//! put the zeroed hole back in the middle.

use utils::Lsn;

use crate::error::DecodeError;
use crate::pglz::pglz_decompress;
use crate::record::{BlockImage, BlockRef, ImageCompression};
use crate::BLCKSZ;

/// Decompresses an image to its stored form (the page without its hole): exactly
/// `BLCKSZ - hole_length` bytes. `lsn` is used in error messages.
pub fn decompress_image(image: &BlockImage, lsn: Lsn) -> Result<Vec<u8>, DecodeError> {
    let expected = BLCKSZ
        .checked_sub(image.hole_length as usize)
        .ok_or_else(|| DecodeError::new(lsn, format!("image hole length {} exceeds the page", image.hole_length)))?;
    let fail =
        |method: &str, why: String| DecodeError::new(lsn, format!("could not decompress {method} page image: {why}"));
    let out = match image.compression {
        ImageCompression::None => image.data.to_vec(),
        ImageCompression::Pglz => pglz_decompress(&image.data, expected).map_err(|e| fail("pglz", e.to_string()))?,
        ImageCompression::Lz4 => {
            let mut buf = vec![0u8; expected];
            let n = lz4_flex::block::decompress_into(&image.data, &mut buf).map_err(|e| fail("lz4", e.to_string()))?;
            buf.truncate(n);
            buf
        }
        ImageCompression::Zstd => {
            // `bulk::decompress` never writes more than `capacity` bytes: a corrupt frame
            // cannot make us allocate more than a page.
            zstd::bulk::decompress(&image.data, expected).map_err(|e| fail("zstd", e.to_string()))?
        }
    };
    if out.len() != expected {
        return Err(DecodeError::new(
            lsn,
            format!(
                "{} page image holds {} bytes, expected {expected} (hole of {} bytes)",
                image.compression.name(),
                out.len(),
                image.hole_length
            ),
        ));
    }
    Ok(out)
}

/// Reconstructs the 8192-byte page an image describes.
pub fn restore_image(image: &BlockImage, lsn: Lsn) -> Result<Vec<u8>, DecodeError> {
    let stored = decompress_image(image, lsn)?;
    let hole_offset = image.hole_offset as usize;
    let hole_length = image.hole_length as usize;
    if hole_offset + hole_length > BLCKSZ {
        return Err(DecodeError::new(lsn, format!("image hole {hole_offset}+{hole_length} lies outside the page")));
    }
    let mut page = vec![0u8; BLCKSZ];
    page[..hole_offset].copy_from_slice(&stored[..hole_offset]);
    page[hole_offset + hole_length..].copy_from_slice(&stored[hole_offset..]);
    Ok(page)
}

/// Reconstructs the page of a block reference that carries an image.
pub fn restore_block_image(block: &BlockRef, lsn: Lsn) -> Result<Vec<u8>, DecodeError> {
    let image = block
        .image
        .as_ref()
        .ok_or_else(|| DecodeError::new(lsn, format!("block {} has no full-page image", block.block_id)))?;
    restore_image(image, lsn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{BKPIMAGE_APPLY, BKPIMAGE_HAS_HOLE};
    use bytes::Bytes;

    fn sample_page() -> Vec<u8> {
        let mut page = vec![0u8; BLCKSZ];
        for (i, b) in page.iter_mut().enumerate() {
            if !(100..7000).contains(&i) {
                *b = (i * 31 % 251) as u8;
            }
        }
        page
    }

    fn image(stored: Vec<u8>, compression: ImageCompression, hole: (u16, u16)) -> BlockImage {
        BlockImage {
            bimg_info: BKPIMAGE_APPLY | if hole.1 > 0 { BKPIMAGE_HAS_HOLE } else { 0 } | compression.flag(),
            hole_offset: hole.0,
            hole_length: hole.1,
            compression,
            apply: true,
            data: Bytes::from(stored),
        }
    }

    #[test]
    fn all_methods_restore_the_page() {
        let page = sample_page();
        let mut without_hole = page[..100].to_vec();
        without_hole.extend_from_slice(&page[7000..]);
        let lsn = Lsn(0x1000);
        let cases = [
            (without_hole.clone(), ImageCompression::None),
            (crate::pglz::tests::pglz_compress_for_tests(&without_hole), ImageCompression::Pglz),
            (lz4_flex::block::compress(&without_hole), ImageCompression::Lz4),
            (zstd::bulk::compress(&without_hole, 3).unwrap(), ImageCompression::Zstd),
        ];
        for (stored, method) in cases {
            let img = image(stored.clone(), method, (100, 6900));
            assert_eq!(restore_image(&img, lsn).unwrap(), page, "{method:?}");
            // Wrong hole length: decompressed size mismatch must be an error, not a panic.
            let img = image(stored, method, (100, 6800));
            assert!(restore_image(&img, lsn).is_err(), "{method:?}");
        }
        let full = image(page.clone(), ImageCompression::None, (0, 0));
        assert_eq!(restore_image(&full, lsn).unwrap(), page);
        let garbage = image(vec![0xFF; 50], ImageCompression::Zstd, (100, 6900));
        assert!(restore_image(&garbage, lsn).is_err());
        let garbage = image(vec![0xFF; 50], ImageCompression::Lz4, (100, 6900));
        assert!(restore_image(&garbage, lsn).is_err());
    }
}
