//! Error types, split by who can act on them.
//!
//! * [`ProtocolError`]: the bytes on the wire were wrong (or could not be produced). The
//!   connection cannot continue, because message framing can no longer be trusted.
//! * [`UserError`]: a query or login failed in a way the client should be told about, with a
//!   SQLSTATE. The connection stays usable after a query-level `UserError`.
//! * [`ConnectionError`]: why a session ended abnormally (protocol, I/O, refused login, or a
//!   handler bug); what `PostgresBackend` methods return.
//! * [`QueryError`]: what a query handler returns: either a `UserError` (reported, session goes on)
//!   or a `ConnectionError` (session ends).

use std::fmt;
use std::io;

/// Human-readable name of a message tag, for error messages. Tag 0 stands for the untagged
/// startup packet.
fn tag_name(tag: u8) -> String {
    match tag {
        0 => "startup packet".to_string(),
        t if t.is_ascii_graphic() => format!("message '{}'", t as char),
        t => format!("message with tag byte 0x{t:02x}"),
    }
}

/// The client sent bytes that break the protocol, or a message could not be encoded.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// The length field announces more than we accept. Raised from the header alone, before
    /// any buffer for the body is allocated.
    #[error("{} of {len} bytes exceeds the limit of {max} bytes", tag_name(*tag))]
    MessageTooLarge { tag: u8, len: u64, max: u64 },
    /// The length field is negative or smaller than the fixed part of the message.
    #[error("{} has invalid length field {len}", tag_name(*tag))]
    InvalidLength { tag: u8, len: i64 },
    /// A tag byte that is not a frontend message type.
    #[error("invalid frontend message type 0x{0:02x}")]
    UnknownTag(u8),
    /// The peer closed the connection in the middle of a message.
    #[error("client closed the connection in the middle of {context}")]
    UnexpectedEof { context: &'static str },
    /// The startup packet is malformed or asks for something we do not speak.
    #[error("invalid startup packet: {0}")]
    BadStartup(String),
    /// The `options` startup parameter could not be parsed.
    #[error("invalid startup option: {0}")]
    BadStartupOptions(String),
    /// A message body does not match its type's layout.
    #[error("malformed {}: {reason}", tag_name(*tag))]
    BadMessage { tag: u8, reason: String },
    /// A well-formed message arrived in a state where it is not allowed.
    #[error("unexpected {} {state}", tag_name(*tag))]
    UnexpectedMessage { tag: u8, state: &'static str },
    /// A backend message could not be encoded (e.g. a string holds a NUL byte). A server bug,
    /// reported instead of writing a corrupt frame.
    #[error("cannot encode {}: {reason}", tag_name(*tag))]
    Encode { tag: u8, reason: &'static str },
}

impl ProtocolError {
    /// The SQLSTATE to report to the client when this error ends the session.
    pub fn sqlstate(&self) -> SqlState {
        match self {
            ProtocolError::BadStartupOptions(_) => SqlState::SYNTAX_ERROR,
            ProtocolError::Encode { .. } => SqlState::INTERNAL_ERROR,
            _ => SqlState::PROTOCOL_VIOLATION,
        }
    }
}

/// A five-character SQLSTATE code (`[0-9A-Z]{5}`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SqlState([u8; 5]);

impl SqlState {
    pub const SUCCESSFUL_COMPLETION: SqlState = SqlState(*b"00000");
    pub const WARNING: SqlState = SqlState(*b"01000");
    pub const CONNECTION_EXCEPTION: SqlState = SqlState(*b"08000");
    pub const PROTOCOL_VIOLATION: SqlState = SqlState(*b"08P01");
    pub const FEATURE_NOT_SUPPORTED: SqlState = SqlState(*b"0A000");
    pub const CHARACTER_NOT_IN_REPERTOIRE: SqlState = SqlState(*b"22021");
    pub const INVALID_PARAMETER_VALUE: SqlState = SqlState(*b"22023");
    pub const INVALID_AUTHORIZATION_SPECIFICATION: SqlState = SqlState(*b"28000");
    pub const INVALID_PASSWORD: SqlState = SqlState(*b"28P01");
    pub const SYNTAX_ERROR: SqlState = SqlState(*b"42601");
    pub const UNDEFINED_OBJECT: SqlState = SqlState(*b"42704");
    pub const INSUFFICIENT_PRIVILEGE: SqlState = SqlState(*b"42501");
    pub const TOO_MANY_CONNECTIONS: SqlState = SqlState(*b"53300");
    pub const QUERY_CANCELED: SqlState = SqlState(*b"57014");
    pub const ADMIN_SHUTDOWN: SqlState = SqlState(*b"57P01");
    pub const INTERNAL_ERROR: SqlState = SqlState(*b"XX000");

    /// Parses a code such as `"28P01"`; `None` unless it is exactly five of `[0-9A-Z]`.
    pub fn new(code: &str) -> Option<SqlState> {
        let bytes: [u8; 5] = code.as_bytes().try_into().ok()?;
        bytes.iter().all(|b| b.is_ascii_digit() || b.is_ascii_uppercase()).then_some(SqlState(bytes))
    }

    pub fn as_str(&self) -> &str {
        // Constructed only from ASCII, so this cannot fail; fall back rather than panic anyway.
        std::str::from_utf8(&self.0).unwrap_or("XX000")
    }
}

impl fmt::Display for SqlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for SqlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SqlState({})", self.as_str())
    }
}

/// An error meant for the client: SQLSTATE, primary message, optional detail and hint. Sent as
/// an ErrorResponse (or, with another severity, a NoticeResponse).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (SQLSTATE {code})")]
pub struct UserError {
    pub code: SqlState,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl UserError {
    pub fn new(code: SqlState, message: impl Into<String>) -> Self {
        UserError { code, message: message.into(), detail: None, hint: None }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// 28P01: the password (or token sent as one) was wrong.
    pub fn invalid_password(message: impl Into<String>) -> Self {
        Self::new(SqlState::INVALID_PASSWORD, message)
    }

    /// 28000: the login is not allowed, whatever the password.
    pub fn invalid_authorization(message: impl Into<String>) -> Self {
        Self::new(SqlState::INVALID_AUTHORIZATION_SPECIFICATION, message)
    }

    /// 0A000: a recognised request we deliberately do not implement.
    pub fn feature_not_supported(message: impl Into<String>) -> Self {
        Self::new(SqlState::FEATURE_NOT_SUPPORTED, message)
    }

    /// 42601: the query text is not a command we understand.
    pub fn syntax_error(message: impl Into<String>) -> Self {
        Self::new(SqlState::SYNTAX_ERROR, message)
    }

    /// XX000: a server-side failure the client cannot fix.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(SqlState::INTERNAL_ERROR, message)
    }
}

/// Why a session ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("I/O error on client connection: {0}")]
    Io(#[from] io::Error),
    /// The auth hook refused the login; the client was sent this error as FATAL.
    #[error("login refused: {0}")]
    AuthRejected(UserError),
    /// The client ended the connection (EOF between messages) while the server expected more,
    /// e.g. in the middle of COPY.
    #[error("client disconnected {context}")]
    ClientDisconnected { context: &'static str },
    /// A handler called a `PostgresBackend` method in the wrong protocol state (a server bug,
    /// e.g. writing CopyData outside COPY).
    #[error("protocol state misuse by the server: {0}")]
    Misuse(&'static str),
}

impl ConnectionError {
    /// True when the error only means the client went away (EOF, reset, broken pipe). Such
    /// sessions end quietly: nothing is wrong on our side.
    pub fn is_client_disconnect(&self) -> bool {
        match self {
            ConnectionError::ClientDisconnected { .. } => true,
            ConnectionError::Protocol(ProtocolError::UnexpectedEof { .. }) => true,
            ConnectionError::Io(e) => is_disconnect_io_error(e),
            _ => false,
        }
    }
}

/// I/O error kinds that mean "the peer is gone" rather than "something broke here".
pub fn is_disconnect_io_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
    )
}

/// What a query handler returns on failure.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// Reported to the client as an ErrorResponse; the session continues with ReadyForQuery.
    #[error(transparent)]
    User(#[from] UserError),
    /// The connection is unusable; the session ends.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
}

impl From<io::Error> for QueryError {
    fn from(e: io::Error) -> Self {
        QueryError::Connection(ConnectionError::Io(e))
    }
}

impl From<ProtocolError> for QueryError {
    fn from(e: ProtocolError) -> Self {
        QueryError::Connection(ConnectionError::Protocol(e))
    }
}

/// Internal failures become XX000 errors for the client, with the full cause chain as the
/// message, so `?` on `anyhow::Result` works in handlers without ending the session.
impl From<anyhow::Error> for QueryError {
    fn from(e: anyhow::Error) -> Self {
        QueryError::User(UserError::internal(format!("{e:#}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstate_validation() {
        assert_eq!(SqlState::new("28P01"), Some(SqlState::INVALID_PASSWORD));
        assert_eq!(SqlState::new("28p01"), None);
        assert_eq!(SqlState::new("2801"), None);
        assert_eq!(SqlState::new("280011"), None);
        assert_eq!(SqlState::INTERNAL_ERROR.to_string(), "XX000");
    }

    #[test]
    fn error_messages_name_the_message() {
        let e = ProtocolError::MessageTooLarge { tag: b'd', len: 1 << 31, max: 16 };
        assert_eq!(e.to_string(), "message 'd' of 2147483648 bytes exceeds the limit of 16 bytes");
        let e = ProtocolError::InvalidLength { tag: 0, len: -1 };
        assert_eq!(e.to_string(), "startup packet has invalid length field -1");
    }
}
