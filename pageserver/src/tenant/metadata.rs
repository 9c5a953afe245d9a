//! The timeline metadata file (`metadata` in the timeline directory): what a timeline needs to
//! know about itself at load time that its layer files do not say.
//!
//! The key field is `disk_consistent_lsn`: every change at or below it is in the layer files of
//! this directory (or the ancestor's), so after a restart ingest resumes there. It only moves
//! after the layers holding the data are durable (see [`super::timeline`]), and this file is
//! replaced atomically (write a temp file, fsync, rename, fsync the directory), so a crash
//! leaves the old or the new version, never a mix.
//!
//! Format (72 bytes, big-endian):
//!
//! ```text
//!   0  u32  magic 0x4E544D44 ("NTMD")
//!   4  u16  format version (1)
//!   6  u16  flags: bit 0 prev_record_lsn present, bit 1 ancestor present
//!   8  u64  disk_consistent_lsn
//!  16  u64  prev_record_lsn (0 when absent)
//!  24  [16] ancestor timeline id (zeros when absent)
//!  40  u64  ancestor_lsn (0 without an ancestor)
//!  48  u64  latest_gc_cutoff_lsn
//!  56  u64  initdb_lsn
//!  64  u32  pg_version (major)
//!  68  u32  crc32c of bytes 0..68
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use utils::{Lsn, TimelineId};

/// Name of the metadata file inside a timeline directory.
pub const METADATA_FILE_NAME: &str = "metadata";
/// Name of the temp file a new version is written to before the rename.
pub const METADATA_TEMP_FILE_NAME: &str = "metadata.tmp";
/// Current format version; decoding rejects others.
pub const METADATA_FORMAT_VERSION: u16 = 1;
/// Encoded size of the metadata file.
pub const METADATA_SIZE_BYTES: usize = 72;

const METADATA_MAGIC: u32 = 0x4E54_4D44;
const CRC_OFFSET: usize = 68;
const FLAG_PREV_RECORD: u16 = 1;
const FLAG_ANCESTOR: u16 = 2;

/// What a timeline persists about itself besides its layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineMetadata {
    /// Everything at or below this LSN is in durable layer files.
    pub disk_consistent_lsn: Lsn,
    /// Start LSN of the record that ends at `disk_consistent_lsn`, when known: the `xl_prev` of
    /// a record written right there (a compute started at that LSN, DESIGN D4).
    pub prev_record_lsn: Option<Lsn>,
    /// The parent timeline of a branch.
    pub ancestor_timeline: Option<TimelineId>,
    /// The branch point: reads at or below it fall through to the ancestor. 0 without ancestor.
    pub ancestor_lsn: Lsn,
    /// History below this LSN may have been garbage collected: no reads or branches below it.
    pub latest_gc_cutoff_lsn: Lsn,
    /// The LSN the timeline's data was bootstrapped at (inherited by branches).
    pub initdb_lsn: Lsn,
    /// Postgres major version of the data.
    pub pg_version: u32,
}

/// Why the metadata file could not be read or written. Always names the file.
#[derive(Debug, thiserror::Error)]
#[error("timeline metadata file {}: {kind}", path.display())]
pub struct MetadataError {
    pub path: PathBuf,
    #[source]
    pub kind: MetadataErrorKind,
}

#[derive(Debug, thiserror::Error)]
pub enum MetadataErrorKind {
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: io::Error,
    },
    /// The bytes are not a valid metadata file; the timeline cannot be loaded from them.
    #[error(
        "corrupt: {0}; the timeline cannot be loaded until the file is restored (from remote storage) \
         or the timeline is deleted"
    )]
    Corrupt(String),
    /// A valid file written by another format version.
    #[error("format version {found} is not supported (this build reads version {METADATA_FORMAT_VERSION})")]
    UnsupportedVersion { found: u16 },
}

impl MetadataError {
    fn io(path: &Path, context: &'static str, source: io::Error) -> MetadataError {
        MetadataError { path: path.to_path_buf(), kind: MetadataErrorKind::Io { context, source } }
    }

    fn corrupt(path: &Path, what: impl Into<String>) -> MetadataError {
        MetadataError { path: path.to_path_buf(), kind: MetadataErrorKind::Corrupt(what.into()) }
    }

    pub fn is_corruption(&self) -> bool {
        matches!(self.kind, MetadataErrorKind::Corrupt(_))
    }
}

impl TimelineMetadata {
    pub fn encode(&self) -> [u8; METADATA_SIZE_BYTES] {
        assert!(
            self.ancestor_timeline.is_some() || self.ancestor_lsn == Lsn::INVALID,
            "ancestor LSN {} without an ancestor timeline",
            self.ancestor_lsn
        );
        let mut b = [0u8; METADATA_SIZE_BYTES];
        b[0..4].copy_from_slice(&METADATA_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&METADATA_FORMAT_VERSION.to_be_bytes());
        let mut flags = 0u16;
        if self.prev_record_lsn.is_some() {
            flags |= FLAG_PREV_RECORD;
        }
        if self.ancestor_timeline.is_some() {
            flags |= FLAG_ANCESTOR;
        }
        b[6..8].copy_from_slice(&flags.to_be_bytes());
        b[8..16].copy_from_slice(&self.disk_consistent_lsn.0.to_be_bytes());
        b[16..24].copy_from_slice(&self.prev_record_lsn.unwrap_or(Lsn::INVALID).0.to_be_bytes());
        if let Some(ancestor) = self.ancestor_timeline {
            b[24..40].copy_from_slice(ancestor.as_bytes());
        }
        b[40..48].copy_from_slice(&self.ancestor_lsn.0.to_be_bytes());
        b[48..56].copy_from_slice(&self.latest_gc_cutoff_lsn.0.to_be_bytes());
        b[56..64].copy_from_slice(&self.initdb_lsn.0.to_be_bytes());
        b[64..68].copy_from_slice(&self.pg_version.to_be_bytes());
        let crc = crc32c::crc32c(&b[..CRC_OFFSET]);
        b[CRC_OFFSET..].copy_from_slice(&crc.to_be_bytes());
        b
    }

    /// Decodes and validates `buf`, the contents of the file at `path` (used in errors only).
    /// Never panics on bad bytes.
    pub fn decode(buf: &[u8], path: &Path) -> Result<TimelineMetadata, MetadataError> {
        let corrupt = |what: String| MetadataError::corrupt(path, what);
        if buf.len() < 8 {
            return Err(corrupt(format!("{} bytes, too short for a header", buf.len())));
        }
        let u16_at = |i: usize| u16::from_be_bytes([buf[i], buf[i + 1]]);
        let u32_at = |i: usize| u32::from_be_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
        let magic = u32_at(0);
        if magic != METADATA_MAGIC {
            return Err(corrupt(format!("bad magic {magic:08X}, expected {METADATA_MAGIC:08X}")));
        }
        let version = u16_at(4);
        if version != METADATA_FORMAT_VERSION {
            return Err(MetadataError {
                path: path.to_path_buf(),
                kind: MetadataErrorKind::UnsupportedVersion { found: version },
            });
        }
        if buf.len() != METADATA_SIZE_BYTES {
            return Err(corrupt(format!("{} bytes, expected {METADATA_SIZE_BYTES}", buf.len())));
        }
        let stored_crc = u32_at(CRC_OFFSET);
        let crc = crc32c::crc32c(&buf[..CRC_OFFSET]);
        if stored_crc != crc {
            return Err(corrupt(format!("checksum mismatch: stored {stored_crc:08X}, computed {crc:08X}")));
        }
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&buf[i..i + 8]);
            u64::from_be_bytes(a)
        };
        let flags = u16_at(6);
        if flags & !(FLAG_PREV_RECORD | FLAG_ANCESTOR) != 0 {
            return Err(corrupt(format!("unknown flags {flags:#06x}")));
        }
        let prev = Lsn(u64_at(16));
        let ancestor_lsn = Lsn(u64_at(40));
        let ancestor_timeline = if flags & FLAG_ANCESTOR != 0 {
            TimelineId::from_slice(&buf[24..40])
        } else {
            if buf[24..40].iter().any(|b| *b != 0) || ancestor_lsn != Lsn::INVALID {
                return Err(corrupt("ancestor fields set without the ancestor flag".to_string()));
            }
            None
        };
        let md = TimelineMetadata {
            disk_consistent_lsn: Lsn(u64_at(8)),
            prev_record_lsn: (flags & FLAG_PREV_RECORD != 0).then_some(prev),
            ancestor_timeline,
            ancestor_lsn,
            latest_gc_cutoff_lsn: Lsn(u64_at(48)),
            initdb_lsn: Lsn(u64_at(56)),
            pg_version: u32_at(64),
        };
        if md.ancestor_timeline.is_some() && md.disk_consistent_lsn < md.ancestor_lsn {
            return Err(corrupt(format!(
                "disk_consistent_lsn {} is below the branch point {}",
                md.disk_consistent_lsn, md.ancestor_lsn
            )));
        }
        Ok(md)
    }
}

/// Path of the metadata file of the timeline in `timeline_dir`.
pub fn metadata_path(timeline_dir: &Path) -> PathBuf {
    timeline_dir.join(METADATA_FILE_NAME)
}

/// Reads and validates the metadata file in `timeline_dir`.
pub fn load_metadata(timeline_dir: &Path) -> Result<TimelineMetadata, MetadataError> {
    let path = metadata_path(timeline_dir);
    let buf = fs::read(&path).map_err(|e| MetadataError::io(&path, "reading", e))?;
    TimelineMetadata::decode(&buf, &path)
}

/// Replaces the metadata file in `timeline_dir` atomically and durably: write a temp file,
/// fsync it, rename it over the old file, fsync the directory. Returns only once the new
/// version would survive a crash.
pub fn save_metadata(timeline_dir: &Path, md: &TimelineMetadata) -> Result<(), MetadataError> {
    let path = metadata_path(timeline_dir);
    let temp = timeline_dir.join(METADATA_TEMP_FILE_NAME);
    utils::durable::replace_file(&path, &temp, &md.encode()).map_err(|e| MetadataError::io(&e.path, e.step, e.source))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TimelineMetadata {
        TimelineMetadata {
            disk_consistent_lsn: Lsn(0x1_6B37_48A0),
            prev_record_lsn: Some(Lsn(0x1_6B37_4870)),
            ancestor_timeline: Some(TimelineId([0xAB; 16])),
            ancestor_lsn: Lsn(0x1_0000_0028),
            latest_gc_cutoff_lsn: Lsn(0x1_0000_0000),
            initdb_lsn: Lsn(0x0169_AD58),
            pg_version: 15,
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        for md in [
            sample(),
            TimelineMetadata { prev_record_lsn: None, ancestor_timeline: None, ancestor_lsn: Lsn::INVALID, ..sample() },
        ] {
            save_metadata(dir.path(), &md).expect("save");
            assert_eq!(load_metadata(dir.path()).expect("load"), md);
            assert!(!dir.path().join(METADATA_TEMP_FILE_NAME).exists(), "the temp file is renamed away");
        }
        assert_eq!(sample().encode().len(), METADATA_SIZE_BYTES);
    }

    #[test]
    fn corruption_is_detected_and_names_the_file() {
        let path = Path::new("/x/tenants/t/timelines/tl/metadata");
        let good = sample().encode();
        // Every single-bit flip is caught (magic, version, crc or a field covered by the crc).
        for byte in 0..good.len() {
            for bit in 0..8 {
                let mut bad = good;
                bad[byte] ^= 1 << bit;
                let err = TimelineMetadata::decode(&bad, path).expect_err("flipped bit must be detected");
                assert!(err.to_string().contains("/x/tenants/t/timelines/tl/metadata"), "{err}");
            }
        }
        for cut in 0..good.len() {
            assert!(TimelineMetadata::decode(&good[..cut], path).is_err(), "truncated to {cut}");
        }
        let mut longer = good.to_vec();
        longer.push(0);
        assert!(TimelineMetadata::decode(&longer, path).unwrap_err().is_corruption());
        let mut v2 = good;
        v2[5] = 2;
        let err = TimelineMetadata::decode(&v2, path).unwrap_err();
        assert!(matches!(err.kind, MetadataErrorKind::UnsupportedVersion { found: 2 }), "{err}");
        let err = TimelineMetadata::decode(b"garbage!", path).unwrap_err();
        assert!(err.to_string().contains("bad magic"), "{err}");
        // A missing file is an I/O error naming it.
        let dir = tempfile::tempdir().expect("tempdir");
        let err = load_metadata(dir.path()).unwrap_err();
        assert!(err.to_string().contains(&dir.path().display().to_string()), "{err}");
        assert!(!err.is_corruption());
    }

    #[test]
    fn invariants_checked_on_decode() {
        let path = Path::new("metadata");
        // A branch whose disk_consistent_lsn is below its branch point cannot exist.
        let md = TimelineMetadata { disk_consistent_lsn: Lsn(5), ancestor_lsn: Lsn(10), ..sample() };
        assert!(TimelineMetadata::decode(&md.encode(), path).unwrap_err().is_corruption());
    }
}
