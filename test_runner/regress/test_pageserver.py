"""The pageserver with real Postgres: WAL from a primary flows through the walproposer and three
safekeepers into the pageserver, and what it serves at an LSN is what the primary had."""

from __future__ import annotations

import uuid

from fixtures.daemons import wait_until
from fixtures.pageserver import Pageserver
from fixtures.safekeeper import WALPROPOSER_PG_CONF, Walproposer, lsn_int
from fixtures.vanilla_pg import VanillaPostgres


def start_primary_from_pageserver(daemons, ps, safekeeper_cluster, test_output_dir, port_allocator, tenant_id, timeline_id, name="primary"):
    tar = ps.backup_tar(tenant_id, timeline_id, full=True)
    pg = VanillaPostgres(daemons, test_output_dir / name / "pgdata", port_allocator.get())
    ps.extract_backup(tar, pg.datadir)
    with open(pg.datadir / "postgresql.conf", "a") as f:
        f.write(f"\nport = {pg.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\nfsync = off\n{WALPROPOSER_PG_CONF}")
    daemons.watch_log(pg.log_path)
    return pg


def test_wal_flows_into_pageserver_and_backups_match(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    ps = Pageserver(daemons, test_output_dir / "pageserver", port_allocator.get(), port_allocator.get(), [sk.addr for sk in safekeeper_cluster]).start()
    tenant_id, timeline_id = uuid.uuid4().hex, uuid.uuid4().hex
    ps.create_tenant(tenant_id)
    info = ps.create_timeline(tenant_id, timeline_id)
    start_lsn = info["last_record_lsn"]
    for sk in safekeeper_cluster:
        sk.create_timeline(tenant_id, timeline_id, start_lsn)

    # A stock Postgres started from the pageserver's full backup of the fresh timeline.
    pg = start_primary_from_pageserver(daemons, ps, safekeeper_cluster, test_output_dir, port_allocator, tenant_id, timeline_id)
    pg.user = "cloud_admin"
    pg.start()
    wp = Walproposer(daemons, pg, safekeeper_cluster, tenant_id, timeline_id).start()
    pg.safe_psql("create table t(id int primary key, v text)")
    for i in range(3):
        pg.safe_psql(f"insert into t select g, repeat('x', 100) from generate_series({i * 10000 + 1}, {(i + 1) * 10000}) g")
        pg.safe_psql(f"update t set v = 'updated' where id % 7 = {i}")
    pg.safe_psql("vacuum t")
    final_lsn = pg.safe_psql("select pg_current_wal_flush_lsn()::text")[0][0]
    wait_until(
        "the pageserver to ingest the WAL",
        lambda: lsn_int(ps.timeline(tenant_id, timeline_id)["last_record_lsn"]) >= lsn_int(final_lsn),
        timeout_s=120,
    )
    # The last state, served by the pageserver as a full backup, read by another stock Postgres.
    expected_final = pg.safe_psql("select count(*), sum(length(v)) from t")[0]
    wp.stop()
    pg.stop()
    copy = VanillaPostgres(daemons, test_output_dir / "copy" / "pgdata", port_allocator.get())
    ps.extract_backup(ps.backup_tar(tenant_id, timeline_id, full=True), copy.datadir)
    with open(copy.datadir / "postgresql.conf", "a") as f:
        f.write(f"\nport = {copy.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\nfsync = off\n")
    daemons.watch_log(copy.log_path)
    copy.start()
    assert copy.safe_psql("select count(*), sum(length(v)) from t")[0] == expected_final
    copy.safe_psql("create extension amcheck")
    copy.safe_psql("select bt_index_check('t_pkey', true)")
    assert "database system was shut down" in copy.log_path.read_text()
