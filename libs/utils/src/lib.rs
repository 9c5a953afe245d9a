//! Small shared types and helpers used by every daemon: LSNs, ids, auth (JWT), logging, shutdown,
//! TLS settings, serving HTTP(S).

pub mod auth;
pub mod durable;
pub mod http_server;
pub mod id;
pub mod logging;
pub mod lsn;
pub mod pg_os_user;
pub mod shutdown;
pub mod tls;

pub use id::{NodeId, TenantId, TimelineId};
pub use lsn::Lsn;
