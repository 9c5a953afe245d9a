//! The untagged first packet of a connection (StartupMessage, SSLRequest, GSSENCRequest,
//! CancelRequest), the startup parameters it carries, and the `options` parameter, which libpq
//! uses to pass `-c key=value` settings.

use std::collections::BTreeMap;

use bytes::{Buf, BufMut, BytesMut};

use crate::error::ProtocolError;
use crate::messages::{put_cstr, CancelKey};

/// Postgres' own limit (`MAX_STARTUP_PACKET_LENGTH`): the startup packet, length field
/// included, may not be longer.
pub const MAX_STARTUP_PACKET_LENGTH_BYTES: usize = 10_000;
/// Smallest valid startup packet: length field plus request code.
const MIN_STARTUP_PACKET_LENGTH_BYTES: usize = 8;

/// `1234.5679`: the client asks for TLS.
pub const SSL_REQUEST_CODE: u32 = (1234 << 16) | 5679;
/// `1234.5680`: the client asks for GSSAPI encryption.
pub const GSSENC_REQUEST_CODE: u32 = (1234 << 16) | 5680;
/// `1234.5678`: the client asks to cancel a running query of another connection.
pub const CANCEL_REQUEST_CODE: u32 = (1234 << 16) | 5678;
/// The only protocol major version we speak.
pub const PROTOCOL_MAJOR_VERSION: u16 = 3;

/// Startup parameters whose names start with this are protocol extensions, negotiated with
/// NegotiateProtocolVersion rather than treated as settings.
const PROTOCOL_EXTENSION_PREFIX: &str = "_pq_.";

/// The first packet a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeStartupPacket {
    SslRequest,
    GssEncRequest,
    CancelRequest(CancelKey),
    /// A protocol 3.x StartupMessage. `protocol_minor` > 0 is accepted and answered with
    /// NegotiateProtocolVersion (we speak 3.0).
    Startup {
        protocol_minor: u16,
        params: StartupParams,
    },
}

impl FeStartupPacket {
    /// Parses the startup packet at the front of `buf`: `Ok(None)` while incomplete (nothing
    /// consumed), `Ok(Some)` after consuming it. The length field is checked against
    /// [`MAX_STARTUP_PACKET_LENGTH_BYTES`] from the first 4 bytes, before the body is awaited.
    pub fn parse(buf: &mut BytesMut) -> Result<Option<FeStartupPacket>, ProtocolError> {
        let Some(len) = startup_frame_len(buf)? else {
            return Ok(None);
        };
        if buf.len() < len {
            return Ok(None);
        }
        let mut packet = buf.split_to(len).freeze();
        packet.advance(4);
        let code = packet.get_u32();
        let body = &packet[..];
        let expect_len = |expected: usize, what: &str| {
            if len == expected {
                Ok(())
            } else {
                Err(ProtocolError::BadStartup(format!("{what} must be {expected} bytes long, got {len}")))
            }
        };
        match code {
            SSL_REQUEST_CODE => {
                expect_len(8, "SSLRequest")?;
                Ok(Some(FeStartupPacket::SslRequest))
            }
            GSSENC_REQUEST_CODE => {
                expect_len(8, "GSSENCRequest")?;
                Ok(Some(FeStartupPacket::GssEncRequest))
            }
            CANCEL_REQUEST_CODE => {
                expect_len(16, "CancelRequest")?;
                let mut body = body;
                Ok(Some(FeStartupPacket::CancelRequest(CancelKey {
                    process_id: body.get_i32(),
                    secret_key: body.get_i32(),
                })))
            }
            code => {
                let major = (code >> 16) as u16;
                let minor = (code & 0xffff) as u16;
                if major != PROTOCOL_MAJOR_VERSION {
                    return Err(ProtocolError::BadStartup(format!(
                        "unsupported frontend protocol {major}.{minor}: server supports 3.0"
                    )));
                }
                let params = StartupParams::from_pairs(parse_param_pairs(body)?)?;
                Ok(Some(FeStartupPacket::Startup { protocol_minor: minor, params }))
            }
        }
    }

    /// Serializes the packet as a client would send it (for tests and test clients).
    pub fn write(&self, buf: &mut BytesMut) -> Result<(), ProtocolError> {
        let start = buf.len();
        buf.put_i32(0);
        let result = match self {
            FeStartupPacket::SslRequest => {
                buf.put_u32(SSL_REQUEST_CODE);
                Ok(())
            }
            FeStartupPacket::GssEncRequest => {
                buf.put_u32(GSSENC_REQUEST_CODE);
                Ok(())
            }
            FeStartupPacket::CancelRequest(key) => {
                buf.put_u32(CANCEL_REQUEST_CODE);
                buf.put_i32(key.process_id);
                buf.put_i32(key.secret_key);
                Ok(())
            }
            FeStartupPacket::Startup { protocol_minor, params } => {
                buf.put_u32((u32::from(PROTOCOL_MAJOR_VERSION) << 16) | u32::from(*protocol_minor));
                let mut result = Ok(());
                for (name, value) in &params.params {
                    result = put_cstr(buf, 0, name.as_bytes()).and_then(|()| put_cstr(buf, 0, value.as_bytes()));
                    if result.is_err() {
                        break;
                    }
                }
                buf.put_u8(0);
                result
            }
        };
        let len = buf.len() - start;
        if let Err(e) = result {
            buf.truncate(start);
            return Err(e);
        }
        if len > MAX_STARTUP_PACKET_LENGTH_BYTES {
            buf.truncate(start);
            return Err(ProtocolError::Encode { tag: 0, reason: "startup packet longer than 10000 bytes" });
        }
        // Bounded by the check above, so it fits an i32.
        buf[start..start + 4].copy_from_slice(&(len as i32).to_be_bytes());
        Ok(())
    }
}

/// Total length of the startup packet at the front of `buf`, once its length field is there.
pub(crate) fn startup_frame_len(buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
    let Some(len_field) = buf.get(..4) else {
        return Ok(None);
    };
    let len = i32::from_be_bytes([len_field[0], len_field[1], len_field[2], len_field[3]]);
    let Ok(len_bytes) = usize::try_from(len) else {
        return Err(ProtocolError::InvalidLength { tag: 0, len: i64::from(len) });
    };
    if len_bytes < MIN_STARTUP_PACKET_LENGTH_BYTES {
        return Err(ProtocolError::InvalidLength { tag: 0, len: i64::from(len) });
    }
    if len_bytes > MAX_STARTUP_PACKET_LENGTH_BYTES {
        return Err(ProtocolError::MessageTooLarge {
            tag: 0,
            len: len_bytes as u64,
            max: MAX_STARTUP_PACKET_LENGTH_BYTES as u64,
        });
    }
    Ok(Some(len_bytes))
}

/// `name\0value\0 ... \0`: the terminator must be the last byte, as Postgres insists.
fn parse_param_pairs(mut body: &[u8]) -> Result<Vec<(String, String)>, ProtocolError> {
    fn take_cstr<'a>(body: &mut &'a [u8], what: &str) -> Result<&'a str, ProtocolError> {
        let Some(nul) = body.iter().position(|&b| b == 0) else {
            return Err(ProtocolError::BadStartup(format!(
                "{what} is not NUL-terminated (expected a terminator as the last byte)"
            )));
        };
        let s = std::str::from_utf8(&body[..nul])
            .map_err(|e| ProtocolError::BadStartup(format!("{what} is not valid UTF-8: {e}")))?;
        *body = &body[nul + 1..];
        Ok(s)
    }
    let mut pairs = Vec::new();
    loop {
        let name = take_cstr(&mut body, "parameter name")?;
        if name.is_empty() {
            if !body.is_empty() {
                return Err(ProtocolError::BadStartup(
                    "expected the terminator as the last byte of the startup packet".into(),
                ));
            }
            return Ok(pairs);
        }
        let value = take_cstr(&mut body, "parameter value")?;
        pairs.push((name.to_owned(), value.to_owned()));
    }
}

/// Parameters of a StartupMessage, with `options` already split into key/value settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupParams {
    /// All parameters as sent; a later duplicate overrides an earlier one, as in Postgres.
    params: BTreeMap<String, String>,
    /// `options` parsed into `(name, value)` settings, in order.
    options: Vec<(String, String)>,
}

impl StartupParams {
    /// Builds and validates the parameter set: `user` is required (Postgres refuses a startup
    /// packet without it) and `options`, if present, must parse.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> Result<Self, ProtocolError> {
        let params: BTreeMap<String, String> = pairs.into_iter().collect();
        if params.get("user").is_none_or(|u| u.is_empty()) {
            return Err(ProtocolError::BadStartup("no user name specified in startup packet".into()));
        }
        let options = match params.get("options") {
            Some(raw) => parse_options(raw)?,
            None => Vec::new(),
        };
        Ok(StartupParams { params, options })
    }

    /// Any startup parameter by name.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    pub fn user(&self) -> &str {
        self.get("user").unwrap_or_default()
    }

    /// The database; defaults to the user name, as in Postgres.
    pub fn database(&self) -> &str {
        self.get("database").unwrap_or_else(|| self.user())
    }

    pub fn application_name(&self) -> Option<&str> {
        self.get("application_name")
    }

    /// `replication` as sent (`true`, `database`, ...), for walsender-style endpoints.
    pub fn replication(&self) -> Option<&str> {
        self.get("replication")
    }

    /// The `options` parameter parsed into settings, e.g. `[("tenant_id", "...")]` for
    /// `options='-c tenant_id=...'`.
    pub fn options(&self) -> &[(String, String)] {
        &self.options
    }

    /// Value of one setting from `options`; the last occurrence wins.
    pub fn option(&self, name: &str) -> Option<&str> {
        self.options.iter().rev().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// All parameters, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.params.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Requested protocol extensions (`_pq_.*` parameters); we support none, and report them
    /// back in NegotiateProtocolVersion.
    pub fn protocol_extensions(&self) -> Vec<String> {
        self.params.keys().filter(|k| k.starts_with(PROTOCOL_EXTENSION_PREFIX)).cloned().collect()
    }
}

/// Splits `options` into words like Postgres' `pg_split_opts`: words are separated by
/// whitespace, and a backslash makes the next character literal (`\ ` is a space inside a
/// word, `\\` a backslash). A trailing lone backslash is dropped.
pub fn split_options(raw: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut chars = raw.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return words;
        }
        let mut word = String::new();
        while let Some(c) = chars.next() {
            if c.is_ascii_whitespace() {
                break;
            }
            if c == '\\' {
                if let Some(escaped) = chars.next() {
                    word.push(escaped);
                }
            } else {
                word.push(c);
            }
        }
        words.push(word);
    }
}

/// Parses `options` into settings the way a Postgres backend reads its command-line switches:
/// `-c name=value`, `-cname=value` and `--name=value`. As in Postgres, dashes in the name become
/// underscores. Any other switch is refused, since we could not honour it.
pub fn parse_options(raw: &str) -> Result<Vec<(String, String)>, ProtocolError> {
    let words = split_options(raw);
    let mut settings = Vec::new();
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        let (switch, setting) = if word == "-c" {
            let Some(next) = words.next() else {
                return Err(ProtocolError::BadStartupOptions("-c requires a name=value argument".into()));
            };
            ("-c", next)
        } else if let Some(rest) = word.strip_prefix("--") {
            ("--", rest.to_owned())
        } else if let Some(rest) = word.strip_prefix("-c") {
            ("-c", rest.to_owned())
        } else {
            return Err(ProtocolError::BadStartupOptions(format!(
                "unsupported argument {word:?} in the options startup parameter; \
                 only -c name=value and --name=value are accepted"
            )));
        };
        let Some((name, value)) = setting.split_once('=') else {
            return Err(ProtocolError::BadStartupOptions(format!(
                "{switch}{setting} requires a value (expected {switch}name=value)"
            )));
        };
        if name.is_empty() {
            return Err(ProtocolError::BadStartupOptions(format!("{switch}{setting} has an empty setting name")));
        }
        settings.push((name.replace('-', "_"), value.to_owned()));
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(pairs: &[(&str, &str)]) -> BytesMut {
        let mut buf = BytesMut::new();
        postgres_protocol::message::frontend::startup_message(pairs.iter().copied(), &mut buf).unwrap();
        buf
    }

    #[test]
    fn parses_libpq_startup_message() {
        let mut buf = startup(&[
            ("user", "alice"),
            ("database", "db1"),
            ("application_name", "psql"),
            ("replication", "true"),
            ("options", r"-c tenant_id=abc --timeline-id=def -cx=a\ b"),
        ]);
        let packet = FeStartupPacket::parse(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        let FeStartupPacket::Startup { protocol_minor, params } = packet else {
            panic!("expected a startup message");
        };
        assert_eq!(protocol_minor, 0);
        assert_eq!(params.user(), "alice");
        assert_eq!(params.database(), "db1");
        assert_eq!(params.application_name(), Some("psql"));
        assert_eq!(params.replication(), Some("true"));
        assert_eq!(params.option("tenant_id"), Some("abc"));
        assert_eq!(params.option("timeline_id"), Some("def"));
        assert_eq!(params.option("x"), Some("a b"));
        assert_eq!(params.options().len(), 3);
    }

    #[test]
    fn database_defaults_to_user() {
        let mut buf = startup(&[("user", "bob")]);
        let Some(FeStartupPacket::Startup { params, .. }) = FeStartupPacket::parse(&mut buf).unwrap() else {
            panic!("expected a startup message");
        };
        assert_eq!(params.database(), "bob");
        assert!(params.options().is_empty());
    }

    #[test]
    fn round_trip_all_packet_kinds() {
        let params = StartupParams::from_pairs([
            ("user".to_string(), "u".to_string()),
            ("options".to_string(), "-c a=b".to_string()),
            ("_pq_.ext".to_string(), "1".to_string()),
        ])
        .unwrap();
        assert_eq!(params.protocol_extensions(), vec!["_pq_.ext".to_string()]);
        for packet in [
            FeStartupPacket::SslRequest,
            FeStartupPacket::GssEncRequest,
            FeStartupPacket::CancelRequest(CancelKey { process_id: 7, secret_key: -1 }),
            FeStartupPacket::Startup { protocol_minor: 2, params },
        ] {
            let mut buf = BytesMut::new();
            packet.write(&mut buf).unwrap();
            assert_eq!(FeStartupPacket::parse(&mut buf), Ok(Some(packet)));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn ssl_request_bytes() {
        let mut buf = BytesMut::new();
        postgres_protocol::message::frontend::ssl_request(&mut buf);
        assert_eq!(FeStartupPacket::parse(&mut buf), Ok(Some(FeStartupPacket::SslRequest)));
    }

    #[test]
    fn rejects_bad_lengths_from_the_length_field() {
        for (bytes, expect_too_large) in [
            (&[0x7f, 0xff, 0xff, 0xff][..], true),
            (&[0x00, 0x00, 0x27, 0x11][..], true), // 10001
            (&[0xff, 0xff, 0xff, 0xff][..], false),
            (&[0x00, 0x00, 0x00, 0x07][..], false),
            (&[0x00, 0x00, 0x00, 0x00][..], false),
        ] {
            let mut buf = BytesMut::from(bytes);
            let err = FeStartupPacket::parse(&mut buf).unwrap_err();
            if expect_too_large {
                assert!(matches!(err, ProtocolError::MessageTooLarge { tag: 0, .. }), "{err}");
            } else {
                assert!(matches!(err, ProtocolError::InvalidLength { tag: 0, .. }), "{err}");
            }
        }
    }

    #[test]
    fn rejects_malformed_startup_bodies() {
        let cases: [&[u8]; 6] = [
            b"\x00\x03\x00\x00user\0u\0",       // missing final terminator
            b"\x00\x03\x00\x00user\0u\0\0junk", // bytes after terminator
            b"\x00\x03\x00\x00user\0",          // missing value
            b"\x00\x03\x00\x00database\0d\0\0", // no user
            b"\x00\x02\x00\x00user\0u\0\0",     // protocol 2
            b"\x04\xd2\x16\x2f\0\0",            // SSLRequest with a body
        ];
        for body in cases {
            let mut buf = BytesMut::new();
            buf.put_i32(body.len() as i32 + 4);
            buf.put_slice(body);
            let err = FeStartupPacket::parse(&mut buf).unwrap_err();
            assert!(matches!(err, ProtocolError::BadStartup(_)), "{body:?}: {err}");
        }
    }

    #[test]
    fn options_splitting_follows_pg_split_opts() {
        assert_eq!(split_options("  a  b\tc "), vec!["a", "b", "c"]);
        assert_eq!(split_options(r"a\ b c\\d e\"), vec!["a b", r"c\d", "e"]);
        assert_eq!(split_options(""), Vec::<String>::new());
    }

    #[test]
    fn options_parsing() {
        assert_eq!(
            parse_options("-c search_path=a,b --work-mem=4MB -cfoo=").unwrap(),
            vec![
                ("search_path".to_string(), "a,b".to_string()),
                ("work_mem".to_string(), "4MB".to_string()),
                ("foo".to_string(), String::new()),
            ]
        );
        assert_eq!(
            parse_options(r"-c key=with\ space=and\\more").unwrap(),
            vec![("key".to_string(), r"with space=and\more".to_string())]
        );
        for bad in ["-c", "-c novalue", "--novalue", "-B 100", "plain", "-c =x"] {
            assert!(matches!(parse_options(bad), Err(ProtocolError::BadStartupOptions(_))), "{bad}");
        }
    }
}
