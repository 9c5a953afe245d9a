//! Remote storage of timelines (DESIGN D8): layer files and `index_part.json` under
//!
//! ```text
//! tenants/<tenant id>/timelines/<timeline id>/<layer file name>
//! tenants/<tenant id>/timelines/<timeline id>/index_part.json
//! ```
//!
//! (below `prefix_in_bucket` on S3). The index is the only source of truth: a layer that the
//! index does not name is garbage, whatever else is in the prefix.
//!
//! - [`index`]: the `index_part.json` format.
//! - [`upload`]: the per-timeline upload queue ([`RemoteTimelineClient`]): layers, then the
//!   index, in order, retried until they succeed.
//! - [`download`]: listing remote tenants and timelines, restoring a timeline's local directory
//!   from its index (the metadata only), and downloading one layer, checked against the index.
//!   Layers the index names and local disk lacks are `PersistentLayer::Remote` entries in the
//!   layer map, downloaded by the first read that needs them (the client is their
//!   [`crate::layer::LayerDownloader`]).

pub mod download;
pub mod index;
pub mod upload;

#[cfg(test)]
mod tests;

use std::io::{self, Read};
use std::path::Path;

use remote_storage::RemotePath;
use sha2::{Digest, Sha256};
use utils::{TenantId, TimelineId};

pub use index::{IndexPart, IndexPartError, LayerFileMetadata, INDEX_PART_FILE_NAME};
pub use upload::{RemoteTimelineClient, UploadStatus};

/// `tenants`: the root of every tenant's remote prefix.
pub const REMOTE_TENANTS_PREFIX: &str = "tenants";

/// `tenants/<tenant>`.
pub fn remote_tenant_path(tenant_id: TenantId) -> RemotePath {
    RemotePath::from_components(&[REMOTE_TENANTS_PREFIX.to_string(), tenant_id.to_string()])
        .expect("hex ids make valid remote paths")
}

/// `tenants/<tenant>/timelines/<timeline>`.
pub fn remote_timeline_path(tenant_id: TenantId, timeline_id: TimelineId) -> RemotePath {
    remote_tenant_path(tenant_id).join(&format!("timelines/{timeline_id}")).expect("hex ids make valid remote paths")
}

/// `tenants/<tenant>/timelines/<timeline>/index_part.json`.
pub fn remote_index_path(tenant_id: TenantId, timeline_id: TimelineId) -> RemotePath {
    remote_timeline_path(tenant_id, timeline_id).join(INDEX_PART_FILE_NAME).expect("constant name")
}

/// `tenants/<tenant>/timelines/<timeline>/<layer file name>`.
pub fn remote_layer_path(
    tenant_id: TenantId,
    timeline_id: TimelineId,
    layer_file_name: &str,
) -> Result<RemotePath, remote_storage::InvalidRemotePath> {
    if layer_file_name.contains('/') {
        return Err(remote_storage::InvalidRemotePath {
            path: layer_file_name.to_string(),
            reason: "a layer file name must be one path component",
        });
    }
    remote_timeline_path(tenant_id, timeline_id).join(layer_file_name)
}

/// Computes size, crc32c and SHA-256 of everything `reader` yields.
#[derive(Default)]
pub struct Checksummer {
    size: u64,
    crc: u32,
    sha: Sha256,
}

impl Checksummer {
    pub fn update(&mut self, buf: &[u8]) {
        self.size += buf.len() as u64;
        self.crc = crc32c::crc32c_append(self.crc, buf);
        self.sha.update(buf);
    }

    pub fn finish(self) -> LayerFileMetadata {
        LayerFileMetadata { file_size: self.size, crc32c: self.crc, sha256: hex::encode(self.sha.finalize()) }
    }
}

/// Size and checksums of the file at `path` (blocking; reads it in 1 MiB chunks).
pub fn checksum_file(path: &Path) -> io::Result<LayerFileMetadata> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut sum = Checksummer::default();
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(sum.finish());
        }
        sum.update(&buf[..n]);
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn paths_and_checksums() {
        let (t, tl) = (TenantId([0x11; 16]), TimelineId([0x22; 16]));
        assert_eq!(remote_index_path(t, tl).as_str(), format!("tenants/{t}/timelines/{tl}/index_part.json"));
        assert!(remote_layer_path(t, tl, "a/b").is_err());
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, b"123456789").expect("write");
        let m = checksum_file(&path).expect("checksum");
        assert_eq!(m.file_size, 9);
        assert_eq!(m.crc32c, 0xE306_9283, "the crc32c check value");
        assert_eq!(m.sha256, "15e2b0d3c33891ebb0f1ef609ec419420c20e320ce94c65fbc8c3312448eb225");
    }
}
