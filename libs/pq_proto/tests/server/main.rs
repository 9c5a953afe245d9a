//! End-to-end tests: a small server built on `pq_proto`, driven by real clients
//! (`tokio-postgres`, `psql`) and by a raw client sending what real clients never would.

mod harness;
mod psql;
mod raw;
mod real_client;
