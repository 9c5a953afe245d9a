//! The upload queue and restore against LocalFs: what a checkpoint uploads, a restore from an
//! empty disk reads back the same, a corrupt remote layer is refused, a failing upload is
//! visible and recovers.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use remote_storage::{GenericRemoteStorage, LocalFs};
use utils::{Lsn, TimelineId};

use super::download::{download_index, list_remote_tenants, restore_tenant};
use super::{checksum_file, remote_layer_path, IndexPart};
use crate::tenant::timeline::tests::{resources, TENANT, TIMELINE};
use crate::tenant::timeline::{timeline_path, Timeline};
use crate::test_utils::key;
use crate::value::Value;

const KEYS: u32 = 30;

fn write(tl: &Timeline, from: u64, records: u64) -> Lsn {
    let mut lsn = Lsn(0);
    for i in 0..records {
        lsn = Lsn(from + i * 16);
        let mut w = tl.writer();
        let k = (i % u64::from(KEYS)) as u32;
        w.put(key(k), lsn, Value::Image(Bytes::from(format!("{k}@{lsn}").into_bytes()))).expect("put");
        w.finish_write(lsn, None).expect("finish_write");
    }
    lsn
}

fn reads(tl: &Timeline, lsns: &[Lsn]) -> Vec<Option<Bytes>> {
    lsns.iter().flat_map(|lsn| (0..KEYS).map(move |k| tl.get(key(k), *lsn).ok())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_then_restore_on_an_empty_disk() {
    let remote_dir = tempfile::tempdir().expect("tempdir");
    let storage = GenericRemoteStorage::LocalFs(LocalFs::new(remote_dir.path().to_path_buf()).expect("localfs"));
    let workdir = tempfile::tempdir().expect("tempdir");
    let res = resources(4096).with_remote_storage(Some(storage.clone()));
    let tl = Timeline::create_empty(workdir.path(), TENANT, TIMELINE, Lsn(0x100), 15, res.clone()).expect("create");
    let last = write(&tl, 0x100, 600);
    tl.checkpoint().expect("checkpoint");
    let remote = tl.remote_client().expect("remote client").clone();
    let status = remote.wait_uploaded(Duration::from_secs(30)).await.expect("uploaded");
    assert_eq!(status.remote_consistent_lsn, last);
    assert_eq!(tl.remote_consistent_lsn(), Some(last));
    assert!(status.last_error.is_none());

    // The index names exactly the local layers, with their real sizes and checksums.
    let index = download_index(&storage, TENANT, TIMELINE).await.expect("download").expect("an index");
    assert_eq!(index.disk_consistent_lsn(), last);
    assert_eq!(index.timeline_metadata(), tl.metadata());
    let local: BTreeSet<String> = tl.historic_layers().iter().map(|d| d.layer_name().to_string()).collect();
    assert!(local.len() > 3, "several flushes: {local:?}");
    assert_eq!(index.layers.keys().cloned().collect::<BTreeSet<_>>(), local);
    for (name, meta) in &index.layers {
        let path = remote_dir.path().join(remote_layer_path(TENANT, TIMELINE, name).expect("path").as_str());
        assert_eq!(&checksum_file(&path).expect("remote file"), meta, "{name}");
    }

    // A branch is uploaded too (an index with no layers yet).
    let child_id = TimelineId([0x33; 16]);
    let branch_lsn = Lsn(0x100 + 16 * 300);
    let child = tl.branch(child_id, branch_lsn, Duration::from_secs(5)).await.expect("branch");
    let child_last = write(&child, last.0 + 16, 100);
    child.checkpoint().expect("checkpoint child");
    child.remote_client().expect("remote").wait_uploaded(Duration::from_secs(30)).await.expect("uploaded");

    // An empty disk: both timelines come back from remote storage (metadata only; layers on
    // demand) and read the same.
    let lsns: Vec<Lsn> = [0x100, 0x100 + 16 * 100, branch_lsn.0, last.0, child_last.0].map(Lsn).to_vec();
    let (want_parent, want_child) = (reads(&tl, &lsns), reads(&child, &lsns));
    assert!(want_parent.iter().filter(|v| v.is_some()).count() > 100);
    let restored_dir = tempfile::tempdir().expect("tempdir");
    assert_eq!(list_remote_tenants(&storage).await.expect("list"), vec![TENANT]);
    assert_eq!(restore_tenant(&storage, restored_dir.path(), TENANT).await.expect("restore"), 2);
    // Restoring again restores nothing: both directories exist.
    assert_eq!(restore_tenant(&storage, restored_dir.path(), TENANT).await.expect("restore"), 0);
    let load = |dir: &std::path::Path, tl_id: TimelineId, ancestor: Option<Arc<Timeline>>, index: &IndexPart| {
        Timeline::load_with_remote_index(&timeline_path(dir, TENANT, tl_id), ancestor, res.clone(), Some(index))
            .expect("load restored timeline")
    };
    let child_index = download_index(&storage, TENANT, child_id).await.expect("get").expect("child index");
    let parent2 = load(restored_dir.path(), TIMELINE, None, &index);
    let child2 = load(restored_dir.path(), child_id, Some(Arc::clone(&parent2)), &child_index);
    assert_eq!(parent2.get_disk_consistent_lsn(), last);
    assert_eq!(child2.get_disk_consistent_lsn(), child_last);
    assert_eq!(parent2.historic_layers().len(), index.layers.len(), "every layer is in the map, remote");
    assert_eq!(local_layer_files(parent2.dir()), 0, "nothing is downloaded before a read needs it");
    let parent2_remote = parent2.remote_client().expect("remote").clone();
    // Concurrent readers of the same layers share one download per layer.
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let tl = Arc::clone(&parent2);
            tokio::task::spawn_blocking(move || tl.get(key(3), last).ok())
        })
        .collect();
    let want = tl.get(key(3), last).ok();
    for r in readers {
        assert_eq!(r.await.expect("reader"), want);
    }
    let status = parent2_remote.status();
    assert!(status.downloaded_layers >= 1);
    assert_eq!(status.downloaded_layers as usize, local_layer_files(parent2.dir()), "each layer downloaded once");
    assert_eq!(reads(&parent2, &lsns), want_parent);
    assert_eq!(reads(&child2, &lsns), want_child);
    // Loading the restored timelines uploads nothing new: the remote index already has it all.
    let status = parent2_remote.wait_uploaded(Duration::from_secs(30)).await.expect("idle");
    assert_eq!((status.uploaded_layers, status.remote_consistent_lsn), (0, last));
    let after = download_index(&storage, TENANT, TIMELINE).await.expect("get").expect("index");
    assert_eq!(after.layers, index.layers, "the new index still names the layers not downloaded");

    // A corrupt remote layer is refused when it is downloaded, naming the layer; nothing of it
    // is left on local disk.
    let (name, _) = index.layers.iter().next().expect("a layer");
    let path = remote_dir.path().join(remote_layer_path(TENANT, TIMELINE, name).expect("path").as_str());
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[100] ^= 0x40;
    std::fs::write(&path, bytes).expect("write");
    let third = tempfile::tempdir().expect("tempdir");
    restore_tenant(&storage, third.path(), TENANT).await.expect("restore");
    let parent3 = load(third.path(), TIMELINE, None, &index);
    let results = tokio::task::spawn_blocking(move || {
        let results: Vec<_> = lsns.iter().flat_map(|lsn| (0..KEYS).map(|k| parent3.get(key(k), *lsn))).collect();
        (results, parent3)
    });
    let (results, parent3) = results.await.expect("reads");
    let msg = results.iter().find_map(|r| r.as_ref().err()).expect("a read needs the corrupt layer").to_string();
    assert!(msg.contains("does not match the index") && msg.contains(name.as_str()), "{msg}");
    assert!(!parent3.dir().join(name).exists());
    assert!(std::fs::read_dir(parent3.dir()).expect("ls").all(|e| !e
        .expect("entry")
        .file_name()
        .to_string_lossy()
        .ends_with(".tmp")));
}

fn local_layer_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .expect("ls")
        .filter(|e| e.as_ref().expect("entry").file_name().to_string_lossy().parse::<crate::layer::LayerName>().is_ok())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_upload_is_visible_and_retried() {
    let remote_parent = tempfile::tempdir().expect("tempdir");
    let root = remote_parent.path().join("remote");
    let storage = GenericRemoteStorage::LocalFs(LocalFs::new(root.clone()).expect("localfs"));
    let workdir = tempfile::tempdir().expect("tempdir");
    let res = resources(1 << 20).with_remote_storage(Some(storage.clone()));
    let tl = Timeline::create_empty(workdir.path(), TENANT, TIMELINE, Lsn(0x100), 15, res).expect("create");
    let remote = tl.remote_client().expect("remote").clone();
    remote.wait_uploaded(Duration::from_secs(30)).await.expect("initial index");
    // The storage breaks: its root becomes a file.
    std::fs::remove_dir_all(&root).expect("rm");
    std::fs::write(&root, b"not a directory").expect("write");
    let last = write(&tl, 0x100, 50);
    tl.checkpoint().expect("checkpoint");
    let status = remote.wait_uploaded(Duration::from_millis(1500)).await.expect_err("cannot upload");
    assert!(status.queue_len >= 2, "{status:?}");
    let error = status.last_error.expect("the failure is visible");
    assert!(error.contains("upload of layer"), "{error}");
    assert!(status.remote_consistent_lsn < last);
    // Repaired: the queue drains by itself.
    std::fs::remove_file(&root).expect("rm");
    std::fs::create_dir(&root).expect("mkdir");
    let status = remote.wait_uploaded(Duration::from_secs(30)).await.expect("recovered");
    assert_eq!(status.remote_consistent_lsn, last);
    assert!(status.last_error.is_none());
    assert_eq!(
        download_index(&storage, TENANT, TIMELINE).await.expect("get").expect("index").disk_consistent_lsn(),
        last
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_remote_index_is_replaced_by_the_local_state() {
    let remote_dir = tempfile::tempdir().expect("tempdir");
    let storage = GenericRemoteStorage::LocalFs(LocalFs::new(remote_dir.path().to_path_buf()).expect("localfs"));
    let workdir = tempfile::tempdir().expect("tempdir");
    let res = resources(4096).with_remote_storage(Some(storage.clone()));
    let tl = Timeline::create_empty(workdir.path(), TENANT, TIMELINE, Lsn(0x100), 15, res.clone()).expect("create");
    let last = write(&tl, 0x100, 300);
    tl.checkpoint().expect("checkpoint");
    tl.remote_client().expect("remote").wait_uploaded(Duration::from_secs(30)).await.expect("uploaded");
    let dir = tl.dir().to_path_buf();
    drop(tl);
    let index_path = remote_dir.path().join(super::remote_index_path(TENANT, TIMELINE).as_str());
    std::fs::write(&index_path, b"{\"version\": 1, \"layers\": ").expect("corrupt the index");
    let err = download_index(&storage, TENANT, TIMELINE).await.expect_err("corrupt");
    assert!(format!("{err:#}").contains("corrupt index_part.json"), "{err:#}");
    // The next load uploads a complete index again.
    let tl = Timeline::load(&dir, None, res).expect("reload");
    let status = tl.remote_client().expect("remote").wait_uploaded(Duration::from_secs(30)).await.expect("uploaded");
    assert_eq!(status.remote_consistent_lsn, last);
    let index = download_index(&storage, TENANT, TIMELINE).await.expect("valid again").expect("an index");
    assert_eq!(index.layers.len(), tl.historic_layers().len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_layers_are_downloaded_again_on_read() {
    let remote_dir = tempfile::tempdir().expect("tempdir");
    let storage = GenericRemoteStorage::LocalFs(LocalFs::new(remote_dir.path().to_path_buf()).expect("localfs"));
    let workdir = tempfile::tempdir().expect("tempdir");
    let res = resources(4096).with_remote_storage(Some(storage.clone()));
    let tl = Timeline::create_empty(workdir.path(), TENANT, TIMELINE, Lsn(0x100), 15, res).expect("create");
    let last = write(&tl, 0x100, 400);
    tl.checkpoint().expect("checkpoint");
    let remote = tl.remote_client().expect("remote").clone();
    let lsns = [Lsn(0x100 + 16 * 50), Lsn(0x100 + 16 * 250), last];
    let want = reads(&tl, &lsns);
    // Not uploaded yet (or unknown name): refused with the reason.
    let err = tl.evict_layer("not-a-layer").expect_err("bad name");
    assert!(err.to_string().contains("not a layer file name"), "{err}");
    remote.wait_uploaded(Duration::from_secs(30)).await.expect("uploaded");
    let names: Vec<String> = tl.historic_layers().iter().map(|d| d.layer_name().to_string()).collect();
    let tl2 = Arc::clone(&tl);
    let names2 = names.clone();
    let evicted = tokio::task::spawn_blocking(move || {
        names2.iter().map(|n| tl2.evict_layer(n).expect("evict")).filter(|e| *e).count()
    })
    .await
    .expect("evict");
    assert_eq!(evicted, names.len());
    assert_eq!(local_layer_files(tl.dir()), 0);
    assert!(!tl.evict_layer(&names[0]).expect("again"), "an evicted layer is not evicted twice");
    let tl2 = Arc::clone(&tl);
    let got = tokio::task::spawn_blocking(move || reads(&tl2, &lsns)).await.expect("reads");
    assert_eq!(got, want);
    assert_eq!(remote.status().downloaded_layers as usize, local_layer_files(tl.dir()));
    assert!(local_layer_files(tl.dir()) > 0);
    // The index still names every layer, downloaded or not.
    remote.wait_uploaded(Duration::from_secs(30)).await.expect("idle");
    let index = download_index(&storage, TENANT, TIMELINE).await.expect("get").expect("index");
    assert_eq!(index.layers.len(), names.len());
}
