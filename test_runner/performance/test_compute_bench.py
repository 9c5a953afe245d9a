"""Benchmarks of stateless computes (issue: stateless compute). Figures are printed in a table;
nothing is timed-asserted (assertions check correctness only: row counts, pgbench finishing
without failed transactions).

1. `test_compute_start_to_first_query`: a ~100 MB (`pgbench -i -s 7`) and a ≥ 2 GB
   (`pgbench -i -s 140`) database are built through a compute on one timeline; the pageserver
   ingests the WAL and flushes its open layer (HTTP `checkpoint`); the builder stops. Then fresh
   computes are started `BENCH_START_RUNS` times (default 3) on an empty data directory: the
   figure is the wall time from launching `compute_ctl run` to the first successful
   `select ... from pgbench_accounts where aid = 1` (index + heap pages fetched from the
   pageserver), polled every 10 ms from the test. Also printed: compute_ctl's own step timings
   (`/status`) and the basebackup size (from its log).
2. `test_pgbench_and_seqscan_vs_stock`: `pgbench -i -s 50` into stock Postgres on local disk
   (fsync on) and, through a compute, into the pageserver + 3 safekeepers (fsync on); then a
   fresh compute (every page it reads comes from the pageserver) and the restarted stock server
   run, in turn:
   - sequential scan `select count(*) from pgbench_accounts` (~670 MB at scale 50, 5× the
     128 MB shared_buffers; index scans disabled, the plan is checked to be a Seq Scan): cold
     (first scan after the start; the OS page cache is NOT dropped, so stock reads from the page
     cache and the pageserver's layer files are cached too), again
     (warm: the ring buffer keeps the table out of shared_buffers, so a compute still fetches
     every page), both without parallel workers, then with the default parallel plan;
   - pgbench read-write (TPC-B-like) and select-only (`-S`), 4 clients, 60 s each, with the
     ratio compute / stock. Each measurement runs on stock first, then on the compute.
   Same postgresql.conf for both where it matters: shared_buffers = 128MB,
   synchronous_commit = on. Stock Postgres runs with fsync = on; a compute runs with fsync = off
   (its data directory is a cache) and its commits wait for a quorum of safekeepers that fsync.

Run (debug binaries from target/debug unless NEON_BIN_DIR says otherwise; about 6-8 minutes on
2 cores at the default sizes, ~16 GB of test_output):

    .venv/bin/python -m pytest test_runner/performance/test_compute_bench.py -m performance -s

Knobs for a quick smoke run: BENCH_SCALE (50), BENCH_SECONDS (60), BENCH_CLIENTS (4),
BENCH_START_SMALL_SCALE (7), BENCH_START_BIG_SCALE (140), BENCH_START_RUNS (3), e.g.

    BENCH_SCALE=5 BENCH_SECONDS=10 BENCH_START_BIG_SCALE=20 BENCH_START_RUNS=2 \\
        .venv/bin/python -m pytest test_runner/performance/test_compute_bench.py -m performance -s
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import threading
import time
from typing import Optional

import psycopg
import pytest
import requests

from fixtures.bench import machine, wait_for_ingest
from fixtures.compute import Compute, Storage
from fixtures.paths import neon_bin_dir, pg_bin
from fixtures.vanilla_pg import VanillaPostgres

SCALE = int(os.environ.get("BENCH_SCALE", "50"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "60"))
CLIENTS = int(os.environ.get("BENCH_CLIENTS", "4"))
START_SMALL_SCALE = int(os.environ.get("BENCH_START_SMALL_SCALE", "7"))
START_BIG_SCALE = int(os.environ.get("BENCH_START_BIG_SCALE", "140"))
START_RUNS = int(os.environ.get("BENCH_START_RUNS", "3"))

# Settings both sides share (a compute gets them through its spec).
COMMON_SETTINGS = {"shared_buffers": "128MB", "synchronous_commit": "on"}
STOCK_CONF = "fsync = on\n" + "".join(f"{k} = '{v}'\n" for k, v in COMMON_SETTINGS.items())

FIRST_QUERY = "select abalance from pgbench_accounts where aid = 1"


def mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n\n{title}")
    w0 = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{w0}} | result")
    print(f"{'-' * w0}-+-{'-' * 40}")
    for a, b in rows:
        print(f"{a:<{w0}} | {b}")


def pgbench(port: int, *args: str, timeout_s: float = 7200) -> str:
    """Runs pgbench against 127.0.0.1:`port` as cloud_admin, database postgres."""
    env = dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(port), PGUSER="cloud_admin", PGDATABASE="postgres")
    out = subprocess.run([str(pg_bin("pgbench")), *args], capture_output=True, text=True, env=env, timeout=timeout_s)
    assert out.returncode == 0, f"pgbench {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def pgbench_run(port: int, select_only: bool) -> dict:
    args = ["-c", str(CLIENTS), "-j", str(CLIENTS), "-T", str(SECONDS)] + (["-S"] if select_only else [])
    out = pgbench(port, *args, timeout_s=SECONDS + 600)
    tps = float(re.search(r"^tps = ([\d.]+)", out, re.M).group(1))
    done = int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))
    failed = re.search(r"number of failed transactions: (\d+)", out)
    lat = re.search(r"latency average = ([\d.]+) ms", out)
    assert done > 0, out
    assert failed is None or int(failed.group(1)) == 0, out
    return {"tps": tps, "xacts": done, "lat_ms": float(lat.group(1)) if lat else 0.0}


SCAN_QUERY = "select count(*) from pgbench_accounts"


def timed_scan(connect, parallel: bool) -> tuple[float, int]:
    """Seconds for a sequential scan `select count(*) from pgbench_accounts` in a new session,
    and the count. Index scans are disabled: pgbench's tables are all-visible, so the planner
    would otherwise count the (much smaller) primary key with an index-only scan."""
    with connect() as conn:
        conn.execute("set enable_indexscan = off")
        conn.execute("set enable_indexonlyscan = off")
        conn.execute("set enable_bitmapscan = off")
        if not parallel:
            conn.execute("set max_parallel_workers_per_gather = 0")
        plan = "\n".join(r[0] for r in conn.execute(f"explain {SCAN_QUERY}").fetchall())
        assert "Seq Scan on pgbench_accounts" in plan, plan
        t0 = time.monotonic()
        n = conn.execute(SCAN_QUERY).fetchone()[0]
        return time.monotonic() - t0, n


def ps_checkpoint(storage: Storage) -> None:
    r = requests.put(f"{storage.ps.http}/v1/tenant/{storage.tenant_id}/timeline/{storage.timeline_id}/checkpoint", timeout=600)
    r.raise_for_status()


def build_through_compute(storage: Storage, name: str, scale: int) -> dict:
    """`pgbench -i -s scale` through a new compute; waits for the pageserver to ingest it all,
    flushes the pageserver's open layer, stops the compute. Sizes are read in the builder, whose
    data directory holds every block it wrote (a fresh compute's `pg_*_size` only sees local
    files)."""
    c = storage.compute(name, settings=COMMON_SETTINGS)
    t0 = time.monotonic()
    pgbench(c.spec["pg_port"], "-i", "-s", str(scale), "-q")
    t_init = time.monotonic()
    assert c.sql("select count(*) from pgbench_accounts") == [(scale * 100000,)]
    db_bytes, accounts_bytes, lsn = c.sql(
        "select pg_database_size('postgres'), pg_relation_size('pgbench_accounts'), pg_current_wal_flush_lsn()::text"
    )[0]
    t_ingested = wait_for_ingest(storage.ps, storage.tenant_id, storage.timeline_id, lsn, timeout_s=7200)
    ps_checkpoint(storage)
    t_ckpt = time.monotonic()
    c.stop()
    return {
        "db_bytes": db_bytes, "accounts_bytes": accounts_bytes, "lsn": lsn,
        "init_s": t_init - t0, "ingest_wait_s": t_ingested - t_init, "checkpoint_s": t_ckpt - t_ingested,
    }


class FirstQueryPoller(threading.Thread):
    """Tries `FIRST_QUERY` on `port` every 10 ms until it succeeds (or `stop` is set); records
    time.monotonic() of the first success and its result."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.done_at: Optional[float] = None
        self.result: Optional[list] = None
        self.stop_evt = threading.Event()

    def run(self) -> None:
        conninfo = f"host=127.0.0.1 port={self.port} user=cloud_admin dbname=postgres connect_timeout=5"
        while not self.stop_evt.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True) as conn:
                    rows = conn.execute(FIRST_QUERY).fetchall()
                self.done_at = time.monotonic()
                self.result = rows
                return
            except psycopg.Error:
                time.sleep(0.01)


def timed_compute_start(storage: Storage, name: str) -> tuple[Compute, dict]:
    spec = storage.spec("primary", settings=COMMON_SETTINGS)
    c = Compute(storage.daemons, name, storage.output_dir / name, spec, storage.ports.get())
    poller = FirstQueryPoller(spec["pg_port"])
    poller.start()
    t0 = time.monotonic()
    try:
        c.start()  # returns once /status says running (polled every 200 ms)
        poller.join(timeout=120)
    finally:
        poller.stop_evt.set()
    assert poller.done_at is not None, f"no successful first query on compute {name}"
    assert poller.result == [(0,)], poller.result
    status = c.status()
    m = re.search(r"basebackup at \S+: (\d+) bytes", c.daemon.log_text())
    return c, {
        "first_query_s": poller.done_at - t0,
        "steps_ms": dict(status["timings_ms"]),
        "basebackup_bytes": int(m.group(1)) if m else None,
    }


@pytest.mark.performance
@pytest.mark.timeout(4 * 3600)
def test_compute_start_to_first_query(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    storage = Storage(daemons, safekeeper_cluster, test_output_dir, port_allocator)
    # Our first-query poller connects while Postgres is still starting.
    daemons.allow_errors(r"FATAL:  the database system is starting up")
    rows: list[tuple[str, str]] = []
    sizes = [(START_SMALL_SCALE, "~100 MB"), (START_BIG_SCALE, "≥ 2 GB")]
    for scale, label in sizes:
        b = build_through_compute(storage, f"build_s{scale}", scale)
        rows.append((f"[{label}] build: pgbench -i -s {scale} through a compute",
                     f"database {mb(b['db_bytes'])}; init {b['init_s']:.1f} s, pageserver caught up "
                     f"{b['ingest_wait_s']:.1f} s later, checkpoint {b['checkpoint_s']:.1f} s"))
        runs = []
        for i in range(START_RUNS):
            c, r = timed_compute_start(storage, f"start_s{scale}_{i + 1}")
            # The data really is there (and read through the pageserver).
            assert c.sql("select count(*) from pgbench_branches") == [(scale,)]
            c.stop()
            runs.append(r)
        times = [r["first_query_s"] for r in runs]
        rows.append((f"[{label}] compute_ctl launch -> first select on pgbench_accounts",
                     f"median {statistics.median(times) * 1000:.0f} ms over {len(times)} starts "
                     f"({', '.join(f'{t * 1000:.0f}' for t in times)} ms)"))
        step_names = list(runs[0]["steps_ms"])
        steps = ", ".join(f"{s} {statistics.median(r['steps_ms'].get(s, 0) for r in runs):.0f}" for s in step_names)
        rows.append((f"[{label}] compute_ctl steps (median ms)", steps))
        bb = [r["basebackup_bytes"] for r in runs]
        # Acceptance (issue 5): the compute does not download the database to start.
        assert all(b is not None and b < 1024 * 1024 for b in bb), f"[{label}] basebackup sizes {bb}: expected under 1 MiB"
        rows.append((f"[{label}] basebackup size", f"{statistics.median(bb) / 1024:.0f} KiB"))
    print_table(
        f"compute start to first query: {machine()}; binaries {neon_bin_dir()}; "
        f"OS page cache not dropped; the machine may be shared (figures are noisy)",
        rows,
    )


@pytest.mark.performance
@pytest.mark.timeout(3 * 3600)
def test_pgbench_and_seqscan_vs_stock(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    rows: list[tuple[str, str]] = []

    # Stock Postgres on local disk.
    stock = VanillaPostgres(daemons, test_output_dir / "stock" / "pgdata", port_allocator.get())
    daemons.watch_log(stock.log_path)
    stock.initdb(STOCK_CONF).start()
    t0 = time.monotonic()
    pgbench(stock.port, "-i", "-s", str(SCALE), "-q")
    stock_init_s = time.monotonic() - t0
    stock_accounts_bytes = stock.safe_psql("select pg_relation_size('pgbench_accounts')")[0][0]
    rows.append((f"build: pgbench -i -s {SCALE}, stock (fsync on)", f"{stock_init_s:.1f} s"))

    # The same data through a compute into the pageserver.
    storage = Storage(daemons, safekeeper_cluster, test_output_dir, port_allocator)
    b = build_through_compute(storage, "build", SCALE)
    rows.append((f"build: pgbench -i -s {SCALE}, through a compute",
                 f"{b['init_s']:.1f} s; pageserver caught up {b['ingest_wait_s']:.1f} s later, checkpoint {b['checkpoint_s']:.1f} s"))

    # Cold: restart stock (empty shared_buffers, files in the OS page cache) and start a fresh
    # compute (empty shared_buffers and data directory: every page comes from the pageserver).
    stock.stop()
    stock.start()
    compute = storage.compute("bench", settings=COMMON_SETTINGS)
    expected = SCALE * 100000
    sides = [("stock", stock.connect, stock_accounts_bytes), ("compute", compute.connect, b["accounts_bytes"])]
    scans: dict[tuple[str, str], float] = {}
    for what, parallel in [("cold", False), ("again", False), ("parallel", True)]:
        for side, connect, size in sides:
            secs, n = timed_scan(connect, parallel)
            assert n == expected, (side, what, n)
            scans[(side, what)] = size / 1e6 / secs
    for what, desc in [("cold", "first scan after start, no parallel workers"), ("again", "second scan, no parallel workers"),
                       ("parallel", "third scan, default parallel plan")]:
        s, c = scans[("stock", what)], scans[("compute", what)]
        rows.append((f"seq scan of pgbench_accounts ({mb(b['accounts_bytes'])}), {desc}",
                     f"stock {s:.0f} MB/s, compute {c:.0f} MB/s, ratio {c / s:.2f}"))

    ports = [("stock", stock.port), ("compute", compute.spec["pg_port"])]
    for mode, select_only in [("read-write (TPC-B-like)", False), ("select-only (-S)", True)]:
        res = {side: pgbench_run(port, select_only) for side, port in ports}
        s, c = res["stock"], res["compute"]
        rows.append((f"pgbench {mode}, -s {SCALE} -c {CLIENTS} -T {SECONDS}",
                     f"stock {s['tps']:.0f} tps ({s['lat_ms']:.2f} ms avg), compute {c['tps']:.0f} tps "
                     f"({c['lat_ms']:.2f} ms avg), ratio {c['tps'] / s['tps']:.2f}"))

    # Both sides still agree with pgbench's invariant (sum of balances equal across tables).
    q = ("select (select sum(abalance) from pgbench_accounts), (select sum(tbalance) from pgbench_tellers), "
         "(select sum(bbalance) from pgbench_branches)")
    for side, connect, _ in sides:
        with connect() as conn:
            sums = conn.execute(q).fetchone()
        assert len(set(sums)) == 1, (side, sums)
    compute.stop()
    stock.stop()

    print_table(
        f"compute vs stock Postgres: {machine()}; binaries {neon_bin_dir()}; stock fsync on, compute commits wait "
        f"for 2 of 3 safekeepers (fsync on); shared_buffers 128MB both; OS page cache not dropped; "
        f"the machine may be shared (figures are noisy)",
        rows,
    )
