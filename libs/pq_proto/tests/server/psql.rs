//! `psql` against the test server, when it is installed. `sslmode=prefer` makes libpq send
//! SSLRequest first, so these also cover the refusal path.

use std::path::Path;
use std::process::Output;

use pq_proto::{BackendConfig, SessionEnd};

use crate::harness::{TestAuth, TestServer, PASSWORD, TIMEOUT};

const PSQL: &str = "/usr/bin/psql";

fn psql_available() -> bool {
    let found = Path::new(PSQL).exists();
    if !found {
        eprintln!("skipping: {PSQL} not installed");
    }
    found
}

/// Runs `psql -X -w <conninfo> -c <command>` with an environment that cannot leak the
/// developer's own settings in.
async fn psql(server: &TestServer, extra_conninfo: &str, password: Option<&str>, command: &str) -> Output {
    let conninfo = format!(
        "host=127.0.0.1 port={} user=alice sslmode=prefer connect_timeout=10 {extra_conninfo}",
        server.addr.port()
    );
    let mut cmd = tokio::process::Command::new(PSQL);
    cmd.args(["-X", "-w", &conninfo, "-c", command])
        .env_clear()
        .env("PGPASSFILE", "/dev/null")
        .env("PGSYSCONFDIR", "/nonexistent")
        .kill_on_drop(true);
    if let Some(password) = password {
        cmd.env("PGPASSWORD", password);
    }
    tokio::time::timeout(TIMEOUT, cmd.output()).await.expect("psql finishes in time").expect("psql runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn psql_select_copy_and_errors() {
    if !psql_available() {
        return;
    }
    let mut server = TestServer::start(TestAuth::Trust, BackendConfig::default()).await;

    let out = psql(&server, "", None, "select 1").await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("?column?"), "{stdout}");
    assert!(stdout.contains(" 1\n"), "{stdout}");
    assert!(stdout.contains("(1 row)"), "{stdout}");
    assert_eq!(server.next_result().await, Ok(SessionEnd::Terminated));

    // psql prints COPY OUT data to stdout.
    let out = psql(&server, "", None, "COPYOUT 3").await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout), "row 0\nrow 1\nrow 2\n");
    assert_eq!(server.next_result().await, Ok(SessionEnd::Terminated));

    let out = psql(&server, "", None, "ERROR").await;
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("ERROR:  you asked for an error"), "{stderr}");
    assert!(stderr.contains("DETAIL:  the ERROR command always fails"), "{stderr}");
    assert!(stderr.contains("HINT:  try SELECT instead"), "{stderr}");
    assert_eq!(server.next_result().await, Ok(SessionEnd::Terminated));

    let out = psql(&server, "options='-c tenant_id=abc'", None, "STARTUP").await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("option.tenant_id | abc"), "{stdout}");
    assert!(stdout.contains("application_name | psql"), "{stdout}");
    assert_eq!(server.next_result().await, Ok(SessionEnd::Terminated));

    // sslmode=require cannot be satisfied: the client gives up after our 'N'.
    let out = psql(&server, "sslmode=require", None, "select 1").await;
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("server does not support SSL"), "{stderr}");
    assert_eq!(server.next_result().await, Ok(SessionEnd::ClientDisconnected));
}

#[tokio::test]
async fn psql_password_auth() {
    if !psql_available() {
        return;
    }
    let mut server = TestServer::start(TestAuth::Password, BackendConfig::default()).await;

    let out = psql(&server, "", Some(PASSWORD), "select yes").await;
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stdout).contains(" yes\n"));
    assert_eq!(server.next_result().await, Ok(SessionEnd::Terminated));

    let out = psql(&server, "", Some("nope"), "select yes").await;
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("FATAL:  password authentication failed for user \"alice\""), "{stderr}");
    assert!(server.next_result().await.is_err());
}
