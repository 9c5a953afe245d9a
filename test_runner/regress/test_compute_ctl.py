"""Stateless primaries started by `compute_ctl run`: the data outlives any one compute."""

from __future__ import annotations

import io
import tarfile

from fixtures.compute import Storage


def test_primary_restarts_keep_every_commit(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    storage = Storage(daemons, safekeeper_cluster, test_output_dir, port_allocator)
    app = {"roles": [{"name": "app", "password": "secret"}], "databases": [{"name": "appdb", "owner": "app"}]}

    c1 = storage.compute("compute1", **app)
    st = c1.status()
    assert [s for s, _ in st["timings_ms"]][:2] == ["find the start LSN on the safekeepers", "fetch the basebackup"]
    c1.sql("create table t(id int primary key, v text)", "appdb")
    c1.sql("insert into t select g, 'v' || g from generate_series(1, 5000) g", "appdb")
    expected = c1.sql("select count(*), sum(id) from t", "appdb")[0]
    c1.stop()

    # A new compute on the same timeline, with a fresh data directory: everything is there.
    c2 = storage.compute("compute2", **app)
    assert c2.sql("select count(*), sum(id) from t", "appdb")[0] == expected
    assert c2.sql("select rolname from pg_roles where rolname = 'app'") == [("app",)]
    c2.sql("insert into t values (5001, 'after restart')", "appdb")
    c2.stop(immediate=True)

    # Even after kill -9, the acknowledged insert survives.
    c3 = storage.compute("compute3", **app)
    assert c3.sql("select v from t where id = 5001", "appdb") == [("after restart",)]
    c3.stop()


def test_tablespaces_survive_a_compute_restart(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    """User tablespaces are in-place folders under pg_tblspc in a new compute: tables in them read
    back, an empty one still takes new tables, and a dropped one is gone."""
    storage = Storage(daemons, safekeeper_cluster, test_output_dir, port_allocator)
    c1 = storage.compute("compute1", settings={"allow_in_place_tablespaces": "on"})
    c1.sql("create tablespace full_ts location ''")
    c1.sql("create tablespace empty_ts location ''")
    c1.sql("create tablespace dropped_ts location ''")
    c1.sql("create table in_ts(id int primary key) tablespace full_ts")
    c1.sql("insert into in_ts select generate_series(1, 1000)")
    c1.sql("create table briefly(id int) tablespace dropped_ts")
    c1.sql("drop table briefly")
    c1.sql("drop tablespace dropped_ts")
    c1.stop()

    c2 = storage.compute("compute2", settings={"allow_in_place_tablespaces": "on"})
    assert c2.sql("select count(*), sum(id) from in_ts") == [(1000, 500500)]
    assert sorted(r[0] for r in c2.sql("select spcname from pg_tablespace where spcname like '%_ts'")) == ["empty_ts", "full_ts"]
    c2.sql("create table later(id int) tablespace empty_ts")
    c2.sql("insert into later values (7)")
    c2.sql("drop table in_ts")
    c2.sql("drop tablespace full_ts")
    c2.stop()

    c3 = storage.compute("compute3", settings={"allow_in_place_tablespaces": "on"})
    assert c3.sql("select id from later") == [(7,)]
    assert c3.sql("select count(*) from pg_tablespace where spcname = 'full_ts'") == [(0,)]
    c3.stop()
    basebackup = storage.ps.backup_tar(storage.tenant_id, storage.timeline_id, full=False)
    names = tarfile.open(fileobj=io.BytesIO(basebackup)).getnames()
    spc_dirs = {n.split("/")[1] for n in names if n.startswith("pg_tblspc/") and n.count("/") >= 1}
    assert len(spc_dirs) == 1, spc_dirs  # only empty_ts is left
