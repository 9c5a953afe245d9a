"""Benchmarks of the WAL path (issue: safekeepers and the walproposer).

pgbench read-write, scale 10, 4 clients, 60 s: stock Postgres alone with fsync on, then the same
Postgres whose commits wait for a quorum of 3 safekeepers (fsync on) through the walproposer.
Prints both TPS, the ratio and commit latency p50/p99; then the WAL throughput of a bulk insert
through the safekeepers. Run: `.venv/bin/pytest test_runner/performance -m performance -s`.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
import uuid

import pytest

from fixtures.paths import pg_bin
from fixtures.safekeeper import WALPROPOSER_PG_CONF, Walproposer, lsn_int, start_timeline_on, wait_for_commit_lsn
from fixtures.vanilla_pg import VanillaPostgres

DURATION_S = int(os.environ.get("BENCH_DURATION_S", "60"))
SCALE = int(os.environ.get("BENCH_SCALE", "10"))
CLIENTS = 4


def run_pgbench(pg: VanillaPostgres, workdir) -> dict:
    env = dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(pg.port), PGUSER=pg.user)
    subprocess.run([pg_bin("pgbench"), "-i", "-s", str(SCALE), "-q", "postgres"], check=True, capture_output=True, env=env)
    workdir.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        [pg_bin("pgbench"), "-c", str(CLIENTS), "-j", str(CLIENTS), "-T", str(DURATION_S), "-l", "--log-prefix", str(workdir / "pgbench_log"), "postgres"],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    tps = float(re.search(r"tps = ([\d.]+)", out.stdout).group(1))
    lat_us = []
    for f in workdir.glob("pgbench_log*"):
        for line in f.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                lat_us.append(int(parts[2]))
    lat_us.sort()
    p = lambda q: lat_us[min(len(lat_us) - 1, int(q * len(lat_us)))] / 1000.0  # noqa: E731
    return {"tps": tps, "p50_ms": p(0.5), "p99_ms": p(0.99), "n": len(lat_us)}


@pytest.mark.performance
def test_pgbench_through_safekeepers_vs_stock(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    conf = "fsync = on\nsynchronous_commit = on\nshared_buffers = 128MB\n"
    stock = VanillaPostgres(daemons, test_output_dir / "stock" / "pgdata", port_allocator.get())
    stock.initdb(conf).start()
    stock_res = run_pgbench(stock, test_output_dir / "stock_bench")
    stock.stop()

    # A compute's local WAL is a cache: durability comes from the safekeepers' fsync, so the
    # compute itself runs with fsync off (as computes do); the stock server keeps fsync on.
    pg = VanillaPostgres(daemons, test_output_dir / "primary" / "pgdata", port_allocator.get())
    pg.initdb(conf.replace("fsync = on", "fsync = off") + WALPROPOSER_PG_CONF).start()
    tenant_id, timeline_id = uuid.uuid4().hex, uuid.uuid4().hex
    start_timeline_on(pg, safekeeper_cluster, tenant_id, timeline_id)
    Walproposer(daemons, pg, safekeeper_cluster, tenant_id, timeline_id).start()
    sk_res = run_pgbench(pg, test_output_dir / "sk_bench")

    # Bulk WAL through the quorum: MB/s from the first byte to the quorum commit.
    pg.safe_psql("create table bulk(v text)")
    before = pg.safe_psql("select pg_current_wal_flush_lsn()::text")[0][0]
    t0 = time.monotonic()
    pg.safe_psql("insert into bulk select repeat('x', 2000) from generate_series(1, 200000)")
    after = pg.safe_psql("select pg_current_wal_flush_lsn()::text")[0][0]
    wait_for_commit_lsn(safekeeper_cluster, tenant_id, timeline_id, after, quorum=2, timeout_s=600)
    elapsed = time.monotonic() - t0
    mb = (lsn_int(after) - lsn_int(before)) / 1e6

    print(f"\nmachine: {platform.node()} {os.cpu_count()} cores; pgbench -s {SCALE} -c {CLIENTS} -T {DURATION_S}")
    print(f"stock Postgres (fsync on):      {stock_res['tps']:.0f} tps, p50 {stock_res['p50_ms']:.2f} ms, p99 {stock_res['p99_ms']:.2f} ms")
    print(f"Postgres + 3 safekeepers (fsync on safekeepers, off on the compute): {sk_res['tps']:.0f} tps, p50 {sk_res['p50_ms']:.2f} ms, p99 {sk_res['p99_ms']:.2f} ms")
    print(f"ratio (safekeepers / stock):    {sk_res['tps'] / stock_res['tps']:.2f}x")
    print(f"bulk WAL through the quorum:    {mb:.0f} MB in {elapsed:.1f} s = {mb / elapsed:.1f} MB/s (fsync on)")
    assert sk_res["n"] > 0 and stock_res["n"] > 0
