//! Server side of the PostgreSQL v3 wire protocol on tokio: startup and encryption negotiation,
//! authentication through a hook, the simple query protocol, and COPY OUT / COPY BOTH streams.
//! Used by the pageserver's page service and the safekeeper's libpq endpoint.
//!
//! * [`messages`]: the byte-level codec (frontend parsing, backend serialization), no I/O.
//! * [`startup`]: the startup packet, its parameters and the `options` switches.
//! * [`backend`]: [`PostgresBackend`], the per-connection state machine.
//! * [`error`]: typed errors, split by who can act on them.
//!
//! Every length field is checked against a limit before any buffer is sized from it, and no
//! input makes the parser panic.

pub mod backend;
pub mod error;
pub mod messages;
pub mod startup;

pub use backend::{
    AsyncStream, AuthDecision, AuthHook, BackendConfig, BoxFuture, BoxedStream, CleartextPasswordAuth, CopyMessage,
    Handshake, PostgresBackend, QueryHandler, SessionEnd, TlsAcceptor, TrustAuth,
};
pub use error::{ConnectionError, ProtocolError, QueryError, SqlState, UserError};
pub use messages::{
    BeMessage, CancelKey, FeMessage, FieldDescription, Format, MessageLimits, Severity, TransactionStatus,
};
pub use startup::{FeStartupPacket, StartupParams};

pub mod jwt;
pub use jwt::JwtPasswordAuth;
pub mod tls;
pub use tls::{ListenerTls, RustlsAcceptor};
