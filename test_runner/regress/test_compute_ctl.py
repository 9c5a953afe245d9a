"""Stateless primaries started by `compute_ctl run`: the data outlives any one compute."""

from __future__ import annotations

import uuid

from fixtures.compute import Compute
from fixtures.pageserver import Pageserver


def test_primary_restarts_keep_every_commit(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    ps = Pageserver(daemons, test_output_dir / "pageserver", port_allocator.get(), port_allocator.get(), [sk.addr for sk in safekeeper_cluster]).start()
    tenant_id, timeline_id = uuid.uuid4().hex, uuid.uuid4().hex
    ps.create_tenant(tenant_id)
    start_lsn = ps.create_timeline(tenant_id, timeline_id)["last_record_lsn"]
    for sk in safekeeper_cluster:
        sk.create_timeline(tenant_id, timeline_id, start_lsn)
    daemons.allow_errors("walproposer", "Postgres ended the replication stream", "disconnected")

    def spec(pg_port):
        return {
            "tenant_id": tenant_id,
            "timeline_id": timeline_id,
            "pageserver": f"127.0.0.1:{ps.pg_port}",
            "safekeepers": [sk.addr for sk in safekeeper_cluster],
            "mode": "primary",
            "pg_port": pg_port,
            "roles": [{"name": "app", "password": "secret"}],
            "databases": [{"name": "appdb", "owner": "app"}],
        }

    c1 = Compute(daemons, "compute1", test_output_dir / "compute1", spec(port_allocator.get()), port_allocator.get()).start()
    st = c1.status()
    assert [s for s, _ in st["timings_ms"]][:2] == ["find the start LSN on the safekeepers", "fetch the basebackup"]
    c1.sql("create table t(id int primary key, v text)", "appdb")
    c1.sql("insert into t select g, 'v' || g from generate_series(1, 5000) g", "appdb")
    expected = c1.sql("select count(*), sum(id) from t", "appdb")[0]
    c1.stop()

    # A new compute on the same timeline, with a fresh data directory: everything is there.
    c2 = Compute(daemons, "compute2", test_output_dir / "compute2", spec(port_allocator.get()), port_allocator.get()).start()
    assert c2.sql("select count(*), sum(id) from t", "appdb")[0] == expected
    assert c2.sql("select rolname from pg_roles where rolname = 'app'") == [("app",)]
    c2.sql("insert into t values (5001, 'after restart')", "appdb")
    c2.stop(immediate=True)

    # Even after kill -9, the acknowledged insert survives.
    c3 = Compute(daemons, "compute3", test_output_dir / "compute3", spec(port_allocator.get()), port_allocator.get()).start()
    assert c3.sql("select v from t where id = 5001", "appdb") == [("after restart",)]
    c3.stop()
