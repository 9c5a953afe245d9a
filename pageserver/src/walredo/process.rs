//! One `postgres --wal-redo` child process: spawning it, one request at a time over its pipes,
//! its stderr into our log, and killing it.
//!
//! A process is used by one request at a time (the pool in [`super`] hands it out). After any
//! I/O error or timeout its pipes are in an unknown state, so the caller kills it instead of
//! reusing it; the child is also killed when this struct is dropped (a cancelled request).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use postgres_ffi::BLCKSZ;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};
use tokio::task::JoinHandle;
use tracing::{info, warn};
use utils::Lsn;

use super::protocol::{self, BufferTag, PING_ANSWER};

/// Stderr lines kept for error messages (the rest is only in the log).
const STDERR_TAIL_LINES_MAX: usize = 20;
/// Longest stderr line kept or logged; Postgres lines are short, garbage may not be.
const STDERR_LINE_SIZE_BYTES_MAX: usize = 2048;
/// Write buffer in front of stdin: small messages coalesce, records pass through.
const STDIN_BUFFER_SIZE_BYTES: usize = 64 * 1024;
/// How long a killed process gets to be reaped and to flush its last stderr lines.
const EXIT_WAIT: Duration = Duration::from_secs(5);

/// How to start a redo process.
#[derive(Debug, Clone)]
pub(super) struct Launch {
    /// `bin/postgres` of our patched build.
    pub postgres_bin: PathBuf,
    /// `(uid, gid)` to run as; set when we are root (Postgres refuses to run as root).
    pub run_as: Option<(u32, u32)>,
}

/// The last lines a process wrote to stderr.
#[derive(Default)]
struct StderrTail {
    lines: Mutex<VecDeque<String>>,
}

impl StderrTail {
    fn push(&self, line: String) {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() == STDERR_TAIL_LINES_MAX {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    fn joined(&self) -> String {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().cloned().collect::<Vec<_>>().join(" | ")
    }
}

pub(super) struct RedoProcess {
    /// Our number for the process (in log lines), not the pid.
    pub id: u64,
    pub pid: u32,
    child: Child,
    stdin: BufWriter<ChildStdin>,
    stdout: ChildStdout,
    stderr_tail: Arc<StderrTail>,
    stderr_task: Option<JoinHandle<()>>,
}

impl RedoProcess {
    /// Starts `postgres --wal-redo` with an empty environment and `/` as working directory
    /// (it needs neither; the unprivileged user may not be able to read ours).
    pub fn spawn(launch: &Launch, id: u64) -> std::io::Result<RedoProcess> {
        let mut cmd = Command::new(&launch.postgres_bin);
        cmd.arg("--wal-redo")
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some((uid, gid)) = launch.run_as {
            cmd.uid(uid).gid(gid);
        }
        let mut child = cmd.spawn()?;
        let pid = child.id().unwrap_or(0);
        let (Some(stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(std::io::Error::other("child process has no stdin/stdout/stderr pipes"));
        };
        let stderr_tail = Arc::new(StderrTail::default());
        let stderr_task = tokio::spawn(log_stderr(stderr, id, pid, Arc::clone(&stderr_tail)));
        info!(process_id = id, pid, "started WAL redo process");
        Ok(RedoProcess {
            id,
            pid,
            child,
            stdin: BufWriter::with_capacity(STDIN_BUFFER_SIZE_BYTES, stdin),
            stdout,
            stderr_tail,
            stderr_task: Some(stderr_task),
        })
    }

    /// Round trip that proves the process came up (the extension loaded, memory set up).
    pub async fn ping(&mut self) -> std::io::Result<()> {
        let mut msg = Vec::with_capacity(protocol::MESSAGE_HEADER_SIZE_BYTES);
        protocol::put_ping(&mut msg);
        self.stdin.write_all(&msg).await?;
        self.stdin.flush().await?;
        let mut answer = [0u8; 1];
        self.stdout.read_exact(&mut answer).await?;
        if answer[0] != PING_ANSWER {
            return Err(std::io::Error::other(format!(
                "answered the ping with byte 0x{:02x}, expected 0x{PING_ANSWER:02x}",
                answer[0]
            )));
        }
        Ok(())
    }

    /// Sends a whole request (`B`, `P` if there is a base page, one `A` per record, `G`) and
    /// reads the page. The caller validated sizes (page of `BLCKSZ`, records within limits).
    pub async fn apply(
        &mut self,
        tag: &BufferTag,
        base_page: Option<&[u8]>,
        records: &[(Lsn, Bytes)],
    ) -> std::io::Result<Bytes> {
        let mut head = Vec::with_capacity(64 + BLCKSZ);
        protocol::put_begin(&mut head, tag);
        if let Some(page) = base_page {
            protocol::put_push_page(&mut head, tag, page);
        }
        self.stdin.write_all(&head).await?;
        for (end_lsn, record) in records {
            let mut apply_header =
                Vec::with_capacity(protocol::MESSAGE_HEADER_SIZE_BYTES + protocol::APPLY_LSN_SIZE_BYTES);
            protocol::put_apply_header(&mut apply_header, *end_lsn, record.len());
            self.stdin.write_all(&apply_header).await?;
            self.stdin.write_all(record).await?;
        }
        let mut tail = Vec::with_capacity(protocol::MESSAGE_HEADER_SIZE_BYTES + protocol::BUFFER_TAG_SIZE_BYTES);
        protocol::put_get_page(&mut tail, tag);
        self.stdin.write_all(&tail).await?;
        self.stdin.flush().await?;

        let mut page = vec![0u8; BLCKSZ];
        self.stdout.read_exact(&mut page).await?;
        Ok(Bytes::from(page))
    }

    /// True if the process has exited (it was killed or crashed while idle).
    pub fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the process (if still running), reaps it and returns how it ended plus the last
    /// lines of its stderr, for the error message of the request that failed.
    pub async fn kill(mut self) -> String {
        let _ = self.child.start_kill();
        let status = match tokio::time::timeout(EXIT_WAIT, self.child.wait()).await {
            Ok(Ok(status)) => describe_exit(status),
            Ok(Err(e)) => format!("could not wait for it: {e}"),
            Err(_) => format!("it did not exit within {} s of SIGKILL", EXIT_WAIT.as_secs()),
        };
        // The pipe closes with the process; let the reader catch the last lines.
        if let Some(task) = self.stderr_task.take() {
            let _ = tokio::time::timeout(EXIT_WAIT, task).await;
        }
        let stderr = self.stderr_tail.joined();
        if stderr.is_empty() {
            format!("process {} (pid {}) {status}; it wrote nothing to stderr", self.id, self.pid)
        } else {
            format!("process {} (pid {}) {status}; its stderr ended with: {stderr}", self.id, self.pid)
        }
    }

    /// Closes stdin (the process exits normally at end of input) and waits for it.
    pub async fn shut_down(mut self) {
        let _ = self.stdin.shutdown().await;
        if tokio::time::timeout(EXIT_WAIT, self.child.wait()).await.is_err() {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
        if let Some(task) = self.stderr_task.take() {
            let _ = tokio::time::timeout(EXIT_WAIT, task).await;
        }
    }
}

fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(9)) => "was killed (SIGKILL)".to_string(),
        (None, Some(6)) => "aborted (SIGABRT: a PANIC in redo)".to_string(),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => format!("ended ({status})"),
    }
}

/// Copies the process's stderr into our log, line by line, keeping the last lines for error
/// messages. Postgres error lines (`ERROR:`, `FATAL:`, `PANIC:`) are warnings here: the
/// request that caused them fails and its caller decides how bad that is.
async fn log_stderr(stderr: ChildStderr, process_id: u64, pid: u32, tail: Arc<StderrTail>) {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    while let Ok(true) = read_line_bounded(&mut reader, &mut line).await {
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        if text.is_empty() {
            continue;
        }
        if text.contains("ERROR:") || text.contains("FATAL:") || text.contains("PANIC:") {
            warn!(process_id, pid, "wal-redo: {text}");
        } else {
            info!(process_id, pid, "wal-redo: {text}");
        }
        tail.push(text);
    }
}

/// Reads one line into `line`, keeping at most [`STDERR_LINE_SIZE_BYTES_MAX`] bytes of it (the
/// rest of a longer line is skipped). Returns false at end of input.
async fn read_line_bounded(reader: &mut BufReader<ChildStderr>, line: &mut Vec<u8>) -> std::io::Result<bool> {
    line.clear();
    let mut read_any = false;
    loop {
        let chunk = reader.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(read_any);
        }
        read_any = true;
        let (part, found_newline) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (&chunk[..i], true),
            None => (chunk, false),
        };
        let room = STDERR_LINE_SIZE_BYTES_MAX.saturating_sub(line.len());
        line.extend_from_slice(&part[..part.len().min(room)]);
        let consumed = part.len() + usize::from(found_newline);
        reader.consume(consumed);
        if found_newline {
            return Ok(true);
        }
    }
}
