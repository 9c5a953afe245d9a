//! `tokio-postgres` against the test server: simple queries, errors, auth, startup options.

use pq_proto::{BackendConfig, SessionEnd};
use tokio_postgres::{NoTls, SimpleQueryMessage};

use crate::harness::{TestAuth, TestServer, PASSWORD};

async fn connect(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

fn rows(msgs: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some((0..row.len()).map(|i| row.get(i).map(str::to_string)).collect()),
            _ => None,
        })
        .collect()
}

fn command_complete(msgs: &[SimpleQueryMessage]) -> Vec<u64> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn simple_queries_rows_and_errors() {
    let mut server = TestServer::start(TestAuth::Trust, BackendConfig::default()).await;
    let client = connect(&server.tokio_postgres_config("alice")).await.expect("connects");

    let msgs = client.simple_query("select 1").await.expect("select works");
    assert_eq!(rows(&msgs), vec![vec![Some("1".to_string())]]);
    assert_eq!(command_complete(&msgs), vec![1]);

    let msgs = client.simple_query("ROWS 5").await.expect("rows work");
    let got = rows(&msgs);
    assert_eq!(got.len(), 5);
    assert_eq!(got[1], vec![Some("1".to_string()), Some("row 1".to_string()), None]);
    assert_eq!(got[4][2].as_deref(), Some("even"));

    // An error is reported with its SQLSTATE, detail and hint, and the connection stays usable.
    let err = client.simple_query("ERROR").await.expect_err("ERROR fails");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "P0001");
    assert_eq!(db.message(), "you asked for an error");
    assert_eq!(db.detail(), Some("the ERROR command always fails"));
    assert_eq!(db.hint(), Some("try SELECT instead"));
    assert_eq!(db.severity(), "ERROR");

    let err = client.simple_query("ANYHOW").await.expect_err("ANYHOW fails");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "XX000");
    assert_eq!(db.message(), "reading layer: disk on fire");

    let err = client.simple_query("frobnicate").await.expect_err("unknown command");
    assert_eq!(err.as_db_error().expect("server error").code().code(), "42601");

    // Empty query: EmptyQueryResponse, no rows.
    let msgs = client.simple_query(" ; ").await.expect("empty query works");
    assert!(rows(&msgs).is_empty());

    // The extended protocol is refused with a clear error, and the session survives it.
    let err = client.query("select 1", &[]).await.expect_err("extended protocol");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "0A000");
    assert_eq!(db.message(), "extended query protocol is not supported");

    let msgs = client.simple_query("select again").await.expect("still usable");
    assert_eq!(rows(&msgs), vec![vec![Some("again".to_string())]]);

    drop(client);
    assert_eq!(server.next_result().await, Ok(SessionEnd::Terminated));
}

#[tokio::test]
async fn startup_parameters_and_options_reach_the_handler() {
    let mut server = TestServer::start(TestAuth::Trust, BackendConfig::default()).await;
    let mut config = server.tokio_postgres_config("bob");
    config
        .dbname("db1")
        .application_name("pq_proto_test")
        .options(r"-c tenant_id=3a9f --timeline-id=7f01 -c note=two\ words");
    let client = connect(&config).await.expect("connects");
    let msgs = client.simple_query("STARTUP").await.expect("startup works");
    let got: Vec<(String, String)> =
        rows(&msgs).into_iter().map(|r| (r[0].clone().unwrap_or_default(), r[1].clone().unwrap_or_default())).collect();
    let get = |k: &str| {
        got.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str()).unwrap_or_else(|| panic!("{k} missing from {got:?}"))
    };
    assert_eq!(get("user"), "bob");
    assert_eq!(get("database"), "db1");
    assert_eq!(get("application_name"), "pq_proto_test");
    assert_eq!(get("option.tenant_id"), "3a9f");
    assert_eq!(get("option.timeline_id"), "7f01");
    assert_eq!(get("option.note"), "two words");
    drop(client);
    assert_eq!(server.next_result().await, Ok(SessionEnd::Terminated));
}

#[tokio::test]
async fn cleartext_password_accepted_and_refused() {
    let mut server = TestServer::start(TestAuth::Password, BackendConfig::default()).await;

    let mut good = server.tokio_postgres_config("carol");
    good.password(PASSWORD);
    let client = connect(&good).await.expect("right password logs in");
    let msgs = client.simple_query("select ok").await.expect("query works");
    assert_eq!(rows(&msgs), vec![vec![Some("ok".to_string())]]);
    drop(client);
    assert_eq!(server.next_result().await, Ok(SessionEnd::Terminated));

    let mut bad = server.tokio_postgres_config("carol");
    bad.password("wrong");
    let err = connect(&bad).await.expect_err("wrong password is refused");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "28P01");
    assert_eq!(db.severity(), "FATAL");
    assert_eq!(db.message(), "password authentication failed for user \"carol\"");
    let result = server.next_result().await;
    assert!(result.as_ref().is_err_and(|e| e.contains("login refused")), "{result:?}");

    // Refused from the startup parameters alone, before any password.
    let err = connect(&server.tokio_postgres_config("banned")).await.expect_err("banned user is refused");
    assert_eq!(err.as_db_error().expect("server error").code().code(), "28000");
    assert!(server.next_result().await.is_err());
}
