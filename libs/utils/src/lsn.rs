//! Log sequence numbers: byte positions in the WAL stream, printed the Postgres way (`X/Y`).

use std::fmt;
use std::ops::{Add, AddAssign, Sub};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Size of a WAL page (`XLOG_BLCKSZ`).
pub const WAL_PAGE_SIZE_BYTES: u64 = 8192;
/// Default WAL segment size (`wal_segment_size`, 16 MiB).
pub const DEFAULT_WAL_SEGMENT_SIZE_BYTES: u64 = 16 * 1024 * 1024;

/// A position in the WAL. Ordered, copyable, printed and parsed as `X/Y` (hex high/low 32 bits).
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

/// Error from parsing an `X/Y` string.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid LSN '{0}': expected two hex numbers separated by '/', like 0/16B3748")]
pub struct LsnParseError(pub String);

impl Lsn {
    pub const INVALID: Lsn = Lsn(0);
    pub const MAX: Lsn = Lsn(u64::MAX);

    pub fn is_valid(self) -> bool {
        self != Lsn::INVALID
    }

    /// Checked addition of a byte count; `None` on overflow.
    pub fn checked_add(self, bytes: u64) -> Option<Lsn> {
        self.0.checked_add(bytes).map(Lsn)
    }

    /// Checked distance `self - other`; `None` when `other > self`.
    pub fn checked_sub(self, other: Lsn) -> Option<u64> {
        self.0.checked_sub(other.0)
    }

    /// Number of the WAL segment holding this LSN.
    pub fn segment_number(self, segment_size_bytes: u64) -> u64 {
        debug_assert!(segment_size_bytes.is_power_of_two());
        self.0 / segment_size_bytes
    }

    /// Offset of this LSN inside its segment.
    pub fn segment_offset(self, segment_size_bytes: u64) -> u64 {
        debug_assert!(segment_size_bytes.is_power_of_two());
        self.0 % segment_size_bytes
    }

    /// LSN of the start of this LSN's segment.
    pub fn segment_start(self, segment_size_bytes: u64) -> Lsn {
        Lsn(self.0 - self.segment_offset(segment_size_bytes))
    }

    /// Offset of this LSN inside its 8 KiB WAL page.
    pub fn page_offset(self) -> u64 {
        self.0 % WAL_PAGE_SIZE_BYTES
    }

    /// LSN of the start of this LSN's WAL page.
    pub fn page_start(self) -> Lsn {
        Lsn(self.0 - self.page_offset())
    }

    /// Rounds up to a multiple of `alignment` (a power of two); `None` on overflow.
    pub fn align_up(self, alignment: u64) -> Option<Lsn> {
        debug_assert!(alignment.is_power_of_two());
        self.0.checked_add(alignment - 1).map(|v| Lsn(v & !(alignment - 1)))
    }

    /// Rounds up to the next 8-byte boundary (`MAXALIGN`), where WAL records start.
    pub fn align(self) -> Lsn {
        self.align_up(8).expect("LSN overflow in align")
    }

    pub fn is_aligned(self) -> bool {
        self.0.is_multiple_of(8)
    }

    /// `from_hex` for the `XXXXXXXXYYYYYYYY` form used in some file names.
    pub fn from_hex16(s: &str) -> Result<Lsn, LsnParseError> {
        if s.len() != 16 {
            return Err(LsnParseError(s.to_string()));
        }
        u64::from_str_radix(s, 16).map(Lsn).map_err(|_| LsnParseError(s.to_string()))
    }
}

impl FromStr for Lsn {
    type Err = LsnParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let valid = |p: &str| !p.is_empty() && p.len() <= 8 && p.bytes().all(|b| b.is_ascii_hexdigit());
        if !valid(hi) || !valid(lo) {
            return Err(err());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())? as u64;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())? as u64;
        Ok(Lsn((hi << 32) | lo))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Self {
        Lsn(v)
    }
}

impl From<Lsn> for u64 {
    fn from(l: Lsn) -> Self {
        l.0
    }
}

impl Add<u64> for Lsn {
    type Output = Lsn;
    fn add(self, bytes: u64) -> Lsn {
        Lsn(self.0.checked_add(bytes).expect("LSN overflow"))
    }
}

impl AddAssign<u64> for Lsn {
    fn add_assign(&mut self, bytes: u64) {
        *self = *self + bytes;
    }
}

impl Sub<Lsn> for Lsn {
    type Output = u64;
    fn sub(self, other: Lsn) -> u64 {
        self.0.checked_sub(other.0).expect("LSN subtraction underflow")
    }
}

impl Sub<u64> for Lsn {
    type Output = Lsn;
    fn sub(self, bytes: u64) -> Lsn {
        Lsn(self.0.checked_sub(bytes).expect("LSN subtraction underflow"))
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        assert_eq!("0/16B3748".parse::<Lsn>().unwrap(), Lsn(0x16B3748));
        assert_eq!("1/0".parse::<Lsn>().unwrap(), Lsn(1 << 32));
        assert_eq!("FFFFFFFF/FFFFFFFF".parse::<Lsn>().unwrap(), Lsn::MAX);
        assert_eq!(Lsn(0x1_0000_00A8).to_string(), "1/A8");
        for bad in ["", "/", "0/", "/0", "x/1", "1/2/3", "123456789/0", "0/-1", "+1/0"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn segment_and_page_math() {
        let seg = DEFAULT_WAL_SEGMENT_SIZE_BYTES;
        let l = Lsn(3 * seg + 2 * WAL_PAGE_SIZE_BYTES + 40);
        assert_eq!(l.segment_number(seg), 3);
        assert_eq!(l.segment_offset(seg), 2 * WAL_PAGE_SIZE_BYTES + 40);
        assert_eq!(l.segment_start(seg), Lsn(3 * seg));
        assert_eq!(l.page_offset(), 40);
        assert_eq!(l.page_start(), Lsn(3 * seg + 2 * WAL_PAGE_SIZE_BYTES));
        assert_eq!(Lsn(41).align(), Lsn(48));
        assert_eq!(Lsn(48).align(), Lsn(48));
        assert_eq!(Lsn(u64::MAX).align_up(8), None);
        assert_eq!(Lsn(100) - Lsn(40), 60);
        assert_eq!(Lsn(40).checked_sub(Lsn(100)), None);
    }

    #[test]
    fn serde_round_trip() {
        let j = serde_json::to_string(&Lsn(0x1_0000_00A8)).unwrap();
        assert_eq!(j, "\"1/A8\"");
        assert_eq!(serde_json::from_str::<Lsn>(&j).unwrap(), Lsn(0x1_0000_00A8));
        assert!(serde_json::from_str::<Lsn>("\"zz\"").is_err());
    }
}
