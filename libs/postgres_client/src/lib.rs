//! Client side of the Postgres wire protocol, for what `tokio-postgres` does not do: replication
//! connections and COPY BOTH streams (walproposer → Postgres and → safekeepers, pageserver →
//! safekeepers, safekeeper → peers), plus simple queries on the same connection.
//!
//! Message encoding and parsing come from `postgres-protocol`; this crate adds the connection
//! flow (startup, authentication, simple query, COPY BOTH) and bounds on what it reads.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::backend::{ErrorFields, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest message we accept from a server (WAL messages are at most a few hundred KiB).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("connection to {addr} timed out after {timeout:?}")]
    ConnectTimeout { addr: String, timeout: Duration },
    #[error("I/O error talking to {addr}: {source}")]
    Io { addr: String, source: std::io::Error },
    #[error("{addr} closed the connection")]
    Closed { addr: String },
    #[error("{addr} answered: {severity} {code}: {message}{}", detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Server { addr: String, severity: String, code: String, message: String, detail: Option<String> },
    #[error("protocol error from {addr}: {what}")]
    Protocol { addr: String, what: String },
    #[error("{addr} does not offer TLS, and this client refuses to talk to it in plain text: give that server a certificate (ssl_cert_file / --ssl-cert-file) or drop the CA from this client's config")]
    TlsRefused { addr: String },
    #[error("TLS handshake with {addr} failed: {source} (is the server's certificate signed by the configured CA and issued for '{host}'?)")]
    Tls { addr: String, host: String, source: std::io::Error },
}

impl ClientError {
    /// The SQLSTATE when the server refused with an ErrorResponse.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ClientError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// How to reach and log in to a server. `Debug` never shows the password (a JWT when auth is
/// on).
#[derive(Clone)]
pub struct ConnectConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: Option<String>,
    pub password: Option<String>,
    /// `replication` startup parameter: `Some("true")` for a physical replication connection.
    pub replication: Option<String>,
    pub application_name: Option<String>,
    /// `-c key=value` switches sent in the `options` startup parameter.
    pub options: Vec<(String, String)>,
    pub connect_timeout: Duration,
    /// When set, the connection is TLS-only: SSLRequest first, the server's certificate checked
    /// against the CA and `host` (libpq's `sslmode=verify-full`); a server without TLS is refused.
    pub tls: Option<utils::tls::TlsConnector>,
}

impl std::fmt::Debug for ConnectConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("dbname", &self.dbname)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("replication", &self.replication)
            .field("application_name", &self.application_name)
            .field("options", &self.options)
            .field("connect_timeout", &self.connect_timeout)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl ConnectConfig {
    pub fn new(host: impl Into<String>, port: u16, user: impl Into<String>) -> Self {
        ConnectConfig {
            host: host.into(),
            port,
            user: user.into(),
            dbname: None,
            password: None,
            replication: None,
            application_name: None,
            options: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            tls: None,
        }
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Escapes a value for the `options` startup parameter (spaces and backslashes).
fn escape_option(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        if c == ' ' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s
}

/// A connected, authenticated session.
pub struct Client {
    addr: String,
    read: MessageReader,
    write: MessageWriter,
}

type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// Reads backend messages from one half of the connection (TCP or TLS).
pub struct MessageReader {
    addr: String,
    sock: ReadHalf,
    buf: BytesMut,
}

/// Writes frontend messages to the other half.
pub struct MessageWriter {
    addr: String,
    sock: WriteHalf,
    buf: BytesMut,
}

/// Upgrades a fresh connection to TLS: SSLRequest, the server's one-byte answer, the handshake.
async fn start_tls(
    mut sock: TcpStream,
    tls: &utils::tls::TlsConnector,
    host: &str,
    addr: &str,
) -> Result<(ReadHalf, WriteHalf), ClientError> {
    let io = |e| ClientError::Io { addr: addr.to_string(), source: e };
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    sock.write_all(&request).await.map_err(io)?;
    let mut answer = [0u8; 1];
    match sock.read(&mut answer).await.map_err(io)? {
        0 => return Err(ClientError::Closed { addr: addr.to_string() }),
        _ if answer[0] == b'S' => {}
        _ if answer[0] == b'N' => return Err(ClientError::TlsRefused { addr: addr.to_string() }),
        _ => {
            return Err(ClientError::Protocol {
                addr: addr.to_string(),
                what: format!("answered SSLRequest with {:?}", answer[0] as char),
            })
        }
    }
    let stream = tls.connect(host, sock).await.map_err(|e| ClientError::Tls {
        addr: addr.to_string(),
        host: host.to_string(),
        source: e,
    })?;
    let (r, w) = tokio::io::split(stream);
    Ok((Box::new(r), Box::new(w)))
}

fn server_error(addr: &str, mut fields: ErrorFields<'_>) -> ClientError {
    use postgres_protocol::message::backend::ErrorField;
    let (mut severity, mut code, mut message, mut detail) = (String::new(), String::new(), String::new(), None);
    loop {
        let field: Result<Option<ErrorField<'_>>, _> = fallible_next(&mut fields);
        match field {
            Ok(Some(f)) => match f.type_() {
                b'S' => severity = String::from_utf8_lossy(f.value_bytes()).into_owned(),
                b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
                b'M' => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
                b'D' => detail = Some(String::from_utf8_lossy(f.value_bytes()).into_owned()),
                _ => {}
            },
            _ => break,
        }
    }
    ClientError::Server { addr: addr.to_string(), severity, code, message, detail }
}

fn fallible_next<'a>(
    f: &mut ErrorFields<'a>,
) -> std::io::Result<Option<postgres_protocol::message::backend::ErrorField<'a>>> {
    use fallible_iterator::FallibleIterator;
    f.next()
}

/// A message as this client sees it: `postgres-protocol` does not parse CopyBothResponse.
pub enum BackendMessage {
    CopyBothResponse,
    Other(Message),
}

impl MessageReader {
    pub async fn read(&mut self) -> Result<BackendMessage, ClientError> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
                if !(4..=MAX_MESSAGE_BYTES).contains(&len) {
                    return Err(self.protocol(format!("message '{}' of {len} bytes", self.buf[0] as char)));
                }
                if self.buf.len() > len {
                    if self.buf[0] == b'W' {
                        self.buf.advance(len + 1);
                        return Ok(BackendMessage::CopyBothResponse);
                    }
                    return match Message::parse(&mut self.buf) {
                        Ok(Some(m)) => Ok(BackendMessage::Other(m)),
                        Ok(None) => Err(self.protocol("incomplete message after its length was read".into())),
                        Err(e) => Err(self.protocol(e.to_string())),
                    };
                }
                self.buf.reserve(len + 1 - self.buf.len());
            } else {
                self.buf.reserve(4096);
            }
            let n = self
                .sock
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| ClientError::Io { addr: self.addr.clone(), source: e })?;
            if n == 0 {
                return Err(ClientError::Closed { addr: self.addr.clone() });
            }
        }
    }

    fn protocol(&self, what: String) -> ClientError {
        ClientError::Protocol { addr: self.addr.clone(), what }
    }

    /// Reads messages until one is not a notice or parameter status.
    async fn read_significant(&mut self) -> Result<BackendMessage, ClientError> {
        loop {
            match self.read().await? {
                BackendMessage::Other(Message::NoticeResponse(_))
                | BackendMessage::Other(Message::ParameterStatus(_)) => continue,
                BackendMessage::Other(Message::ErrorResponse(e)) => return Err(server_error(&self.addr, e.fields())),
                m => return Ok(m),
            }
        }
    }
}

impl MessageWriter {
    async fn flush(&mut self) -> Result<(), ClientError> {
        // flush: TLS may hold the last record until asked (a no-op on plain TCP).
        let r = match self.sock.write_all(&self.buf).await {
            Ok(()) => self.sock.flush().await,
            Err(e) => Err(e),
        };
        self.buf.clear();
        r.map_err(|e| ClientError::Io { addr: self.addr.clone(), source: e })
    }

    fn encode_err(&self, e: std::io::Error) -> ClientError {
        ClientError::Protocol { addr: self.addr.clone(), what: format!("cannot encode message: {e}") }
    }
}

impl Client {
    pub async fn connect(cfg: &ConnectConfig) -> Result<Client, ClientError> {
        let addr = cfg.addr();
        let sock =
            match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect((cfg.host.as_str(), cfg.port))).await {
                Err(_) => return Err(ClientError::ConnectTimeout { addr, timeout: cfg.connect_timeout }),
                Ok(Err(e)) => return Err(ClientError::Connect { addr, source: e }),
                Ok(Ok(s)) => s,
            };
        let _ = sock.set_nodelay(true);
        let (r, w): (ReadHalf, WriteHalf) = match &cfg.tls {
            Some(tls) => {
                match tokio::time::timeout(cfg.connect_timeout, start_tls(sock, tls, &cfg.host, &addr)).await {
                    Err(_) => return Err(ClientError::ConnectTimeout { addr, timeout: cfg.connect_timeout }),
                    Ok(r) => r?,
                }
            }
            None => {
                let (r, w) = sock.into_split();
                (Box::new(r), Box::new(w))
            }
        };
        let mut c = Client {
            addr: addr.clone(),
            read: MessageReader { addr: addr.clone(), sock: r, buf: BytesMut::with_capacity(8192) },
            write: MessageWriter { addr, sock: w, buf: BytesMut::with_capacity(8192) },
        };
        match tokio::time::timeout(cfg.connect_timeout, c.startup(cfg)).await {
            Err(_) => Err(ClientError::ConnectTimeout { addr: c.addr.clone(), timeout: cfg.connect_timeout }),
            Ok(r) => r.map(|_| c),
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    async fn startup(&mut self, cfg: &ConnectConfig) -> Result<(), ClientError> {
        let mut params: Vec<(&str, String)> = vec![("user", cfg.user.clone())];
        if let Some(db) = &cfg.dbname {
            params.push(("database", db.clone()));
        }
        if let Some(r) = &cfg.replication {
            params.push(("replication", r.clone()));
        }
        if let Some(a) = &cfg.application_name {
            params.push(("application_name", a.clone()));
        }
        if !cfg.options.is_empty() {
            let opts: Vec<String> =
                cfg.options.iter().map(|(k, v)| format!("-c {}={}", escape_option(k), escape_option(v))).collect();
            params.push(("options", opts.join(" ")));
        }
        frontend::startup_message(params.iter().map(|(k, v)| (*k, v.as_str())), &mut self.write.buf)
            .map_err(|e| self.write.encode_err(e))?;
        self.write.flush().await?;
        let addr = self.addr.clone();
        let password = || {
            cfg.password.clone().ok_or_else(|| ClientError::Protocol {
                addr: addr.clone(),
                what: "the server asks for a password and none was configured".into(),
            })
        };
        loop {
            match self.read.read_significant().await? {
                BackendMessage::Other(Message::AuthenticationOk) => {}
                BackendMessage::Other(Message::AuthenticationCleartextPassword) => {
                    let p = password()?;
                    frontend::password_message(p.as_bytes(), &mut self.write.buf)
                        .map_err(|e| self.write.encode_err(e))?;
                    self.write.flush().await?;
                }
                BackendMessage::Other(Message::AuthenticationMd5Password(body)) => {
                    let p = password()?;
                    let hash =
                        postgres_protocol::authentication::md5_hash(cfg.user.as_bytes(), p.as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.write.buf)
                        .map_err(|e| self.write.encode_err(e))?;
                    self.write.flush().await?;
                }
                BackendMessage::Other(Message::AuthenticationSasl(_)) => {
                    let p = password()?;
                    self.scram(p.as_bytes()).await?;
                }
                BackendMessage::Other(Message::BackendKeyData(_)) => {}
                BackendMessage::Other(Message::ReadyForQuery(_)) => return Ok(()),
                _ => return Err(self.read.protocol("unexpected message during startup".into())),
            }
        }
    }

    async fn scram(&mut self, password: &[u8]) -> Result<(), ClientError> {
        let mut scram = ScramSha256::new(password, ChannelBinding::unsupported());
        frontend::sasl_initial_response(SCRAM_SHA_256, scram.message(), &mut self.write.buf)
            .map_err(|e| self.write.encode_err(e))?;
        self.write.flush().await?;
        match self.read.read_significant().await? {
            BackendMessage::Other(Message::AuthenticationSaslContinue(b)) => {
                scram.update(b.data()).map_err(|e| self.read.protocol(format!("SCRAM: {e}")))?
            }
            _ => return Err(self.read.protocol("expected SASL continue".into())),
        }
        frontend::sasl_response(scram.message(), &mut self.write.buf).map_err(|e| self.write.encode_err(e))?;
        self.write.flush().await?;
        match self.read.read_significant().await? {
            BackendMessage::Other(Message::AuthenticationSaslFinal(b)) => {
                scram.finish(b.data()).map_err(|e| self.read.protocol(format!("SCRAM: {e}")))
            }
            _ => Err(self.read.protocol("expected SASL final".into())),
        }
    }

    /// Runs one simple query; returns the rows of its (last) result as text.
    pub async fn simple_query(&mut self, query: &str) -> Result<Vec<Vec<Option<String>>>, ClientError> {
        frontend::query(query, &mut self.write.buf).map_err(|e| self.write.encode_err(e))?;
        self.write.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let m = match self.read.read().await? {
                BackendMessage::Other(m) => m,
                BackendMessage::CopyBothResponse => return Err(self.read.protocol("unexpected COPY BOTH".into())),
            };
            match m {
                Message::RowDescription(_) => rows.clear(),
                Message::DataRow(r) => {
                    use fallible_iterator::FallibleIterator;
                    let buf = r.buffer();
                    let cells: Vec<Option<String>> = r
                        .ranges()
                        .map(|range| Ok(range.map(|rg| String::from_utf8_lossy(&buf[rg]).into_owned())))
                        .collect()
                        .map_err(|e: std::io::Error| self.read.protocol(e.to_string()))?;
                    rows.push(cells);
                }
                Message::ErrorResponse(e) => error = Some(server_error(&self.addr, e.fields())),
                Message::ReadyForQuery(_) => return error.map_or(Ok(rows), Err),
                _ => {}
            }
        }
    }

    /// Sends `query` (e.g. `basebackup ...`) and reads its COPY OUT stream to the end.
    /// `max_bytes` bounds what we accept.
    pub async fn copy_out_to_vec(&mut self, query: &str, max_bytes: usize) -> Result<Vec<u8>, ClientError> {
        frontend::query(query, &mut self.write.buf).map_err(|e| self.write.encode_err(e))?;
        self.write.flush().await?;
        let mut out = Vec::new();
        let mut error = None;
        loop {
            match self.read.read().await? {
                BackendMessage::Other(Message::CopyData(d)) => {
                    if out.len() + d.data().len() > max_bytes {
                        return Err(self.read.protocol(format!("'{query}' sent more than {max_bytes} bytes")));
                    }
                    out.extend_from_slice(d.data());
                }
                BackendMessage::Other(Message::ErrorResponse(e)) => error = Some(server_error(&self.addr, e.fields())),
                BackendMessage::Other(Message::ReadyForQuery(_)) => return error.map_or(Ok(out), Err),
                BackendMessage::CopyBothResponse => return Err(self.read.protocol("unexpected COPY BOTH".into())),
                _ => {}
            }
        }
    }

    /// Sends `query` (e.g. `START_REPLICATION ...`) and enters COPY BOTH mode.
    pub async fn copy_both(mut self, query: &str) -> Result<(CopyBothReader, CopyBothWriter), ClientError> {
        frontend::query(query, &mut self.write.buf).map_err(|e| self.write.encode_err(e))?;
        self.write.flush().await?;
        loop {
            match self.read.read_significant().await? {
                BackendMessage::CopyBothResponse => break,
                // Replication commands may answer with a result set before streaming.
                BackendMessage::Other(Message::RowDescription(_))
                | BackendMessage::Other(Message::DataRow(_))
                | BackendMessage::Other(Message::CommandComplete(_)) => continue,
                BackendMessage::Other(Message::ReadyForQuery(_)) => {
                    return Err(self.read.protocol(format!("'{query}' finished without streaming")))
                }
                _ => return Err(self.read.protocol(format!("unexpected answer to '{query}'"))),
            }
        }
        Ok((CopyBothReader { r: self.read }, CopyBothWriter { w: self.write }))
    }
}

/// Incoming half of a COPY BOTH stream.
pub struct CopyBothReader {
    r: MessageReader,
}

impl CopyBothReader {
    /// The next CopyData payload; `None` when the server ended the stream (CopyDone, or the
    /// command completed).
    pub async fn next(&mut self) -> Result<Option<Bytes>, ClientError> {
        match self.r.read_significant().await? {
            BackendMessage::Other(Message::CopyData(d)) => Ok(Some(d.into_bytes())),
            BackendMessage::Other(Message::CopyDone)
            | BackendMessage::Other(Message::CommandComplete(_))
            | BackendMessage::Other(Message::ReadyForQuery(_)) => Ok(None),
            _ => Err(self.r.protocol("unexpected message in COPY BOTH".into())),
        }
    }

    pub fn addr(&self) -> &str {
        &self.r.addr
    }
}

/// Outgoing half of a COPY BOTH stream.
pub struct CopyBothWriter {
    w: MessageWriter,
}

impl CopyBothWriter {
    pub async fn send(&mut self, data: &[u8]) -> Result<(), ClientError> {
        frontend::CopyData::new(data).map_err(|e| self.w.encode_err(e))?.write(&mut self.w.buf);
        self.w.flush().await
    }

    /// Ends our side of the stream.
    pub async fn done(&mut self) -> Result<(), ClientError> {
        frontend::copy_done(&mut self.w.buf);
        self.w.flush().await
    }

    pub fn addr(&self) -> &str {
        &self.w.addr
    }
}

#[cfg(test)]
mod debug_tests {
    use super::*;

    #[test]
    fn debug_hides_the_password() {
        let mut c = ConnectConfig::new("h", 1, "u");
        c.password = Some("secret-token".into());
        let d = format!("{c:?}");
        assert!(!d.contains("secret-token") && d.contains("<redacted>"), "{d}");
    }
}

#[cfg(test)]
mod tls_tests {
    use super::*;
    use pq_proto::backend::{BackendConfig, PostgresBackend, QueryHandler, TlsAcceptor, TrustAuth};
    use std::sync::Arc;

    struct Echo;
    impl QueryHandler for Echo {
        async fn process_query(&mut self, pgb: &mut PostgresBackend, query: &str) -> Result<(), pq_proto::QueryError> {
            pgb.write_row_set(&[pq_proto::FieldDescription::text("q")], [[Some(query.to_string())]]).await?;
            Ok(())
        }
    }

    /// A libpq server on a free port; with `tls`, it offers TLS with that certificate.
    async fn server(tls: Option<(&std::path::Path, &std::path::Path)>) -> u16 {
        let acceptor: Option<Arc<dyn TlsAcceptor>> =
            tls.map(|(c, k)| Arc::new(pq_proto::RustlsAcceptor::from_pem_files(c, k).expect("acceptor")) as _);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            loop {
                let (sock, _) = listener.accept().await.expect("accept");
                let config = BackendConfig { tls: acceptor.clone(), ..BackendConfig::default() };
                tokio::spawn(async move {
                    let _ = PostgresBackend::new(sock, config).run(&TrustAuth, &mut Echo).await;
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn tls_connections_verify_the_server_and_never_fall_back_to_plaintext() {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = utils::tls::test_certs::make(dir.path());
        let tls_port = server(Some((&certs.cert, &certs.key))).await;
        let plain_port = server(None).await;
        let connector = utils::tls::TlsConnector::from_ca_file(&certs.ca).expect("connector");

        let mut cfg = ConnectConfig::new("localhost", tls_port, "u");
        cfg.tls = Some(connector.clone());
        let mut c = Client::connect(&cfg).await.expect("TLS connect");
        let rows = c.simple_query("hello over tls").await.expect("query");
        assert_eq!(rows, vec![vec![Some("hello over tls".to_string())]]);
        // Several round trips on the same connection (the writer must flush each message).
        for i in 0..20 {
            let q = format!("q{i}");
            assert_eq!(c.simple_query(&q).await.expect("query")[0][0].as_deref(), Some(q.as_str()));
        }

        // A server that does not offer TLS is refused, not used in plain text.
        let mut cfg = ConnectConfig::new("localhost", plain_port, "u");
        cfg.tls = Some(connector.clone());
        let err = Client::connect(&cfg).await.err().expect("plaintext server refused");
        assert!(matches!(err, ClientError::TlsRefused { .. }), "{err}");

        // A CA that did not sign the server's certificate is refused (names: utils::tls tests).
        let other_dir = tempfile::tempdir().expect("tempdir");
        let other = utils::tls::test_certs::make(other_dir.path());
        let mut cfg = ConnectConfig::new("localhost", tls_port, "u");
        cfg.tls = Some(utils::tls::TlsConnector::from_ca_file(&other.ca).expect("connector"));
        let err = Client::connect(&cfg).await.err().expect("other CA");
        assert!(
            matches!(err, ClientError::Tls { .. }) && err.to_string().contains("invalid peer certificate"),
            "{err}"
        );
    }
}
