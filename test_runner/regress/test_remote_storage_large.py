"""Issue 7 acceptance on a large database (slow: `scripts/test.sh -m slow`): 500+ MB written
through pgbench, checkpointed and uploaded; the pageserver's disk is wiped and it is restarted:
the first query answers within seconds (layers download on demand) and a full `pg_dump` equals
the one taken before the wipe. Against LocalFs and moto's S3 server."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time

import pytest

from fixtures.paths import pg_bin
from fixtures.remote import RemoteStorageStack, checkpoint_and_upload, pg_dump, remote  # noqa: F401

log = logging.getLogger(__name__)

SCALE = int(os.environ.get("LARGE_RESTORE_SCALE", "35"))  # ~530 MB of pgbench tables


@pytest.mark.slow
def test_restore_500mb_from_remote_storage(remote, daemons, safekeeper_cluster, test_output_dir, port_allocator):
    stack = RemoteStorageStack(daemons, safekeeper_cluster, test_output_dir, port_allocator, remote.conf())
    ps, tenant, timeline = stack.ps, stack.tenant_id, stack.timeline_id
    c = stack.compute("load")
    subprocess.run([str(pg_bin("pgbench")), "-i", "-s", str(SCALE), "-q", c.connstr], check=True, capture_output=True, timeout=3600)
    subprocess.run([str(pg_bin("pgbench")), "-t", "2000", "-c", "4", "-j", "2", "-n", c.connstr], check=True, capture_output=True, timeout=3600)
    db_bytes = int(c.sql("select pg_database_size('postgres')")[0][0])
    assert db_bytes >= 500_000_000, db_bytes
    dump = pg_dump(c.connstr)
    c.stop()
    info = checkpoint_and_upload(ps, tenant, timeline, safekeeper_cluster)

    ps.stop()
    shutil.rmtree(ps.workdir / "tenants")
    t0 = time.monotonic()
    ps.start()
    c = stack.compute("restored")
    assert c.sql("select count(*) from pgbench_branches") == [(SCALE,)]
    first_s = time.monotonic() - t0
    log.info("%.0f MB database: first query %.2f s after the pageserver started on a wiped disk", db_bytes / 1e6, first_s)
    assert pg_dump(c.connstr) == dump
    c.stop()
    assert ps.timeline(tenant, timeline)["disk_consistent_lsn"] == info["disk_consistent_lsn"]
