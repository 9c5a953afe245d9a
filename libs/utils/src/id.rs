//! Identifiers: tenants and timelines are 16 random bytes printed as 32 lowercase hex digits;
//! nodes (pageservers, safekeepers) are small integers chosen by the operator.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Error from parsing a hex id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {kind} '{value}': expected 32 hex digits")]
pub struct IdParseError {
    pub kind: &'static str,
    pub value: String,
}

macro_rules! hex_id {
    ($name:ident, $kind:literal) => {
        #[doc = concat!("A ", $kind, ": 16 bytes, printed as 32 lowercase hex digits.")]
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub [u8; 16]);

        impl $name {
            pub const KIND: &'static str = $kind;

            /// A new random id.
            pub fn generate() -> Self {
                $name(rand::random())
            }

            pub fn as_bytes(&self) -> &[u8; 16] {
                &self.0
            }

            pub fn from_slice(b: &[u8]) -> Option<Self> {
                Some($name(b.try_into().ok()?))
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let err = || IdParseError { kind: $kind, value: s.chars().take(80).collect() };
                let mut out = [0u8; 16];
                if s.len() != 32 {
                    return Err(err());
                }
                hex::decode_to_slice(s, &mut out).map_err(|_| err())?;
                Ok($name(out))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

hex_id!(TenantId, "tenant id");
hex_id!(TimelineId, "timeline id");

/// Id of a pageserver or safekeeper node, chosen in its config.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {}", self.0)
    }
}

impl FromStr for NodeId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(NodeId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let t = TenantId::generate();
        let s = t.to_string();
        assert_eq!(s.len(), 32);
        assert_eq!(s.parse::<TenantId>().unwrap(), t);
        assert_ne!(TenantId::generate(), t);
        let j = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<TenantId>(&j).unwrap(), t);
    }

    #[test]
    fn bad_ids_are_rejected() {
        for bad in ["", "abc", &"g".repeat(32), &"a".repeat(33), &"é".repeat(16)] {
            let e = bad.parse::<TimelineId>().unwrap_err();
            assert!(e.to_string().contains("timeline id"), "{e}");
        }
        assert_eq!("7".parse::<NodeId>().unwrap(), NodeId(7));
    }
}
