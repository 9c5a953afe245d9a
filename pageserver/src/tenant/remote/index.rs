//! `index_part.json`: the remote source of truth of one timeline (DESIGN D8).
//!
//! It names every layer file of the timeline that is in remote storage, with its size and
//! checksums, and carries the timeline metadata (the same fields as the local `metadata` file),
//! so a pageserver with an empty disk can rebuild the timeline from it. It is uploaded only after
//! every layer it names, so it never names a layer that is not there.
//!
//! ```json
//! {
//!   "version": 1,
//!   "tenant_id": "…", "timeline_id": "…",
//!   "metadata": { "disk_consistent_lsn": "0/16B3748", "prev_record_lsn": "0/16B3710",
//!                 "ancestor_timeline": null, "ancestor_lsn": "0/0", "latest_gc_cutoff_lsn": "0/0",
//!                 "initdb_lsn": "0/169AD58", "pg_version": 15 },
//!   "layers": { "<layer file name>": { "file_size": 8192, "crc32c": 305419896, "sha256": "…64 hex…" } }
//! }
//! ```
//!
//! Decoding checks the version first (an index from a newer format is refused as such, not as
//! "corrupt"), then the exact schema (unknown fields are refused), then the invariants: every
//! layer name parses, no layer lies above `disk_consistent_lsn`, the branch fields agree. The
//! decoder never panics, whatever the bytes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utils::{Lsn, TenantId, TimelineId};

use crate::layer::LayerName;
use crate::tenant::metadata::TimelineMetadata;

/// Name of the index object in a timeline's remote prefix.
pub const INDEX_PART_FILE_NAME: &str = "index_part.json";
/// The format this build writes and reads.
pub const INDEX_PART_VERSION: u64 = 1;

/// Size and checksums of one uploaded layer file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerFileMetadata {
    pub file_size: u64,
    /// crc32c (Castagnoli) of the whole file.
    pub crc32c: u32,
    /// SHA-256 of the whole file, lowercase hex.
    pub sha256: String,
}

/// The timeline metadata as stored in the index (see [`TimelineMetadata`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexMetadata {
    pub disk_consistent_lsn: Lsn,
    pub prev_record_lsn: Option<Lsn>,
    pub ancestor_timeline: Option<TimelineId>,
    pub ancestor_lsn: Lsn,
    pub latest_gc_cutoff_lsn: Lsn,
    pub initdb_lsn: Lsn,
    pub pg_version: u32,
}

impl From<&TimelineMetadata> for IndexMetadata {
    fn from(md: &TimelineMetadata) -> Self {
        IndexMetadata {
            disk_consistent_lsn: md.disk_consistent_lsn,
            prev_record_lsn: md.prev_record_lsn,
            ancestor_timeline: md.ancestor_timeline,
            ancestor_lsn: md.ancestor_lsn,
            latest_gc_cutoff_lsn: md.latest_gc_cutoff_lsn,
            initdb_lsn: md.initdb_lsn,
            pg_version: md.pg_version,
        }
    }
}

impl From<&IndexMetadata> for TimelineMetadata {
    fn from(md: &IndexMetadata) -> Self {
        TimelineMetadata {
            disk_consistent_lsn: md.disk_consistent_lsn,
            prev_record_lsn: md.prev_record_lsn,
            ancestor_timeline: md.ancestor_timeline,
            ancestor_lsn: md.ancestor_lsn,
            latest_gc_cutoff_lsn: md.latest_gc_cutoff_lsn,
            initdb_lsn: md.initdb_lsn,
            pg_version: md.pg_version,
        }
    }
}

/// The contents of `index_part.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexPart {
    pub version: u64,
    pub tenant_id: TenantId,
    pub timeline_id: TimelineId,
    pub metadata: IndexMetadata,
    /// Layer file name → size and checksums. Sorted, so equal indexes encode equally.
    pub layers: BTreeMap<String, LayerFileMetadata>,
}

/// Why bytes are not a usable `index_part.json`. `object` names where they came from.
#[derive(Debug, thiserror::Error)]
pub enum IndexPartError {
    #[error("{object}: corrupt index_part.json: {reason}")]
    Corrupt { object: String, reason: String },
    #[error(
        "{object}: index_part.json format version {found} is not supported (this build reads version \
         {INDEX_PART_VERSION}); upgrade the pageserver"
    )]
    UnsupportedVersion { object: String, found: u64 },
}

impl IndexPartError {
    pub fn is_corruption(&self) -> bool {
        matches!(self, IndexPartError::Corrupt { .. })
    }
}

impl IndexPart {
    pub fn new(
        tenant_id: TenantId,
        timeline_id: TimelineId,
        metadata: &TimelineMetadata,
        layers: BTreeMap<String, LayerFileMetadata>,
    ) -> IndexPart {
        IndexPart { version: INDEX_PART_VERSION, tenant_id, timeline_id, metadata: metadata.into(), layers }
    }

    pub fn timeline_metadata(&self) -> TimelineMetadata {
        (&self.metadata).into()
    }

    pub fn disk_consistent_lsn(&self) -> Lsn {
        self.metadata.disk_consistent_lsn
    }

    /// Pretty JSON (a few kB per thousand layers; readable with `jq`).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("an IndexPart always serializes")
    }

    /// Decodes and validates `bytes`, read from `object` (named in errors).
    pub fn decode(bytes: &[u8], object: &str) -> Result<IndexPart, IndexPartError> {
        let corrupt = |reason: String| IndexPartError::Corrupt { object: object.to_string(), reason };
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| corrupt(format!("not valid JSON ({} bytes): {e}", bytes.len())))?;
        let serde_json::Value::Object(fields) = &value else {
            return Err(corrupt("not a JSON object".to_string()));
        };
        let version = match fields.get("version") {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().ok_or_else(|| corrupt(format!("version {n} is not a positive integer")))?
            }
            Some(other) => return Err(corrupt(format!("version {other} is not a number"))),
            None => return Err(corrupt("no version field".to_string())),
        };
        if version != INDEX_PART_VERSION {
            return Err(IndexPartError::UnsupportedVersion { object: object.to_string(), found: version });
        }
        let index: IndexPart = serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))?;
        index.validate().map_err(corrupt)?;
        Ok(index)
    }

    fn validate(&self) -> Result<(), String> {
        let md = &self.metadata;
        match md.ancestor_timeline {
            None if md.ancestor_lsn != Lsn::INVALID => {
                return Err(format!("ancestor_lsn {} without an ancestor_timeline", md.ancestor_lsn))
            }
            Some(_) if md.disk_consistent_lsn < md.ancestor_lsn => {
                return Err(format!(
                    "disk_consistent_lsn {} is below the branch point {}",
                    md.disk_consistent_lsn, md.ancestor_lsn
                ))
            }
            Some(ancestor) if ancestor == self.timeline_id => {
                return Err(format!("timeline {ancestor} names itself as its ancestor"))
            }
            _ => {}
        }
        let layers_end = md.disk_consistent_lsn.0.saturating_add(1);
        for (name, meta) in &self.layers {
            let parsed: LayerName = name.parse().map_err(|_| format!("{name:?} is not a layer file name"))?;
            if parsed.lsn_range().end.0 > layers_end {
                return Err(format!("layer {name} lies above disk_consistent_lsn {}", md.disk_consistent_lsn));
            }
            if meta.sha256.len() != 64 || !meta.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(format!("layer {name}: sha256 {:?} is not 64 lowercase hex digits", meta.sha256));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{Key, KeyRange};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const OBJECT: &str = "tenants/t/timelines/tl/index_part.json";

    fn sample() -> IndexPart {
        let md = TimelineMetadata {
            disk_consistent_lsn: Lsn(0x0200_0000),
            prev_record_lsn: Some(Lsn(0x01FF_FFC0)),
            ancestor_timeline: Some(TimelineId([0xAB; 16])),
            ancestor_lsn: Lsn(0x0100_0000),
            latest_gc_cutoff_lsn: Lsn::INVALID,
            initdb_lsn: Lsn(0x0169_AD58),
            pg_version: 15,
        };
        let mut layers = BTreeMap::new();
        let delta = LayerName::Delta {
            key_range: KeyRange::new(Key::MIN, Key::MAX),
            lsn_range: Lsn(0x0100_0001)..Lsn(0x0180_0000),
        };
        let image = LayerName::Image { key_range: KeyRange::new(Key::MIN, Key::MAX), lsn: Lsn(0x0200_0000) };
        layers.insert(
            delta.to_string(),
            LayerFileMetadata { file_size: 8192, crc32c: 0x1234_5678, sha256: "a".repeat(64) },
        );
        layers.insert(image.to_string(), LayerFileMetadata { file_size: 1 << 28, crc32c: 7, sha256: "0f".repeat(32) });
        IndexPart::new(TenantId([0x11; 16]), TimelineId([0x22; 16]), &md, layers)
    }

    #[test]
    fn round_trip() {
        let index = sample();
        let bytes = index.encode();
        let decoded = IndexPart::decode(&bytes, OBJECT).expect("decode");
        assert_eq!(decoded, index);
        assert_eq!(decoded.timeline_metadata().ancestor_lsn, Lsn(0x0100_0000));
        // LSNs are written the Postgres way, so the file is readable by people.
        let text = String::from_utf8(bytes).expect("utf8");
        assert!(text.contains("\"disk_consistent_lsn\": \"0/2000000\""), "{text}");
        // An empty timeline (a fresh branch) is a valid index too.
        let empty = IndexPart::new(index.tenant_id, index.timeline_id, &index.timeline_metadata(), BTreeMap::new());
        assert_eq!(IndexPart::decode(&empty.encode(), OBJECT).expect("decode"), empty);
    }

    #[test]
    fn unknown_version_is_refused_as_such() {
        let mut value: serde_json::Value = serde_json::from_slice(&sample().encode()).expect("json");
        value["version"] = serde_json::json!(2);
        // Version 2 may have other fields: the version is checked before the schema.
        value["something_new"] = serde_json::json!(true);
        let err = IndexPart::decode(&serde_json::to_vec(&value).expect("json"), OBJECT).unwrap_err();
        assert!(matches!(err, IndexPartError::UnsupportedVersion { found: 2, .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(OBJECT) && msg.contains("version 2 is not supported"), "{msg}");
        for bad in [serde_json::json!(null), serde_json::json!("1"), serde_json::json!(-1), serde_json::json!(1.5)] {
            value["version"] = bad.clone();
            let err = IndexPart::decode(&serde_json::to_vec(&value).expect("json"), OBJECT).unwrap_err();
            assert!(err.is_corruption(), "{bad}: {err}");
        }
    }

    #[test]
    fn corrupt_indexes_are_refused_with_the_reason() {
        let good: serde_json::Value = serde_json::from_slice(&sample().encode()).expect("json");
        let delta_name = sample().layers.keys().next().expect("a layer").clone();
        type Mutation<'a> = Box<dyn Fn(&mut serde_json::Value) + 'a>;
        let cases: Vec<(Mutation<'_>, &str)> = vec![
            (Box::new(|v| v["bogus"] = serde_json::json!(1)), "unknown field"),
            (Box::new(|v| v["metadata"]["disk_consistent_lsn"] = serde_json::json!("zz")), "zz"),
            (Box::new(|v| v.as_object_mut().expect("object").remove("layers").map(drop).unwrap_or(())), "layers"),
            (Box::new(|v| v["layers"]["not-a-layer"] = v["layers"][&delta_name].clone()), "not a layer file name"),
            (
                Box::new(|v| v["metadata"]["disk_consistent_lsn"] = serde_json::json!("0/1000010")),
                "above disk_consistent_lsn",
            ),
            (Box::new(|v| v["metadata"]["disk_consistent_lsn"] = serde_json::json!("0/10")), "below the branch point"),
            (
                Box::new(|v| v["metadata"]["ancestor_timeline"] = serde_json::Value::Null),
                "without an ancestor_timeline",
            ),
            (Box::new(|v| v["layers"][&delta_name]["sha256"] = serde_json::json!("XYZ")), "sha256"),
            (Box::new(|v| v["layers"][&delta_name]["file_size"] = serde_json::json!(-5)), "-5"),
        ];
        for (mutate, expected) in cases {
            let mut v = good.clone();
            mutate(&mut v);
            let err = IndexPart::decode(&serde_json::to_vec(&v).expect("json"), OBJECT).unwrap_err();
            assert!(err.is_corruption(), "{expected}: {err}");
            let msg = err.to_string();
            assert!(msg.contains(expected) && msg.contains(OBJECT), "expected {expected:?} in {msg}");
        }
        for bytes in [&b""[..], b"null", b"[]", b"{}", b"\xff\xfe", b"{\"version\": 1}"] {
            assert!(IndexPart::decode(bytes, OBJECT).unwrap_err().is_corruption());
        }
    }

    #[test]
    fn decoder_never_panics_on_bad_bytes() {
        let good = sample().encode();
        for cut in 0..good.len() {
            assert!(IndexPart::decode(&good[..cut], OBJECT).is_err(), "truncated to {cut} bytes");
        }
        let mut rng = StdRng::seed_from_u64(0x1DE7);
        let mut accepted = 0;
        for _ in 0..20_000 {
            let mut bytes = good.clone();
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..bytes.len());
                bytes[i] = rng.gen();
            }
            // Either refused, or a valid index (e.g. a changed hex digit of a checksum).
            if let Ok(index) = IndexPart::decode(&bytes, OBJECT) {
                index.validate().expect("accepted indexes are valid");
                accepted += 1;
            }
        }
        assert!(accepted < 20_000);
        for _ in 0..2_000 {
            let len = rng.gen_range(0..300);
            let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            assert!(IndexPart::decode(&bytes, OBJECT).is_err());
        }
        // Deep nesting is refused by the parser's recursion limit, not a stack overflow.
        let deep = format!("{{\"version\": 1, \"layers\": {}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(IndexPart::decode(deep.as_bytes(), OBJECT).is_err());
    }
}
