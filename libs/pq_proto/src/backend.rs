//! The connection state machine: startup and encryption negotiation, authentication, the simple
//! query loop, and COPY OUT / COPY BOTH sub-protocols, over any async byte stream.
//!
//! The stream is type-erased ([`BoxedStream`]) so that a TLS upgrade can replace it mid-handshake
//! with a different type, and so handlers need not be generic over the transport.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info, warn};

use crate::error::{ConnectionError, ProtocolError, QueryError, UserError};
use crate::messages::{
    self, frame_len, protocol_error_to_user, BeMessage, CancelKey, FeMessage, FieldDescription, Format, MessageLimits,
    Severity, TransactionStatus, HEADER_LEN_BYTES,
};
use crate::startup::{startup_frame_len, FeStartupPacket, StartupParams};

/// Anything we can speak the protocol over: TCP, TLS, an in-memory duplex in tests.
pub trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncStream for T {}

pub type BoxedStream = Box<dyn AsyncStream>;
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Upgrades the connection to TLS after we answered `S` to an SSLRequest. Without one, SSLRequest
/// is refused with `N` and the client may continue in plaintext (libpq `sslmode=prefer`).
pub trait TlsAcceptor: Send + Sync {
    /// Runs the TLS handshake over `stream` and returns the encrypted stream.
    fn accept(&self, stream: BoxedStream) -> BoxFuture<'static, io::Result<BoxedStream>>;
}

/// How to answer the login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthDecision {
    Accept,
    /// Send AuthenticationCleartextPassword; the answer goes to
    /// [`AuthHook::on_cleartext_password`]. (A JWT sent as the password travels this way.)
    RequestCleartextPassword,
    /// Refuse with this error (use 28P01 for a bad password, 28000 otherwise), sent as FATAL.
    Reject(UserError),
}

/// Decides whether a client may log in.
pub trait AuthHook: Send + Sync {
    /// Called once with the startup parameters.
    fn on_startup(&self, params: &StartupParams) -> impl Future<Output = AuthDecision> + Send;

    /// Called with the password the client sent after `on_startup` asked for it. Returning
    /// `RequestCleartextPassword` again is treated as a refusal.
    fn on_cleartext_password(
        &self,
        _params: &StartupParams,
        _password: &str,
    ) -> impl Future<Output = AuthDecision> + Send {
        std::future::ready(AuthDecision::Reject(UserError::internal(
            "server asked for a password but has no way to check it",
        )))
    }
}

/// Lets everyone in (tests, trusted local sockets).
#[derive(Debug, Clone, Copy, Default)]
pub struct TrustAuth;

impl AuthHook for TrustAuth {
    fn on_startup(&self, _params: &StartupParams) -> impl Future<Output = AuthDecision> + Send {
        std::future::ready(AuthDecision::Accept)
    }
}

/// Always asks for a cleartext password and checks it with a closure, e.g. JWT validation.
pub struct CleartextPasswordAuth<F>(pub F);

impl<F> AuthHook for CleartextPasswordAuth<F>
where
    F: Fn(&StartupParams, &str) -> Result<(), UserError> + Send + Sync,
{
    fn on_startup(&self, _params: &StartupParams) -> impl Future<Output = AuthDecision> + Send {
        std::future::ready(AuthDecision::RequestCleartextPassword)
    }

    fn on_cleartext_password(
        &self,
        params: &StartupParams,
        password: &str,
    ) -> impl Future<Output = AuthDecision> + Send {
        std::future::ready(match (self.0)(params, password) {
            Ok(()) => AuthDecision::Accept,
            Err(e) => AuthDecision::Reject(e),
        })
    }
}

/// Runs the commands of a session.
pub trait QueryHandler: Send {
    /// Handles one simple-query string (never empty: empty queries are answered for you).
    ///
    /// On `Ok`, the handler must have completed the command: sent CommandComplete (e.g. via
    /// [`PostgresBackend::write_row_set`] or [`PostgresBackend::finish_copy`]). On
    /// `Err(QueryError::User)`, the error is sent and the session goes on; ReadyForQuery follows
    /// either way.
    fn process_query(
        &mut self,
        pgb: &mut PostgresBackend,
        query: &str,
    ) -> impl Future<Output = Result<(), QueryError>> + Send;
}

/// Settings of one connection.
#[derive(Clone)]
pub struct BackendConfig {
    pub limits: MessageLimits,
    /// Buffered output is written out once it exceeds this, so streaming large results does not
    /// grow the buffer without bound.
    pub write_buffer_flush_threshold_bytes: usize,
    /// ParameterStatus messages sent after login. Clients such as psql expect at least
    /// `server_version`.
    pub parameter_status: Vec<(String, String)>,
    /// Sent as BackendKeyData if set; cancellation is the caller's business (see
    /// [`SessionEnd::CancelRequested`]).
    pub backend_key: Option<CancelKey>,
    /// TLS upgrade for SSLRequest; `None` refuses TLS.
    pub tls: Option<Arc<dyn TlsAcceptor>>,
    /// Refuse a StartupMessage that did not come over TLS (DESIGN D9: once a listener has a
    /// certificate, passwords and tokens must not travel in the clear). Set it together with
    /// `tls`; alone it refuses every login. CancelRequest is still accepted in plaintext, as
    /// Postgres does: libpq before 17 always sends it unencrypted, and it carries only a
    /// one-connection key, no credentials.
    pub require_tls: bool,
}

impl Default for BackendConfig {
    fn default() -> Self {
        let status = [
            ("server_version", "15.0"),
            ("server_encoding", "UTF8"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("integer_datetimes", "on"),
            ("standard_conforming_strings", "on"),
        ];
        BackendConfig {
            limits: MessageLimits::default(),
            write_buffer_flush_threshold_bytes: 64 << 10,
            parameter_status: status.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            backend_key: None,
            tls: None,
            require_tls: false,
        }
    }
}

impl fmt::Debug for BackendConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendConfig")
            .field("limits", &self.limits)
            .field("write_buffer_flush_threshold_bytes", &self.write_buffer_flush_threshold_bytes)
            .field("parameter_status", &self.parameter_status)
            .field("backend_key", &self.backend_key.is_some())
            .field("tls", &self.tls.is_some())
            .field("require_tls", &self.require_tls)
            .finish()
    }
}

/// How a session ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The client sent Terminate.
    Terminated,
    /// The client went away (EOF, reset) at any point; not an error.
    ClientDisconnected,
    /// The connection was a CancelRequest for the session holding this key.
    CancelRequested(CancelKey),
}

/// Result of [`PostgresBackend::handshake`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// Logged in; ReadyForQuery was sent.
    Ready,
    /// The connection ended during the handshake without error.
    Ended(SessionEnd),
}

/// A message received during COPY BOTH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyMessage {
    Data(Bytes),
    /// The client finished its half of the stream. Call [`PostgresBackend::finish_copy`].
    Done,
    /// The client aborted COPY with this message. COPY mode is over; the handler should return
    /// an error, which the client expects.
    Fail(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyState {
    None,
    Out,
    Both { client_done: bool, server_done: bool },
}

/// At most this many SSLRequest/GSSENCRequest before the real startup; libpq sends at most two.
const MAX_ENCRYPTION_NEGOTIATIONS: usize = 2;
/// Minimum room made in the read buffer before each read, so small messages arrive in batches.
const READ_CHUNK_BYTES: usize = 8 << 10;

/// The server end of one client connection.
pub struct PostgresBackend {
    stream: BoxedStream,
    read_buf: BytesMut,
    write_buf: BytesMut,
    config: BackendConfig,
    startup: Option<StartupParams>,
    copy: CopyState,
    tls_active: bool,
    /// After an extended-protocol message was refused, further ones are skipped until Sync, as
    /// Postgres does after an error, so the client sees one error per pipeline.
    skipping_until_sync: bool,
}

impl fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("startup", &self.startup)
            .field("copy", &self.copy)
            .field("tls_active", &self.tls_active)
            .finish_non_exhaustive()
    }
}

impl PostgresBackend {
    pub fn new(stream: impl AsyncStream + 'static, config: BackendConfig) -> Self {
        PostgresBackend {
            stream: Box::new(stream),
            read_buf: BytesMut::with_capacity(READ_CHUNK_BYTES),
            write_buf: BytesMut::with_capacity(READ_CHUNK_BYTES),
            config,
            startup: None,
            copy: CopyState::None,
            tls_active: false,
            skipping_until_sync: false,
        }
    }

    /// Startup parameters, once the handshake has read them.
    pub fn startup_params(&self) -> Option<&StartupParams> {
        self.startup.as_ref()
    }

    pub fn is_tls(&self) -> bool {
        self.tls_active
    }

    /// Capacity of the read buffer: lets tests check that hostile length fields did not make
    /// us allocate.
    pub fn read_buffer_capacity_bytes(&self) -> usize {
        self.read_buf.capacity()
    }

    /// The whole session: handshake, then queries until the client leaves.
    ///
    /// Client disconnects end it with `Ok`. Protocol errors are reported to the client as FATAL
    /// before returning `Err`.
    pub async fn run(
        mut self,
        auth: &impl AuthHook,
        handler: &mut impl QueryHandler,
    ) -> Result<SessionEnd, ConnectionError> {
        match self.handshake(auth).await? {
            Handshake::Ready => self.serve_queries(handler).await,
            Handshake::Ended(end) => Ok(end),
        }
    }

    /// Reads the startup packet (answering encryption requests), authenticates, and sends the
    /// login answer up to the first ReadyForQuery. Use directly when the choice of handler
    /// depends on the startup parameters.
    pub async fn handshake(&mut self, auth: &impl AuthHook) -> Result<Handshake, ConnectionError> {
        match self.handshake_inner(auth).await {
            Ok(h) => Ok(h),
            Err(e) => self.end_with_error(e).await.map(Handshake::Ended),
        }
    }

    /// The simple-query loop, after a successful [`handshake`](Self::handshake).
    pub async fn serve_queries(&mut self, handler: &mut impl QueryHandler) -> Result<SessionEnd, ConnectionError> {
        if self.startup.is_none() {
            return Err(ConnectionError::Misuse("serve_queries called before a successful handshake"));
        }
        match self.query_loop(handler).await {
            Ok(end) => {
                debug!(?end, "session ended");
                Ok(end)
            }
            Err(e) => self.end_with_error(e).await,
        }
    }

    /// Turns client disconnects into a quiet `Ok`, and tells the client about protocol errors
    /// before the connection is dropped.
    async fn end_with_error(&mut self, e: ConnectionError) -> Result<SessionEnd, ConnectionError> {
        if e.is_client_disconnect() {
            info!("client disconnected: {e}");
            return Ok(SessionEnd::ClientDisconnected);
        }
        let last_words = match &e {
            ConnectionError::Protocol(p) => Some(protocol_error_to_user(p)),
            // A handler bug: the client deserves to know the session is over and why.
            ConnectionError::Misuse(what) => Some(UserError::internal(format!("internal server error: {what}"))),
            _ => None,
        };
        if let Some(user_error) = last_words {
            debug!("closing connection after error: {e}");
            // Best effort: the peer may be gone or misbehaving; the original error matters more.
            if self
                .write_message(&BeMessage::ErrorResponse { severity: Severity::Fatal, error: &user_error })
                .await
                .is_ok()
            {
                let _ = self.flush().await;
            }
        }
        Err(e)
    }

    async fn handshake_inner(&mut self, auth: &impl AuthHook) -> Result<Handshake, ConnectionError> {
        let mut negotiations = 0;
        let (protocol_minor, params) = loop {
            let Some(packet) = self.read_startup_packet().await? else {
                // Port scanners and health checks connect and leave without a word.
                debug!("client disconnected before sending a startup packet");
                return Ok(Handshake::Ended(SessionEnd::ClientDisconnected));
            };
            match packet {
                FeStartupPacket::SslRequest | FeStartupPacket::GssEncRequest => {
                    negotiations += 1;
                    if negotiations > MAX_ENCRYPTION_NEGOTIATIONS || self.tls_active {
                        return Err(
                            ProtocolError::BadStartup("encryption requested again after negotiation".into()).into()
                        );
                    }
                    let is_ssl = packet == FeStartupPacket::SslRequest;
                    self.negotiate_encryption(is_ssl).await?;
                }
                FeStartupPacket::CancelRequest(key) => {
                    debug!(process_id = key.process_id, "cancel request received");
                    return Ok(Handshake::Ended(SessionEnd::CancelRequested(key)));
                }
                FeStartupPacket::Startup { protocol_minor, params } => break (protocol_minor, params),
            }
        };
        if self.config.require_tls && !self.tls_active {
            // The client may already have sent a password-less startup with its user name; it
            // gets one error it can act on and nothing else (no auth exchange, no parameters).
            let error = UserError::invalid_authorization(
                "this server requires TLS: connect with sslmode=verify-full (or require)",
            );
            info!(
                user = params.user(),
                database = params.database(),
                "refused a plaintext connection: TLS is required"
            );
            self.write_message(&BeMessage::ErrorResponse { severity: Severity::Fatal, error: &error }).await?;
            self.flush().await?;
            return Err(ConnectionError::AuthRejected(error));
        }
        let extensions = params.protocol_extensions();
        if protocol_minor > 0 || !extensions.is_empty() {
            self.write_message(&BeMessage::NegotiateProtocolVersion {
                newest_minor: 0,
                unrecognized_options: &extensions,
            })
            .await?;
        }

        let mut decision = auth.on_startup(&params).await;
        if decision == AuthDecision::RequestCleartextPassword {
            self.write_message(&BeMessage::AuthenticationCleartextPassword).await?;
            self.flush().await?;
            let Some(password) = self.read_password().await? else {
                debug!("client disconnected while asked for a password");
                return Ok(Handshake::Ended(SessionEnd::ClientDisconnected));
            };
            decision = auth.on_cleartext_password(&params, &password).await;
        }
        let refusal = match decision {
            AuthDecision::Accept => None,
            // on_startup may only ask once; on_cleartext_password's answer was mapped above.
            AuthDecision::RequestCleartextPassword => {
                Some(UserError::internal("authentication asked for a password twice"))
            }
            AuthDecision::Reject(error) => Some(error),
        };
        if let Some(error) = refusal {
            warn!(
                user = params.user(),
                database = params.database(),
                code = %error.code,
                "login refused: {}",
                error.message
            );
            self.write_message(&BeMessage::ErrorResponse { severity: Severity::Fatal, error: &error }).await?;
            self.flush().await?;
            return Err(ConnectionError::AuthRejected(error));
        }

        self.write_message(&BeMessage::AuthenticationOk).await?;
        let status = std::mem::take(&mut self.config.parameter_status);
        for (name, value) in &status {
            self.write_message(&BeMessage::ParameterStatus { name, value }).await?;
        }
        self.config.parameter_status = status;
        if let Some(key) = self.config.backend_key {
            self.write_message(&BeMessage::BackendKeyData(key)).await?;
        }
        self.write_message(&BeMessage::ReadyForQuery(TransactionStatus::Idle)).await?;
        self.flush().await?;
        debug!(user = params.user(), database = params.database(), "client logged in");
        self.startup = Some(params);
        Ok(Handshake::Ready)
    }

    /// Answers SSLRequest/GSSENCRequest: `S` and a TLS upgrade if configured, `N` otherwise.
    async fn negotiate_encryption(&mut self, is_ssl: bool) -> Result<(), ConnectionError> {
        let tls = if is_ssl { self.config.tls.clone() } else { None };
        let Some(tls) = tls else {
            self.write_buf.put_u8(b'N');
            return self.flush().await;
        };
        // Bytes sent before the handshake would be read as if they came over TLS
        // (CVE-2021-23214): refuse them.
        if !self.read_buf.is_empty() {
            return Err(ProtocolError::BadStartup("received unencrypted data after SSL request".into()).into());
        }
        self.write_buf.put_u8(b'S');
        self.flush().await?;
        // The stream is moved into the acceptor; leave an inert placeholder meanwhile.
        let plain =
            std::mem::replace(&mut self.stream, Box::new(tokio::io::join(tokio::io::empty(), tokio::io::sink())));
        self.stream = tls.accept(plain).await?;
        self.tls_active = true;
        Ok(())
    }

    async fn read_password(&mut self) -> Result<Option<String>, ConnectionError> {
        match self.read_message().await? {
            Some(FeMessage::PasswordMessage(body)) => {
                let text = messages::single_cstr(b'p', &body)?;
                let password = std::str::from_utf8(text).map_err(|_| ProtocolError::BadMessage {
                    tag: b'p',
                    reason: "password is not valid UTF-8".into(),
                })?;
                Ok(Some(password.to_owned()))
            }
            Some(FeMessage::Terminate) | None => Ok(None),
            Some(other) => {
                Err(ProtocolError::UnexpectedMessage { tag: other.tag(), state: "while waiting for a password" }.into())
            }
        }
    }

    async fn query_loop(&mut self, handler: &mut impl QueryHandler) -> Result<SessionEnd, ConnectionError> {
        loop {
            let Some(msg) = self.read_message().await? else {
                return Ok(SessionEnd::ClientDisconnected);
            };
            match msg {
                FeMessage::Query(query) => {
                    self.skipping_until_sync = false;
                    self.handle_query(handler, &query).await?;
                }
                FeMessage::Terminate => return Ok(SessionEnd::Terminated),
                FeMessage::Sync => {
                    self.skipping_until_sync = false;
                    self.write_message(&BeMessage::ReadyForQuery(TransactionStatus::Idle)).await?;
                    self.flush().await?;
                }
                FeMessage::Flush => self.flush().await?,
                FeMessage::ExtendedQuery { tag } => {
                    if !self.skipping_until_sync {
                        self.skipping_until_sync = true;
                        debug!("refusing extended query protocol message '{}'", tag as char);
                        let error = UserError::feature_not_supported("extended query protocol is not supported")
                            .with_hint("use the simple query protocol");
                        self.write_message(&BeMessage::ErrorResponse { severity: Severity::Error, error: &error })
                            .await?;
                    }
                }
                // Leftovers of a COPY the server already ended (e.g. after an error): Postgres
                // ignores these too.
                FeMessage::CopyData(_) | FeMessage::CopyDone | FeMessage::CopyFail(_) => {
                    debug!("ignoring COPY message outside COPY mode");
                }
                FeMessage::PasswordMessage(_) => {
                    return Err(ProtocolError::UnexpectedMessage { tag: b'p', state: "after authentication" }.into())
                }
            }
        }
    }

    async fn handle_query(&mut self, handler: &mut impl QueryHandler, query: &str) -> Result<(), ConnectionError> {
        if query.trim_matches(|c: char| c.is_whitespace() || c == ';').is_empty() {
            self.write_message(&BeMessage::EmptyQueryResponse).await?;
        } else {
            self.copy = CopyState::None;
            let result = handler.process_query(self, query).await;
            let error = match result {
                Ok(()) if self.copy == CopyState::None => None,
                Ok(()) => {
                    warn!("query handler returned without finishing COPY: {query:?}");
                    Some(UserError::internal("server error: COPY was not finished by the command handler"))
                }
                Err(QueryError::User(e)) => Some(e),
                Err(QueryError::Connection(e)) => return Err(e),
            };
            if let Some(error) = error {
                // ErrorResponse also ends COPY mode on the client side.
                self.copy = CopyState::None;
                debug!("query failed: {error}");
                self.write_message(&BeMessage::ErrorResponse { severity: Severity::Error, error: &error }).await?;
            }
        }
        self.write_message(&BeMessage::ReadyForQuery(TransactionStatus::Idle)).await?;
        self.flush().await
    }

    /// Reads more bytes into the read buffer, first making room for the rest of a frame of
    /// `frame_len_bytes` (already validated against the limits). `Ok(false)` on EOF.
    async fn fill_read_buf(&mut self, frame_len_bytes: usize) -> Result<bool, ConnectionError> {
        let missing_bytes = frame_len_bytes.saturating_sub(self.read_buf.len());
        self.read_buf.reserve(missing_bytes.max(READ_CHUNK_BYTES));
        let n = self.stream.read_buf(&mut self.read_buf).await?;
        Ok(n > 0)
    }

    async fn read_startup_packet(&mut self) -> Result<Option<FeStartupPacket>, ConnectionError> {
        loop {
            if let Some(packet) = FeStartupPacket::parse(&mut self.read_buf)? {
                return Ok(Some(packet));
            }
            let frame_len_bytes = startup_frame_len(&self.read_buf)?.unwrap_or(4);
            if !self.fill_read_buf(frame_len_bytes).await? {
                if self.read_buf.is_empty() {
                    return Ok(None);
                }
                return Err(ProtocolError::UnexpectedEof { context: "the startup packet" }.into());
            }
        }
    }

    /// Reads the next frontend message; `Ok(None)` on a clean EOF between messages.
    ///
    /// Cancel-safe: bytes already read stay buffered, so this can sit in a `tokio::select!`
    /// (e.g. waiting for CopyData while also waiting for data to send).
    pub async fn read_message(&mut self) -> Result<Option<FeMessage>, ConnectionError> {
        loop {
            let limits = self.config.limits;
            if let Some(msg) = FeMessage::parse(&mut self.read_buf, &limits)? {
                return Ok(Some(msg));
            }
            let frame_len_bytes = frame_len(&self.read_buf, &limits)?.unwrap_or(HEADER_LEN_BYTES);
            if !self.fill_read_buf(frame_len_bytes).await? {
                if self.read_buf.is_empty() {
                    return Ok(None);
                }
                return Err(ProtocolError::UnexpectedEof { context: "a message" }.into());
            }
        }
    }

    /// Buffers a message, writing the buffer out once it passes the flush threshold. Call
    /// [`flush`](Self::flush) to make sure the client sees it.
    pub async fn write_message(&mut self, msg: &BeMessage<'_>) -> Result<(), ConnectionError> {
        msg.write(&mut self.write_buf)?;
        self.flush_if_over_threshold().await
    }

    async fn flush_if_over_threshold(&mut self) -> Result<(), ConnectionError> {
        if self.write_buf.len() >= self.config.write_buffer_flush_threshold_bytes {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes out everything buffered. Not cancel-safe: a cancelled flush may have sent part of
    /// a message, after which the connection must be dropped.
    pub async fn flush(&mut self) -> Result<(), ConnectionError> {
        if !self.write_buf.is_empty() {
            self.stream.write_all(&self.write_buf).await?;
            self.write_buf.clear();
        }
        self.stream.flush().await?;
        Ok(())
    }

    /// Sends a complete result set: RowDescription, one DataRow per row (`None` = NULL), and
    /// CommandComplete `SELECT n`. Returns the row count.
    pub async fn write_row_set<Row, Cell>(
        &mut self,
        fields: &[FieldDescription],
        rows: impl IntoIterator<Item = Row>,
    ) -> Result<u64, ConnectionError>
    where
        Row: IntoIterator<Item = Option<Cell>>,
        Cell: AsRef<[u8]>,
    {
        self.write_message(&BeMessage::RowDescription(fields)).await?;
        let mut row_count: u64 = 0;
        for row in rows {
            let start = self.write_buf.len();
            let cell_count = messages::write_data_row(&mut self.write_buf, row)?;
            // A row that does not match the description would confuse every client.
            if cell_count != fields.len() {
                self.write_buf.truncate(start);
                return Err(ConnectionError::Misuse("row has a different number of cells than the row description"));
            }
            row_count += 1;
            self.flush_if_over_threshold().await?;
        }
        let command_tag = format!("SELECT {row_count}");
        self.write_message(&BeMessage::CommandComplete(&command_tag)).await?;
        Ok(row_count)
    }

    /// Sends CommandComplete with a tag such as `SET` or `INSERT 0 1`.
    pub async fn write_command_complete(&mut self, command_tag: &str) -> Result<(), ConnectionError> {
        self.write_message(&BeMessage::CommandComplete(command_tag)).await
    }

    /// Sends a NoticeResponse (a warning or info the client shows but that does not fail the
    /// command).
    pub async fn write_notice(&mut self, severity: Severity, notice: &UserError) -> Result<(), ConnectionError> {
        self.write_message(&BeMessage::NoticeResponse { severity, notice }).await
    }

    /// Enters COPY OUT (server → client): stream with [`write_copy_data`](Self::write_copy_data)
    /// and end with [`finish_copy`](Self::finish_copy).
    pub async fn start_copy_out(&mut self) -> Result<(), ConnectionError> {
        self.expect_no_copy("start_copy_out called while already in COPY")?;
        self.write_message(&BeMessage::CopyOutResponse { format: Format::Text, column_count: 0 }).await?;
        self.flush().await?;
        self.copy = CopyState::Out;
        Ok(())
    }

    /// Enters COPY BOTH (CopyData both ways, as in streaming replication): read with
    /// [`read_copy_message`](Self::read_copy_message), write with
    /// [`write_copy_data`](Self::write_copy_data), end with [`finish_copy`](Self::finish_copy).
    pub async fn start_copy_both(&mut self) -> Result<(), ConnectionError> {
        self.expect_no_copy("start_copy_both called while already in COPY")?;
        self.write_message(&BeMessage::CopyBothResponse { format: Format::Binary, column_count: 0 }).await?;
        self.flush().await?;
        self.copy = CopyState::Both { client_done: false, server_done: false };
        Ok(())
    }

    fn expect_no_copy(&self, what: &'static str) -> Result<(), ConnectionError> {
        if self.copy == CopyState::None {
            Ok(())
        } else {
            Err(ConnectionError::Misuse(what))
        }
    }

    /// Buffers one CopyData message (flushed at the threshold; call `flush` for latency).
    pub async fn write_copy_data(&mut self, data: &[u8]) -> Result<(), ConnectionError> {
        match self.copy {
            CopyState::Out | CopyState::Both { server_done: false, .. } => {
                self.write_message(&BeMessage::CopyData(data)).await
            }
            _ => Err(ConnectionError::Misuse("write_copy_data called outside COPY OUT/BOTH or after our CopyDone")),
        }
    }

    /// Ends our half of COPY BOTH with CopyDone while still accepting the client's CopyData
    /// until its CopyDone.
    pub async fn send_copy_done(&mut self) -> Result<(), ConnectionError> {
        match self.copy {
            CopyState::Both { client_done, server_done: false } => {
                self.write_message(&BeMessage::CopyDone).await?;
                self.flush().await?;
                self.copy = CopyState::Both { client_done, server_done: true };
                Ok(())
            }
            _ => Err(ConnectionError::Misuse("send_copy_done called outside COPY BOTH or twice")),
        }
    }

    /// Next message of the client's half of COPY BOTH. Cancel-safe, like
    /// [`read_message`](Self::read_message). Sync and Flush are ignored, as Postgres does during
    /// COPY; any other non-COPY message is a protocol error.
    pub async fn read_copy_message(&mut self) -> Result<CopyMessage, ConnectionError> {
        let CopyState::Both { client_done: false, server_done } = self.copy else {
            return Err(ConnectionError::Misuse(
                "read_copy_message called outside COPY BOTH or after the client's CopyDone",
            ));
        };
        loop {
            let Some(msg) = self.read_message().await? else {
                return Err(ConnectionError::ClientDisconnected { context: "during COPY" });
            };
            return match msg {
                FeMessage::CopyData(data) => Ok(CopyMessage::Data(data)),
                FeMessage::CopyDone => {
                    self.copy = CopyState::Both { client_done: true, server_done };
                    Ok(CopyMessage::Done)
                }
                FeMessage::CopyFail(reason) => {
                    self.copy = CopyState::None;
                    Ok(CopyMessage::Fail(reason))
                }
                FeMessage::Sync | FeMessage::Flush => continue,
                FeMessage::Terminate => {
                    Err(ConnectionError::ClientDisconnected { context: "with Terminate during COPY" })
                }
                other => Err(ProtocolError::UnexpectedMessage { tag: other.tag(), state: "during COPY" }.into()),
            };
        }
    }

    /// Ends COPY OUT/BOTH: CopyDone (unless already sent) and CommandComplete with
    /// `command_tag` (e.g. `COPY 10`), then flushes.
    pub async fn finish_copy(&mut self, command_tag: &str) -> Result<(), ConnectionError> {
        let send_copy_done = match self.copy {
            CopyState::Out => true,
            CopyState::Both { server_done, .. } => !server_done,
            CopyState::None => return Err(ConnectionError::Misuse("finish_copy called outside COPY")),
        };
        if send_copy_done {
            self.write_message(&BeMessage::CopyDone).await?;
        }
        self.copy = CopyState::None;
        self.write_message(&BeMessage::CommandComplete(command_tag)).await?;
        self.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::DuplexStream;

    /// A backend past its handshake, and the client end of its stream.
    async fn logged_in_backend(config: BackendConfig) -> (PostgresBackend, DuplexStream) {
        let (server, mut client) = tokio::io::duplex(1 << 16);
        let mut pgb = PostgresBackend::new(server, config);
        let mut startup = BytesMut::new();
        FeStartupPacket::Startup {
            protocol_minor: 0,
            params: StartupParams::from_pairs([("user".to_string(), "t".to_string())]).expect("valid"),
        }
        .write(&mut startup)
        .expect("encodes");
        client.write_all(&startup).await.expect("write");
        assert_eq!(pgb.handshake(&TrustAuth).await.expect("login"), Handshake::Ready);
        (pgb, client)
    }

    #[tokio::test]
    async fn hostile_length_is_refused_without_growing_the_read_buffer() {
        let (mut pgb, mut client) = logged_in_backend(BackendConfig::default()).await;
        let capacity_before = pgb.read_buffer_capacity_bytes();
        client.write_all(&[b'd', 0x7f, 0xff, 0xff, 0xff]).await.expect("write");
        let err = pgb.read_message().await.expect_err("refused");
        assert!(matches!(err, ConnectionError::Protocol(ProtocolError::MessageTooLarge { tag: b'd', .. })));
        assert!(pgb.read_buffer_capacity_bytes() <= capacity_before.max(2 * READ_CHUNK_BYTES));
    }

    /// `read_message` can be abandoned mid-message (as in `select!`) without losing bytes.
    #[tokio::test]
    async fn read_message_is_cancel_safe() {
        let (mut pgb, mut client) = logged_in_backend(BackendConfig::default()).await;
        let mut msg = BytesMut::new();
        FeMessage::CopyData(Bytes::from_static(b"hello world")).write(&mut msg).expect("encodes");
        client.write_all(&msg[..7]).await.expect("write");
        let attempt = tokio::time::timeout(Duration::from_millis(50), pgb.read_message()).await;
        assert!(attempt.is_err(), "incomplete message must not be returned");
        client.write_all(&msg[7..]).await.expect("write");
        assert_eq!(
            pgb.read_message().await.expect("reads"),
            Some(FeMessage::CopyData(Bytes::from_static(b"hello world")))
        );
    }

    #[tokio::test]
    async fn copy_helpers_refuse_misuse() {
        let (mut pgb, _client) = logged_in_backend(BackendConfig::default()).await;
        assert!(matches!(pgb.write_copy_data(b"x").await, Err(ConnectionError::Misuse(_))));
        assert!(matches!(pgb.read_copy_message().await, Err(ConnectionError::Misuse(_))));
        assert!(matches!(pgb.finish_copy("COPY 0").await, Err(ConnectionError::Misuse(_))));
        pgb.start_copy_out().await.expect("enters COPY OUT");
        assert!(matches!(pgb.start_copy_both().await, Err(ConnectionError::Misuse(_))));
        assert!(matches!(pgb.read_copy_message().await, Err(ConnectionError::Misuse(_))));
        pgb.finish_copy("COPY 0").await.expect("finishes");
        let rows: [[Option<&str>; 2]; 1] = [[Some("a"), None]];
        assert!(matches!(
            pgb.write_row_set(&[FieldDescription::text("only_one")], rows).await,
            Err(ConnectionError::Misuse(_))
        ));
    }

    /// "Upgrades" without encryption, so the test sees what the backend does around the
    /// upgrade; real TLS is exercised in `tls.rs`.
    struct PassThroughTls;
    impl TlsAcceptor for PassThroughTls {
        fn accept(&self, stream: BoxedStream) -> BoxFuture<'static, io::Result<BoxedStream>> {
            Box::pin(async move { Ok(stream) })
        }
    }

    fn tls_required() -> BackendConfig {
        BackendConfig { tls: Some(Arc::new(PassThroughTls)), require_tls: true, ..BackendConfig::default() }
    }

    fn startup_packet() -> BytesMut {
        let mut buf = BytesMut::new();
        let params = StartupParams::from_pairs([("user".to_string(), "t".to_string())]).expect("valid");
        FeStartupPacket::Startup { protocol_minor: 0, params }.write(&mut buf).expect("encodes");
        buf
    }

    #[tokio::test]
    async fn plaintext_startup_is_refused_when_tls_is_required() {
        let (server, mut client) = tokio::io::duplex(1 << 16);
        let mut pgb = PostgresBackend::new(server, tls_required());
        client.write_all(&startup_packet()).await.expect("write");
        let err = pgb.handshake(&TrustAuth).await.expect_err("refused");
        let ConnectionError::AuthRejected(error) = &err else { panic!("expected a refusal, got {err}") };
        assert_eq!(error.code.as_str(), "28000");
        assert!(error.message.contains("requires TLS") && error.message.contains("sslmode=verify-full"), "{error}");
        assert!(!pgb.is_tls() && pgb.startup_params().is_none());
        drop(pgb);
        // Exactly one FATAL ErrorResponse and then EOF: no authentication request, no
        // parameters, nothing that would let the client go on.
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("read");
        assert_eq!(got[0], b'E');
        let len = u32::from_be_bytes(got[1..5].try_into().expect("4 bytes")) as usize;
        assert_eq!(got.len(), 1 + len, "more than one message: {got:?}");
        let body = String::from_utf8_lossy(&got[5..]);
        assert!(body.contains("SFATAL") && body.contains("C28000") && body.contains("requires TLS"), "{body}");
    }

    #[tokio::test]
    async fn startup_after_ssl_request_is_accepted_when_tls_is_required() {
        let (server, mut client) = tokio::io::duplex(1 << 16);
        let mut pgb = PostgresBackend::new(server, tls_required());
        let mut ssl = BytesMut::new();
        FeStartupPacket::SslRequest.write(&mut ssl).expect("encodes");
        client.write_all(&ssl).await.expect("write");
        let login = tokio::spawn(async move {
            let h = pgb.handshake(&TrustAuth).await;
            (pgb, h)
        });
        assert_eq!(client.read_u8().await.expect("answer"), b'S');
        client.write_all(&startup_packet()).await.expect("write");
        let (pgb, h) = login.await.expect("join");
        assert_eq!(h.expect("login"), Handshake::Ready);
        assert!(pgb.is_tls());
        assert_eq!(client.read_u8().await.expect("auth ok"), b'R');
    }

    #[tokio::test]
    async fn plaintext_cancel_request_still_works_when_tls_is_required() {
        let (server, mut client) = tokio::io::duplex(1 << 16);
        let mut pgb = PostgresBackend::new(server, tls_required());
        let key = CancelKey { process_id: 7, secret_key: 42 };
        let mut buf = BytesMut::new();
        FeStartupPacket::CancelRequest(key).write(&mut buf).expect("encodes");
        client.write_all(&buf).await.expect("write");
        assert_eq!(pgb.handshake(&TrustAuth).await.expect("ends"), Handshake::Ended(SessionEnd::CancelRequested(key)));
    }
}
