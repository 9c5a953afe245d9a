"""Benchmarks of remote storage, compaction and GC (issue 7). Figures are printed; nothing is
timed-asserted (assertions check correctness only).

1. `test_storage_amplification_and_upload`: `pgbench -i -s BENCH_AMP_SCALE` (10) and
   BENCH_AMP_SECONDS (30) of TPC-B updates with 4 clients, through a compute. Printed: local layer
   bytes and remote bytes over `pg_database_size`, after ingest (L0s), after compaction (L1s and
   images) and after GC with a cutoff at the last LSN (pitr_interval 0, gc_horizon 0); and the
   upload throughput of the layers compaction wrote (bytes / time until the upload queue
   drained), for LocalFs and for moto's S3 server.
2. `test_restore_to_first_query`: a ~100 MB (`-s 7`) and a >= 2 GB (`-s BENCH_RESTORE_BIG_SCALE`,
   140) database are written, checkpointed and uploaded; the pageserver is stopped, its disk
   wiped, and started again: the figure is the wall time from starting the pageserver to the
   first answer of `select abalance from pgbench_accounts where aid = 1` on a new compute
   (compute start included), then to a full `count(*)`; both against LocalFs and moto S3.

Run:

    .venv/bin/python -m pytest test_runner/performance/test_remote_storage_bench.py -m performance -s
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
import requests

from fixtures.bench import machine
from fixtures.paths import pg_bin
from fixtures.remote import RemoteStorageStack, checkpoint_and_upload, remote  # noqa: F401
from fixtures.safekeeper import lsn_int

AMP_SCALE = int(os.environ.get("BENCH_AMP_SCALE", "10"))
AMP_SECONDS = int(os.environ.get("BENCH_AMP_SECONDS", "30"))
RESTORE_SMALL_SCALE = int(os.environ.get("BENCH_RESTORE_SMALL_SCALE", "7"))
RESTORE_BIG_SCALE = int(os.environ.get("BENCH_RESTORE_BIG_SCALE", "140"))

CONFIG = {"compaction_period": "0s", "gc_period": "0s", "gc_horizon": "0", "pitr_interval": "0s", "lsn_lease_length": "2s"}


def pgbench(connstr: str, *args: str) -> None:
    subprocess.run([str(pg_bin("pgbench")), *args, connstr], check=True, capture_output=True, timeout=7200)


def remote_bytes(remote, tenant: str) -> int:
    return sum(remote.sizes(f"tenants/{tenant}").values())


def wait_drained(ps, tenant: str, timeline: str, timeout_s: float = 1800) -> float:
    t0 = time.monotonic()
    while ps.timeline(tenant, timeline)["upload_queue_len"] != 0:
        assert time.monotonic() - t0 < timeout_s, "uploads did not finish"
        time.sleep(0.05)
    return time.monotonic() - t0


@pytest.mark.performance
def test_storage_amplification_and_upload(remote, daemons, safekeeper_cluster, test_output_dir, port_allocator):
    stack = RemoteStorageStack(daemons, safekeeper_cluster, test_output_dir, port_allocator, remote.conf())
    ps, tenant, timeline = stack.ps, stack.tenant_id, stack.timeline_id
    assert requests.put(f"{ps.http}/v1/tenant/{tenant}/config", json=CONFIG, timeout=30).ok
    c = stack.compute("load")
    pgbench(c.connstr, "-i", "-s", str(AMP_SCALE), "-q")
    pgbench(c.connstr, "-T", str(AMP_SECONDS), "-c", "4", "-j", "2", "-n")
    db_bytes = int(c.sql("select pg_database_size('postgres')")[0][0])
    sums = c.sql("select sum(abalance), count(*) from pgbench_accounts")
    c.stop()
    rows = []

    def measure(stage: str) -> None:
        info = checkpoint_and_upload(ps, tenant, timeline, safekeeper_cluster)
        local = info["layer_bytes"]
        rem = remote_bytes(remote, tenant)
        rows.append((stage, info["layer_count"], local, rem))

    measure("after ingest")
    t0 = time.monotonic()
    r = requests.put(f"{ps.http}/v1/tenant/{tenant}/timeline/{timeline}/compact?force=true", timeout=3600)
    assert r.ok, r.text
    compact_s = time.monotonic() - t0
    measure("after compaction")
    # More updates, then images above them, so GC at the last LSN has images to keep.
    c = stack.compute("more")
    pgbench(c.connstr, "-T", str(max(5, AMP_SECONDS // 3)), "-c", "4", "-j", "2", "-n")
    sums = c.sql("select sum(abalance), count(*) from pgbench_accounts")
    c.stop()
    checkpoint_and_upload(ps, tenant, timeline, safekeeper_cluster)
    assert requests.put(f"{ps.http}/v1/tenant/{tenant}/timeline/{timeline}/compact?force=true", timeout=3600).ok
    time.sleep(3)  # the computes' leases run out
    g = requests.put(f"{ps.http}/v1/tenant/{tenant}/timeline/{timeline}/do_gc", timeout=3600).json()
    measure("after more updates, compaction, GC")
    c = stack.compute("check")
    assert c.sql("select sum(abalance), count(*) from pgbench_accounts") == sums
    c.stop()

    print(f"\n{machine()}")
    print(f"storage amplification ({type(remote).__name__}), pgbench -s {AMP_SCALE} + {AMP_SECONDS}s TPC-B, pg_database_size {db_bytes / 1e6:.1f} MB")
    print(f"{'stage':<40} {'layers':>7} {'local MB':>9} {'local/db':>9} {'remote MB':>10} {'remote/db':>10}")
    for stage, n, local, rem in rows:
        print(f"{stage:<40} {n:>7} {local / 1e6:>9.1f} {local / db_bytes:>9.2f} {rem / 1e6:>10.1f} {rem / db_bytes:>10.2f}")
    print(f"first compaction (L0s → L1s + images, uploads running meanwhile): {compact_s:.1f} s")
    print(f"gc: {g}")


@pytest.mark.performance
def test_upload_throughput(remote, daemons, safekeeper_cluster, test_output_dir, port_allocator):
    """One large L0 (everything stays in memory until the checkpoint), then the time from the
    end of its flush until the upload queue is empty: the upload of that file and an index."""
    stack = RemoteStorageStack(daemons, safekeeper_cluster, test_output_dir, port_allocator, remote.conf())
    ps, tenant, timeline = stack.ps, stack.tenant_id, stack.timeline_id
    config = dict(CONFIG, checkpoint_distance=str(4 << 30), checkpoint_timeout="1h")
    assert requests.put(f"{ps.http}/v1/tenant/{tenant}/config", json=config, timeout=30).ok
    c = stack.compute("load")
    c.sql("create table r(id int, v text)")
    c.sql(f"insert into r select g, md5(random()::text) || md5(random()::text) from generate_series(1, {AMP_SCALE * 100_000}) g")
    c.stop()
    before = ps.timeline(tenant, timeline)
    wait_drained(ps, tenant, timeline)
    t0 = time.monotonic()
    r = requests.put(f"{ps.http}/v1/tenant/{tenant}/timeline/{timeline}/checkpoint", timeout=3600)
    assert r.ok, r.text
    flush_s = time.monotonic() - t0
    upload_s = wait_drained(ps, tenant, timeline)
    after = ps.timeline(tenant, timeline)
    new_bytes = after["layer_bytes"] - before["layer_bytes"]
    assert new_bytes > 0 and after["remote_consistent_lsn"] == after["disk_consistent_lsn"], after
    print(f"\n{machine()}")
    print(
        f"upload ({type(remote).__name__}): one {new_bytes / 1e6:.1f} MB layer flushed in {flush_s:.2f} s, uploaded "
        f"(with its index) {upload_s:.2f} s after: {new_bytes / 1e6 / max(upload_s, 1e-3):.1f} MB/s"
    )


@pytest.mark.performance
@pytest.mark.parametrize("scale", [RESTORE_SMALL_SCALE, RESTORE_BIG_SCALE])
def test_restore_to_first_query(scale, remote, daemons, safekeeper_cluster, test_output_dir, port_allocator):
    stack = RemoteStorageStack(daemons, safekeeper_cluster, test_output_dir, port_allocator, remote.conf())
    ps, tenant, timeline = stack.ps, stack.tenant_id, stack.timeline_id
    daemons.allow_errors("canceling autovacuum task")  # pgbench -i's TRUNCATE/DDL cancels autovacuum
    c = stack.compute("load")
    t0 = time.monotonic()
    pgbench(c.connstr, "-i", "-s", str(scale), "-q")
    load_s = time.monotonic() - t0
    db_bytes = int(c.sql("select pg_database_size('postgres')")[0][0])
    expected = c.sql("select count(*), sum(abalance) from pgbench_accounts")
    c.stop()
    t0 = time.monotonic()
    info = checkpoint_and_upload(ps, tenant, timeline, safekeeper_cluster)
    drain_s = time.monotonic() - t0
    rem = remote_bytes(remote, tenant)

    ps.stop()
    shutil.rmtree(ps.workdir / "tenants")
    t0 = time.monotonic()
    ps.start()
    c = stack.compute("after_restore")
    first = c.sql("select abalance from pgbench_accounts where aid = 1")
    first_s = time.monotonic() - t0
    got = c.sql("select count(*), sum(abalance) from pgbench_accounts")
    full_s = time.monotonic() - t0
    c.stop()
    assert first == [(0,)] and got == expected
    restored = ps.timeline(tenant, timeline)
    assert restored["disk_consistent_lsn"] == info["disk_consistent_lsn"]
    print(f"\n{machine()}")
    print(
        f"restore ({type(remote).__name__}), pgbench -s {scale}: pg_database_size {db_bytes / 1e6:.0f} MB, remote {rem / 1e6:.0f} MB "
        f"({info['layer_count']} layers); load {load_s:.1f} s, checkpoint + upload wait {drain_s:.1f} s; after wiping the disk: "
        f"pageserver start → first query {first_s:.2f} s, → full count(*) {full_s:.1f} s"
    )
    assert lsn_int(restored["last_record_lsn"]) >= lsn_int(info["last_record_lsn"])
