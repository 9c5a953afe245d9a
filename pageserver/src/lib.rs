//! The pageserver's storage engine (DESIGN D6): keys and values, immutable layer files, the
//! in-memory layer that absorbs ingest, the layer map of a timeline, and the read path that
//! collects what is needed to reconstruct a page at an LSN. No network, no WAL decoding here:
//! the daemon and ingest build on this.
//!
//! Modules, one job each:
//! - [`key`]: the 18-byte storage key and its layout.
//! - [`value`]: images and WAL records, and their encoding.
//! - [`layer`]: the layer file format; delta and image writers and readers; the block cache.
//! - [`inmemory_layer`]: the open layer.
//! - [`layer_map`]: which layer to read next for a key at an LSN.
//! - [`reconstruct`]: the walk down a timeline's layers.
//! - [`redo_applier`]: the trait the read path applies WAL records through; Rust-applied records.
//! - [`tenant`]: timelines on disk: metadata, write path and flushes, read path, branching.
//! - [`pgdatadir_mapping`]: the Postgres view of a timeline (relations, databases, SLRUs, ...).
//! - [`walingest`]: decoded WAL records → timeline changes.
//! - [`import_datadir`]: bootstrap a timeline from `initdb` output.

pub mod basebackup;
pub mod config;
pub mod http;
pub mod import_datadir;
pub mod inmemory_layer;
pub mod key;
pub mod layer;
pub mod layer_map;
pub mod page_service;
pub mod pgdatadir_mapping;
pub mod reconstruct;
pub mod redo_applier;
pub mod tenant;
pub mod tenant_mgr;
pub mod value;
pub mod walingest;
pub mod walreceiver;
pub mod walredo;

#[cfg(test)]
pub(crate) mod test_utils;
