//! Reading remote storage: which tenants and timelines it holds, their indexes, and restoring a
//! timeline's local directory from its index.
//!
//! Restore is on demand: restoring a timeline creates its directory with the metadata file from
//! the index (a temp directory renamed into place, like a new timeline), and loading it with the
//! index puts a remote layer in the layer map for every layer the index names; the first read
//! that needs one downloads it ([`download_layer`]: size, crc32c and SHA-256 checked against the
//! index, fsync'd, renamed into place). Layers already downloaded stay on local disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use futures::TryStreamExt;
use remote_storage::{GenericRemoteStorage, ListingMode, RemotePath, RemoteStorage};
use tokio::io::AsyncWriteExt;
use tracing::info;
use utils::{TenantId, TimelineId};

use super::index::{IndexPart, LayerFileMetadata};
use super::{remote_index_path, remote_layer_path, remote_tenant_path, Checksummer, REMOTE_TENANTS_PREFIX};
use crate::tenant::config::TENANT_CONFIG_FILE_NAME;
use crate::tenant::metadata::save_metadata;
use crate::tenant::timeline::{timeline_path, TENANTS_DIR_NAME, TIMELINES_DIR_NAME};

/// Suffix of a timeline directory being downloaded.
const DOWNLOAD_TEMP_DIR_SUFFIX: &str = ".___download";

/// Tenants that have anything in remote storage.
pub async fn list_remote_tenants(storage: &GenericRemoteStorage) -> anyhow::Result<Vec<TenantId>> {
    let prefix = RemotePath::new(REMOTE_TENANTS_PREFIX).expect("constant");
    let listing = storage.list(Some(&prefix), ListingMode::WithDelimiter, None).await?;
    Ok(listing.prefixes.iter().filter_map(|p| p.object_name().parse().ok()).collect())
}

/// Timelines of `tenant_id` in remote storage (whether or not they have an index yet).
pub async fn list_remote_timelines(
    storage: &GenericRemoteStorage,
    tenant_id: TenantId,
) -> anyhow::Result<Vec<TimelineId>> {
    let prefix = remote_tenant_path(tenant_id).join(TIMELINES_DIR_NAME).expect("constant");
    let listing = storage.list(Some(&prefix), ListingMode::WithDelimiter, None).await?;
    Ok(listing.prefixes.iter().filter_map(|p| p.object_name().parse().ok()).collect())
}

/// The timeline's index, or `None` if it has none.
pub async fn download_index(
    storage: &GenericRemoteStorage,
    tenant_id: TenantId,
    timeline_id: TimelineId,
) -> anyhow::Result<Option<IndexPart>> {
    let path = remote_index_path(tenant_id, timeline_id);
    let bytes = match storage.get_bytes(&path).await {
        Ok(bytes) => bytes,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let index = IndexPart::decode(&bytes, path.as_str())?;
    if index.tenant_id != tenant_id || index.timeline_id != timeline_id {
        anyhow::bail!(
            "{path}: the index says it belongs to {}/{}, not to the timeline whose prefix holds it",
            index.tenant_id,
            index.timeline_id
        );
    }
    Ok(Some(index))
}

/// Downloads layer `name` of the timeline to `dest`, checks it against `expected` and fsyncs it.
pub async fn download_layer(
    storage: &GenericRemoteStorage,
    tenant_id: TenantId,
    timeline_id: TimelineId,
    name: &str,
    expected: &LayerFileMetadata,
    dest: &Path,
) -> anyhow::Result<()> {
    let remote = remote_layer_path(tenant_id, timeline_id, name)?;
    let download = storage.get(&remote, None).await?;
    let mut file = tokio::fs::File::create(dest).await.with_context(|| format!("creating {}", dest.display()))?;
    let mut sum = Checksummer::default();
    let mut body = download.body;
    while let Some(chunk) = body.try_next().await.with_context(|| format!("downloading {remote}"))? {
        sum.update(&chunk);
        file.write_all(&chunk).await.with_context(|| format!("writing {}", dest.display()))?;
    }
    let got = sum.finish();
    if &got != expected {
        anyhow::bail!(
            "downloaded layer {remote} does not match the index: got {} bytes, crc32c {:08x}, sha256 {}; the index \
             says {} bytes, crc32c {:08x}, sha256 {}",
            got.file_size,
            got.crc32c,
            got.sha256,
            expected.file_size,
            expected.crc32c,
            expected.sha256
        );
    }
    file.sync_all().await.with_context(|| format!("fsyncing {}", dest.display()))?;
    Ok(())
}

/// Creates the local directory of the timeline from `index`: the metadata file only. The layers
/// join the layer map as remote layers when the timeline is loaded with the index
/// ([`crate::tenant::timeline::Timeline::load_with_remote_index`]) and are downloaded on first
/// read. Fails if the directory exists.
pub async fn restore_timeline(workdir: &Path, index: &IndexPart) -> anyhow::Result<PathBuf> {
    let (tenant_id, timeline_id) = (index.tenant_id, index.timeline_id);
    let dir = timeline_path(workdir, tenant_id, timeline_id);
    anyhow::ensure!(!dir.exists(), "{} already exists", dir.display());
    let parent = dir.parent().expect("a timeline path has a parent");
    tokio::fs::create_dir_all(parent).await.with_context(|| format!("creating {}", parent.display()))?;
    let temp = parent.join(format!(".{timeline_id}{DOWNLOAD_TEMP_DIR_SUFFIX}"));
    if temp.exists() {
        tokio::fs::remove_dir_all(&temp).await.with_context(|| format!("removing leftover {}", temp.display()))?;
    }
    tokio::fs::create_dir(&temp).await.with_context(|| format!("creating {}", temp.display()))?;
    let md = index.timeline_metadata();
    let (temp2, md2) = (temp.clone(), md.clone());
    tokio::task::spawn_blocking(move || save_metadata(&temp2, &md2)).await??;
    tokio::fs::rename(&temp, &dir).await.with_context(|| format!("renaming {} into place", dir.display()))?;
    std::fs::File::open(parent).and_then(|d| d.sync_all()).with_context(|| format!("fsyncing {}", parent.display()))?;
    info!(
        tenant = %tenant_id,
        timeline = %timeline_id,
        "restored timeline from remote storage: {} layers ({} bytes) to download on demand, disk_consistent_lsn {}",
        index.layers.len(),
        index.layers.values().map(|m| m.file_size).sum::<u64>(),
        md.disk_consistent_lsn
    );
    Ok(dir)
}

/// The remote indexes of the timelines that have a local directory under
/// `<workdir>/tenants/<tenant_id>`, for loading them. A timeline whose index cannot be read is
/// logged and left out (it loads from local disk alone).
pub async fn local_timelines_remote_indexes(
    storage: &GenericRemoteStorage,
    workdir: &Path,
    tenant_id: TenantId,
) -> HashMap<TimelineId, IndexPart> {
    let dir = workdir.join(TENANTS_DIR_NAME).join(tenant_id.to_string()).join(TIMELINES_DIR_NAME);
    let mut out = HashMap::new();
    let Ok(entries) = std::fs::read_dir(&dir) else { return out };
    for entry in entries.flatten() {
        let Ok(timeline_id) = entry.file_name().to_string_lossy().parse::<TimelineId>() else { continue };
        match download_index(storage, tenant_id, timeline_id).await {
            Ok(Some(index)) => {
                out.insert(timeline_id, index);
            }
            Ok(None) => {}
            Err(e) => tracing::error!("timeline {tenant_id}/{timeline_id}: cannot read its remote index: {e:#}"),
        }
    }
    out
}

/// Restores every timeline of `tenant_id` that has a remote index and no local directory, and
/// the tenant's settings (`config.json`) if they are in remote storage and not here. Returns how
/// many timelines were restored.
pub async fn restore_tenant(
    storage: &GenericRemoteStorage,
    workdir: &Path,
    tenant_id: TenantId,
) -> anyhow::Result<usize> {
    let tenant_dir = workdir.join(TENANTS_DIR_NAME).join(tenant_id.to_string());
    let timelines_dir = tenant_dir.join(TIMELINES_DIR_NAME);
    tokio::fs::create_dir_all(&timelines_dir).await.with_context(|| format!("creating {}", timelines_dir.display()))?;
    let config_path = tenant_dir.join(TENANT_CONFIG_FILE_NAME);
    if !config_path.exists() {
        let remote = remote_tenant_path(tenant_id).join(TENANT_CONFIG_FILE_NAME)?;
        match storage.get_bytes(&remote).await {
            Ok(bytes) => {
                let temp = tenant_dir.join(format!("{TENANT_CONFIG_FILE_NAME}.download"));
                let path = config_path.clone();
                tokio::task::spawn_blocking(move || utils::durable::replace_file(&path, &temp, &bytes)).await??;
                info!(tenant = %tenant_id, "restored the tenant's settings from remote storage");
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(anyhow::anyhow!("downloading {remote}: {e}")),
        }
    }
    let mut restored = 0;
    for timeline_id in list_remote_timelines(storage, tenant_id).await? {
        if timeline_path(workdir, tenant_id, timeline_id).exists() {
            continue;
        }
        match download_index(storage, tenant_id, timeline_id).await? {
            Some(index) => {
                restore_timeline(workdir, &index).await?;
                restored += 1;
            }
            None => tracing::warn!(
                "remote timeline {tenant_id}/{timeline_id} has no index_part.json (its creation was not uploaded); \
                 skipping it"
            ),
        }
    }
    Ok(restored)
}
