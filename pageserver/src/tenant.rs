//! A tenant's timelines on local disk: `<workdir>/tenants/<tenant>/timelines/<timeline>/`.
//!
//! - [`metadata`]: the per-timeline metadata file (disk-consistent LSN, branch point, ...).
//! - [`remote`]: remote storage: `index_part.json`, the upload queue, restore, on-demand download.
//! - [`timeline`]: one timeline: its layers, write path (ingest → in-memory layer → L0 deltas),
//!   read path (layers, then the ancestor below the branch point, then WAL redo), branching.
//!
//! The tenant object itself (loading all timelines of a tenant in ancestor order, tenant
//! configuration, background flush/compaction/GC loops) comes later; today callers create and
//! load timelines directly.

pub mod config;
pub mod metadata;
pub mod remote;
pub mod timeline;
