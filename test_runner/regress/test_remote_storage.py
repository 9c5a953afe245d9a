"""Remote storage (issue 7, first increment): the pageserver uploads every layer and then
`index_part.json`; a pageserver whose disk was wiped restores its tenants from remote storage
and serves the same data. Each test runs against LocalFs and against moto's S3 server."""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
import uuid

import requests

from fixtures.daemons import Daemon, wait_until
from fixtures.pageserver import Pageserver
from fixtures.paths import neon_bin, pg_bin, pg_install_dir
from fixtures.remote import RemoteStorageStack, check_remote_index, checkpoint_and_upload, pg_dump, remote  # noqa: F401
from fixtures.safekeeper import lsn_int

log = logging.getLogger(__name__)


class NamedPageserver(Pageserver):
    """A second pageserver in one test, with its own daemon name and log."""

    def start(self) -> "NamedPageserver":
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "pageserver.toml").write_text(
            f"id = 2\nlisten_pg_addr = '127.0.0.1:{self.pg_port}'\nlisten_http_addr = '127.0.0.1:{self.http_port}'\n"
            f"pg_distrib_dir = '{pg_install_dir()}'\nsafekeepers = []\n{self.extra_conf}\n"
        )
        self.daemon = self.daemons.add(
            Daemon(name="pageserver2", argv=[str(neon_bin("pageserver")), "--workdir", str(self.workdir)], log_path=self.daemons.output_dir / "pageserver2.log")
        )
        self.daemon.start()
        wait_until("pageserver2 HTTP", lambda: requests.get(f"{self.http}/v1/status", timeout=1).ok)
        return self


SUMS = "select (select count(*) from pgbench_accounts), (select sum(abalance) from pgbench_accounts), (select count(*) from t), (select sum(id) from t)"


def test_upload_wipe_restore(remote, daemons, safekeeper_cluster, test_output_dir, port_allocator):
    # A second pageserver on the same remote storage, started before the tenant exists: it
    # learns about the tenant only through the attach API.
    other = NamedPageserver(daemons, test_output_dir / "pageserver2", port_allocator.get(), port_allocator.get(), [], extra_conf=remote.conf()).start()
    stack = RemoteStorageStack(daemons, safekeeper_cluster, test_output_dir, port_allocator, remote.conf())
    ps, tenant, timeline = stack.ps, stack.tenant_id, stack.timeline_id

    c1 = stack.compute("compute1")
    t0 = time.monotonic()
    subprocess.run([str(pg_bin("pgbench")), "-i", "-s", "5", "-q", c1.connstr], check=True, capture_output=True, timeout=600)
    c1.sql("create table t(id int primary key, v text)")
    c1.sql("insert into t select g, md5(g::text) from generate_series(1, 20000) g")
    log.info("pgbench -i -s 5 and 20k rows: %.1fs", time.monotonic() - t0)
    expected = c1.sql(SUMS)
    dump = pg_dump(c1.connstr)
    c1.stop()

    # Everything committed is ingested, checkpointed and uploaded; the index names exactly the
    # local layers, with the right sizes and checksums.
    t0 = time.monotonic()
    info = checkpoint_and_upload(ps, tenant, timeline, safekeeper_cluster)
    upload_s = time.monotonic() - t0
    n_layers, total_bytes = check_remote_index(remote, ps, tenant, timeline, info)
    log.info("uploaded %d layers, %.1f MB; checkpoint + upload wait %.1fs", n_layers, total_bytes / 1e6, upload_s)
    assert n_layers >= 2
    local_dir = ps.workdir / "tenants" / tenant / "timelines" / timeline
    local_layers = {p.name: p.stat().st_size for p in local_dir.iterdir() if p.name != "metadata"}

    # The safekeeper the pageserver streams from hears the remote-consistent LSN in its feedback
    # (the others learn it when the pageserver streams from them).
    remote_lsn = lsn_int(info["remote_consistent_lsn"])
    wait_until(
        "a safekeeper to learn the remote-consistent LSN",
        lambda: any(lsn_int(sk.timeline_status(tenant, timeline)["remote_consistent_lsn"]) >= remote_lsn for sk in safekeeper_cluster),
        timeout_s=30,
    )

    # Attach on the other pageserver: it downloads the tenant (with its settings) and has the
    # same timeline.
    overrides = {"pitr_interval": "2h", "compaction_period": "0s"}
    assert requests.put(f"{ps.http}/v1/tenant/{tenant}/config", json=overrides, timeout=30).ok
    r = requests.post(f"{other.http}/v1/tenant/{tenant}/attach", timeout=300)
    assert r.status_code == 201, r.text
    attached = other.timeline(tenant, timeline)
    assert attached["disk_consistent_lsn"] == info["disk_consistent_lsn"]
    assert requests.get(f"{other.http}/v1/tenant/{tenant}/config", timeout=10).json()["tenant_specific_overrides"] == overrides
    assert requests.post(f"{other.http}/v1/tenant/{tenant}/attach", timeout=30).status_code == 409
    r = requests.post(f"{other.http}/v1/tenant/{uuid.uuid4().hex}/attach", timeout=30)
    assert r.status_code == 404, r.text
    other.stop()

    # Wipe the pageserver's disk and restart it: it restores the tenant from remote storage.
    ps.stop()
    shutil.rmtree(ps.workdir / "tenants")
    t0 = time.monotonic()
    ps.start()
    restored = ps.timeline(tenant, timeline)
    restore_s = time.monotonic() - t0
    log.info("restart with an empty disk until the timeline is served: %.1fs (%.1f MB in remote storage)", restore_s, total_bytes / 1e6)
    assert restored["disk_consistent_lsn"] == info["disk_consistent_lsn"]
    # (0/0 until the upload queue has read the remote index, a moment after start.)
    wait_until("the remote index to be read", lambda: ps.timeline(tenant, timeline)["remote_consistent_lsn"] == info["remote_consistent_lsn"])
    assert restored["initdb_lsn"] == info["initdb_lsn"]
    assert [p.name for p in local_dir.iterdir()] == ["metadata"], "layers are downloaded on demand, not at start"

    # A fresh compute reads back exactly the same data (downloading layers as it goes), and can
    # write on.
    t0 = time.monotonic()
    c2 = stack.compute("compute2")
    assert c2.sql("select count(*) from t") == [(expected[0][2],)]
    log.info("compute start and first query after the restore: %.1fs", time.monotonic() - t0)
    assert c2.sql(SUMS) == expected
    assert pg_dump(c2.connstr) == dump
    downloaded = {p.name: p.stat().st_size for p in local_dir.iterdir() if p.name != "metadata"}
    assert downloaded and all(local_layers.get(name) == size for name, size in downloaded.items()), (downloaded, local_layers)
    log.info("downloaded on demand: %d of %d layers", len(downloaded), len(local_layers))
    c2.sql("insert into t values (20001, 'after restore')")
    c2.stop()

    # Evicting every layer's local file: reads bring them back.
    base = f"{ps.http}/v1/tenant/{tenant}/timeline/{timeline}/layer"
    for name in downloaded:
        r = requests.delete(f"{base}/{name}", timeout=60)
        assert r.ok and r.json() == {"evicted": True}, r.text
    assert [p.name for p in local_dir.iterdir() if p.name in local_layers] == []
    r = requests.delete(f"{base}/{next(iter(downloaded))}", timeout=60)
    assert r.ok and r.json() == {"evicted": False}, r.text
    assert requests.delete(f"{base}/no-such-layer", timeout=60).status_code == 400
    c3 = stack.compute("compute3")
    assert c3.sql("select v from t where id = 20001") == [("after restore",)]
    assert c3.sql(SUMS)[0][:2] == expected[0][:2]
    assert [p.name for p in local_dir.iterdir() if p.name in local_layers], "read back on demand"
    c3.stop()


def test_kill9_during_upload_then_restore(remote, daemons, safekeeper_cluster, test_output_dir, port_allocator):
    """kill -9 of the pageserver while it ingests and uploads, a restart on the same disk, then a
    wipe: the index stays consistent (every layer it names is there with its checksum) and no
    data is lost."""
    stack = RemoteStorageStack(daemons, safekeeper_cluster, test_output_dir, port_allocator, remote.conf())
    ps, tenant, timeline = stack.ps, stack.tenant_id, stack.timeline_id
    c1 = stack.compute("compute1")
    c1.sql("create table t(id int primary key, v text)")
    first = lsn_int(ps.timeline(tenant, timeline)["disk_consistent_lsn"])
    bench = subprocess.Popen([str(pg_bin("pgbench")), "-i", "-s", "5", "-q", c1.connstr], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Kill it while WAL flows, as soon as a layer beyond the bootstrap is flushed (its upload is
    # then under way), and restart it on the same disk.
    wait_until("a flush", lambda: lsn_int(ps.timeline(tenant, timeline)["disk_consistent_lsn"]) > first, timeout_s=120, interval_s=0.02)
    at_kill = ps.timeline(tenant, timeline)
    ps.stop(immediate=True)
    log.info(
        "killed at last_record_lsn %s, disk_consistent_lsn %s, remote_consistent_lsn %s, %s uploads queued",
        at_kill["last_record_lsn"], at_kill["disk_consistent_lsn"], at_kill["remote_consistent_lsn"], at_kill["upload_queue_len"],
    )
    ps.start()
    _, err = bench.communicate(timeout=600)
    assert bench.returncode == 0, err
    c1.sql("insert into t select g, md5(g::text) from generate_series(1, 20000) g")
    expected = c1.sql(SUMS)
    dump = pg_dump(c1.connstr)
    c1.stop()
    info = checkpoint_and_upload(ps, tenant, timeline, safekeeper_cluster)
    assert lsn_int(info["remote_consistent_lsn"]) >= lsn_int(at_kill["remote_consistent_lsn"])
    check_remote_index(remote, ps, tenant, timeline, info)

    ps.stop()
    shutil.rmtree(ps.workdir / "tenants")
    ps.start()
    assert ps.timeline(tenant, timeline)["disk_consistent_lsn"] == info["disk_consistent_lsn"]
    c2 = stack.compute("compute2")
    assert c2.sql(SUMS) == expected
    assert pg_dump(c2.connstr) == dump
    c2.stop()
