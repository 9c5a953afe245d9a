"""Compaction, GC with pitr_interval, LSN leases, crash safety of compaction, and timeline and
tenant deletion (issue 7), each against LocalFs and moto's S3 server."""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
import uuid

import requests

from fixtures.daemons import wait_until
from fixtures.paths import pg_bin
from fixtures.remote import RemoteStorageStack, check_remote_index, checkpoint_and_upload, remote  # noqa: F401
from fixtures.safekeeper import lsn_int

log = logging.getLogger(__name__)

# Background loops off (the test triggers compaction and GC), short leases so a stopped
# compute's lease runs out quickly.
TENANT_CONFIG = {"compaction_period": "0s", "gc_period": "0s", "gc_horizon": "0", "lsn_lease_length": "3s", "pitr_interval": "7d"}


def set_config(ps, tenant: str, **changes) -> dict:
    conf = dict(TENANT_CONFIG, **changes)
    r = requests.put(f"{ps.http}/v1/tenant/{tenant}/config", json=conf, timeout=30)
    assert r.ok, r.text
    return r.json()


def compact(ps, tenant: str, timeline: str) -> dict:
    r = requests.put(f"{ps.http}/v1/tenant/{tenant}/timeline/{timeline}/compact?force=true", timeout=600)
    assert r.ok, r.text
    return r.json()


def gc(ps, tenant: str, timeline: str) -> dict:
    r = requests.put(f"{ps.http}/v1/tenant/{tenant}/timeline/{timeline}/do_gc", timeout=600)
    assert r.ok, r.text
    return r.json()


def pgbench(connstr: str, *args: str) -> None:
    subprocess.run([str(pg_bin("pgbench")), *args, connstr], check=True, capture_output=True, timeout=600)


def current_lsn(c) -> int:
    return lsn_int(c.sql("select pg_current_wal_flush_lsn()::text")[0][0])


def lsn_str(v: int) -> str:
    return f"{v >> 32:X}/{v & 0xFFFFFFFF:X}"


def make_branch(stack, lsn: int) -> str:
    """A branch of the stack's timeline at `lsn`, on the pageserver and the safekeepers."""
    branch = uuid.uuid4().hex
    stack.ps.create_timeline(stack.tenant_id, branch, ancestor=stack.timeline_id, ancestor_lsn=lsn_str(lsn))
    for sk in stack.safekeepers:
        sk.create_timeline(stack.tenant_id, branch, lsn_str(lsn))
    return branch


SUMS = "select count(*), sum(abalance) from pgbench_accounts"


def test_gc_keeps_the_pitr_window(remote, daemons, safekeeper_cluster, test_output_dir, port_allocator):
    stack = RemoteStorageStack(daemons, safekeeper_cluster, test_output_dir, port_allocator, remote.conf())
    ps, tenant, timeline = stack.ps, stack.tenant_id, stack.timeline_id
    set_config(ps, tenant)

    # Phase 1 (old history), then images at its end.
    c = stack.compute("phase1")
    pgbench(c.connstr, "-i", "-s", "3", "-q")
    old_lsn = current_lsn(c)
    old_sums = c.sql(SUMS)
    pgbench(c.connstr, "-t", "1500", "-c", "2", "-n")
    c.stop()
    checkpoint_and_upload(ps, tenant, timeline, safekeeper_cluster)
    first = compact(ps, tenant, timeline)
    assert first["images_created"] >= 1, first

    # A commit above those images, then (after a pause) phase 2 inside the window, with a
    # branch and a static endpoint at its end.
    c = stack.compute("phase2")
    c.sql("create table window_marker(a int)")
    time.sleep(6)
    window_start = time.time()
    pgbench(c.connstr, "-t", "1500", "-c", "2", "-n")
    mid_lsn = current_lsn(c)
    mid_sums = c.sql(SUMS)
    c.stop()
    checkpoint_and_upload(ps, tenant, timeline, safekeeper_cluster)
    branch = make_branch(stack, mid_lsn)
    static = stack.compute("static", mode="static", lsn=lsn_str(mid_lsn))
    assert static.sql(SUMS) == mid_sums

    # Phase 3, then images at its end; the old computes' leases have run out.
    c = stack.compute("phase3")
    pgbench(c.connstr, "-t", "1500", "-c", "2", "-n")
    new_sums = c.sql(SUMS)
    c.stop()
    info = checkpoint_and_upload(ps, tenant, timeline, safekeeper_cluster)
    second = compact(ps, tenant, timeline)
    assert second["images_created"] >= 1, second
    time.sleep(4)
    before = ps.timeline(tenant, timeline)

    # Keep from just before phase 2: phase 1's history goes.
    set_config(ps, tenant, pitr_interval=f"{int(time.time() - window_start) + 2}s")
    result = gc(ps, tenant, timeline)
    log.info("gc: %s", result)
    after = ps.timeline(tenant, timeline)
    cutoff = lsn_int(result["cutoff"])
    assert old_lsn < cutoff <= mid_lsn, (old_lsn, result, mid_lsn)
    assert result["layers_removed"] >= 1, result
    assert after["layer_count"] < before["layer_count"] and after["layer_bytes"] < before["layer_bytes"], (before, after)
    log.info("layers %d → %d, %d → %d bytes", before["layer_count"], after["layer_count"], before["layer_bytes"], after["layer_bytes"])

    # Inside the window: the static endpoint, the branch, the latest data all still read.
    assert static.sql(SUMS) == mid_sums
    static.stop()
    b = stack.compute("branch", timeline_id=branch)
    assert b.sql(SUMS) == mid_sums
    b.stop()
    c = stack.compute("after_gc")
    assert c.sql(SUMS) == new_sums
    c.stop()
    # Below the cutoff: a clear refusal for a branch and for a static endpoint.
    old = lsn_str(old_lsn)
    r = requests.post(f"{ps.http}/v1/tenant/{tenant}/timeline", json={"new_timeline_id": uuid.uuid4().hex, "ancestor_timeline_id": timeline, "ancestor_start_lsn": old}, timeout=30)
    assert r.status_code == 400 and "garbage-collection cutoff" in r.text, r.text
    tar = subprocess.run(
        [str(pg_bin("psql")), "-XAt", "-c", f"basebackup {tenant} {timeline} {old} readonly", f"postgresql://cloud_admin@127.0.0.1:{ps.pg_port}/postgres"],
        capture_output=True, text=True, timeout=60,
    )
    assert tar.returncode != 0 and "garbage-collection cutoff" in tar.stderr, tar.stderr
    # The remote index names exactly the local layers, each with its checksum.
    info = checkpoint_and_upload(ps, tenant, timeline, safekeeper_cluster)
    check_remote_index(remote, ps, tenant, timeline, info)
    assert old_sums != mid_sums


def compact_ignoring_errors(ps, tenant: str, timeline: str) -> None:
    try:
        requests.put(f"{ps.http}/v1/tenant/{tenant}/timeline/{timeline}/compact?force=true", timeout=600)
    except requests.RequestException:
        pass  # the pageserver was killed meanwhile


def test_kill9_during_compaction(remote, daemons, safekeeper_cluster, test_output_dir, port_allocator):
    stack = RemoteStorageStack(daemons, safekeeper_cluster, test_output_dir, port_allocator, remote.conf())
    ps, tenant, timeline = stack.ps, stack.tenant_id, stack.timeline_id
    set_config(ps, tenant)
    c = stack.compute("c1")
    pgbench(c.connstr, "-i", "-s", "5", "-q")
    pgbench(c.connstr, "-t", "2000", "-c", "2", "-n")
    sums = c.sql(SUMS)
    c.stop()
    info = checkpoint_and_upload(ps, tenant, timeline, safekeeper_cluster)
    assert ps.timeline(tenant, timeline)["l0_delta_count"] >= 3
    daemons.allow_errors("pageserver", "compaction", "connection", "upload")

    # Kill -9 at several moments of a compaction; each restart must leave a consistent
    # timeline, and the last compaction must finish.
    for delay in (0.3, 1.0, 2.5):
        t = threading.Thread(target=compact_ignoring_errors, args=(ps, tenant, timeline), daemon=True)
        t.start()
        time.sleep(delay)
        ps.stop(immediate=True)
        t.join(timeout=30)
        ps.start()
        wait_until("the timeline to load", lambda: requests.get(f"{ps.http}/v1/tenant/{tenant}/timeline/{timeline}", timeout=2).ok, timeout_s=60)
        local_dir = ps.workdir / "tenants" / tenant / "timelines" / timeline
        leftovers = [p.name for p in local_dir.iterdir() if p.name.endswith(".tmp")]
        assert not leftovers, leftovers
    result = compact(ps, tenant, timeline)
    log.info("compaction after the kills: %s", result)
    info = checkpoint_and_upload(ps, tenant, timeline, safekeeper_cluster)
    n_layers, n_bytes = check_remote_index(remote, ps, tenant, timeline, info)
    assert ps.timeline(tenant, timeline)["l0_delta_count"] <= 1
    c = stack.compute("c2")
    assert c.sql(SUMS) == sums
    subprocess.run([str(pg_bin("pgbench")), "-t", "100", "-n", c.connstr], check=True, capture_output=True, timeout=300)
    c.stop()
    log.info("after 3 kills during compaction: %d layers, %d bytes, data intact", n_layers, n_bytes)


def test_timeline_and_tenant_delete(remote, daemons, safekeeper_cluster, test_output_dir, port_allocator):
    stack = RemoteStorageStack(daemons, safekeeper_cluster, test_output_dir, port_allocator, remote.conf())
    ps, tenant, timeline = stack.ps, stack.tenant_id, stack.timeline_id
    c = stack.compute("main")
    c.sql("create table t as select g from generate_series(1, 100000) g")
    lsn = current_lsn(c)
    c.stop()
    checkpoint_and_upload(ps, tenant, timeline, safekeeper_cluster)
    branch = make_branch(stack, lsn)
    b = stack.compute("branch", timeline_id=branch)
    b.sql("insert into t select g from generate_series(1, 50000) g")
    b.stop()
    checkpoint_and_upload(ps, tenant, branch, safekeeper_cluster)
    branch_prefix = f"tenants/{tenant}/timelines/{branch}"
    assert remote.sizes(branch_prefix), "the branch uploaded layers"

    # A timeline with children cannot go; the error says what to do.
    r = requests.delete(f"{ps.http}/v1/tenant/{tenant}/timeline/{timeline}", timeout=60)
    assert r.status_code == 400 and "delete them first" in r.text and branch in r.text, r.text
    assert requests.get(f"{ps.http}/v1/tenant/{tenant}/timeline/{timeline}", timeout=10).ok

    r = requests.delete(f"{ps.http}/v1/tenant/{tenant}/timeline/{branch}", timeout=60)
    assert r.ok, r.text
    assert remote.sizes(branch_prefix) == {}, "nothing is left under the timeline's remote prefix"
    assert not (ps.workdir / "tenants" / tenant / "timelines" / branch).exists()
    assert requests.get(f"{ps.http}/v1/tenant/{tenant}/timeline/{branch}", timeout=10).status_code == 404
    # Deleting again: a clear 404.
    r = requests.delete(f"{ps.http}/v1/tenant/{tenant}/timeline/{branch}", timeout=60)
    assert r.status_code == 404, r.text
    # The parent still serves; after a restart the branch stays gone.
    ps.stop()
    ps.start()
    wait_until("the tenant to load", lambda: requests.get(f"{ps.http}/v1/tenant/{tenant}/timeline/{timeline}", timeout=2).ok, timeout_s=60)
    assert requests.get(f"{ps.http}/v1/tenant/{tenant}/timeline/{branch}", timeout=10).status_code == 404
    c = stack.compute("main2")
    assert c.sql("select count(*) from t") == [(100000,)]
    c.stop()

    # An interrupted deletion (marker written, crash) finishes at the next start.
    tl_dir = ps.workdir / "tenants" / tenant / "timelines" / timeline
    ps.stop()
    (tl_dir / "deleted").write_text("")
    ps.start()
    wait_until("the pageserver", lambda: requests.get(f"{ps.http}/v1/status", timeout=2).ok)
    wait_until("the interrupted deletion to finish", lambda: not tl_dir.exists(), timeout_s=60)
    assert remote.sizes(f"tenants/{tenant}/timelines/{timeline}") == {}

    # Tenant delete: nothing left under its prefix, locally or remotely.
    r = requests.delete(f"{ps.http}/v1/tenant/{tenant}", timeout=60)
    assert r.ok, r.text
    assert remote.sizes(f"tenants/{tenant}") == {}
    assert not (ps.workdir / "tenants" / tenant).exists()
    assert requests.get(f"{ps.http}/v1/tenant/{tenant}", timeout=10).status_code == 404


def test_tenant_config_api(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    from fixtures.compute import Storage

    stack = Storage(daemons, safekeeper_cluster, test_output_dir, port_allocator)
    ps = stack.ps
    tenant = uuid.uuid4().hex
    # Bad settings create nothing and say what is wrong.
    r = requests.post(f"{ps.http}/v1/tenant", json={"tenant_id": tenant, "config": {"pitr_intervall": "1h"}}, timeout=30)
    assert r.status_code == 400 and "unknown tenant setting 'pitr_intervall'" in r.text, r.text
    r = requests.post(f"{ps.http}/v1/tenant", json={"tenant_id": tenant, "config": {"pitr_interval": "soon"}}, timeout=30)
    assert r.status_code == 400 and "pitr_interval" in r.text, r.text
    assert requests.get(f"{ps.http}/v1/tenant/{tenant}", timeout=10).status_code == 404
    r = requests.post(f"{ps.http}/v1/tenant", json={"tenant_id": tenant, "config": {"pitr_interval": "1h", "gc_horizon": "1024"}}, timeout=30)
    assert r.status_code == 201, r.text
    conf = requests.get(f"{ps.http}/v1/tenant/{tenant}/config", timeout=10).json()
    assert conf["tenant_specific_overrides"] == {"pitr_interval": "1h", "gc_horizon": "1024"}
    assert conf["effective_config"]["pitr_interval"] == "3600s" and conf["effective_config"]["compaction_threshold"] == "10"
    # Survives a restart; PUT replaces the overrides.
    ps.stop()
    ps.start()
    conf = requests.get(f"{ps.http}/v1/tenant/{tenant}/config", timeout=10).json()
    assert conf["tenant_specific_overrides"] == {"pitr_interval": "1h", "gc_horizon": "1024"}
    r = requests.put(f"{ps.http}/v1/tenant/{tenant}/config", json={"compaction_threshold": 4}, timeout=10)
    assert r.ok and r.json()["tenant_specific_overrides"] == {"compaction_threshold": "4"}, r.text
    assert json.loads((ps.workdir / "tenants" / tenant / "config.json").read_text()) == {"compaction_threshold": "4"}
    r = requests.put(f"{ps.http}/v1/tenant/{tenant}/config", json={"compaction_threshold": 1}, timeout=10)
    assert r.status_code == 400 and "compaction_threshold" in r.text, r.text
    assert requests.get(f"{ps.http}/v1/tenant/{tenant}/config", timeout=10).json()["tenant_specific_overrides"] == {"compaction_threshold": "4"}


def test_eviction_under_a_disk_limit_and_metrics(remote, daemons, safekeeper_cluster, test_output_dir, port_allocator):
    """With `max_local_layer_bytes`, uploaded layers read longest ago leave the local disk until
    the rest fits; reads download them again; /metrics shows the timeline's state."""
    limit = 2 << 20
    stack = RemoteStorageStack(daemons, safekeeper_cluster, test_output_dir, port_allocator, f"max_local_layer_bytes = {limit}\n" + remote.conf())
    ps, tenant, timeline = stack.ps, stack.tenant_id, stack.timeline_id
    c = stack.compute("c1")
    pgbench(c.connstr, "-i", "-s", "4", "-q")
    sums = c.sql(SUMS)
    c.stop()
    info = checkpoint_and_upload(ps, tenant, timeline, safekeeper_cluster)
    assert info["layer_bytes"] > 2 * limit, info
    local_dir = ps.workdir / "tenants" / tenant / "timelines" / timeline

    def local_bytes() -> int:
        return sum(p.stat().st_size for p in local_dir.iterdir() if p.name != "metadata")

    wait_until("eviction down to the limit", lambda: local_bytes() <= limit, timeout_s=60)
    log.info("local layer bytes %d of %d after eviction (limit %d)", local_bytes(), info["layer_bytes"], limit)
    c = stack.compute("c2")
    assert c.sql(SUMS) == sums, "evicted layers are downloaded again on read"
    c.stop()
    metrics = requests.get(f"{ps.http}/metrics", timeout=10).text
    labels = f'{{tenant_id="{tenant}",timeline_id="{timeline}"}}'
    assert f"pageserver_upload_failing{labels} 0" in metrics, metrics
    assert f"pageserver_layers{labels} {ps.timeline(tenant, timeline)['layer_count']}" in metrics, metrics
    assert f"pageserver_remote_consistent_lsn_bytes{labels} " in metrics
