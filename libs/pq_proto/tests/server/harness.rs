//! A small server built on `pq_proto`, and a raw protocol client to poke at it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use pq_proto::{
    AuthDecision, AuthHook, BackendConfig, CleartextPasswordAuth, ConnectionError, CopyMessage, FeMessage,
    FeStartupPacket, FieldDescription, PostgresBackend, QueryError, QueryHandler, SessionEnd, Severity, SqlState,
    StartupParams, TrustAuth, UserError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

pub const PASSWORD: &str = "s3cret";
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Commands understood by the test server:
/// * `select X` → one text column `?column?`, one row `X`
/// * `ROWS n` → columns (i int8, label text, maybe text) with NULL in odd rows
/// * `ERROR` → a user error with detail and hint
/// * `ANYHOW` → an internal (anyhow) error
/// * `NOTICE` → a notice, then `DO`
/// * `STARTUP` → (name, value) rows of startup params and parsed options (`option.NAME`)
/// * `COPYOUT n` → COPY OUT of `row i\n` lines
/// * `COPYBOTH` → COPY BOTH echoing every CopyData back
pub struct TestHandler;

impl QueryHandler for TestHandler {
    async fn process_query(&mut self, pgb: &mut PostgresBackend, query: &str) -> Result<(), QueryError> {
        let query = query.trim().trim_end_matches(';');
        let (command, arg) = query.split_once(' ').unwrap_or((query, ""));
        match command.to_ascii_uppercase().as_str() {
            "SELECT" => {
                pgb.write_row_set(&[FieldDescription::text("?column?")], [[Some(arg.trim().as_bytes())]]).await?;
            }
            "ROWS" => {
                let n: u64 = arg.parse().map_err(|_| UserError::syntax_error(format!("bad row count {arg:?}")))?;
                let rows = (0..n)
                    .map(|i| [Some(i.to_string()), Some(format!("row {i}")), (i % 2 == 0).then(|| "even".to_string())]);
                pgb.write_row_set(
                    &[FieldDescription::int8("i"), FieldDescription::text("label"), FieldDescription::text("maybe")],
                    rows,
                )
                .await?;
            }
            "ERROR" => {
                return Err(UserError::new(SqlState::new("P0001").expect("valid code"), "you asked for an error")
                    .with_detail("the ERROR command always fails")
                    .with_hint("try SELECT instead")
                    .into())
            }
            "ANYHOW" => {
                let e: anyhow::Result<()> =
                    Err(anyhow::anyhow!("disk on fire")).map_err(|e| e.context("reading layer"));
                e?;
            }
            "NOTICE" => {
                pgb.write_notice(
                    Severity::Notice,
                    &UserError::new(SqlState::SUCCESSFUL_COMPLETION, "just so you know"),
                )
                .await?;
                pgb.write_command_complete("DO").await?;
            }
            "STARTUP" => {
                let params = pgb.startup_params().ok_or_else(|| UserError::internal("no startup params"))?.clone();
                let mut rows: Vec<[Option<String>; 2]> =
                    params.iter().map(|(k, v)| [Some(k.to_string()), Some(v.to_string())]).collect();
                rows.extend(params.options().iter().map(|(k, v)| [Some(format!("option.{k}")), Some(v.clone())]));
                pgb.write_row_set(&[FieldDescription::text("name"), FieldDescription::text("value")], rows).await?;
            }
            "COPYOUT" => {
                let n: u64 = arg.parse().map_err(|_| UserError::syntax_error(format!("bad row count {arg:?}")))?;
                pgb.start_copy_out().await?;
                for i in 0..n {
                    pgb.write_copy_data(format!("row {i}\n").as_bytes()).await?;
                }
                pgb.finish_copy(&format!("COPY {n}")).await?;
            }
            "COPYBOTH" => {
                pgb.start_copy_both().await?;
                let mut echoed = 0u64;
                loop {
                    match pgb.read_copy_message().await? {
                        CopyMessage::Data(data) => {
                            pgb.write_copy_data(&data).await?;
                            pgb.flush().await?;
                            echoed += 1;
                        }
                        CopyMessage::Done => break,
                        CopyMessage::Fail(reason) => {
                            return Err(UserError::new(
                                SqlState::QUERY_CANCELED,
                                format!("COPY aborted by client: {reason}"),
                            )
                            .into())
                        }
                    }
                }
                pgb.finish_copy(&format!("COPY {echoed}")).await?;
            }
            _ => return Err(UserError::syntax_error(format!("unknown command {command:?}")).into()),
        }
        Ok(())
    }
}

/// Either trust or a fixed cleartext password, decided per server.
pub enum TestAuth {
    Trust,
    Password,
}

impl AuthHook for TestAuth {
    async fn on_startup(&self, params: &StartupParams) -> AuthDecision {
        if params.user() == "banned" {
            return AuthDecision::Reject(UserError::invalid_authorization(format!(
                "user \"{}\" may not connect",
                params.user()
            )));
        }
        match self {
            TestAuth::Trust => TrustAuth.on_startup(params).await,
            TestAuth::Password => AuthDecision::RequestCleartextPassword,
        }
    }

    async fn on_cleartext_password(&self, params: &StartupParams, password: &str) -> AuthDecision {
        CleartextPasswordAuth(|params: &StartupParams, password: &str| {
            if password == PASSWORD {
                Ok(())
            } else {
                Err(UserError::invalid_password(format!(
                    "password authentication failed for user \"{}\"",
                    params.user()
                )))
            }
        })
        .on_cleartext_password(params, password)
        .await
    }
}

/// Outcome of one server session, as seen by the listener.
pub type SessionResult = Result<SessionEnd, String>;

pub struct TestServer {
    pub addr: SocketAddr,
    pub results: mpsc::UnboundedReceiver<SessionResult>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    pub async fn start(auth: TestAuth, config: BackendConfig) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, results) = mpsc::unbounded_channel();
        let auth = Arc::new(auth);
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let auth = Arc::clone(&auth);
                let config = config.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let pgb = PostgresBackend::new(socket, config);
                    let result = pgb.run(&*auth, &mut TestHandler).await.map_err(|e: ConnectionError| e.to_string());
                    let _ = tx.send(result);
                });
            }
        });
        TestServer { addr, results, task }
    }

    /// The result of the next session to end.
    pub async fn next_result(&mut self) -> SessionResult {
        tokio::time::timeout(TIMEOUT, self.results.recv())
            .await
            .expect("a session ends in time")
            .expect("server still running")
    }

    pub fn tokio_postgres_config(&self, user: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config.host("127.0.0.1").port(self.addr.port()).user(user).connect_timeout(TIMEOUT);
        config
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One backend message: tag and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawMessage {
    pub tag: u8,
    pub body: Bytes,
}

impl RawMessage {
    /// Fields of an ErrorResponse/NoticeResponse as (code, value).
    pub fn error_fields(&self) -> Vec<(u8, String)> {
        let mut out = Vec::new();
        let mut body = &self.body[..];
        while let Some((&code, rest)) = body.split_first() {
            if code == 0 {
                break;
            }
            let end = rest.iter().position(|&b| b == 0).expect("terminated field");
            out.push((code, String::from_utf8_lossy(&rest[..end]).into_owned()));
            body = &rest[end + 1..];
        }
        out
    }

    pub fn error_field(&self, code: u8) -> Option<String> {
        self.error_fields().into_iter().find(|(c, _)| *c == code).map(|(_, v)| v)
    }

    /// The body as a NUL-terminated string (CommandComplete).
    pub fn cstr(&self) -> String {
        String::from_utf8_lossy(self.body.strip_suffix(b"\0").unwrap_or(&self.body)).into_owned()
    }
}

/// A hand-driven protocol client, for what real clients won't do (COPY BOTH, garbage bytes).
pub struct RawClient {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr).await.expect("connect");
        RawClient { stream, buf: BytesMut::new() }
    }

    /// Connects and logs in with trust auth, consuming messages up to ReadyForQuery.
    pub async fn login(addr: SocketAddr, pairs: &[(&str, &str)]) -> RawClient {
        let mut client = RawClient::connect(addr).await;
        client.send_startup(0, pairs).await;
        let msgs = client.recv_until_ready().await;
        assert_eq!(msgs.first().map(|m| m.tag), Some(b'R'), "{msgs:?}");
        client
    }

    pub async fn send_startup(&mut self, protocol_minor: u16, pairs: &[(&str, &str)]) {
        let params =
            StartupParams::from_pairs(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()))).expect("valid params");
        let mut buf = BytesMut::new();
        FeStartupPacket::Startup { protocol_minor, params }.write(&mut buf).expect("encodes");
        self.send_raw(&buf).await;
    }

    pub async fn send(&mut self, msg: FeMessage) {
        let mut buf = BytesMut::new();
        msg.write(&mut buf).expect("encodes");
        self.send_raw(&buf).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Next message, or `None` on EOF.
    pub async fn recv(&mut self) -> Option<RawMessage> {
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
                let total = 1 + usize::try_from(len).expect("sane length");
                if self.buf.len() >= total {
                    let mut frame = self.buf.split_to(total);
                    let tag = frame.get_u8();
                    frame.advance(4);
                    return Some(RawMessage { tag, body: frame.freeze() });
                }
            }
            let n = tokio::time::timeout(TIMEOUT, self.stream.read_buf(&mut self.buf))
                .await
                .expect("server answers in time")
                .unwrap_or(0);
            if n == 0 {
                assert!(self.buf.is_empty(), "EOF inside a message: {:?}", self.buf);
                return None;
            }
        }
    }

    pub async fn recv_expect(&mut self) -> RawMessage {
        self.recv().await.expect("a message before EOF")
    }

    /// One byte, as the answer to SSLRequest/GSSENCRequest.
    pub async fn recv_byte(&mut self) -> u8 {
        if self.buf.is_empty() {
            tokio::time::timeout(TIMEOUT, self.stream.read_buf(&mut self.buf))
                .await
                .expect("server answers in time")
                .expect("read");
        }
        assert!(!self.buf.is_empty(), "EOF instead of an answer byte");
        self.buf.get_u8()
    }

    /// Messages up to and including ReadyForQuery (or up to EOF).
    pub async fn recv_until_ready(&mut self) -> Vec<RawMessage> {
        let mut out = Vec::new();
        while let Some(m) = self.recv().await {
            let done = m.tag == b'Z';
            out.push(m);
            if done {
                break;
            }
        }
        out
    }

    /// Sends a simple query and collects the answer up to ReadyForQuery.
    pub async fn query(&mut self, q: &str) -> Vec<RawMessage> {
        self.send(FeMessage::Query(q.to_string())).await;
        self.recv_until_ready().await
    }
}

pub fn tags(msgs: &[RawMessage]) -> String {
    msgs.iter().map(|m| m.tag as char).collect()
}
