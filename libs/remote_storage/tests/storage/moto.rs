//! A moto S3 server for the test binary: started once, on a free port, stopped when the test
//! process exits (even if it panics or is killed).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long moto may take to start; Python imports are slow on a busy 2-core machine.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(90);

/// Runs moto in the background and kills it once this wrapper's stdin reaches EOF, which happens
/// when the test process drops the pipe: on `Drop`, on exit, and on SIGKILL alike. (Statics are
/// never dropped, so the pipe is what cleans up the shared server.) The wrapper exits when moto
/// does, which lets startup notice a crashed moto.
const WRAPPER_SCRIPT: &str = r#"
exec 3<&0
"$0" -H 127.0.0.1 -p "$1" >"$2" 2>&1 &
moto=$!
(read _unused <&3; kill "$moto" 2>/dev/null) &
wait "$moto"
"#;

/// Guard for a running moto server; dropping it stops the server.
pub struct MotoServer {
    wrapper: Child,
    stdin: Option<ChildStdin>,
    pub endpoint: String,
}

impl MotoServer {
    /// The server shared by all tests of this binary; panics with instructions if moto is not
    /// installed or does not start.
    pub fn shared() -> &'static MotoServer {
        static SERVER: OnceLock<Result<MotoServer, String>> = OnceLock::new();
        match SERVER.get_or_init(MotoServer::start) {
            Ok(server) => server,
            Err(message) => panic!("{message}"),
        }
    }

    fn start() -> Result<MotoServer, String> {
        let binary = find_moto_server()?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(|e| format!("cannot pick a free port for moto: {e}"))?
            .port();
        let log_path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("remote_storage_moto_server.log");
        let wrapper = Command::new("sh")
            .arg("-c")
            .arg(WRAPPER_SCRIPT)
            .arg(&binary)
            .arg(port.to_string())
            .arg(&log_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let mut server = MotoServer { stdin: None, wrapper, endpoint: format!("http://127.0.0.1:{port}") };
        server.stdin = server.wrapper.stdin.take();

        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if answers_http(port) {
                return Ok(server);
            }
            if let Ok(Some(status)) = server.wrapper.try_wait() {
                return Err(format!(
                    "{} exited during startup ({status}); see {}",
                    binary.display(),
                    log_path.display()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} did not answer HTTP on port {port} within {STARTUP_TIMEOUT:?}; see {}",
                    binary.display(),
                    log_path.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        // Closing stdin makes the wrapper kill moto and exit.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.wrapper.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.wrapper.kill();
        let _ = self.wrapper.wait();
    }
}

/// `MOTO_SERVER_BIN`, else the workspace virtualenv, else `moto_server` on `PATH`.
fn find_moto_server() -> Result<PathBuf, String> {
    if let Some(binary) = std::env::var_os("MOTO_SERVER_BIN") {
        let binary = PathBuf::from(binary);
        return if binary.is_file() {
            Ok(binary)
        } else {
            Err(format!("MOTO_SERVER_BIN={} does not exist", binary.display()))
        };
    }
    let workspace_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let venv_binary = workspace_root.join(".venv/bin/moto_server");
    if venv_binary.is_file() {
        return Ok(venv_binary);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("moto_server");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(format!(
        "moto_server not found: the S3 tests need moto's S3 server. Run scripts/test.sh (which \
         installs it into {}), or `pip install 'moto[server]'`, or set MOTO_SERVER_BIN",
        venv_binary.display()
    ))
}

fn answers_http(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if stream.write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).is_ok() && &head == b"HTTP/"
}
