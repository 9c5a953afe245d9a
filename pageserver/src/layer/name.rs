//! Layer file names. A name says what a file covers, so a timeline directory can be listed and
//! planned without opening any file, and two files covering the same rectangle collide by name.
//!
//! ```text
//!  delta  <key start, 36 hex>-<key end, 36 hex>__<LSN start, 16 hex>-<LSN end, 16 hex>
//!  image  <key start, 36 hex>-<key end, 36 hex>__<LSN, 16 hex>
//! ```

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use utils::Lsn;

use crate::key::{Key, KeyRange};

/// The parsed name of a layer file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LayerName {
    Delta { key_range: KeyRange, lsn_range: Range<Lsn> },
    Image { key_range: KeyRange, lsn: Lsn },
}

/// Error from parsing a file name that is not a layer name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("'{0}' is not a layer file name (expected <keystart>-<keyend>__<lsn>[-<lsnend>])")]
pub struct LayerNameParseError(pub String);

impl LayerName {
    pub fn key_range(&self) -> KeyRange {
        match self {
            LayerName::Delta { key_range, .. } | LayerName::Image { key_range, .. } => *key_range,
        }
    }

    /// For an image at `L`: `L..L+1`.
    pub fn lsn_range(&self) -> Range<Lsn> {
        match self {
            LayerName::Delta { lsn_range, .. } => lsn_range.clone(),
            LayerName::Image { lsn, .. } => *lsn..Lsn(lsn.0.saturating_add(1)),
        }
    }
}

impl fmt::Display for LayerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayerName::Delta { key_range, lsn_range } => {
                write!(f, "{}-{}__{:016X}-{:016X}", key_range.start, key_range.end, lsn_range.start.0, lsn_range.end.0)
            }
            LayerName::Image { key_range, lsn } => {
                write!(f, "{}-{}__{:016X}", key_range.start, key_range.end, lsn.0)
            }
        }
    }
}

impl FromStr for LayerName {
    type Err = LayerNameParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LayerNameParseError(s.chars().take(200).collect());
        let (keys, lsns) = s.split_once("__").ok_or_else(err)?;
        let (key_start, key_end) = keys.split_once('-').ok_or_else(err)?;
        let key_start: Key = key_start.parse().map_err(|_| err())?;
        let key_end: Key = key_end.parse().map_err(|_| err())?;
        if key_start > key_end {
            return Err(err());
        }
        let key_range = KeyRange::new(key_start, key_end);
        match lsns.split_once('-') {
            Some((start, end)) => {
                let start = Lsn::from_hex16(start).map_err(|_| err())?;
                let end = Lsn::from_hex16(end).map_err(|_| err())?;
                if start >= end {
                    return Err(err());
                }
                Ok(LayerName::Delta { key_range, lsn_range: start..end })
            }
            None => Ok(LayerName::Image { key_range, lsn: Lsn::from_hex16(lsns).map_err(|_| err())? }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let kr = KeyRange::new(Key { field6: 5, ..Key::MIN }, Key::MAX);
        let delta = LayerName::Delta { key_range: kr, lsn_range: Lsn(0x10)..Lsn(0x1_0000_0020) };
        let s = delta.to_string();
        assert_eq!(s, format!("{}-{}__0000000000000010-0000000100000020", kr.start, kr.end));
        assert_eq!(s.parse::<LayerName>(), Ok(delta));
        let image = LayerName::Image { key_range: kr, lsn: Lsn(0xABC) };
        assert_eq!(image.to_string().parse::<LayerName>(), Ok(image.clone()));
        assert_eq!(image.lsn_range(), Lsn(0xABC)..Lsn(0xABD));
        for bad in ["", "x__y", "00-00__0", &format!("{}-{}__{:016X}-{:016X}", kr.start, kr.end, 5, 5)] {
            assert!(bad.parse::<LayerName>().is_err(), "{bad}");
        }
    }
}
