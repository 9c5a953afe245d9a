"""The compute's overlay storage manager (pgxn/neon, DESIGN D3): a Postgres started from a
basebackup without relation data reads every block it never wrote from the pageserver at its
start LSN, keeps the blocks it writes locally, and fails with an error naming the pageserver,
not a hang, when the pageserver is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid

import psycopg
import pytest

from fixtures.daemons import wait_until
from fixtures.pageserver import Pageserver
from fixtures.paths import pg_bin
from fixtures.safekeeper import WALPROPOSER_PG_CONF, Walproposer, lsn_int
from fixtures.vanilla_pg import VanillaPostgres

PAGESERVER_TIMEOUT_MS = 2000


def compute_conf(pg: VanillaPostgres, ps: Pageserver, tenant_id: str, timeline_id: str) -> str:
    return (
        f"\nport = {pg.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\nfsync = off\n"
        "shared_preload_libraries = 'neon'\n"
        f"neon.pageserver_connstring = 'host=127.0.0.1 port={ps.pg_port} user=cloud_admin'\n"
        f"neon.tenant_id = '{tenant_id}'\nneon.timeline_id = '{timeline_id}'\n"
        f"neon.pageserver_timeout = {PAGESERVER_TIMEOUT_MS}\n"
        # small enough that the test table does not fit: pages are evicted and read again,
        # mixing locally written blocks with the pageserver's
        "shared_buffers = 1MB\n"
        # no walproposer yet: this compute only reads and writes locally
        "synchronous_standby_names = ''\n"
    )


def test_compute_reads_pages_from_pageserver(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    ps = Pageserver(daemons, test_output_dir / "pageserver", port_allocator.get(), port_allocator.get(), [sk.addr for sk in safekeeper_cluster]).start()
    tenant_id, timeline_id = uuid.uuid4().hex, uuid.uuid4().hex
    ps.create_tenant(tenant_id)
    start_lsn = ps.create_timeline(tenant_id, timeline_id)["last_record_lsn"]
    for sk in safekeeper_cluster:
        sk.create_timeline(tenant_id, timeline_id, start_lsn)

    # A stock primary from the full backup writes the data through the walproposer.
    primary = VanillaPostgres(daemons, test_output_dir / "primary" / "pgdata", port_allocator.get())
    ps.extract_backup(ps.backup_tar(tenant_id, timeline_id, full=True), primary.datadir)
    with open(primary.datadir / "postgresql.conf", "a") as f:
        f.write(f"\nport = {primary.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\nfsync = off\n{WALPROPOSER_PG_CONF}")
    daemons.watch_log(primary.log_path)
    primary.start()
    wp = Walproposer(daemons, primary, safekeeper_cluster, tenant_id, timeline_id).start()
    primary.safe_psql("create table t(id int primary key, v text)")
    for i in range(2):
        primary.safe_psql(f"insert into t select g, repeat('x', 100) from generate_series({i * 10000 + 1}, {(i + 1) * 10000}) g")
    primary.safe_psql("create table untouched(id int)")
    primary.safe_psql("insert into untouched select generate_series(1, 1000)")
    primary.safe_psql("create table untouched2 as select generate_series(1, 1000) id")
    # frozen: reading sets no hint bits, so no page of t is written before the update below
    primary.safe_psql("vacuum (freeze) t")
    t_path = primary.safe_psql("select pg_relation_filepath('t')")[0][0]
    # VACUUM writes no commit record, so nothing flushes (and streams) its WAL: a transaction
    # that writes WAL does (one that only takes an xid commits asynchronously).
    primary.safe_psql("create table wal_marker()")
    final_lsn = primary.safe_psql("select pg_current_wal_flush_lsn()::text")[0][0]
    wait_until(
        "the pageserver to ingest the WAL",
        lambda: lsn_int(ps.timeline(tenant_id, timeline_id)["last_record_lsn"]) >= lsn_int(final_lsn),
        timeout_s=120,
    )
    wp.stop()
    primary.stop()

    # The compute: a basebackup without relation data, our storage manager, no walproposer.
    compute = VanillaPostgres(daemons, test_output_dir / "compute" / "pgdata", port_allocator.get())
    ps.extract_backup(ps.backup_tar(tenant_id, timeline_id, full=False), compute.datadir)
    assert not (compute.datadir / t_path).exists(), "the basebackup must not carry relation data"
    with open(compute.datadir / "postgresql.conf", "a") as f:
        f.write(compute_conf(compute, ps, tenant_id, timeline_id))
    daemons.watch_log(compute.log_path)
    compute.start()
    assert "neon: reading the pageserver at start LSN" in compute.log_path.read_text()

    # Reads: every page of t comes from the pageserver.
    assert compute.safe_psql("select count(*), sum(length(v)) from t")[0] == (20000, 2000000)
    assert not (compute.datadir / t_path).exists(), "reading must not create local files"
    with compute.connect() as conn:
        conn.execute("set enable_seqscan = off")
        plan = "\n".join(r[0] for r in conn.execute("explain select v from t where id = 12345").fetchall())
        assert "Index" in plan, plan
        assert conn.execute("select v from t where id = 12345").fetchall() == [("x" * 100,)]

    # A block written in the middle of t: the local file has holes below it, read from the
    # pageserver.
    compute.safe_psql("update t set v = 'mid' where id = 10000")
    compute.safe_psql("checkpoint")
    assert (compute.datadir / t_path).exists(), "written blocks must live locally"
    assert compute.safe_psql("select count(*), sum(length(v)), count(*) filter (where v = 'mid') from t")[0] == (20000, 2000000 - 97, 1)

    # Local writes over the pageserver's pages, flushed to local files and read back.
    compute.safe_psql("update t set v = 'updated' where id % 10 = 0")
    compute.safe_psql("checkpoint")
    assert compute.safe_psql("select count(*), count(*) filter (where v = 'updated') from t")[0] == (20000, 2000)
    # Vacuum truncation of a pageserver relation, then extension past the truncation point.
    compute.safe_psql("delete from t where id > 19000")
    compute.safe_psql("vacuum t")
    compute.safe_psql("insert into t select g, 'new' from generate_series(30001, 30500) g")
    compute.safe_psql("checkpoint")
    assert compute.safe_psql("select count(*), count(*) filter (where v = 'new'), max(id) from t")[0] == (19500, 500, 30500)
    compute.safe_psql("create extension amcheck")
    compute.safe_psql("select bt_index_check('t_pkey', true)")

    # A table created here lives only here.
    compute.safe_psql("create table fresh(id int primary key, v text)")
    compute.safe_psql("insert into fresh select g, md5(g::text) from generate_series(1, 5000) g")
    compute.safe_psql("checkpoint")
    assert compute.safe_psql("select count(*), min(id), max(id) from fresh")[0] == (5000, 1, 5000)
    assert compute.safe_psql("select v from fresh where id = 4321")[0][0] == compute.safe_psql("select md5('4321')")[0][0]

    # Concurrent backends sharing the relation size cache, with buffers evicted all the time.
    pgbench = str(pg_bin("pgbench"))
    subprocess.run([pgbench, "-i", "-s", "2", "-q", compute.connstr()], check=True, capture_output=True)
    subprocess.run([pgbench, "-c", "4", "-T", "5", compute.connstr()], check=True, capture_output=True)
    assert compute.safe_psql("select (select sum(abalance) from pgbench_accounts) = (select coalesce(sum(delta), 0) from pgbench_history)")[0][0]
    compute.safe_psql("select bt_index_check('pgbench_accounts_pkey', true)")

    # CREATE DATABASE (WAL_LOG strategy) copies the template's relations through the smgr.
    compute.safe_psql("create database db2")
    compute.safe_psql("create table t2 as select generate_series(1, 100) id", dbname="db2")
    assert compute.safe_psql("select count(*) from t2", dbname="db2")[0][0] == 100
    assert compute.safe_psql("select count(*) > 100 from pg_class", dbname="db2")[0][0]

    # The pageserver goes away: a read of a table not read yet fails, naming it, within the timeout.
    daemons.allow_errors(r"pageserver at 127\.0\.0\.1:\d+ .*failed to answer")
    with compute.connect() as conn:
        conn.execute("select count(*) from fresh")  # catalogs this session needs are cached
        ps.stop()
        started = time.monotonic()
        with pytest.raises(psycopg.Error, match=rf"pageserver at 127\.0\.0\.1:{ps.pg_port}"):
            conn.execute("select count(*) from untouched")
        assert time.monotonic() - started < 3 * PAGESERVER_TIMEOUT_MS / 1000 + 5
        # The session survives the error.
        assert conn.execute("select 1").fetchall() == [(1,)]

    # Back again: the next request reconnects.
    ps.start()
    assert compute.safe_psql("select count(*) from untouched")[0][0] == 1000

    # A pageserver that accepts connections but never answers: the timeout, not a hang.
    with compute.connect() as conn:
        conn.execute("select count(*) from fresh")
        os.kill(ps.daemon.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(psycopg.Error, match=rf"pageserver at 127\.0\.0\.1:{ps.pg_port} .*no answer within neon\.pageserver_timeout"):
                conn.execute("select count(*) from untouched2")
            elapsed = time.monotonic() - started
            assert PAGESERVER_TIMEOUT_MS / 1000 * 0.9 <= elapsed < 2 * PAGESERVER_TIMEOUT_MS / 1000 + 5, elapsed
        finally:
            os.kill(ps.daemon.proc.pid, signal.SIGCONT)
        assert conn.execute("select count(*) from untouched2").fetchall() == [(1000,)]
    compute.stop()
