//! A bounds-checked little-endian cursor over bytes from outside.
//!
//! Every struct decoder goes through this so that a short or corrupt input becomes a
//! [`DecodeError`] naming the structure, the field and the LSN, never an index panic.

use utils::Lsn;

use crate::error::DecodeError;

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    lsn: Lsn,
    /// The structure being decoded, e.g. `"xl_xact_commit"`; used in error messages.
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], lsn: Lsn, what: &'static str) -> Self {
        Reader { buf, pos: 0, lsn, what }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn error(&self, msg: impl std::fmt::Display) -> DecodeError {
        DecodeError::new(self.lsn, format!("{}: {}", self.what, msg))
    }

    /// Takes the next `len` bytes, or fails naming `field`.
    pub(crate) fn bytes(&mut self, len: usize, field: &str) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < len {
            return Err(self.error(format_args!(
                "truncated at field {field}: need {len} bytes at offset {}, only {} left of {}",
                self.pos,
                self.remaining(),
                self.buf.len()
            )));
        }
        let out = &self.buf[self.pos..self.pos + len];
        self.pos += len;
        Ok(out)
    }

    pub(crate) fn skip(&mut self, len: usize, field: &str) -> Result<(), DecodeError> {
        self.bytes(len, field).map(|_| ())
    }

    /// Skips to the next multiple of `align` from the start of the buffer (C struct padding).
    pub(crate) fn align(&mut self, align: usize, field: &str) -> Result<(), DecodeError> {
        let target = self.pos.div_ceil(align) * align;
        self.skip(target - self.pos, field)
    }

    pub(crate) fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N], DecodeError> {
        let b = self.bytes(N, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, field: &str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub(crate) fn bool(&mut self, field: &str) -> Result<bool, DecodeError> {
        Ok(self.u8(field)? != 0)
    }

    pub(crate) fn u16(&mut self, field: &str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn u32(&mut self, field: &str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn i32(&mut self, field: &str) -> Result<i32, DecodeError> {
        Ok(i32::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn u64(&mut self, field: &str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn i64(&mut self, field: &str) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn f64(&mut self, field: &str) -> Result<f64, DecodeError> {
        Ok(f64::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn lsn(&mut self, field: &str) -> Result<Lsn, DecodeError> {
        Ok(Lsn(self.u64(field)?))
    }

    /// Reads a C `int` element count and checks that `count * elem_size` more bytes are
    /// present, so a corrupt count fails here instead of driving a huge allocation.
    pub(crate) fn count(&mut self, field: &str, elem_size: usize) -> Result<usize, DecodeError> {
        let n = self.i32(field)?;
        self.check_count(n as i64, field, elem_size)
    }

    pub(crate) fn check_count(&self, n: i64, field: &str, elem_size: usize) -> Result<usize, DecodeError> {
        if n < 0 {
            return Err(self.error(format_args!("negative count {n} in field {field}")));
        }
        let n = n as usize;
        match n.checked_mul(elem_size) {
            Some(bytes) if bytes <= self.remaining() => Ok(n),
            _ => Err(self.error(format_args!(
                "count {n} in field {field} needs {} bytes at offset {}, only {} left",
                n as u128 * elem_size as u128,
                self.pos,
                self.remaining()
            ))),
        }
    }

    pub(crate) fn u32_array(&mut self, n: usize, field: &str) -> Result<Vec<u32>, DecodeError> {
        let b = self.bytes(n * 4, field)?;
        Ok(b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// A NUL-terminated string of at most `max_len` bytes (terminator excluded).
    pub(crate) fn cstring(&mut self, max_len: usize, field: &str) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(self.error(format_args!("field {field} is not NUL-terminated")));
        };
        if nul > max_len {
            return Err(self.error(format_args!("field {field} is {nul} bytes long, more than {max_len}")));
        }
        let s = String::from_utf8_lossy(&rest[..nul]).into_owned();
        self.pos += nul + 1;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_input_is_an_error_naming_the_field() {
        let mut r = Reader::new(&[1, 2, 3], Lsn(0x10), "thing");
        assert_eq!(r.u16("a").unwrap(), 0x0201);
        let e = r.u32("b").unwrap_err();
        assert!(e.to_string().contains("thing: truncated at field b"), "{e}");
        assert!(e.to_string().contains("0/10"), "{e}");
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0x7f], Lsn(0), "thing");
        assert!(r.count("n", 4).is_err());
        let mut r = Reader::new(b"ab\0cd", Lsn(0), "s");
        assert_eq!(r.cstring(10, "gid").unwrap(), "ab");
        assert!(r.cstring(10, "gid").is_err());
    }
}
