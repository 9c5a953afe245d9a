//! The control file: a timeline's [`TimelinePersistentState`] on disk (DESIGN D7).
//!
//! The acceptor answers a vote only after the vote is durable here, so this file must never be
//! half-written and never silently wrong: it is replaced atomically (write
//! `safekeeper.control.partial`, fsync, rename over `safekeeper.control`, fsync the directory)
//! and carries a crc32c over everything before the checksum. A reader sees the old state or the
//! new one; a leftover `.partial` from a crash in the middle of `save` is simply ignored.
//!
//! Layout, little-endian, format version 1:
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `SKCF` |
//! | 4 | format version |
//! | 16 + 16 | tenant id, timeline id |
//! | 4 + 8 + 4 | server: pg_version, system_id, wal_seg_size |
//! | 8 | term |
//! | 16 | proposer id |
//! | 6 × 8 | timeline_start, local_start, commit, backup, peer_horizon, remote_consistent LSNs |
//! | 4 + 16 × n | term history: entry count n, then (term, lsn) pairs |
//! | 4 | crc32c of all the bytes above |

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use safekeeper_api::term::MAX_TERM_HISTORY_ENTRIES;
use safekeeper_api::{TermHistory, TermLsn};
use utils::{Lsn, TenantId, TimelineId};

use crate::state::{ServerInfo, TimelinePersistentState};

pub const CONTROL_FILE_NAME: &str = "safekeeper.control";
/// Where `save` writes before renaming; never read.
pub const CONTROL_FILE_PARTIAL_NAME: &str = "safekeeper.control.partial";

/// `SKCF` read as a little-endian u32.
pub const CONTROL_FILE_MAGIC: u32 = u32::from_le_bytes(*b"SKCF");
pub const CONTROL_FILE_FORMAT_VERSION: u32 = 1;

/// Bytes before the term history entries (magic through the entry count).
const FIXED_PART_BYTES: usize = 4 + 4 + 16 + 16 + 4 + 8 + 4 + 8 + 16 + 6 * 8 + 4;
const HISTORY_ENTRY_BYTES: usize = 16;
const CHECKSUM_BYTES: usize = 4;
/// Offset of the term history entry count, for explaining a length mismatch.
const HISTORY_COUNT_OFFSET: usize = FIXED_PART_BYTES - 4;

/// What to do about a control file that cannot be read, appended to every decoding error.
const FIX_HINT: &str = "restore it from a backup, or delete this timeline's directory on this safekeeper and let it \
                        recover from its peers";

/// The control file's bytes for `state`. Fails only for a state `decode` would refuse (an invalid
/// term history), so a written file is always loadable.
pub fn encode(state: &TimelinePersistentState) -> Result<Vec<u8>, String> {
    state.term_history.validate().map_err(|e| format!("refusing to write an invalid term history: {e}"))?;
    let entries = &state.term_history.0;
    let mut out = Vec::with_capacity(FIXED_PART_BYTES + entries.len() * HISTORY_ENTRY_BYTES + CHECKSUM_BYTES);
    out.extend_from_slice(&CONTROL_FILE_MAGIC.to_le_bytes());
    out.extend_from_slice(&CONTROL_FILE_FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&state.tenant_id.0);
    out.extend_from_slice(&state.timeline_id.0);
    out.extend_from_slice(&state.server.pg_version.to_le_bytes());
    out.extend_from_slice(&state.server.system_id.to_le_bytes());
    out.extend_from_slice(&state.server.wal_seg_size.to_le_bytes());
    out.extend_from_slice(&state.term.to_le_bytes());
    out.extend_from_slice(&state.proposer_id);
    for lsn in [
        state.timeline_start_lsn,
        state.local_start_lsn,
        state.commit_lsn,
        state.backup_lsn,
        state.peer_horizon_lsn,
        state.remote_consistent_lsn,
    ] {
        out.extend_from_slice(&lsn.0.to_le_bytes());
    }
    // validate() bounds the length by MAX_TERM_HISTORY_ENTRIES, far below u32::MAX.
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.term.to_le_bytes());
        out.extend_from_slice(&e.lsn.0.to_le_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Reads fields in order; every read is bounds-checked so bad bytes give an error, not a panic.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take<const N: usize>(&mut self, field: &str) -> Result<[u8; N], String> {
        let end = self.pos + N;
        let bytes = self.buf.get(self.pos..end).ok_or_else(|| {
            format!("truncated: the file ends inside {field} (needs bytes {}..{end}, has {})", self.pos, self.buf.len())
        })?;
        self.pos = end;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self, field: &str) -> Result<u32, String> {
        self.take::<4>(field).map(u32::from_le_bytes)
    }

    fn u64(&mut self, field: &str) -> Result<u64, String> {
        self.take::<8>(field).map(u64::from_le_bytes)
    }

    fn lsn(&mut self, field: &str) -> Result<Lsn, String> {
        self.u64(field).map(Lsn)
    }
}

/// Decodes a control file's bytes; the error says what is wrong (without the path).
pub fn decode(buf: &[u8]) -> Result<TimelinePersistentState, String> {
    let mut c = Cursor { buf, pos: 0 };
    let magic = c.u32("the magic number")?;
    if magic != CONTROL_FILE_MAGIC {
        return Err(format!(
            "wrong magic number {magic:#010x} (expected {CONTROL_FILE_MAGIC:#010x}): not a safekeeper control file"
        ));
    }
    let version = c.u32("the format version")?;
    if version != CONTROL_FILE_FORMAT_VERSION {
        return Err(format!(
            "unknown format version {version} (this safekeeper reads version {CONTROL_FILE_FORMAT_VERSION}); \
             a newer safekeeper may have written it: run that version"
        ));
    }
    // The checksum comes first among the remaining checks: a flipped bit anywhere must be
    // reported as corruption, not misread as, say, a huge term history.
    if buf.len() < FIXED_PART_BYTES + CHECKSUM_BYTES {
        return Err(format!(
            "truncated: {} bytes, a control file has at least {}",
            buf.len(),
            FIXED_PART_BYTES + CHECKSUM_BYTES
        ));
    }
    let (body, stored) = buf.split_at(buf.len() - CHECKSUM_BYTES);
    let stored = u32::from_le_bytes([stored[0], stored[1], stored[2], stored[3]]);
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Err(checksum_mismatch(buf, stored, computed));
    }

    let tenant_id = TenantId(c.take::<16>("the tenant id")?);
    let timeline_id = TimelineId(c.take::<16>("the timeline id")?);
    let server = ServerInfo {
        pg_version: c.u32("the Postgres version")?,
        system_id: c.u64("the system id")?,
        wal_seg_size: c.u32("the WAL segment size")?,
    };
    let term = c.u64("the term")?;
    let proposer_id = c.take::<16>("the proposer id")?;
    let timeline_start_lsn = c.lsn("timeline_start_lsn")?;
    let local_start_lsn = c.lsn("local_start_lsn")?;
    let commit_lsn = c.lsn("commit_lsn")?;
    let backup_lsn = c.lsn("backup_lsn")?;
    let peer_horizon_lsn = c.lsn("peer_horizon_lsn")?;
    let remote_consistent_lsn = c.lsn("remote_consistent_lsn")?;
    let count = c.u32("the term history length")? as usize;
    if count > MAX_TERM_HISTORY_ENTRIES {
        return Err(format!("term history has {count} entries, more than the limit {MAX_TERM_HISTORY_ENTRIES}"));
    }
    let mut entries = Vec::with_capacity(count);
    for i in 0..count {
        let field = format!("term history entry {i} of {count}");
        entries.push(TermLsn { term: c.u64(&field)?, lsn: c.lsn(&field)? });
    }
    let term_history = TermHistory(entries);
    if c.pos != body.len() {
        return Err(format!("{} unexpected bytes between the last field and the checksum", body.len() - c.pos));
    }
    term_history.validate().map_err(|e| format!("invalid term history: {e}"))?;
    Ok(TimelinePersistentState {
        tenant_id,
        timeline_id,
        server,
        term,
        term_history,
        proposer_id,
        timeline_start_lsn,
        local_start_lsn,
        commit_lsn,
        backup_lsn,
        peer_horizon_lsn,
        remote_consistent_lsn,
    })
}

/// Explains a checksum mismatch, naming truncation or trailing bytes when the length recorded
/// in the file (the term history count) accounts for it.
fn checksum_mismatch(buf: &[u8], stored: u32, computed: u32) -> String {
    let count = u32::from_le_bytes([
        buf[HISTORY_COUNT_OFFSET],
        buf[HISTORY_COUNT_OFFSET + 1],
        buf[HISTORY_COUNT_OFFSET + 2],
        buf[HISTORY_COUNT_OFFSET + 3],
    ]) as usize;
    let expected_len = FIXED_PART_BYTES + count.saturating_mul(HISTORY_ENTRY_BYTES) + CHECKSUM_BYTES;
    let why = if count > MAX_TERM_HISTORY_ENTRIES || expected_len == buf.len() {
        "the file is corrupt".to_string()
    } else if expected_len > buf.len() {
        format!("the file is truncated: {} bytes, its {count} term history entries need {expected_len}", buf.len())
    } else {
        format!("the file has {} trailing bytes beyond the {expected_len} its contents need", buf.len() - expected_len)
    };
    format!("checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): {why}")
}

fn invalid_data(path: &Path, what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("control file {}: {what}; {FIX_HINT}", path.display()))
}

/// Wraps an I/O error with what we were doing and the path.
pub(crate) fn with_path(e: io::Error, doing: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{doing} {}: {e}", path.display()))
}

/// Fsyncs a directory, making renames and file creations and removals in it durable.
pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| with_path(e, "fsync directory", dir))
}

/// Loads `dir/safekeeper.control`. A missing file is `NotFound`; anything unreadable is
/// `InvalidData` with the path and what is wrong.
pub fn load(dir: &Path) -> io::Result<TimelinePersistentState> {
    let path = dir.join(CONTROL_FILE_NAME);
    let bytes = fs::read(&path).map_err(|e| with_path(e, "read control file", &path))?;
    decode(&bytes).map_err(|what| invalid_data(&path, what))
}

/// Atomically replaces `dir/safekeeper.control` with `state`. `sync == false` (the daemon's
/// `--no-sync`, for tests) skips the fsyncs, so the result may not survive a power loss.
pub fn save(dir: &Path, state: &TimelinePersistentState, sync: bool) -> io::Result<()> {
    let path = dir.join(CONTROL_FILE_NAME);
    let partial = dir.join(CONTROL_FILE_PARTIAL_NAME);
    let bytes = encode(state).map_err(|what| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("control file {}: {what}", path.display()))
    })?;
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&partial)
        .map_err(|e| with_path(e, "create", &partial))?;
    f.write_all(&bytes).map_err(|e| with_path(e, "write", &partial))?;
    if sync {
        f.sync_all().map_err(|e| with_path(e, "fsync", &partial))?;
    }
    drop(f);
    fs::rename(&partial, &path)
        .map_err(|e| io::Error::new(e.kind(), format!("rename {} to {}: {e}", partial.display(), path.display())))?;
    if sync {
        fsync_dir(dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TimelinePersistentState {
        let mut s = TimelinePersistentState::new(
            TenantId([3; 16]),
            TimelineId([4; 16]),
            ServerInfo { pg_version: 150018, system_id: 7_123_456_789, wal_seg_size: 16 << 20 },
            Lsn(0x0169_AD58),
        );
        s.term = 7;
        s.proposer_id = [9; 16];
        s.term_history = TermHistory(vec![
            TermLsn { term: 2, lsn: Lsn(0x0169_AD58) },
            TermLsn { term: 5, lsn: Lsn(0x0170_0000) },
            TermLsn { term: 7, lsn: Lsn(0x0170_0000) },
        ]);
        s.commit_lsn = Lsn(0x0171_0000);
        s.backup_lsn = Lsn(0x0100_0000);
        s.peer_horizon_lsn = Lsn(0x0170_0010);
        s.remote_consistent_lsn = Lsn(0x0160_0000);
        s
    }

    fn load_err(dir: &Path) -> String {
        let e = load(dir).expect_err("load should fail");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        let msg = e.to_string();
        assert!(msg.contains(&dir.join(CONTROL_FILE_NAME).display().to_string()), "error names the file: {msg}");
        msg
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        for state in [sample(), TimelinePersistentState { term_history: TermHistory::empty(), ..sample() }] {
            save(dir.path(), &state, true).unwrap();
            assert_eq!(load(dir.path()).unwrap(), state);
        }
        assert_eq!(encode(&sample()).unwrap().len(), FIXED_PART_BYTES + 3 * HISTORY_ENTRY_BYTES + CHECKSUM_BYTES);
        assert!(!dir.path().join(CONTROL_FILE_PARTIAL_NAME).exists());
        assert_eq!(load(tempfile::tempdir().unwrap().path()).unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_rejected() {
        let bytes = encode(&sample()).unwrap();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(decode(&bad).is_err(), "flip at {i} accepted");
            assert!(decode(&bytes[..i]).is_err(), "truncation to {i} accepted");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONTROL_FILE_NAME);
        // A flipped bit in the middle: a checksum error saying the file is corrupt.
        let mut bad = bytes.clone();
        bad[70] ^= 1;
        fs::write(&path, &bad).unwrap();
        let msg = load_err(dir.path());
        assert!(msg.contains("checksum mismatch") && msg.contains("corrupt"), "{msg}");
        // Truncated and extended files say so.
        fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        assert!(load_err(dir.path()).contains("truncated"));
        fs::write(&path, &bytes[..10]).unwrap();
        assert!(load_err(dir.path()).contains("truncated"));
        let mut long = bytes.clone();
        long.extend_from_slice(&[0; 3]);
        fs::write(&path, &long).unwrap();
        assert!(load_err(dir.path()).contains("trailing"));
    }

    #[test]
    fn wrong_magic_version_and_invalid_contents_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONTROL_FILE_NAME);
        let bytes = encode(&sample()).unwrap();
        let reseal = |mut b: Vec<u8>| {
            let n = b.len() - CHECKSUM_BYTES;
            let crc = crc32c::crc32c(&b[..n]);
            b[n..].copy_from_slice(&crc.to_le_bytes());
            b
        };
        let mut bad = bytes.clone();
        bad[0] = b'X';
        fs::write(&path, &bad).unwrap();
        assert!(load_err(dir.path()).contains("wrong magic"));
        let mut bad = bytes.clone();
        bad[4..8].copy_from_slice(&2u32.to_le_bytes());
        fs::write(&path, reseal(bad)).unwrap();
        assert!(load_err(dir.path()).contains("unknown format version 2"));
        // Valid checksum but a history whose terms go backwards.
        let mut bad = bytes.clone();
        bad[FIXED_PART_BYTES..FIXED_PART_BYTES + 8].copy_from_slice(&9u64.to_le_bytes());
        fs::write(&path, reseal(bad)).unwrap();
        assert!(load_err(dir.path()).contains("invalid term history"));
        // Valid checksum, but the history count claims more entries than there are bytes.
        let mut bad = bytes.clone();
        bad[HISTORY_COUNT_OFFSET..HISTORY_COUNT_OFFSET + 4].copy_from_slice(&4u32.to_le_bytes());
        fs::write(&path, reseal(bad)).unwrap();
        assert!(load_err(dir.path()).contains("truncated: the file ends inside term history entry 3"));
        // Valid checksum with bytes the fields do not account for.
        let mut bad = bytes.clone();
        bad.splice(bytes.len() - CHECKSUM_BYTES..bytes.len() - CHECKSUM_BYTES, [0u8; 16]);
        bad[HISTORY_COUNT_OFFSET..HISTORY_COUNT_OFFSET + 4].copy_from_slice(&3u32.to_le_bytes());
        fs::write(&path, reseal(bad)).unwrap();
        assert!(load_err(dir.path()).contains("unexpected bytes"));
        // An invalid history is refused at save time, leaving the old file in place.
        let mut s = sample();
        s.term_history.0.swap(0, 1);
        fs::write(&path, &bytes).unwrap();
        assert_eq!(save(dir.path(), &s, false).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(load(dir.path()).unwrap(), sample());
    }

    #[test]
    fn leftover_partial_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &sample(), false).unwrap();
        // A crash after writing part of the next version leaves it under the .partial name.
        let mut next = sample();
        next.term = 8;
        let half = encode(&next).unwrap();
        fs::write(dir.path().join(CONTROL_FILE_PARTIAL_NAME), &half[..half.len() / 2]).unwrap();
        assert_eq!(load(dir.path()).unwrap(), sample());
        // The next save replaces it cleanly.
        save(dir.path(), &next, true).unwrap();
        assert_eq!(load(dir.path()).unwrap(), next);
        assert!(!dir.path().join(CONTROL_FILE_PARTIAL_NAME).exists());
    }
}
