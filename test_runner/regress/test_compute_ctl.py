"""Stateless primaries started by `compute_ctl run`: the data outlives any one compute."""

from __future__ import annotations

import io
import subprocess
import tarfile
import threading
import time

import psycopg
import pytest

from fixtures.compute import Storage
from fixtures.daemons import wait_until
from fixtures.paths import pg_bin


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


def test_kill9_under_write_load_loses_no_acknowledged_commit(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    """pgbench and a ledger writer run; the compute (compute_ctl and Postgres) is killed with
    SIGKILL; a new compute has every acknowledged ledger row, pgbench's balances agree across its
    four tables, and amcheck finds nothing wrong."""
    storage = Storage(daemons, safekeeper_cluster, test_output_dir, port_allocator)
    c1 = storage.compute("compute1")
    subprocess.run([str(pg_bin("pgbench")), "-i", "-s", "2", "-q", c1.connstr], check=True, capture_output=True, timeout=300)
    c1.sql("create table ledger(id int primary key, at timestamptz default now())")
    bench = subprocess.Popen([str(pg_bin("pgbench")), "-c", "4", "-T", "60", c1.connstr], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    acked = []
    stop = threading.Event()

    def writer():
        try:
            with c1.connect() as conn:
                i = 0
                while not stop.is_set():
                    i += 1
                    conn.execute("insert into ledger(id) values (%s)", (i,))
                    acked.append(i)
        except psycopg.Error:
            pass  # the compute went away mid-statement: that row was never acknowledged

    t = threading.Thread(target=writer)
    t.start()
    wait_until("ledger rows", lambda: len(acked) >= 300, timeout_s=60)
    c1.stop(immediate=True)
    stop.set()
    t.join(timeout=30)
    bench.kill()
    bench.wait()
    daemons.allow_errors("connection to server .* failed", "server closed the connection", "terminating connection due to unexpected postmaster exit")

    c2 = storage.compute("compute2")
    present = {r[0] for r in c2.sql("select id from ledger")}
    missing = sorted(set(acked) - present)
    assert not missing, f"{len(missing)} acknowledged ledger rows lost, first {missing[:10]}"
    sums = c2.sql(
        "select (select sum(abalance) from pgbench_accounts), (select sum(tbalance) from pgbench_tellers),"
        " (select sum(bbalance) from pgbench_branches), (select sum(delta) from pgbench_history)"
    )[0]
    assert len(set(sums)) == 1, f"pgbench balances disagree after the crash: {sums}"
    assert sums[0] is not None, "pgbench committed nothing before the kill"
    c2.sql("create extension amcheck")
    indexes = c2.sql(
        "select c.relname from pg_index i join pg_class c on c.oid = i.indexrelid join pg_am a on a.oid = c.relam"
        " where a.amname = 'btree' and c.relnamespace = 'public'::regnamespace"
    )
    for (name,) in indexes:
        c2.sql(f"select bt_index_check('{name}'::regclass, true)")
    assert len(indexes) >= 4
    bad = c2.sql(
        "select c.relname, v.blkno, v.msg from pg_class c, verify_heapam(c.oid) v"
        " where c.relkind = 'r' and c.relnamespace = 'public'::regnamespace"
    )
    assert bad == []
    c2.stop()


def test_relation_and_database_sizes_match_stock(daemons, safekeeper_cluster, test_output_dir, port_allocator, vanilla_pg):
    """pg_relation_size and friends come from the storage manager (the compute has no local file
    for what it never wrote) and pg_database_size from the pageserver: the same data gives the
    same relation sizes as stock Postgres, in the writing compute and in a fresh one."""
    workload = [
        "create table t(id int, v text)",
        "insert into t select g, repeat('x', 100) from generate_series(1, 50000) g",
        "create index t_id on t(id)",
        "vacuum t",  # visibility map and free space map forks
    ]
    vanilla_pg.start()
    for q in workload:
        vanilla_pg.safe_psql(q)
    sizes_q = (
        "select pg_relation_size('t'), pg_relation_size('t', 'vm'), pg_relation_size('t_id'),"
        " pg_table_size('t') > pg_relation_size('t'), pg_database_size(current_database())"
    )
    stock = vanilla_pg.safe_psql(sizes_q)[0]

    storage = Storage(daemons, safekeeper_cluster, test_output_dir, port_allocator)
    c1 = storage.compute("compute1")
    for q in workload:
        c1.sql(q)
    ours_writer = c1.sql(sizes_q)[0]
    c1.stop()
    c2 = storage.compute("compute2")
    ours_fresh = c2.sql(sizes_q)[0]
    c2.stop()
    for ours in (ours_writer, ours_fresh):
        assert ours[:4] == stock[:4], f"relation sizes {ours[:4]} differ from stock {stock[:4]}"
        # The database also holds the catalogs; sizes differ by what stock has beyond WAL-logged
        # relation blocks (pg_filenode.map, PG_VERSION, free space map pages).
        assert abs(ours[4] - stock[4]) < 0.1 * stock[4], f"pg_database_size {ours[4]} vs stock {stock[4]}"
    assert stock[0] > 5_000_000


def test_file_copy_commands_are_refused_clearly(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    """CREATE DATABASE ... STRATEGY FILE_COPY and ALTER DATABASE ... SET TABLESPACE copy files a
    compute does not have: refused with the alternative, leaving nothing behind; WAL_LOG works."""
    storage = Storage(daemons, safekeeper_cluster, test_output_dir, port_allocator)
    daemons.allow_errors("is not supported on this compute")
    c = storage.compute("compute1", settings={"allow_in_place_tablespaces": "on"})
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="STRATEGY FILE_COPY is not supported") as e:
        c.sql("create database fc strategy file_copy")
    assert "WAL_LOG" in (e.value.diag.message_hint or "")
    assert c.sql("select count(*) from pg_database where datname = 'fc'") == [(0,)]
    c.sql("create database wl strategy wal_log")
    c.sql("create tablespace ts location ''")
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="SET TABLESPACE is not supported"):
        c.sql("alter database wl set tablespace ts")
    c.sql("create table t(id int)", "wl")
    c.sql("insert into t values (1)", "wl")
    c.stop()
    c2 = storage.compute("compute2")
    assert c2.sql("select id from t", "wl") == [(1,)]
    c2.stop()


def test_a_second_primary_deposes_the_first(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    """Two primaries on one timeline (neon_local refuses this; compute_ctl on its own cannot know):
    the newer one wins the safekeepers' election, and the older one can no longer get a commit
    acknowledged: its compute_ctl stops it and says why, and exits non-zero."""
    storage = Storage(daemons, safekeeper_cluster, test_output_dir, port_allocator)
    daemons.allow_errors("another compute now owns timeline", "terminating connection due to administrator command")
    c1 = storage.compute("compute1")
    c1.sql("create table t(id int)")
    c1.sql("insert into t values (1)")
    c2 = storage.compute("compute2")
    c2.sql("insert into t values (2)")
    with pytest.raises(psycopg.Error):
        with psycopg.connect(c1.connstr, autocommit=True, connect_timeout=5) as conn:
            for i in range(100):  # until the old primary is gone
                conn.execute("insert into t values (3)")
                time.sleep(0.1)
    assert c1.daemon.proc.wait(timeout=30) != 0
    assert "another compute now owns timeline" in c1.daemon.log_text()
    rows = [r[0] for r in c2.sql("select id from t order by 1")]
    assert rows == [1, 2], "a commit on the deposed primary must never be acknowledged"
    c2.stop()


def test_sequential_reads_are_pipelined_on_one_connection(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    """A backend's read-ahead keeps its one pagestream connection: a scan of 3,300 pages the
    compute never wrote (pgbench_accounts at scale 2) opens at most a couple of connections to the pageserver (a regression:
    a backend whose first request was a prefetch reconnected for every page)."""
    storage = Storage(daemons, safekeeper_cluster, test_output_dir, port_allocator)
    c1 = storage.compute("compute1")
    subprocess.run([str(pg_bin("pgbench")), "-i", "-s", "2", "-q", c1.connstr], check=True, capture_output=True, timeout=300)
    c1.stop()
    # shared_buffers smaller than the table: every scan reads it again (through a buffer ring).
    c2 = storage.compute("compute2", settings={"max_parallel_workers_per_gather": "0", "shared_buffers": "16MB"})
    log = storage.ps.daemon.log_path
    for session in range(3):  # the first one also fills the shared relation-size cache
        before = log.read_text().count("client disconnected")
        assert c2.sql("select count(*) from pgbench_accounts where abalance = 0") == [(200000,)]
        time.sleep(0.5)
        ended = log.read_text().count("client disconnected") - before
        assert ended <= 3, f"session {session}: {ended} pagestream connections ended during one scan"
    c2.stop()
