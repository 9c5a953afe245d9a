//! Running the real Postgres 15 build from tests: finding it, dropping root privileges
//! (Postgres refuses to run as root), throwaway clusters that are always stopped.

#![allow(dead_code)]

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where the Postgres binaries are and which OS user runs them.
pub struct PgEnv {
    pub install_dir: PathBuf,
    /// `Some(user)` when the test runs as root and must drop to `user`.
    pub os_user: Option<String>,
}

fn command_output(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"))
}

impl PgEnv {
    /// Finds the build at `$PG_INSTALL_DIR` or `<workspace root>/pg_install`, or fails saying
    /// how to build it.
    pub fn find() -> PgEnv {
        let install_dir = match std::env::var_os("PG_INSTALL_DIR") {
            Some(d) => PathBuf::from(d),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pg_install"),
        };
        let waldump = install_dir.join("bin/pg_waldump");
        assert!(
            waldump.exists(),
            "Postgres 15 build not found: {} does not exist. Run `postgres/build.sh` in the workspace root \
             (or point PG_INSTALL_DIR at an installation) before running these tests.",
            waldump.display()
        );
        let uid = String::from_utf8_lossy(&command_output(Command::new("id").arg("-u")).stdout).trim().to_string();
        let os_user = (uid == "0").then(|| std::env::var("PG_OS_USER").unwrap_or_else(|_| "postgres".to_string()));
        if let Some(user) = &os_user {
            let out = command_output(Command::new("id").args(["-u", user]));
            assert!(
                out.status.success(),
                "running as root, but the unprivileged user '{user}' to run Postgres as does not exist \
                 (create it, or set PG_OS_USER to another user)"
            );
        }
        PgEnv { install_dir, os_user }
    }

    pub fn bin(&self, prog: &str) -> PathBuf {
        self.install_dir.join("bin").join(prog)
    }

    /// A command for `prog` from the build, run as the unprivileged user when needed.
    pub fn cmd(&self, prog: &str) -> Command {
        match &self.os_user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(self.bin(prog));
                c
            }
            None => Command::new(self.bin(prog)),
        }
    }

    /// Runs `prog args` and returns stdout; panics with stderr if it fails.
    pub fn run(&self, prog: &str, args: &[&str]) -> String {
        let out = command_output(self.cmd(prog).args(args));
        assert!(
            out.status.success(),
            "{prog} {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A temp dir under /tmp that the Postgres user owns.
    pub fn tempdir(&self, prefix: &str) -> tempfile::TempDir {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir_in("/tmp").expect("create temp dir in /tmp");
        self.give_to_user(dir.path());
        dir
    }

    /// Hands a path (recursively) to the Postgres user.
    pub fn give_to_user(&self, path: &Path) {
        if let Some(user) = &self.os_user {
            let out = command_output(Command::new("chown").arg("-R").arg(format!("{user}:")).arg(path));
            assert!(out.status.success(), "chown {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
        }
    }

    pub fn supports(&self, configure_flag: &str) -> bool {
        self.run("pg_config", &["--configure"]).contains(configure_flag)
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("find a free port")
}

/// An initdb'd cluster in a temp dir. Dropping it stops Postgres (`-m immediate`), so a
/// failing test never leaves a server behind.
pub struct PgCluster<'a> {
    pub env: &'a PgEnv,
    pub dir: tempfile::TempDir,
    pub datadir: PathBuf,
    pub port: u16,
    running: bool,
}

impl<'a> PgCluster<'a> {
    /// `initdb` with trust auth and superuser `postgres`, then appends `extra_conf`.
    pub fn init(env: &'a PgEnv, extra_conf: &str) -> PgCluster<'a> {
        let dir = env.tempdir("pgffi-");
        let datadir = dir.path().join("data");
        env.run(
            "initdb",
            &["-D", datadir.to_str().unwrap(), "-A", "trust", "-U", "postgres", "-N", "-E", "UTF8", "--locale=C"],
        );
        let port = free_port();
        let conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n{extra_conf}\n",
            dir.path().display()
        );
        let conf_path = datadir.join("postgresql.conf");
        let mut all = fs::read_to_string(&conf_path).expect("read postgresql.conf");
        all.push_str(&conf);
        fs::write(&conf_path, all).expect("write postgresql.conf");
        PgCluster { env, dir, datadir, port, running: false }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn start(&mut self) {
        let out = command_output(self.env.cmd("pg_ctl").args([
            "-D",
            self.datadir.to_str().unwrap(),
            "-l",
            self.log_path().to_str().unwrap(),
            "-w",
            "-t",
            "60",
            "start",
        ]));
        self.running = true; // even on failure, try to stop in Drop
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}\nlog:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
    }

    /// Clean shutdown (writes a shutdown checkpoint).
    pub fn stop(&mut self) {
        if self.running {
            self.env.run("pg_ctl", &["-D", self.datadir.to_str().unwrap(), "-m", "fast", "-w", "stop"]);
            self.running = false;
        }
    }

    fn psql_cmd(&self, db: &str) -> Command {
        let mut c = self.env.cmd("psql");
        c.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"]).arg(self.dir.path()).args([
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-d",
            db,
        ]);
        c
    }

    /// Runs SQL given as one string (one implicit transaction); returns the output.
    pub fn psql(&self, sql: &str) -> String {
        let out = command_output(self.psql_cmd("postgres").args(["-c", sql]));
        assert!(
            out.status.success(),
            "psql -c {sql:?} failed:\n{}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a script statement by statement (so CREATE DATABASE etc. work).
    pub fn psql_script(&self, name: &str, sql: &str) -> String {
        let path = self.dir.path().join(format!("{name}.sql"));
        fs::write(&path, sql).expect("write sql script");
        self.env.give_to_user(&path);
        let out = command_output(self.psql_cmd("postgres").arg("-f").arg(&path));
        assert!(
            out.status.success(),
            "psql script {name} failed:\n{}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a psql running `sql` in the background.
    pub fn spawn_psql(&self, sql: &str) -> Child {
        self.psql_cmd("postgres")
            .args(["-c", sql])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn psql")
    }

    /// Polls `query` until it prints `expected`, for up to `timeout`.
    pub fn wait_for(&self, query: &str, expected: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.psql(query).trim() == expected {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {query:?} to return {expected:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PgCluster<'_> {
    fn drop(&mut self) {
        if self.running {
            let _ = self
                .env
                .cmd("pg_ctl")
                .args(["-D", self.datadir.to_str().unwrap_or(""), "-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// WAL segment files in `pg_wal`, sorted by name.
pub fn wal_segment_files(pg_wal: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(pg_wal)
        .expect("read pg_wal")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| postgres_ffi::xlog_file::is_xlog_file_name(n))
        .collect();
    names.sort();
    names
}
