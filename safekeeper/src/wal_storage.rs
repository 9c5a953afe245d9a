//! [`PhysicalStorage`]: the acceptor's WAL and control file on disk (DESIGN D7).
//!
//! WAL lives in the timeline directory as Postgres-style segment files of `wal_seg_size` bytes
//! (`000000010000000000000001`, timeline id always 1); the segment being written carries a
//! `.partial` suffix, like `pg_receivewal`'s. Every segment file is full-size and zero-filled
//! when created, so bytes past the WAL end read as zeros and a reader stops there.
//!
//! The reported flush LSN is always the end of a whole record: written bytes are fed to a
//! [`WalStreamDecoder`], and `flush_wal` advances `flush_lsn` only to the end of the last
//! complete record. A proposer counts our flush LSN towards the commit LSN and may start a new
//! term there, so it must never point into the middle of a record. The same decoder refuses a
//! stream that is not valid WAL before any of it reaches the disk.
//!
//! On open the WAL end is found by decoding the tail from a known record boundary; whatever
//! follows the last complete record (a torn write from a crash) is zeroed or removed, so it is
//! never served and never mistaken for WAL later. All I/O is blocking `std::fs`: the daemon
//! calls this from blocking tasks.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use postgres_ffi::wal_decoder::{WalDecoderConfig, WalStreamDecoder};
use postgres_ffi::xlog_file::{parse_xlog_file_name, xlog_file_name, PARTIAL_SUFFIX};
use postgres_ffi::xlog_page::{XLogPageHeader, SIZE_OF_XLOG_LONG_PHD};
use postgres_ffi::{TimeLineId, WAL_SEGMENT_SIZE_MAX, WAL_SEGMENT_SIZE_MIN, XLOG_BLCKSZ};
use utils::Lsn;

use crate::acceptor::AcceptorStorage;
use crate::control_file::{self, fsync_dir, with_path};
use crate::state::TimelinePersistentState;

/// Safekeepers store one WAL history per timeline directory; file names always say timeline 1.
pub const WAL_FILE_TIMELINE_ID: TimeLineId = 1;
/// Largest range one `read_wal` call returns, so a reader cannot make us allocate without bound.
pub const READ_WAL_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// Buffer size for scanning, zeroing and zero-filling segment files.
const IO_CHUNK_BYTES: u64 = 1024 * 1024;
const PAGE_BYTES: u64 = XLOG_BLCKSZ as u64;

/// Which names a segment number exists under in the directory.
#[derive(Clone, Copy, Debug, Default)]
struct SegmentFiles {
    complete: bool,
    partial: bool,
}

/// The segment file being written.
struct OpenSegment {
    segno: u64,
    path: PathBuf,
    file: File,
    /// Bytes were written since the last fdatasync.
    unsynced: bool,
}

/// What `cut_after` did, for the log.
#[derive(Debug, Default)]
struct CutReport {
    zeroed_bytes: u64,
    removed_files: Vec<String>,
}

pub struct PhysicalStorage {
    dir: PathBuf,
    seg_size_bytes: u64,
    /// `false` is the daemon's `--no-sync` (tests only): no fsync or fdatasync at all.
    sync: bool,
    local_start_lsn: Lsn,
    /// Lowest LSN still on disk: `local_start_lsn`, raised by `remove_wal_below`.
    oldest_lsn: Lsn,
    /// End of the bytes written.
    write_lsn: Lsn,
    /// End of the last complete record within the bytes written.
    write_record_lsn: Lsn,
    /// End of a record the decoder has returned whose end lies past `write_lsn`: its MAXALIGN
    /// padding, or the rest of the segment after an `XLOG_SWITCH`, has not arrived yet.
    pending_record_end_lsn: Option<Lsn>,
    /// End of the durable WAL; a record boundary.
    flush_lsn: Lsn,
    /// Positioned at `write_lsn`, holding the partial record after `write_record_lsn`. `None`
    /// after a failed write: rebuilt from disk before the next write.
    decoder: Option<WalStreamDecoder>,
    open_segment: Option<OpenSegment>,
}

fn invalid_input(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn invalid_data(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl PhysicalStorage {
    /// Opens the WAL in `dir` (the timeline directory, which must exist) for `state`, finding
    /// the WAL end by decoding and cutting any torn tail after it.
    pub fn open(dir: &Path, state: &TimelinePersistentState, sync: bool) -> io::Result<PhysicalStorage> {
        let seg_size = state.server.wal_seg_size as usize;
        if !seg_size.is_power_of_two() || !(WAL_SEGMENT_SIZE_MIN..=WAL_SEGMENT_SIZE_MAX).contains(&seg_size) {
            return Err(invalid_input(format!(
                "timeline in {}: WAL segment size {seg_size} is not a power of two between 1 MiB and 1 GiB; \
                 the control file's server info is wrong",
                dir.display()
            )));
        }
        let meta = fs::metadata(dir).map_err(|e| with_path(e, "open timeline directory", dir))?;
        if !meta.is_dir() {
            return Err(invalid_input(format!("timeline directory {} is not a directory", dir.display())));
        }
        let start = state.local_start_lsn;
        let mut st = PhysicalStorage {
            dir: dir.to_path_buf(),
            seg_size_bytes: seg_size as u64,
            sync,
            local_start_lsn: start,
            oldest_lsn: start,
            write_lsn: start,
            write_record_lsn: start,
            pending_record_end_lsn: None,
            flush_lsn: start,
            decoder: None,
            open_segment: None,
        };
        st.new_decoder(start)?; // local_start_lsn must be a record boundary
        let end = st.recover_wal_end()?;
        st.write_lsn = end;
        st.write_record_lsn = end;
        st.flush_lsn = end;
        st.decoder = Some(st.new_decoder(end)?);
        if end < state.commit_lsn {
            tracing::warn!(
                "WAL in {} ends at {end}, below the commit LSN {} in the control file: durable WAL was lost \
                 (the disk did not honour fsync, or files were removed); peers hold the missing WAL",
                dir.display(),
                state.commit_lsn
            );
        }
        Ok(st)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn seg_size_bytes(&self) -> u64 {
        self.seg_size_bytes
    }

    /// Lowest LSN `read_wal` can serve.
    pub fn oldest_lsn(&self) -> Lsn {
        self.oldest_lsn.max(self.local_start_lsn)
    }

    /// End of the last complete record written (flushed or not).
    pub fn write_record_lsn(&self) -> Lsn {
        self.write_record_lsn
    }

    /// The durable WAL in `[from, to)`, for walsenders and peers. Refuses ranges that are not
    /// (or no longer) durable here, and ranges over [`READ_WAL_MAX_BYTES`].
    pub fn read_wal(&self, from: Lsn, to: Lsn) -> io::Result<Bytes> {
        let oldest = self.oldest_lsn();
        if from > to || from < oldest || to > self.flush_lsn {
            return Err(invalid_input(format!(
                "cannot read WAL {from}..{to} from {}: it holds durable WAL {oldest}..{}",
                self.dir.display(),
                self.flush_lsn
            )));
        }
        if to.0 - from.0 > READ_WAL_MAX_BYTES {
            return Err(invalid_input(format!(
                "cannot read WAL {from}..{to} from {}: {} bytes is more than {READ_WAL_MAX_BYTES} per read; read in pieces",
                self.dir.display(),
                to.0 - from.0
            )));
        }
        self.read_raw(from, to).map(Bytes::from)
    }

    /// Deletes the segment files lying entirely below `lsn`; never the one holding `lsn`, nor
    /// the one holding the last WAL byte, whose file is how `open` finds the WAL end. Returns
    /// how many files were removed. For WAL removal once the WAL is offloaded and the
    /// pageserver has it: the caller decides that `lsn` is safe.
    pub fn remove_wal_below(&mut self, lsn: Lsn) -> io::Result<usize> {
        let keep_from = lsn.min(Lsn(self.write_lsn.0.saturating_sub(1)));
        let keep_segno = self.segno(keep_from);
        let segs = self.list_segments()?;
        let mut removed = 0;
        // Lowest first, so a crash part-way leaves a contiguous run of segments.
        for (&segno, files) in segs.range(..keep_segno) {
            self.remove_segment(segno, *files)?;
            removed += 1;
        }
        if removed > 0 {
            if self.sync {
                fsync_dir(&self.dir)?;
            }
            self.oldest_lsn = self.oldest_lsn.max(self.seg_start(keep_segno));
            tracing::info!(
                "removed {removed} WAL segments below {} from {}",
                self.seg_start(keep_segno),
                self.dir.display()
            );
        }
        Ok(removed)
    }

    /// The file of segment `segno` once it is complete (final name, all its bytes written), for
    /// offloading. `None` if it is not complete here, or lies (partly) below the WAL this
    /// safekeeper holds: bytes of a segment before our first WAL are zeros, not the timeline's
    /// WAL, so only a safekeeper holding the whole segment (from the timeline start, for the
    /// timeline's first segment) may upload it. Completed segments never change again (the
    /// commit LSN, below which nothing is truncated, lies beyond them before we upload), so the
    /// caller reads the file without holding the timeline lock.
    pub fn complete_segment_path(&self, segno: u64, timeline_start_lsn: Lsn) -> Option<PathBuf> {
        let first_needed = self.seg_start(segno).max(timeline_start_lsn);
        if self.oldest_lsn() > first_needed || self.seg_start(segno + 1) > self.flush_lsn {
            return None;
        }
        let path = self.segment_path(segno, false);
        path.exists().then_some(path)
    }

    fn segno(&self, lsn: Lsn) -> u64 {
        lsn.segment_number(self.seg_size_bytes)
    }

    fn seg_start(&self, segno: u64) -> Lsn {
        Lsn(segno * self.seg_size_bytes)
    }

    fn segment_name(&self, segno: u64) -> String {
        xlog_file_name(WAL_FILE_TIMELINE_ID, segno, self.seg_size_bytes as usize)
    }

    fn segment_path(&self, segno: u64, partial: bool) -> PathBuf {
        let name = self.segment_name(segno);
        self.dir.join(if partial { format!("{name}{PARTIAL_SUFFIX}") } else { name })
    }

    fn decoder_config(&self) -> WalDecoderConfig {
        WalDecoderConfig { segment_size_bytes: self.seg_size_bytes as usize, system_id: None, prev_record_lsn: None }
    }

    fn new_decoder(&self, start: Lsn) -> io::Result<WalStreamDecoder> {
        WalStreamDecoder::with_config(start, self.decoder_config())
            .map_err(|e| invalid_input(format!("cannot decode the WAL in {} from {start}: {e}", self.dir.display())))
    }

    /// The segment files in the directory by segment number. Files of other timelines are
    /// ignored; a segment present under both names is an error, since we cannot tell which
    /// one is right.
    fn list_segments(&self) -> io::Result<BTreeMap<u64, SegmentFiles>> {
        let mut segs: BTreeMap<u64, SegmentFiles> = BTreeMap::new();
        let entries = fs::read_dir(&self.dir).map_err(|e| with_path(e, "list", &self.dir))?;
        for entry in entries {
            let entry = entry.map_err(|e| with_path(e, "list", &self.dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some((segno, tli)) = parse_xlog_file_name(name, self.seg_size_bytes as usize) else { continue };
            if tli != WAL_FILE_TIMELINE_ID {
                tracing::warn!("ignoring {name} in {}: safekeepers name WAL with timeline 1", self.dir.display());
                continue;
            }
            let files = segs.entry(segno).or_default();
            if name.ends_with(PARTIAL_SUFFIX) {
                files.partial = true;
            } else {
                files.complete = true;
            }
            if files.partial && files.complete {
                let base = self.segment_name(segno);
                return Err(invalid_data(format!(
                    "both {base} and {base}{PARTIAL_SUFFIX} exist in {}: keep the one holding more WAL \
                     (compare them with pg_waldump) and delete the other",
                    self.dir.display()
                )));
            }
        }
        Ok(segs)
    }

    /// The existing file of a segment: complete name, then `.partial`, then the complete name
    /// again (in case the segment was completed in between). `None` if it does not exist.
    fn open_segment_for_read(&self, segno: u64) -> io::Result<Option<(PathBuf, File)>> {
        for partial in [false, true, false] {
            let path = self.segment_path(segno, partial);
            match File::open(&path) {
                Ok(f) => return Ok(Some((path, f))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(with_path(e, "open", &path)),
            }
        }
        Ok(None)
    }

    /// Reads WAL bytes `[from, to)` from the segment files, without range checks.
    fn read_raw(&self, from: Lsn, to: Lsn) -> io::Result<Vec<u8>> {
        let mut out = vec![0u8; (to.0 - from.0) as usize];
        let mut pos = from;
        let mut filled = 0usize;
        while pos < to {
            let segno = self.segno(pos);
            let off = pos.segment_offset(self.seg_size_bytes);
            let n = (to.0 - pos.0).min(self.seg_size_bytes - off) as usize;
            let Some((path, file)) = self.open_segment_for_read(segno)? else {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "WAL segment {} holding {pos} is missing from {}",
                        self.segment_name(segno),
                        self.dir.display()
                    ),
                ));
            };
            file.read_exact_at(&mut out[filled..filled + n], off)
                .map_err(|e| with_path(e, &format!("read WAL at {pos} ({n} bytes) from"), &path))?;
            filled += n;
            pos += n as u64;
        }
        Ok(out)
    }

    /// Finds the WAL end on disk and cuts everything after it. Decoding starts at a known record
    /// boundary near the end: `local_start_lsn` if it lies in the last or the previous segment,
    /// otherwise the first record boundary of the previous segment (past the continuation of a
    /// record from before it), going back further only if no boundary can be found there.
    fn recover_wal_end(&mut self) -> io::Result<Lsn> {
        let local_segno = self.segno(self.local_start_lsn);
        let mut segs = self.list_segments()?;
        segs.retain(|&segno, _| segno >= local_segno); // below our WAL: none of our business
        let (Some(&first), Some(&last)) = (segs.keys().next(), segs.keys().next_back()) else {
            tracing::info!("no WAL in {}: it starts at {}", self.dir.display(), self.local_start_lsn);
            return Ok(self.local_start_lsn);
        };
        self.oldest_lsn = self.local_start_lsn.max(self.seg_start(first));

        let mut segno = last.saturating_sub(1).max(first);
        let start = loop {
            if segno == local_segno {
                break self.local_start_lsn;
            }
            if let Some(boundary) = self.first_record_boundary(segno)? {
                break boundary;
            }
            if segno == first {
                return Err(invalid_data(format!(
                    "cannot find the WAL end in {}: no record boundary from segment {} ({}) on; the WAL is \
                     corrupt: delete this timeline's directory on this safekeeper and let it recover from its peers",
                    self.dir.display(),
                    self.segment_name(first),
                    self.seg_start(first)
                )));
            }
            segno -= 1;
        };
        if let Some(hole) = (first..self.segno(start)).find(|s| !segs.contains_key(s)) {
            return Err(invalid_data(format!(
                "WAL segment {} is missing from {} between {} and {}: the WAL has a hole; delete this \
                 timeline's directory on this safekeeper and let it recover from its peers",
                self.segment_name(hole),
                self.dir.display(),
                self.segment_name(first),
                self.segment_name(last)
            )));
        }
        let (end, stopped) = self.scan(start, last)?;
        let cut = self.cut_after(end, &segs)?;
        let removed = if cut.removed_files.is_empty() {
            String::new()
        } else {
            format!(" and removed {} later segment file(s) ({})", cut.removed_files.len(), cut.removed_files.join(", "))
        };
        tracing::info!(
            "WAL in {} ends at {end} (decoded from {start}; stopped: {stopped}); cut {} torn byte(s) after it{removed}",
            self.dir.display(),
            cut.zeroed_bytes
        );
        Ok(end)
    }

    /// The first record boundary in segment `segno`: its start, or the end of the record
    /// continued from the previous segment, found by following `xlp_rem_len` across pages (and
    /// into later segments if the record is that long). `None` if the file is missing or the
    /// page headers do not describe a complete continuation (a torn record).
    fn first_record_boundary(&self, segno: u64) -> io::Result<Option<Lsn>> {
        let seg_start = self.seg_start(segno);
        let mut pos = seg_start;
        let mut remaining: Option<u32> = None;
        let mut file: Option<(u64, PathBuf, File)> = None;
        loop {
            // `pos` is a page boundary here.
            let cur = self.segno(pos);
            if file.as_ref().map(|f| f.0) != Some(cur) {
                file = self.open_segment_for_read(cur)?.map(|(path, f)| (cur, path, f));
            }
            let Some((_, path, f)) = &file else { return Ok(None) };
            let mut buf = [0u8; SIZE_OF_XLOG_LONG_PHD];
            let off = pos.segment_offset(self.seg_size_bytes);
            let n = read_up_to(f, &mut buf, off).map_err(|e| with_path(e, "read page header from", path))?;
            let Ok(hdr) = XLogPageHeader::decode(&buf[..n]) else { return Ok(None) };
            if hdr.validate(pos, self.seg_size_bytes as usize, None).is_err() {
                return Ok(None);
            }
            let rem = match remaining {
                None if !hdr.is_contrecord() => return Ok(Some(seg_start)),
                None => hdr.xlp_rem_len,
                Some(r) if hdr.is_contrecord() && hdr.xlp_rem_len == r => r,
                Some(_) => return Ok(None),
            };
            pos += hdr.size() as u64;
            let page_left = PAGE_BYTES - pos.page_offset();
            if rem as u64 <= page_left {
                return Ok(Some((pos + rem as u64).align()));
            }
            remaining = Some(rem - page_left as u32);
            pos += page_left;
        }
    }

    /// Decodes from `start` (a record boundary) through segment `last` until the first invalid
    /// or incomplete record. Returns the end of the last complete record (`start` if none) and
    /// why decoding stopped.
    fn scan(&self, start: Lsn, last: u64) -> io::Result<(Lsn, String)> {
        let mut decoder = self.new_decoder(start)?;
        let mut end = start;
        let mut buf = vec![0u8; IO_CHUNK_BYTES.min(self.seg_size_bytes) as usize];
        for segno in self.segno(start)..=last {
            let Some((path, file)) = self.open_segment_for_read(segno)? else {
                return Ok((end, format!("segment {} is missing", self.segment_name(segno))));
            };
            let len = file.metadata().map_err(|e| with_path(e, "stat", &path))?.len();
            let file_end = len.min(self.seg_size_bytes);
            let mut off = if segno == self.segno(start) { start.segment_offset(self.seg_size_bytes) } else { 0 };
            while off < file_end {
                let n = (file_end - off).min(buf.len() as u64) as usize;
                file.read_exact_at(&mut buf[..n], off).map_err(|e| with_path(e, "read", &path))?;
                off += n as u64;
                decoder.feed(&buf[..n]);
                loop {
                    match decoder.poll_record() {
                        Ok(Some(r)) => end = r.end_lsn,
                        Ok(None) => break,
                        Err(e) => return Ok((end, e.to_string())),
                    }
                }
            }
            if len < self.seg_size_bytes {
                return Ok((end, format!("{} is only {len} bytes long", path.display())));
            }
        }
        Ok((end, "the last segment ends inside a record".to_string()))
    }

    fn remove_segment(&self, segno: u64, files: SegmentFiles) -> io::Result<()> {
        for (present, partial) in [(files.complete, false), (files.partial, true)] {
            if present {
                let path = self.segment_path(segno, partial);
                fs::remove_file(&path).map_err(|e| with_path(e, "remove", &path))?;
            }
        }
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
            .map_err(|e| io::Error::new(e.kind(), format!("rename {} to {}: {e}", from.display(), to.display())))
    }

    /// Makes `end` the WAL end on disk: removes the segments after the one holding `end` (that
    /// one too if `end` is its start), zeroes the rest of the segment holding `end`, and fixes
    /// names: `.partial` for the segment holding `end`, final names below it. Later segments go
    /// first, so after a crash in the middle no valid-looking WAL survives behind a zeroed gap.
    fn cut_after(&mut self, end: Lsn, segs: &BTreeMap<u64, SegmentFiles>) -> io::Result<CutReport> {
        self.open_segment = None;
        let mut report = CutReport::default();
        let end_segno = self.segno(end);
        let end_off = end.segment_offset(self.seg_size_bytes);
        let first_removed = if end_off == 0 { end_segno } else { end_segno + 1 };
        for (&segno, files) in segs.range(first_removed..).rev() {
            self.remove_segment(segno, *files)?;
            report.removed_files.push(self.segment_name(segno));
        }
        report.removed_files.reverse();
        let mut dir_changed = !report.removed_files.is_empty();
        if dir_changed && self.sync {
            fsync_dir(&self.dir)?;
        }
        if let (true, Some(files)) = (end_off != 0, segs.get(&end_segno)) {
            let path = self.segment_path(end_segno, files.partial);
            report.zeroed_bytes = self.zero_tail(&path, end_off)?;
            if files.complete {
                self.rename(&path, &self.segment_path(end_segno, true))?;
                dir_changed = true;
            }
        }
        for (&segno, files) in segs.range(..end_segno) {
            if files.partial {
                self.rename(&self.segment_path(segno, true), &self.segment_path(segno, false))?;
                dir_changed = true;
            }
        }
        if dir_changed && self.sync {
            fsync_dir(&self.dir)?;
        }
        Ok(report)
    }

    /// Zeroes whatever is not zero in `path` from `from_off` to the segment end and restores the
    /// full segment size. Returns how many bytes after `from_off` held data (up to the last
    /// non-zero byte).
    fn zero_tail(&self, path: &Path, from_off: u64) -> io::Result<u64> {
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(|e| with_path(e, "open", path))?;
        let len = file.metadata().map_err(|e| with_path(e, "stat", path))?.len();
        let mut buf = vec![0u8; IO_CHUNK_BYTES.min(self.seg_size_bytes) as usize];
        let mut off = from_off;
        let mut data_end = from_off;
        let mut changed = false;
        let file_end = len.min(self.seg_size_bytes);
        while off < file_end {
            let n = (file_end - off).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], off).map_err(|e| with_path(e, "read", path))?;
            if let Some(last) = buf[..n].iter().rposition(|&b| b != 0) {
                data_end = off + last as u64 + 1;
                buf[..n].fill(0);
                file.write_all_at(&buf[..n], off).map_err(|e| with_path(e, "zero the WAL tail in", path))?;
                changed = true;
            }
            off += n as u64;
        }
        if len != self.seg_size_bytes {
            file.set_len(self.seg_size_bytes).map_err(|e| with_path(e, "resize", path))?;
            changed = true;
        }
        if changed && self.sync {
            file.sync_data().map_err(|e| with_path(e, "fdatasync", path))?;
        }
        Ok(data_end - from_off)
    }

    /// The file of segment `segno` for writing, creating it (zero-filled) if needed.
    fn segment_for_write(&mut self, segno: u64) -> io::Result<&mut OpenSegment> {
        if self.open_segment.as_ref().is_some_and(|s| s.segno != segno) {
            self.close_segment()?;
        }
        let seg = match self.open_segment.take() {
            Some(s) => s,
            None => {
                let path = self.segment_path(segno, true);
                let file = match OpenOptions::new().read(true).write(true).open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => self.create_segment(segno, &path)?,
                    Err(e) => return Err(with_path(e, "open", &path)),
                };
                OpenSegment { segno, path, file, unsynced: false }
            }
        };
        Ok(self.open_segment.insert(seg))
    }

    /// Creates `path` full-size and zero-filled (allocated, like pg_receivewal's `.partial`,
    /// so a full disk shows up here rather than in the middle of WAL).
    fn create_segment(&self, segno: u64, path: &Path) -> io::Result<File> {
        let complete = self.segment_path(segno, false);
        if complete.exists() {
            return Err(invalid_data(format!(
                "cannot write WAL at {} in {}: its segment {} is already complete; the directory was changed \
                 behind this safekeeper's back",
                self.write_lsn,
                self.dir.display(),
                complete.display()
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| with_path(e, "create", path))?;
        let zeros = vec![0u8; IO_CHUNK_BYTES.min(self.seg_size_bytes) as usize];
        let mut off = 0;
        while off < self.seg_size_bytes {
            file.write_all_at(&zeros, off).map_err(|e| with_path(e, "zero-fill", path))?;
            off += zeros.len() as u64;
        }
        if self.sync {
            file.sync_all().map_err(|e| with_path(e, "fsync", path))?;
            fsync_dir(&self.dir)?;
        }
        Ok(file)
    }

    /// Closes the open segment, fdatasyncing it first if it has unsynced writes.
    fn close_segment(&mut self) -> io::Result<()> {
        if let Some(s) = &mut self.open_segment {
            if s.unsynced && self.sync {
                s.file.sync_data().map_err(|e| with_path(e, "fdatasync", &s.path))?;
            }
            s.unsynced = false;
        }
        self.open_segment = None;
        Ok(())
    }

    /// The open segment is full: make it durable and give it its final name.
    fn complete_segment(&mut self) -> io::Result<()> {
        let Some(s) = &self.open_segment else { return Ok(()) };
        let (segno, partial_path) = (s.segno, s.path.clone());
        self.close_segment()?;
        self.rename(&partial_path, &self.segment_path(segno, false))?;
        if self.sync {
            fsync_dir(&self.dir)?;
        }
        Ok(())
    }

    fn write_segments(&mut self, mut lsn: Lsn, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let segno = self.segno(lsn);
            let off = lsn.segment_offset(self.seg_size_bytes);
            let n = (data.len() as u64).min(self.seg_size_bytes - off) as usize;
            let seg = self.segment_for_write(segno)?;
            seg.file
                .write_all_at(&data[..n], off)
                .map_err(|e| with_path(e, &format!("write WAL at {lsn} ({n} bytes) to"), &seg.path))?;
            seg.unsynced = true;
            lsn += n as u64;
            data = &data[n..];
            if off + n as u64 == self.seg_size_bytes {
                self.complete_segment()?;
            }
        }
        Ok(())
    }

    /// The decoder positioned at `write_lsn`, rebuilt from disk after a failed write.
    fn take_decoder(&mut self) -> io::Result<WalStreamDecoder> {
        if let Some(d) = self.decoder.take() {
            return Ok(d);
        }
        let mut d = self.new_decoder(self.write_record_lsn)?;
        d.feed(&self.read_raw(self.write_record_lsn, self.write_lsn)?);
        // At most the record whose padding is pending comes out; it is already accounted for.
        loop {
            match d.poll_record() {
                Ok(Some(_)) => {}
                Ok(None) => return Ok(d),
                Err(e) => {
                    return Err(invalid_data(format!(
                        "WAL in {} after {} no longer decodes: {e}",
                        self.dir.display(),
                        self.write_record_lsn
                    )))
                }
            }
        }
    }
}

/// Reads as many bytes as the file has at `off`, up to `buf.len()`.
fn read_up_to(file: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl AcceptorStorage for PhysicalStorage {
    fn persist_state(&mut self, state: &TimelinePersistentState) -> io::Result<()> {
        control_file::save(&self.dir, state, self.sync)
    }

    fn write_wal(&mut self, lsn: Lsn, data: &[u8]) -> io::Result<()> {
        if lsn != self.write_lsn {
            return Err(invalid_input(format!(
                "WAL write at {lsn} to {}, whose WAL ends at {}: writes must continue the WAL",
                self.dir.display(),
                self.write_lsn
            )));
        }
        if data.is_empty() {
            return Ok(());
        }
        let end =
            lsn.checked_add(data.len() as u64).ok_or_else(|| invalid_input(format!("WAL write at {lsn} overflows")))?;
        // Decode before writing: bytes that are not valid WAL never reach the disk.
        let mut decoder = self.take_decoder()?;
        decoder.feed(data);
        let (mut last_end_within, mut last_end_beyond) = (None, None);
        loop {
            match decoder.poll_record() {
                Ok(Some(r)) if r.end_lsn <= end => last_end_within = Some(r.end_lsn),
                Ok(Some(r)) => last_end_beyond = Some(r.end_lsn),
                Ok(None) => break,
                Err(e) => {
                    // self.decoder stays None: rebuilt from disk (without these bytes) next time.
                    return Err(invalid_data(format!(
                        "refusing WAL {lsn}..{end} for {}: it is not valid WAL ({e}); the proposer sent a corrupt stream",
                        self.dir.display()
                    )));
                }
            }
        }
        self.write_segments(lsn, data)?;
        self.decoder = Some(decoder);
        self.write_lsn = end;
        if let Some(pending) = self.pending_record_end_lsn {
            if pending <= end {
                self.write_record_lsn = pending;
                self.pending_record_end_lsn = None;
            }
        }
        if let Some(e) = last_end_within {
            self.write_record_lsn = e;
        }
        if last_end_beyond.is_some() {
            self.pending_record_end_lsn = last_end_beyond;
        }
        Ok(())
    }

    fn flush_wal(&mut self) -> io::Result<()> {
        if let Some(s) = &mut self.open_segment {
            if s.unsynced && self.sync {
                s.file.sync_data().map_err(|e| with_path(e, "fdatasync", &s.path))?;
            }
            s.unsynced = false;
        }
        self.flush_lsn = self.write_record_lsn;
        Ok(())
    }

    fn truncate_wal(&mut self, end_lsn: Lsn) -> io::Result<()> {
        if end_lsn > self.write_lsn || end_lsn < self.oldest_lsn() {
            return Err(invalid_input(format!(
                "cannot truncate the WAL in {} at {end_lsn}: it holds {}..{}",
                self.dir.display(),
                self.oldest_lsn(),
                self.write_lsn
            )));
        }
        let decoder = self.new_decoder(end_lsn)?; // also checks end_lsn is a possible record boundary
                                                  // WAL below end_lsn becomes flushed: sync what the open segment holds.
        self.close_segment()?;
        let local_segno = self.segno(self.local_start_lsn);
        let mut segs = self.list_segments()?;
        segs.retain(|&segno, _| segno >= local_segno);
        let cut = self.cut_after(end_lsn, &segs)?;
        tracing::info!(
            "truncated the WAL in {} at {end_lsn} (was {}): zeroed {} byte(s), removed {:?}",
            self.dir.display(),
            self.write_lsn,
            cut.zeroed_bytes,
            cut.removed_files
        );
        self.write_lsn = end_lsn;
        self.write_record_lsn = end_lsn;
        self.flush_lsn = end_lsn;
        self.pending_record_end_lsn = None;
        self.decoder = Some(decoder);
        Ok(())
    }

    fn write_lsn(&self) -> Lsn {
        self.write_lsn
    }

    fn flush_lsn(&self) -> Lsn {
        self.flush_lsn
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use utils::{TenantId, TimelineId};

    use super::*;
    use crate::state::ServerInfo;
    use crate::test_wal::{real_wal, RealWal};

    fn is_zero(buf: &[u8]) -> bool {
        buf.iter().all(|&b| b == 0)
    }

    fn state_for(wal: &RealWal) -> TimelinePersistentState {
        TimelinePersistentState::new(
            TenantId([1; 16]),
            TimelineId([2; 16]),
            ServerInfo { pg_version: 150018, system_id: wal.system_id, wal_seg_size: wal.seg_size_bytes as u32 },
            wal.start_lsn,
        )
    }

    /// A record of a few KiB crossing a page boundary.
    fn spanning_pages(wal: &RealWal) -> &(Lsn, Lsn) {
        wal.records
            .iter()
            .find(|r| (4000..9000).contains(&(r.1 .0 - r.0 .0)) && r.0.page_start() != r.1.page_start())
            .unwrap()
    }

    fn open(dir: &Path, sync: bool) -> PhysicalStorage {
        PhysicalStorage::open(dir, &state_for(real_wal()), sync).expect("open storage")
    }

    /// Writes the real WAL `[from, to)` in random chunks of 1 byte to 200 KiB, flushing now and
    /// then, checking after every flush that flush_lsn is the last record end written.
    fn write_random_chunks(st: &mut PhysicalStorage, from: Lsn, to: Lsn, rng: &mut StdRng) {
        let wal = real_wal();
        assert_eq!(st.write_lsn(), from);
        let mut pos = from;
        while pos < to {
            let max = if rng.gen_bool(0.3) { 64 } else { 200 * 1024 };
            let n = rng.gen_range(1..=max).min(to.0 - pos.0);
            st.write_wal(pos, wal.slice(pos, pos + n)).expect("write real WAL");
            pos += n;
            assert_eq!(st.write_lsn(), pos);
            if rng.gen_bool(0.5) || pos == to {
                st.flush_wal().unwrap();
                let flush = st.flush_lsn();
                assert!(wal.is_record_end(flush), "flush_lsn {flush} is not a record end");
                assert_eq!(flush, wal.record_end_at_or_before(pos), "flush_lsn after writing up to {pos}");
            }
        }
    }

    fn segment_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| parse_xlog_file_name(n, real_wal().seg_size_bytes as usize).is_some())
            .collect();
        names.sort();
        names
    }

    /// The names a WAL from the test WAL's start to `end` must have: complete segments, then
    /// the one holding `end` as `.partial` (none if `end` starts a segment).
    fn expected_files(from_segno: u64, end: Lsn) -> Vec<String> {
        let seg = real_wal().seg_size_bytes;
        let mut names: Vec<String> =
            (from_segno..end.segment_number(seg)).map(|s| xlog_file_name(1, s, seg as usize)).collect();
        if end.segment_offset(seg) != 0 {
            names.push(format!("{}.partial", xlog_file_name(1, end.segment_number(seg), seg as usize)));
        }
        names
    }

    /// Everything on disk from `end` to the end of its segment is zero.
    fn assert_zero_after(dir: &Path, end: Lsn) {
        let seg = real_wal().seg_size_bytes;
        if end.segment_offset(seg) == 0 {
            return;
        }
        let name = format!("{}.partial", xlog_file_name(1, end.segment_number(seg), seg as usize));
        let bytes = fs::read(dir.join(&name)).unwrap();
        assert_eq!(bytes.len() as u64, seg, "{name} is full-size");
        let tail = &bytes[end.segment_offset(seg) as usize..];
        assert!(is_zero(tail), "{name} has data after the WAL end {end}");
    }

    fn read_all(st: &PhysicalStorage, from: Lsn, to: Lsn) -> Vec<u8> {
        let mut out = Vec::new();
        let mut pos = from;
        while pos < to {
            let n = (to.0 - pos.0).min(3 * 1024 * 1024 + 17);
            out.extend_from_slice(&st.read_wal(pos, pos + n).unwrap());
            pos += n;
        }
        out
    }

    #[test]
    fn writes_real_wal_in_random_chunks_and_flushes_at_record_ends() {
        let wal = real_wal();
        let dir = tempfile::tempdir().unwrap();
        let mut st = open(dir.path(), true);
        assert_eq!((st.write_lsn(), st.flush_lsn()), (wal.start_lsn, wal.start_lsn));
        write_random_chunks(&mut st, wal.start_lsn, wal.end_lsn(), &mut StdRng::seed_from_u64(1));
        assert_eq!(st.flush_lsn(), wal.end_lsn());
        let start_segno = wal.start_lsn.segment_number(wal.seg_size_bytes);
        assert_eq!(segment_files(dir.path()), expected_files(start_segno, wal.end_lsn()));
        assert_zero_after(dir.path(), wal.end_lsn());
        assert!(read_all(&st, wal.start_lsn, wal.end_lsn()) == wal.bytes, "read_wal returns what was written");
        // The durable range only.
        assert!(st.read_wal(wal.start_lsn - 8, wal.start_lsn + 8).is_err());
        assert!(st.read_wal(wal.end_lsn() - 8, wal.end_lsn() + 8).is_err());
        assert!(st.read_wal(wal.start_lsn, wal.start_lsn + READ_WAL_MAX_BYTES + 1).is_err());
        drop(st);
        let st = open(dir.path(), true);
        assert_eq!((st.write_lsn(), st.flush_lsn()), (wal.end_lsn(), wal.end_lsn()));
        assert!(read_all(&st, wal.start_lsn, wal.end_lsn()) == wal.bytes);
    }

    #[test]
    fn a_partial_record_is_written_but_not_flushed() {
        let wal = real_wal();
        let dir = tempfile::tempdir().unwrap();
        let mut st = open(dir.path(), false);
        // A record spanning pages (a full-page image), written all but its last bytes.
        let &(start, end) = spanning_pages(wal);
        let cut = end - 9;
        st.write_wal(wal.start_lsn, wal.slice(wal.start_lsn, cut)).unwrap();
        st.flush_wal().unwrap();
        assert_eq!(st.write_lsn(), cut);
        assert_eq!(st.flush_lsn(), wal.record_end_at_or_before(start));
        assert!(st.read_wal(start, cut).is_err(), "the partial record is not served");
        st.write_wal(cut, wal.slice(cut, end)).unwrap();
        st.flush_wal().unwrap();
        assert_eq!(st.flush_lsn(), end);
        // An XLOG_SWITCH ends where its segment ends: it counts once the padding has arrived.
        let seg = wal.seg_size_bytes;
        let &(switch_start, switch_end) =
            wal.records.iter().find(|r| r.1.segment_offset(seg) == 0 && r.1 .0 - r.0 .0 > 8192).unwrap();
        let switch_bytes_end = switch_start + 24;
        st.write_wal(end, wal.slice(end, switch_bytes_end)).unwrap();
        st.flush_wal().unwrap();
        assert_eq!(st.flush_lsn(), switch_start);
        st.write_wal(switch_bytes_end, wal.slice(switch_bytes_end, switch_end - 1)).unwrap();
        st.flush_wal().unwrap();
        assert_eq!(st.flush_lsn(), switch_start);
        st.write_wal(switch_end - 1, wal.slice(switch_end - 1, switch_end)).unwrap();
        st.flush_wal().unwrap();
        assert_eq!(st.flush_lsn(), switch_end);
    }

    #[test]
    fn corrupt_or_misplaced_writes_are_refused_and_change_nothing() {
        let wal = real_wal();
        let dir = tempfile::tempdir().unwrap();
        let mut st = open(dir.path(), false);
        let mid = wal.records[500].1;
        st.write_wal(wal.start_lsn, wal.slice(wal.start_lsn, mid)).unwrap();
        st.flush_wal().unwrap();
        // A flipped byte inside the next records: refused, nothing written.
        let to = wal.records[520].1;
        let mut bad = wal.slice(mid, to).to_vec();
        bad[100] ^= 0x20;
        let err = st.write_wal(mid, &bad).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains("not valid WAL"), "{err}");
        assert_eq!((st.write_lsn(), st.flush_lsn()), (mid, mid));
        let seg = wal.seg_size_bytes;
        let file =
            fs::read(dir.path().join(format!("{}.partial", xlog_file_name(1, mid.segment_number(seg), seg as usize))))
                .unwrap();
        let off = mid.segment_offset(seg) as usize;
        assert!(is_zero(&file[off..off + bad.len()]), "refused bytes reached the disk");
        // Zeros where a record must start are not WAL either.
        assert_eq!(st.write_wal(mid, &[0u8; 64]).unwrap_err().kind(), io::ErrorKind::InvalidData);
        // Writes must continue the WAL.
        assert_eq!(st.write_wal(mid + 8, wal.slice(mid + 8, to)).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        // The good bytes are still accepted, also when a partial record was pending before.
        let half = wal.records[510].0 + 10;
        st.write_wal(mid, wal.slice(mid, half)).unwrap();
        let mut bad = wal.slice(half, to).to_vec();
        bad[50] ^= 1;
        assert!(st.write_wal(half, &bad).is_err());
        st.write_wal(half, wal.slice(half, to)).unwrap();
        st.flush_wal().unwrap();
        assert_eq!(st.flush_lsn(), to);
        assert!(read_all(&st, wal.start_lsn, to) == wal.slice(wal.start_lsn, to));
    }

    /// Writes `[start, torn_at)` after flushing `[start, flushed)`, "crashes" (the unflushed bytes
    /// did reach the disk), reopens and checks that the WAL ends at the last complete record.
    fn crash_and_reopen(torn_at: Lsn, corrupt: impl FnOnce(&Path)) -> (tempfile::TempDir, PhysicalStorage) {
        let wal = real_wal();
        let dir = tempfile::tempdir().unwrap();
        let mut st = open(dir.path(), false);
        st.write_wal(wal.start_lsn, wal.slice(wal.start_lsn, torn_at)).unwrap();
        st.flush_wal().unwrap();
        drop(st);
        corrupt(dir.path());
        let st = open(dir.path(), false);
        assert_eq!(st.write_lsn(), st.flush_lsn());
        let end = st.flush_lsn();
        assert!(wal.is_record_end(end), "WAL end {end} is not a record end");
        let start_segno = wal.start_lsn.segment_number(wal.seg_size_bytes);
        assert_eq!(segment_files(dir.path()), expected_files(start_segno, end), "files after reopening at {end}");
        assert_zero_after(dir.path(), end);
        assert!(read_all(&st, wal.start_lsn, end) == wal.slice(wal.start_lsn, end));
        (dir, st)
    }

    #[test]
    fn torn_tail_is_cut_on_open() {
        let wal = real_wal();
        let seg = wal.seg_size_bytes;
        // Torn inside a page, and inside a record that crosses pages.
        for &(start, end) in [wal.records[3000], *spanning_pages(wal)].iter() {
            let torn_at = start + (end.0 - start.0) / 2;
            let (_dir, st) = crash_and_reopen(torn_at, |_| {});
            assert_eq!(st.flush_lsn(), wal.record_end_at_or_before(start));
        }
        // A record crossing a segment boundary, torn in the next segment: that segment goes and
        // the previous one is `.partial` again.
        let &(start, end) = wal
            .records
            .iter()
            .find(|r| r.0.segment_number(seg) != (r.1 - 1).segment_number(seg) && r.1.segment_offset(seg) > 200)
            .unwrap();
        let torn_at = (end - 1).segment_start(seg) + (end.segment_offset(seg) / 2);
        let (_dir, st) = crash_and_reopen(torn_at, |_| {});
        assert_eq!(st.flush_lsn(), wal.record_end_at_or_before(start));
        assert!(st.flush_lsn().segment_number(seg) < torn_at.segment_number(seg));
        // The 2.5 MB record spanning three segments, torn in the third: the decoder must start
        // before the segment preceding the last one.
        let &(start, end) = wal.records.iter().find(|r| r.1 .0 - r.0 .0 > 2 * seg).unwrap();
        let torn_at = end - seg / 3;
        assert!(torn_at.segment_number(seg) >= start.segment_number(seg) + 2);
        let (_dir, st) = crash_and_reopen(torn_at, |_| {});
        assert_eq!(st.flush_lsn(), wal.record_end_at_or_before(start));
        // A flipped byte in a complete record of the last segment: it and everything after go.
        let &(victim_start, victim_end) = wal
            .records
            .iter()
            .rev()
            .find(|r| r.0.segment_number(seg) == wal.end_lsn().segment_number(seg) && r.1 .0 - r.0 .0 > 100)
            .unwrap();
        let (_dir, st) = crash_and_reopen(wal.end_lsn(), |dir| {
            let path =
                dir.join(format!("{}.partial", xlog_file_name(1, victim_start.segment_number(seg), seg as usize)));
            let mut bytes = fs::read(&path).unwrap();
            bytes[victim_start.segment_offset(seg) as usize + 50] ^= 0x08;
            fs::write(&path, bytes).unwrap();
        });
        assert_eq!(st.flush_lsn(), wal.record_end_at_or_before(victim_start));
        assert!(victim_end <= wal.end_lsn());
        // A segment file cut short in the middle of a record: extended again, tail cut.
        let &(start, end) =
            wal.records.iter().find(|r| r.0 > wal.start_lsn + 3 * seg && r.1 .0 - r.0 .0 > 1000).unwrap();
        let short_at = start + (end.0 - start.0) / 2;
        let (_dir, st) = crash_and_reopen(short_at + 5000, |dir| {
            let path = dir.join(format!("{}.partial", xlog_file_name(1, short_at.segment_number(seg), seg as usize)));
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            f.set_len(short_at.segment_offset(seg)).unwrap();
        });
        assert_eq!(st.flush_lsn(), wal.record_end_at_or_before(start));
    }

    #[test]
    fn leftover_zero_segment_and_unrenamed_complete_segment_are_fixed_on_open() {
        let wal = real_wal();
        let seg = wal.seg_size_bytes;
        // Writing stopped exactly at a segment end; the next segment was created but nothing
        // reached it, and the completed one kept its .partial name (crash before the rename).
        let boundary = wal.records.iter().map(|r| r.1).find(|e| e.segment_offset(seg) == 0).unwrap();
        let (_dir, st) = crash_and_reopen(boundary, |dir| {
            let segno = boundary.segment_number(seg);
            let complete = dir.join(xlog_file_name(1, segno - 1, seg as usize));
            fs::rename(&complete, dir.join(format!("{}.partial", xlog_file_name(1, segno - 1, seg as usize)))).unwrap();
            let next = dir.join(format!("{}.partial", xlog_file_name(1, segno, seg as usize)));
            fs::write(next, vec![0u8; seg as usize]).unwrap();
        });
        assert_eq!(st.flush_lsn(), boundary);
    }

    #[test]
    fn truncate_mid_segment_and_across_segments_then_continue() {
        let wal = real_wal();
        let seg = wal.seg_size_bytes;
        let start_segno = wal.start_lsn.segment_number(seg);
        let dir = tempfile::tempdir().unwrap();
        let mut st = open(dir.path(), true);
        let mut rng = StdRng::seed_from_u64(2);
        let third = wal.records[wal.records.len() / 3].1;
        write_random_chunks(&mut st, wal.start_lsn, third, &mut rng);
        // In the middle of the segment being written.
        let cut1 = wal
            .records
            .iter()
            .map(|r| r.1)
            .rev()
            .find(|e| e.segment_number(seg) == third.segment_number(seg) && *e < third - 3000)
            .unwrap();
        st.truncate_wal(cut1).unwrap();
        assert_eq!((st.write_lsn(), st.flush_lsn()), (cut1, cut1));
        assert_eq!(segment_files(dir.path()), expected_files(start_segno, cut1));
        assert_zero_after(dir.path(), cut1);
        write_random_chunks(&mut st, cut1, wal.end_lsn(), &mut rng);
        // Exactly at a segment boundary (the end of the XLOG_SWITCH): the next segment goes.
        let switch_end = wal.records.iter().map(|r| r.1).find(|e| e.segment_offset(seg) == 0).unwrap();
        st.truncate_wal(switch_end).unwrap();
        assert_eq!((st.write_lsn(), st.flush_lsn()), (switch_end, switch_end));
        assert_eq!(segment_files(dir.path()), expected_files(start_segno, switch_end));
        write_random_chunks(&mut st, switch_end, wal.end_lsn(), &mut rng);
        // Two or more segments back: later segments removed, the completed one `.partial` again.
        let cut2 = wal
            .records
            .iter()
            .map(|r| r.1)
            .rev()
            .find(|e| e.segment_number(seg) <= wal.end_lsn().segment_number(seg) - 2 && e.segment_offset(seg) > 1000)
            .unwrap();
        st.truncate_wal(cut2).unwrap();
        assert_eq!((st.write_lsn(), st.flush_lsn()), (cut2, cut2));
        assert_eq!(segment_files(dir.path()), expected_files(start_segno, cut2));
        assert_zero_after(dir.path(), cut2);
        assert!(st.read_wal(cut2 - 8, cut2 + 8).is_err());
        drop(st);
        let mut st = open(dir.path(), true);
        assert_eq!(st.flush_lsn(), cut2);
        write_random_chunks(&mut st, cut2, wal.end_lsn(), &mut rng);
        assert!(read_all(&st, wal.start_lsn, wal.end_lsn()) == wal.bytes);
        drop(st);
        let st = open(dir.path(), true);
        assert_eq!(st.flush_lsn(), wal.end_lsn());
        assert_eq!(segment_files(dir.path()), expected_files(start_segno, wal.end_lsn()));
        // Beyond the WAL end, or not a record boundary: refused.
        let mut st = st;
        assert!(st.truncate_wal(wal.end_lsn() + 8).is_err());
        assert!(st.truncate_wal(wal.end_lsn() - 3).is_err());
        assert_eq!(st.flush_lsn(), wal.end_lsn());
    }

    #[test]
    fn remove_wal_below_keeps_what_open_needs() {
        let wal = real_wal();
        let seg = wal.seg_size_bytes;
        let dir = tempfile::tempdir().unwrap();
        let mut st = open(dir.path(), false);
        let switch_end = wal.records.iter().map(|r| r.1).find(|e| e.segment_offset(seg) == 0).unwrap();
        st.write_wal(wal.start_lsn, wal.slice(wal.start_lsn, switch_end)).unwrap();
        st.flush_wal().unwrap();
        // The WAL ends at a segment boundary: the last complete segment must stay.
        let n = st.remove_wal_below(switch_end).unwrap();
        assert!(n > 0);
        let last = xlog_file_name(1, switch_end.segment_number(seg) - 1, seg as usize);
        assert_eq!(segment_files(dir.path()), vec![last.clone()]);
        assert!(st.read_wal(switch_end - seg - 8, switch_end).is_err());
        assert_eq!(st.read_wal(switch_end - seg, switch_end).unwrap(), wal.slice(switch_end - seg, switch_end));
        drop(st);
        let mut st = open(dir.path(), false);
        assert_eq!(st.flush_lsn(), switch_end);
        assert_eq!(st.oldest_lsn(), switch_end - seg);
        st.write_wal(switch_end, wal.slice(switch_end, wal.end_lsn())).unwrap();
        st.flush_wal().unwrap();
        // Only the last segment left, starting with the continuation of a record from before.
        let keep = wal.end_lsn() - 100;
        st.remove_wal_below(keep).unwrap();
        assert_eq!(segment_files(dir.path()), expected_files(keep.segment_number(seg), wal.end_lsn()));
        drop(st);
        let st = open(dir.path(), false);
        assert_eq!(st.flush_lsn(), wal.end_lsn());
        let from = keep.segment_start(seg);
        assert!(read_all(&st, from, wal.end_lsn()) == wal.slice(from, wal.end_lsn()));
    }

    #[test]
    fn acceptor_on_physical_storage_reopens_with_the_same_state() {
        use bytes::Bytes;
        use safekeeper_api::proto::{
            AcceptorMessage, AppendRequest, ProposerElected, ProposerGreeting, ProposerMessage, VoteRequest,
        };
        use safekeeper_api::{TermHistory, TermLsn};

        use crate::acceptor::Acceptor;

        let wal = real_wal();
        let start = wal.start_lsn;
        let dir = tempfile::tempdir().unwrap();
        let mut state = state_for(wal);
        state.server.system_id = 0; // learnt from the first greeting
        control_file::save(dir.path(), &state, true).unwrap();
        let storage = PhysicalStorage::open(dir.path(), &state, true).unwrap();
        let mut a = Acceptor::new(1, state, storage);

        let greeting = ProposerMessage::Greeting(ProposerGreeting {
            protocol_version: 1,
            pg_version: 150018,
            proposer_id: [9; 16],
            system_id: wal.system_id,
            tenant_id: TenantId([1; 16]),
            timeline_id: TimelineId([2; 16]),
            wal_seg_size: wal.seg_size_bytes as u32,
        });
        let elect = |term, at: Lsn, history: &[(u64, Lsn)]| {
            ProposerMessage::Elected(ProposerElected {
                term,
                start_streaming_at: at,
                term_history: TermHistory(history.iter().map(|&(term, lsn)| TermLsn { term, lsn }).collect()),
                timeline_start_lsn: start,
            })
        };
        let append = |term, from: Lsn, to: Lsn, commit: Lsn| {
            ProposerMessage::Append(AppendRequest {
                term,
                begin_lsn: from,
                end_lsn: to,
                commit_lsn: commit,
                truncate_lsn: Lsn(0),
                wal: Bytes::copy_from_slice(wal.slice(from, to)),
            })
        };
        /// Streams `[from, to)` in pieces, checking every answer's flush LSN is a record end.
        fn stream(
            a: &mut Acceptor<PhysicalStorage>,
            append: &dyn Fn(u64, Lsn, Lsn, Lsn) -> ProposerMessage,
            term: u64,
            from: Lsn,
            to: Lsn,
            commit: Lsn,
        ) {
            let mut pos = from;
            while pos < to {
                let next = (pos + 150_001).min(to);
                match a.process(&append(term, pos, next, commit)).unwrap() {
                    Some(AcceptorMessage::Append(r)) => {
                        assert_eq!(r.flush_lsn, real_wal().record_end_at_or_before(next));
                    }
                    other => panic!("unexpected answer {other:?}"),
                }
                pos = next;
            }
        }

        a.process(&greeting).unwrap();
        a.process(&ProposerMessage::VoteRequest(VoteRequest { term: 3, proposer_id: [9; 16] })).unwrap();
        a.process(&elect(3, start, &[(3, start)])).unwrap();
        let two_thirds = start + (wal.end_lsn().0 - start.0) * 2 / 3;
        let commit = wal.records[wal.records.len() / 3].1;
        stream(&mut a, &append, 3, start, two_thirds, commit);
        a.process(&append(3, two_thirds, two_thirds, commit)).unwrap();
        a.persist_if_dirty().unwrap(); // what the daemon does periodically
        let before = a.state().clone();
        let flush_before = a.flush_lsn();
        assert_eq!(before.server.system_id, wal.system_id);
        assert_eq!(before.commit_lsn, commit);
        drop(a);

        // Restart: control file and WAL give back the same acceptor.
        let loaded = control_file::load(dir.path()).unwrap();
        assert_eq!(loaded, before);
        let storage = PhysicalStorage::open(dir.path(), &loaded, true).unwrap();
        let mut a = Acceptor::new(1, loaded, storage);
        assert_eq!(a.state(), &before);
        assert_eq!(a.flush_lsn(), flush_before);

        // A new leader whose term 4 began at an earlier record end: our tail is cut there and
        // its WAL (the same bytes here) streamed on.
        let diverge = wal.records.iter().map(|r| r.1).filter(|&e| e > commit && e < flush_before).nth(1000).unwrap();
        a.process(&greeting).unwrap();
        a.process(&ProposerMessage::VoteRequest(VoteRequest { term: 4, proposer_id: [8; 16] })).unwrap();
        a.process(&elect(4, diverge, &[(3, start), (4, diverge)])).unwrap();
        assert_eq!(a.flush_lsn(), diverge);
        stream(&mut a, &append, 4, diverge, wal.end_lsn(), wal.end_lsn());
        a.process(&append(4, wal.end_lsn(), wal.end_lsn(), wal.end_lsn())).unwrap();
        assert_eq!(a.commit_lsn(), wal.end_lsn());
        a.persist_if_dirty().unwrap();
        let before = a.state().clone();
        drop(a);
        let loaded = control_file::load(dir.path()).unwrap();
        assert_eq!(loaded, before);
        let a = Acceptor::new(1, loaded.clone(), PhysicalStorage::open(dir.path(), &loaded, true).unwrap());
        assert_eq!(a.flush_lsn(), wal.end_lsn());
        assert!(read_all(a.storage(), start, wal.end_lsn()) == wal.bytes);
    }
}
