//! Message codec: frontend (client → server) messages parsed from bytes, backend (server →
//! client) messages serialized into bytes. No I/O here, so every byte sequence can be tested.
//!
//! Parsing is incremental: [`FeMessage::parse`] looks at the front of a buffer and either
//! consumes one complete message or says it needs more bytes. The header (tag and length field)
//! is validated *before* the caller reserves room for the body, so a hostile length field can
//! never make us allocate more than the configured limits.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{ProtocolError, UserError};

/// Default bound on the body of any frontend message except CopyData.
pub const DEFAULT_MAX_MESSAGE_SIZE_BYTES: usize = 1 << 20;
/// Default bound on the body of a frontend CopyData message: WAL streaming sends bigger chunks
/// than ordinary queries.
pub const DEFAULT_MAX_COPY_DATA_SIZE_BYTES: usize = 16 << 20;

/// Tag byte plus the 4-byte length field.
pub(crate) const HEADER_LEN_BYTES: usize = 5;

/// Upper bounds on frontend message bodies, checked against the length field before anything is
/// allocated for the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageLimits {
    /// Largest body (length field minus its own 4 bytes) of a message other than CopyData.
    pub max_message_size_bytes: usize,
    /// Largest body of a CopyData message.
    pub max_copy_data_size_bytes: usize,
}

impl Default for MessageLimits {
    fn default() -> Self {
        MessageLimits {
            max_message_size_bytes: DEFAULT_MAX_MESSAGE_SIZE_BYTES,
            max_copy_data_size_bytes: DEFAULT_MAX_COPY_DATA_SIZE_BYTES,
        }
    }
}

impl MessageLimits {
    fn max_body_bytes(&self, tag: u8) -> usize {
        if tag == tag::COPY_DATA {
            self.max_copy_data_size_bytes
        } else {
            self.max_message_size_bytes
        }
    }
}

/// Frontend message tags (after startup).
pub mod tag {
    pub const QUERY: u8 = b'Q';
    pub const TERMINATE: u8 = b'X';
    pub const PASSWORD: u8 = b'p';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
    pub const SYNC: u8 = b'S';
    pub const FLUSH: u8 = b'H';
    pub const PARSE: u8 = b'P';
    pub const BIND: u8 = b'B';
    pub const DESCRIBE: u8 = b'D';
    pub const EXECUTE: u8 = b'E';
    pub const CLOSE: u8 = b'C';
    pub const FUNCTION_CALL: u8 = b'F';
}

/// Tags of the extended query protocol (and the legacy function call), which we recognise only
/// to reject them politely.
const EXTENDED_QUERY_TAGS: [u8; 6] =
    [tag::PARSE, tag::BIND, tag::DESCRIBE, tag::EXECUTE, tag::CLOSE, tag::FUNCTION_CALL];

fn is_known_frontend_tag(t: u8) -> bool {
    matches!(
        t,
        tag::QUERY
            | tag::TERMINATE
            | tag::PASSWORD
            | tag::COPY_DATA
            | tag::COPY_DONE
            | tag::COPY_FAIL
            | tag::SYNC
            | tag::FLUSH
    ) || EXTENDED_QUERY_TAGS.contains(&t)
}

/// A frontend message received after the startup phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeMessage {
    /// Simple query: one string that may hold several statements.
    Query(String),
    Terminate,
    /// Raw body of a 'p' message. Its meaning depends on what the server asked for (cleartext
    /// password, SASL response, ...), so it is interpreted by the authentication step.
    PasswordMessage(Bytes),
    CopyData(Bytes),
    CopyDone,
    CopyFail(String),
    Sync,
    Flush,
    /// Parse/Bind/Describe/Execute/Close/FunctionCall: recognised but not supported. The body
    /// is skipped (it was still bounded by the size limit).
    ExtendedQuery {
        tag: u8,
    },
}

impl FeMessage {
    pub fn tag(&self) -> u8 {
        match self {
            FeMessage::Query(_) => tag::QUERY,
            FeMessage::Terminate => tag::TERMINATE,
            FeMessage::PasswordMessage(_) => tag::PASSWORD,
            FeMessage::CopyData(_) => tag::COPY_DATA,
            FeMessage::CopyDone => tag::COPY_DONE,
            FeMessage::CopyFail(_) => tag::COPY_FAIL,
            FeMessage::Sync => tag::SYNC,
            FeMessage::Flush => tag::FLUSH,
            FeMessage::ExtendedQuery { tag } => *tag,
        }
    }

    /// Parses one message from the front of `buf`.
    ///
    /// Returns `Ok(None)` if the message is not complete yet (nothing consumed), `Ok(Some)` after
    /// consuming exactly one message. On `Err` the connection must be closed: framing is lost.
    /// An unknown tag or a bad length is reported as soon as the header bytes are present.
    pub fn parse(buf: &mut BytesMut, limits: &MessageLimits) -> Result<Option<FeMessage>, ProtocolError> {
        let Some(frame_len_bytes) = frame_len(buf, limits)? else {
            return Ok(None);
        };
        if buf.len() < frame_len_bytes {
            return Ok(None);
        }
        let mut frame = buf.split_to(frame_len_bytes).freeze();
        let t = frame.get_u8();
        frame.advance(4);
        parse_body(t, frame).map(Some)
    }

    /// Serializes the message as a client would send it (used by tests and test clients).
    pub fn write(&self, buf: &mut BytesMut) -> Result<(), ProtocolError> {
        let t = self.tag();
        write_framed(buf, t, |buf| {
            match self {
                FeMessage::Query(q) => put_cstr(buf, t, q.as_bytes())?,
                FeMessage::PasswordMessage(body) => buf.put_slice(body),
                FeMessage::CopyData(data) => buf.put_slice(data),
                FeMessage::CopyFail(msg) => put_cstr(buf, t, msg.as_bytes())?,
                FeMessage::Terminate
                | FeMessage::CopyDone
                | FeMessage::Sync
                | FeMessage::Flush
                | FeMessage::ExtendedQuery { .. } => {}
            }
            Ok(())
        })
    }
}

/// Total size (tag + length field + body) of the message at the front of `buf`, once its header
/// is there; `Ok(None)` if the header is incomplete. Validates the tag and the length field
/// against `limits`, so callers may reserve the returned size safely.
pub(crate) fn frame_len(buf: &[u8], limits: &MessageLimits) -> Result<Option<usize>, ProtocolError> {
    let Some(&t) = buf.first() else {
        return Ok(None);
    };
    if !is_known_frontend_tag(t) {
        return Err(ProtocolError::UnknownTag(t));
    }
    let Some(len_field) = buf.get(1..HEADER_LEN_BYTES) else {
        return Ok(None);
    };
    let len = i32::from_be_bytes([len_field[0], len_field[1], len_field[2], len_field[3]]);
    if len < 4 {
        return Err(ProtocolError::InvalidLength { tag: t, len: i64::from(len) });
    }
    // `len >= 4` was checked, so the conversion cannot fail; the length counts itself.
    let body_len_bytes =
        usize::try_from(len).map_err(|_| ProtocolError::InvalidLength { tag: t, len: i64::from(len) })? - 4;
    let max_body_bytes = limits.max_body_bytes(t);
    if body_len_bytes > max_body_bytes {
        return Err(ProtocolError::MessageTooLarge { tag: t, len: body_len_bytes as u64, max: max_body_bytes as u64 });
    }
    Ok(Some(HEADER_LEN_BYTES + body_len_bytes))
}

fn parse_body(t: u8, body: Bytes) -> Result<FeMessage, ProtocolError> {
    let expect_empty = |msg: FeMessage| {
        if body.is_empty() {
            Ok(msg)
        } else {
            Err(ProtocolError::BadMessage {
                tag: t,
                reason: format!("expected an empty body, got {} bytes", body.len()),
            })
        }
    };
    match t {
        tag::QUERY => {
            let text = single_cstr(t, &body)?;
            let query = std::str::from_utf8(text).map_err(|e| ProtocolError::BadMessage {
                tag: t,
                reason: format!("query string is not valid UTF-8: {e}"),
            })?;
            Ok(FeMessage::Query(query.to_owned()))
        }
        tag::TERMINATE => expect_empty(FeMessage::Terminate),
        tag::PASSWORD => Ok(FeMessage::PasswordMessage(body)),
        tag::COPY_DATA => Ok(FeMessage::CopyData(body)),
        tag::COPY_DONE => expect_empty(FeMessage::CopyDone),
        tag::COPY_FAIL => {
            let text = single_cstr(t, &body)?;
            Ok(FeMessage::CopyFail(String::from_utf8_lossy(text).into_owned()))
        }
        tag::SYNC => expect_empty(FeMessage::Sync),
        tag::FLUSH => expect_empty(FeMessage::Flush),
        t if EXTENDED_QUERY_TAGS.contains(&t) => Ok(FeMessage::ExtendedQuery { tag: t }),
        t => Err(ProtocolError::UnknownTag(t)),
    }
}

/// The body must be exactly one NUL-terminated string; returns it without the terminator.
pub(crate) fn single_cstr(t: u8, body: &[u8]) -> Result<&[u8], ProtocolError> {
    match body.iter().position(|&b| b == 0) {
        Some(nul) if nul + 1 == body.len() => Ok(&body[..nul]),
        Some(_) => {
            Err(ProtocolError::BadMessage { tag: t, reason: "unexpected bytes after the string terminator".into() })
        }
        None => Err(ProtocolError::BadMessage { tag: t, reason: "string is not NUL-terminated".into() }),
    }
}

/// Appends a framed message: `tag`, a length placeholder, whatever `body` writes, then patches
/// the length. On error the buffer is left as it was, so no half-written frame is ever sent.
pub(crate) fn write_framed(
    buf: &mut BytesMut,
    t: u8,
    body: impl FnOnce(&mut BytesMut) -> Result<(), ProtocolError>,
) -> Result<(), ProtocolError> {
    let start = buf.len();
    buf.put_u8(t);
    buf.put_i32(0);
    if let Err(e) = body(buf) {
        buf.truncate(start);
        return Err(e);
    }
    let len_field = buf.len() - start - 1;
    let Ok(len_field) = i32::try_from(len_field) else {
        buf.truncate(start);
        return Err(ProtocolError::Encode { tag: t, reason: "message longer than 2^31-1 bytes" });
    };
    buf[start + 1..start + HEADER_LEN_BYTES].copy_from_slice(&len_field.to_be_bytes());
    Ok(())
}

/// Writes a NUL-terminated string, refusing interior NULs (they would truncate the string on
/// the other side and desynchronise the fields after it).
pub(crate) fn put_cstr(buf: &mut BytesMut, t: u8, s: &[u8]) -> Result<(), ProtocolError> {
    if s.contains(&0) {
        return Err(ProtocolError::Encode { tag: t, reason: "string contains a NUL byte" });
    }
    buf.put_slice(s);
    buf.put_u8(0);
    Ok(())
}

/// Data format of a column or COPY stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text = 0,
    Binary = 1,
}

/// Transaction state reported in ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TransactionStatus {
    fn as_byte(self) -> u8 {
        match self {
            TransactionStatus::Idle => b'I',
            TransactionStatus::InTransaction => b'T',
            TransactionStatus::Failed => b'E',
        }
    }
}

/// Severity of an ErrorResponse/NoticeResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
    Panic,
    Warning,
    Notice,
    Debug,
    Info,
    Log,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Panic => "PANIC",
            Severity::Warning => "WARNING",
            Severity::Notice => "NOTICE",
            Severity::Debug => "DEBUG",
            Severity::Info => "INFO",
            Severity::Log => "LOG",
        }
    }
}

/// Well-known type OIDs for [`FieldDescription`].
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const INT8: u32 = 20;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
}

/// One column of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDescription {
    pub name: String,
    /// OID of the source table, 0 if the column is not a plain table column.
    pub table_oid: u32,
    /// Attribute number in that table, 0 if none.
    pub column_attr: i16,
    pub type_oid: u32,
    /// `pg_type.typlen`: fixed size in bytes, or -1 for variable length.
    pub type_size: i16,
    pub type_modifier: i32,
    pub format: Format,
}

impl FieldDescription {
    pub fn new(name: impl Into<String>, type_oid: u32, type_size: i16) -> Self {
        FieldDescription {
            name: name.into(),
            table_oid: 0,
            column_attr: 0,
            type_oid,
            type_size,
            type_modifier: -1,
            format: Format::Text,
        }
    }

    pub fn text(name: impl Into<String>) -> Self {
        Self::new(name, oid::TEXT, -1)
    }

    pub fn int8(name: impl Into<String>) -> Self {
        Self::new(name, oid::INT8, 8)
    }

    pub fn int4(name: impl Into<String>) -> Self {
        Self::new(name, oid::INT4, 4)
    }

    pub fn bool(name: impl Into<String>) -> Self {
        Self::new(name, oid::BOOL, 1)
    }

    pub fn bytea(name: impl Into<String>) -> Self {
        Self::new(name, oid::BYTEA, -1)
    }
}

/// A backend process id and secret, sent in BackendKeyData and echoed in CancelRequest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub process_id: i32,
    pub secret_key: i32,
}

/// A backend message, borrowing its payload so large rows and CopyData are not copied twice.
#[derive(Debug, Clone, Copy)]
pub enum BeMessage<'a> {
    AuthenticationOk,
    AuthenticationCleartextPassword,
    ParameterStatus {
        name: &'a str,
        value: &'a str,
    },
    BackendKeyData(CancelKey),
    ReadyForQuery(TransactionStatus),
    RowDescription(&'a [FieldDescription]),
    /// One row; `None` is SQL NULL.
    DataRow(&'a [Option<&'a [u8]>]),
    /// The command tag, e.g. `SELECT 3` or `COPY 10`.
    CommandComplete(&'a str),
    EmptyQueryResponse,
    ErrorResponse {
        severity: Severity,
        error: &'a UserError,
    },
    /// Notices reuse the error field set (code, message, detail, hint).
    NoticeResponse {
        severity: Severity,
        notice: &'a UserError,
    },
    /// Overall format and column count; every column uses the overall format.
    CopyInResponse {
        format: Format,
        column_count: i16,
    },
    CopyOutResponse {
        format: Format,
        column_count: i16,
    },
    CopyBothResponse {
        format: Format,
        column_count: i16,
    },
    CopyData(&'a [u8]),
    CopyDone,
    /// Sent when the client asks for protocol 3.x with x > 0 or for `_pq_.*` options.
    NegotiateProtocolVersion {
        newest_minor: i32,
        unrecognized_options: &'a [String],
    },
}

impl BeMessage<'_> {
    pub fn tag(&self) -> u8 {
        match self {
            BeMessage::AuthenticationOk | BeMessage::AuthenticationCleartextPassword => b'R',
            BeMessage::ParameterStatus { .. } => b'S',
            BeMessage::BackendKeyData(_) => b'K',
            BeMessage::ReadyForQuery(_) => b'Z',
            BeMessage::RowDescription(_) => b'T',
            BeMessage::DataRow(_) => b'D',
            BeMessage::CommandComplete(_) => b'C',
            BeMessage::EmptyQueryResponse => b'I',
            BeMessage::ErrorResponse { .. } => b'E',
            BeMessage::NoticeResponse { .. } => b'N',
            BeMessage::CopyInResponse { .. } => b'G',
            BeMessage::CopyOutResponse { .. } => b'H',
            BeMessage::CopyBothResponse { .. } => b'W',
            BeMessage::CopyData(_) => b'd',
            BeMessage::CopyDone => b'c',
            BeMessage::NegotiateProtocolVersion { .. } => b'v',
        }
    }

    /// Appends the framed message to `buf`. On error (a string with a NUL byte, a count that
    /// does not fit the wire field) `buf` is unchanged.
    pub fn write(&self, buf: &mut BytesMut) -> Result<(), ProtocolError> {
        let t = self.tag();
        match self {
            BeMessage::DataRow(cells) => return write_data_row(buf, cells.iter().copied()).map(|_| ()),
            BeMessage::ErrorResponse { severity, error } => return write_error_fields(buf, t, *severity, error),
            BeMessage::NoticeResponse { severity, notice } => return write_error_fields(buf, t, *severity, notice),
            _ => {}
        }
        write_framed(buf, t, |buf| {
            match self {
                BeMessage::AuthenticationOk => buf.put_i32(0),
                BeMessage::AuthenticationCleartextPassword => buf.put_i32(3),
                BeMessage::ParameterStatus { name, value } => {
                    put_cstr(buf, t, name.as_bytes())?;
                    put_cstr(buf, t, value.as_bytes())?;
                }
                BeMessage::BackendKeyData(key) => {
                    buf.put_i32(key.process_id);
                    buf.put_i32(key.secret_key);
                }
                BeMessage::ReadyForQuery(status) => buf.put_u8(status.as_byte()),
                BeMessage::RowDescription(fields) => {
                    buf.put_i16(count_i16(t, fields.len())?);
                    for f in fields.iter() {
                        put_cstr(buf, t, f.name.as_bytes())?;
                        buf.put_u32(f.table_oid);
                        buf.put_i16(f.column_attr);
                        buf.put_u32(f.type_oid);
                        buf.put_i16(f.type_size);
                        buf.put_i32(f.type_modifier);
                        buf.put_i16(f.format as i16);
                    }
                }
                BeMessage::CommandComplete(command_tag) => put_cstr(buf, t, command_tag.as_bytes())?,
                BeMessage::EmptyQueryResponse | BeMessage::CopyDone => {}
                BeMessage::CopyInResponse { format, column_count }
                | BeMessage::CopyOutResponse { format, column_count }
                | BeMessage::CopyBothResponse { format, column_count } => {
                    if *column_count < 0 {
                        return Err(ProtocolError::Encode { tag: t, reason: "negative column count" });
                    }
                    buf.put_i8(*format as i8);
                    buf.put_i16(*column_count);
                    for _ in 0..*column_count {
                        buf.put_i16(*format as i16);
                    }
                }
                BeMessage::CopyData(data) => buf.put_slice(data),
                BeMessage::NegotiateProtocolVersion { newest_minor, unrecognized_options } => {
                    buf.put_i32(*newest_minor);
                    let count = i32::try_from(unrecognized_options.len())
                        .map_err(|_| ProtocolError::Encode { tag: t, reason: "too many options" })?;
                    buf.put_i32(count);
                    for opt in unrecognized_options.iter() {
                        put_cstr(buf, t, opt.as_bytes())?;
                    }
                }
                // Handled above; kept exhaustive so a new variant cannot be forgotten.
                BeMessage::DataRow(_) | BeMessage::ErrorResponse { .. } | BeMessage::NoticeResponse { .. } => {}
            }
            Ok(())
        })
    }
}

fn count_i16(t: u8, n: usize) -> Result<i16, ProtocolError> {
    i16::try_from(n).map_err(|_| ProtocolError::Encode { tag: t, reason: "more than 32767 columns" })
}

/// Writes a DataRow from any sequence of cells (`None` = NULL), so callers need not collect rows
/// into slices first. Returns the number of cells written.
pub fn write_data_row<C: AsRef<[u8]>>(
    buf: &mut BytesMut,
    cells: impl IntoIterator<Item = Option<C>>,
) -> Result<usize, ProtocolError> {
    let t = b'D';
    let mut cell_count = 0usize;
    write_framed(buf, t, |buf| {
        let count_pos = buf.len();
        buf.put_i16(0);
        for cell in cells {
            cell_count += 1;
            match cell {
                None => buf.put_i32(-1),
                Some(value) => {
                    let value = value.as_ref();
                    let len = i32::try_from(value.len()).map_err(|_| ProtocolError::Encode {
                        tag: t,
                        reason: "column value longer than 2^31-1 bytes",
                    })?;
                    buf.put_i32(len);
                    buf.put_slice(value);
                }
            }
        }
        let count = count_i16(t, cell_count)?;
        buf[count_pos..count_pos + 2].copy_from_slice(&count.to_be_bytes());
        Ok(())
    })?;
    Ok(cell_count)
}

/// Error and notice fields. Interior NULs are replaced rather than refused: failing to report an
/// error because its text is odd would hide the original problem.
fn write_error_fields(buf: &mut BytesMut, t: u8, severity: Severity, error: &UserError) -> Result<(), ProtocolError> {
    fn field(buf: &mut BytesMut, code: u8, value: &str) {
        buf.put_u8(code);
        for &b in value.as_bytes() {
            // Replace NUL with '?' to keep the frame intact.
            buf.put_u8(if b == 0 { b'?' } else { b });
        }
        buf.put_u8(0);
    }
    write_framed(buf, t, |buf| {
        field(buf, b'S', severity.as_str());
        field(buf, b'V', severity.as_str());
        field(buf, b'C', error.code.as_str());
        field(buf, b'M', &error.message);
        if let Some(detail) = &error.detail {
            field(buf, b'D', detail);
        }
        if let Some(hint) = &error.hint {
            field(buf, b'H', hint);
        }
        buf.put_u8(0);
        Ok(())
    })
}

/// Builds the ErrorResponse for a protocol error, for the last words before closing.
pub(crate) fn protocol_error_to_user(e: &ProtocolError) -> UserError {
    UserError::new(e.sqlstate(), e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(bytes: &[u8], limits: &MessageLimits) -> Result<Vec<FeMessage>, ProtocolError> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(m) = FeMessage::parse(&mut buf, limits)? {
            out.push(m);
        }
        Ok(out)
    }

    #[test]
    fn frontend_round_trip() {
        let msgs = vec![
            FeMessage::Query("SELECT 1; SELECT 2".into()),
            FeMessage::Terminate,
            FeMessage::PasswordMessage(Bytes::from_static(b"secret\0")),
            FeMessage::CopyData(Bytes::from_static(b"\x00\x01binary\xff")),
            FeMessage::CopyData(Bytes::new()),
            FeMessage::CopyDone,
            FeMessage::CopyFail("client gave up".into()),
            FeMessage::Sync,
            FeMessage::Flush,
            FeMessage::ExtendedQuery { tag: b'P' },
        ];
        let mut buf = BytesMut::new();
        for m in &msgs {
            m.write(&mut buf).expect("encodes");
        }
        let parsed = parse_all(&buf, &MessageLimits::default()).expect("parses");
        assert_eq!(parsed, msgs);
    }

    #[test]
    fn frontend_matches_postgres_protocol_encoder() {
        use postgres_protocol::message::frontend;
        let mut buf = BytesMut::new();
        frontend::query("select 'x'", &mut buf).unwrap();
        frontend::password_message(b"pw", &mut buf).unwrap();
        frontend::copy_done(&mut buf);
        frontend::copy_fail("nope", &mut buf).unwrap();
        frontend::parse("", "select $1", [25], &mut buf).unwrap();
        frontend::sync(&mut buf);
        frontend::terminate(&mut buf);
        let parsed = parse_all(&buf, &MessageLimits::default()).expect("parses");
        assert_eq!(
            parsed,
            vec![
                FeMessage::Query("select 'x'".into()),
                FeMessage::PasswordMessage(Bytes::from_static(b"pw\0")),
                FeMessage::CopyDone,
                FeMessage::CopyFail("nope".into()),
                FeMessage::ExtendedQuery { tag: b'P' },
                FeMessage::Sync,
                FeMessage::Terminate,
            ]
        );
    }

    #[test]
    fn incremental_parse_consumes_nothing_until_complete() {
        let mut full = BytesMut::new();
        FeMessage::Query("select 1".into()).write(&mut full).unwrap();
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert_eq!(FeMessage::parse(&mut buf, &MessageLimits::default()), Ok(None));
            assert_eq!(buf.len(), cut);
        }
    }

    #[test]
    fn huge_length_rejected_from_header_alone() {
        let limits = MessageLimits::default();
        let mut buf = BytesMut::from(&[b'd', 0x7f, 0xff, 0xff, 0xff][..]);
        assert_eq!(
            FeMessage::parse(&mut buf, &limits),
            Err(ProtocolError::MessageTooLarge {
                tag: b'd',
                len: 0x7fff_fffb,
                max: DEFAULT_MAX_COPY_DATA_SIZE_BYTES as u64
            })
        );
        let mut buf = BytesMut::from(&[b'Q', 0x00, 0x20, 0x00, 0x00][..]);
        assert!(matches!(FeMessage::parse(&mut buf, &limits), Err(ProtocolError::MessageTooLarge { tag: b'Q', .. })));
        let mut buf = BytesMut::from(&[b'Q', 0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(FeMessage::parse(&mut buf, &limits), Err(ProtocolError::InvalidLength { tag: b'Q', len: -1 }));
        let mut buf = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
        assert_eq!(FeMessage::parse(&mut buf, &limits), Err(ProtocolError::InvalidLength { tag: b'Q', len: 3 }));
    }

    #[test]
    fn copy_data_has_its_own_limit() {
        let limits = MessageLimits { max_message_size_bytes: 8, max_copy_data_size_bytes: 100 };
        let mut buf = BytesMut::new();
        FeMessage::CopyData(Bytes::from(vec![7u8; 100])).write(&mut buf).unwrap();
        assert!(matches!(FeMessage::parse(&mut buf, &limits), Ok(Some(FeMessage::CopyData(_)))));
        let mut buf = BytesMut::new();
        FeMessage::Query("123456789".into()).write(&mut buf).unwrap();
        assert!(matches!(
            FeMessage::parse(&mut buf, &limits),
            Err(ProtocolError::MessageTooLarge { tag: b'Q', len: 10, max: 8 })
        ));
    }

    #[test]
    fn malformed_bodies() {
        let limits = MessageLimits::default();
        for bytes in [
            &b"Q\0\0\0\x07abc"[..],    // no terminator
            &b"Q\0\0\0\x09ab\0cd"[..], // bytes after terminator
            &b"Q\0\0\0\x06\xff\0"[..], // not UTF-8
            &b"X\0\0\0\x05\0"[..],     // Terminate with a body
            &b"c\0\0\0\x06ab"[..],     // CopyDone with a body
        ] {
            let mut buf = BytesMut::from(bytes);
            assert!(matches!(FeMessage::parse(&mut buf, &limits), Err(ProtocolError::BadMessage { .. })), "{bytes:?}");
        }
        let mut buf = BytesMut::from(&b"!"[..]);
        assert_eq!(FeMessage::parse(&mut buf, &limits), Err(ProtocolError::UnknownTag(b'!')));
    }

    /// Backend messages are checked against an independent decoder (postgres-protocol's).
    #[test]
    fn backend_messages_decode_with_postgres_protocol() {
        use fallible_iterator::FallibleIterator as _;
        use postgres_protocol::message::backend::Message;
        use std::io::Read as _;

        let fields = [FieldDescription::text("name"), FieldDescription::int8("n")];
        let row: [Option<&[u8]>; 2] = [Some(b"alice"), None];
        let err = UserError::invalid_password("password authentication failed").with_detail("d").with_hint("h");
        let msgs = [
            BeMessage::AuthenticationOk,
            BeMessage::AuthenticationCleartextPassword,
            BeMessage::ParameterStatus { name: "server_version", value: "15.0" },
            BeMessage::BackendKeyData(CancelKey { process_id: 42, secret_key: -7 }),
            BeMessage::ReadyForQuery(TransactionStatus::Idle),
            BeMessage::RowDescription(&fields),
            BeMessage::DataRow(&row),
            BeMessage::CommandComplete("SELECT 1"),
            BeMessage::EmptyQueryResponse,
            BeMessage::ErrorResponse { severity: Severity::Error, error: &err },
            BeMessage::NoticeResponse { severity: Severity::Notice, notice: &err },
            BeMessage::CopyOutResponse { format: Format::Text, column_count: 2 },
            BeMessage::CopyInResponse { format: Format::Binary, column_count: 0 },
            BeMessage::CopyData(b"payload"),
            BeMessage::CopyDone,
        ];
        let mut buf = BytesMut::new();
        for m in &msgs {
            m.write(&mut buf).expect("encodes");
        }
        let mut decoded = Vec::new();
        while let Some(m) = Message::parse(&mut buf).expect("valid backend message") {
            decoded.push(m);
        }
        assert_eq!(decoded.len(), msgs.len());
        assert!(matches!(decoded[0], Message::AuthenticationOk));
        assert!(matches!(decoded[1], Message::AuthenticationCleartextPassword));
        match &decoded[2] {
            Message::ParameterStatus(b) => {
                assert_eq!(b.name().unwrap(), "server_version");
                assert_eq!(b.value().unwrap(), "15.0");
            }
            _ => panic!("expected ParameterStatus"),
        }
        match &decoded[3] {
            Message::BackendKeyData(b) => assert_eq!((b.process_id(), b.secret_key()), (42, -7)),
            _ => panic!("expected BackendKeyData"),
        }
        match &decoded[4] {
            Message::ReadyForQuery(b) => assert_eq!(b.status(), b'I'),
            _ => panic!("expected ReadyForQuery"),
        }
        match &decoded[5] {
            Message::RowDescription(b) => {
                let names: Vec<(String, u32)> =
                    b.fields().map(|f| Ok((f.name().to_string(), f.type_oid()))).collect().unwrap();
                assert_eq!(names, vec![("name".to_string(), 25), ("n".to_string(), 20)]);
            }
            _ => panic!("expected RowDescription"),
        }
        match &decoded[6] {
            Message::DataRow(b) => {
                let buffer = b.buffer();
                let cells: Vec<Option<Vec<u8>>> =
                    b.ranges().map(|r| Ok(r.map(|r| buffer[r].to_vec()))).collect().unwrap();
                assert_eq!(cells, vec![Some(b"alice".to_vec()), None]);
            }
            _ => panic!("expected DataRow"),
        }
        match &decoded[7] {
            Message::CommandComplete(b) => assert_eq!(b.tag().unwrap(), "SELECT 1"),
            _ => panic!("expected CommandComplete"),
        }
        assert!(matches!(decoded[8], Message::EmptyQueryResponse));
        for (i, severity) in [(9, "ERROR"), (10, "NOTICE")] {
            let fields = match &decoded[i] {
                Message::ErrorResponse(b) => b.fields(),
                Message::NoticeResponse(b) => b.fields(),
                _ => panic!("expected Error/NoticeResponse"),
            };
            let seen: Vec<(u8, String)> = fields
                .map(|f| Ok((f.type_(), String::from_utf8_lossy(f.value_bytes()).into_owned())))
                .collect()
                .unwrap();
            assert_eq!(
                seen,
                vec![
                    (b'S', severity.to_string()),
                    (b'V', severity.to_string()),
                    (b'C', "28P01".to_string()),
                    (b'M', "password authentication failed".to_string()),
                    (b'D', "d".to_string()),
                    (b'H', "h".to_string()),
                ]
            );
        }
        match &decoded[11] {
            Message::CopyOutResponse(b) => {
                assert_eq!(b.format(), 0);
                let formats: Vec<u16> = b.column_formats().collect().unwrap();
                assert_eq!(formats, vec![0, 0]);
            }
            _ => panic!("expected CopyOutResponse"),
        }
        match &decoded[12] {
            Message::CopyInResponse(b) => assert_eq!(b.format(), 1),
            _ => panic!("expected CopyInResponse"),
        }
        match &decoded[13] {
            Message::CopyData(b) => {
                let mut s = Vec::new();
                b.data().read_to_end(&mut s).unwrap();
                assert_eq!(s, b"payload");
            }
            _ => panic!("expected CopyData"),
        }
        assert!(matches!(decoded[14], Message::CopyDone));
    }

    #[test]
    fn encode_refuses_nul_in_strings_and_leaves_buffer_intact() {
        let mut buf = BytesMut::from(&b"prefix"[..]);
        let err = BeMessage::CommandComplete("SELECT\0 1").write(&mut buf);
        assert!(matches!(err, Err(ProtocolError::Encode { tag: b'C', .. })));
        assert_eq!(&buf[..], b"prefix");
        // Error text with a NUL is sanitized, not refused.
        let e = UserError::internal("bad\0byte");
        BeMessage::ErrorResponse { severity: Severity::Error, error: &e }.write(&mut buf).unwrap();
        assert!(buf.windows(8).any(|w| w == b"bad?byte"));
    }

    #[test]
    fn copy_both_and_negotiate_layout() {
        let mut buf = BytesMut::new();
        BeMessage::CopyBothResponse { format: Format::Binary, column_count: 0 }.write(&mut buf).unwrap();
        assert_eq!(&buf[..], b"W\0\0\0\x07\x01\0\0");
        buf.clear();
        BeMessage::NegotiateProtocolVersion { newest_minor: 0, unrecognized_options: &["_pq_.x".to_string()] }
            .write(&mut buf)
            .unwrap();
        assert_eq!(&buf[..], b"v\0\0\0\x13\0\0\0\0\0\0\0\x01_pq_.x\0");
    }
}
