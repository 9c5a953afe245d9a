//! CRC-32C as Postgres computes it (`port/pg_crc32c.h`).
//!
//! Postgres starts from `0xFFFFFFFF` (`INIT_CRC32C`), feeds data (`COMP_CRC32C`) and xors the
//! result with `0xFFFFFFFF` (`FIN_CRC32C`): the standard CRC-32C (Castagnoli), which is what
//! `crc32c::crc32c` computes. A CRC over two pieces fed one after the other is
//! `crc32c_append(crc32c(first), second)`: the crate undoes the final xor before continuing.

/// CRC of `parts` fed in order, as one `INIT`/`COMP`.../`FIN` sequence.
pub fn pg_crc32c(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0u32, |crc, part| crc32c::crc32c_append(crc, part))
}

/// The CRC stored in `xl_crc`: over the record's data after the 24-byte header, then over the
/// first 20 header bytes (everything before `xl_crc`). See `ValidXLogRecord` in xlogreader.c.
pub fn xlog_record_crc(header_first_20: &[u8], data_after_header: &[u8]) -> u32 {
    pg_crc32c(&[data_after_header, header_first_20])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_crc32c_check_value_and_chains() {
        // The CRC-32C check value: INIT 0xFFFFFFFF, reflected, FIN xor 0xFFFFFFFF.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(pg_crc32c(&[b"1234", b"56789"]), 0xE306_9283);
        assert_eq!(pg_crc32c(&[b"", b"123456789", b""]), 0xE306_9283);
        // Bitwise reference implementation of Postgres's pg_comp_crc32c_sb8 semantics.
        fn reference(data: &[u8]) -> u32 {
            let mut crc = 0xFFFF_FFFFu32;
            for &b in data {
                crc ^= b as u32;
                for _ in 0..8 {
                    crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
                }
            }
            crc ^ 0xFFFF_FFFF
        }
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        assert_eq!(pg_crc32c(&[&data[..300], &data[300..]]), reference(&data));
    }
}
