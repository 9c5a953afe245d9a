"""Benchmarks of the pageserver (DESIGN §6): WAL ingest rate and lag, GetPage@LSN latency and
throughput, branch creation time. One setup, one test, a table of figures at the end; nothing is
timed-asserted (only sanity: no errors, pages/s > 0).

Setup: 3 safekeepers, a pageserver, and a stock Postgres primary started from the pageserver's
full backup whose WAL flows through `compute_ctl walproposer` and the safekeepers into the
pageserver.

1. ~100 MB (`pgbench -i -s 6`) written while the pageserver is stopped, then the pageserver is
   started: catch-up ingest MB/s (not bounded by the primary). Branch creation on that timeline.
2. `pgbench -i -s N` for a database of `BENCH_DB_SIZE_GB` (default 1; ≈ 70 scale units per GB):
   end-to-end ingest MB/s (WAL bytes from `pg_current_wal_flush_lsn` until the pageserver's
   `last_record_lsn` reaches the end); then a pgbench read-write run (`BENCH_RW_S`, default 30 s,
   4 clients) with the lag sampled every 0.25 s (bytes, and seconds since the primary had
   flushed the LSN the pageserver is at).
3. `pagebench` at the last LSN over the pgbench tables and indexes: a warm-up scan of every
   block, then latency at 1 client and throughput at 1/4/8 clients (`BENCH_PAGEBENCH_S`,
   default 10 s each), plus 4 clients with 8 requests in flight.
4. Branch creation on the big timeline (median of 10).

Run (debug binaries, target/debug, as the test suite builds them):

    cargo build -p pageserver -p safekeeper -p compute_ctl
    .venv/bin/pytest test_runner/performance/test_pageserver_bench.py -m performance -s

With release binaries (the figures to compare with DESIGN §6):

    cargo build --release -p pageserver -p safekeeper -p compute_ctl
    NEON_BIN_DIR=target/release .venv/bin/pytest test_runner/performance/test_pageserver_bench.py -m performance -s

Knobs: BENCH_DB_SIZE_GB (e.g. 0.2 for a quick run, 2 for the ≥ 2 GB branch figure),
BENCH_PAGEBENCH_S, BENCH_RW_S.
"""

from __future__ import annotations

import math
import os
import threading
import time
import uuid

import pytest
import requests

from fixtures.bench import flush_lsn, machine, pagebench, percentile, pgbench, primary_from_pageserver, user_relations, wait_for_ingest
from fixtures.pageserver import Pageserver
from fixtures.paths import neon_bin_dir
from fixtures.safekeeper import Walproposer, lsn_int

DB_SIZE_GB = float(os.environ.get("BENCH_DB_SIZE_GB", "1"))
PAGEBENCH_S = float(os.environ.get("BENCH_PAGEBENCH_S", "10"))
RW_S = int(os.environ.get("BENCH_RW_S", "30"))
SMALL_SCALE = 6  # ≈ 100 MB with the catalogs
SCALE_PER_GB = 70
BRANCHES = 10
LAG_SAMPLE_S = 0.25

PRIMARY_CONF = "shared_buffers = 256MB\nmax_wal_size = 4GB\ncheckpoint_timeout = 30min\n"


class LagSampler(threading.Thread):
    """Samples (time, primary flush LSN, pageserver last_record_lsn) until stopped."""

    def __init__(self, pg, ps, tenant_id, timeline_id):
        super().__init__(daemon=True)
        self.pg, self.ps, self.tenant_id, self.timeline_id = pg, ps, tenant_id, timeline_id
        self.samples: list[tuple[float, int, int]] = []
        self.stop_evt = threading.Event()
        self.error: BaseException | None = None

    def run(self):
        try:
            with self.pg.connect() as conn:
                while not self.stop_evt.is_set():
                    t = time.monotonic()
                    primary = lsn_int(conn.execute("select pg_current_wal_flush_lsn()::text").fetchone()[0])
                    ps_lsn = lsn_int(self.ps.timeline(self.tenant_id, self.timeline_id)["last_record_lsn"])
                    self.samples.append((t, primary, ps_lsn))
                    self.stop_evt.wait(LAG_SAMPLE_S)
        except BaseException as e:  # reported by the test
            self.error = e

    def stop(self):
        self.stop_evt.set()
        self.join(timeout=30)
        if self.error:
            raise self.error

    def lags(self) -> tuple[list[int], list[float]]:
        """Lag in bytes per sample, and in seconds: how long before the sample the primary had
        flushed the LSN the pageserver was at (interpolated between samples)."""
        lag_bytes, lag_s = [], []
        for i, (t, primary, ps_lsn) in enumerate(self.samples):
            lag_bytes.append(max(0, primary - ps_lsn))
            if ps_lsn >= primary:
                lag_s.append(0.0)
                continue
            for j in range(1, i + 1):
                (t0, p0, _), (t1, p1, _) = self.samples[j - 1], self.samples[j]
                if p1 >= ps_lsn:
                    frac = 0.0 if p1 == p0 else max(0.0, (ps_lsn - p0) / (p1 - p0))
                    lag_s.append(t - (t0 + frac * (t1 - t0)))
                    break
        return lag_bytes, lag_s


def db_size(pg) -> int:
    return int(pg.safe_psql("select sum(pg_database_size(oid)) from pg_database")[0][0])


def time_branches(ps: Pageserver, tenant_id: str, ancestor: str, n: int) -> list[float]:
    times_ms = []
    for _ in range(n):
        body = {"new_timeline_id": uuid.uuid4().hex, "ancestor_timeline_id": ancestor}
        t0 = time.perf_counter()
        r = requests.post(f"{ps.http}/v1/tenant/{tenant_id}/timeline", json=body, timeout=120)
        times_ms.append((time.perf_counter() - t0) * 1000)
        assert r.status_code == 201, r.text
    return times_ms


def mb(b: float) -> str:
    return f"{b / 1e6:.1f} MB"


@pytest.mark.performance
@pytest.mark.timeout(4 * 3600)
def test_pageserver_bench(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    rows: list[tuple[str, str, str]] = []
    ps = Pageserver(daemons, test_output_dir / "pageserver", port_allocator.get(), port_allocator.get(), [sk.addr for sk in safekeeper_cluster]).start()
    tenant_id, timeline_id = uuid.uuid4().hex, uuid.uuid4().hex
    ps.create_tenant(tenant_id)
    start_lsn = ps.create_timeline(tenant_id, timeline_id)["last_record_lsn"]
    for sk in safekeeper_cluster:
        sk.create_timeline(tenant_id, timeline_id, start_lsn)
    pg = primary_from_pageserver(daemons, ps, tenant_id, timeline_id, test_output_dir / "primary" / "pgdata", port_allocator.get(), PRIMARY_CONF)
    pg.start()
    Walproposer(daemons, pg, safekeeper_cluster, tenant_id, timeline_id).start()
    pg.safe_psql("select 1")
    wait_for_ingest(ps, tenant_id, timeline_id, flush_lsn(pg))

    # 1. ~100 MB written while the pageserver is down; then it catches up from the safekeepers.
    before = ps.timeline(tenant_id, timeline_id)["last_record_lsn"]
    ps.stop()
    pgbench(pg, "-i", "-s", str(SMALL_SCALE), "-q")
    end = flush_lsn(pg)
    t0 = time.monotonic()
    ps.start()
    t1 = wait_for_ingest(ps, tenant_id, timeline_id, end)
    catchup_bytes = lsn_int(end) - lsn_int(before)
    rows.append(
        ("WAL ingest, catch-up (pageserver started after the WAL was written)",
         f"{catchup_bytes / 1e6 / (t1 - t0):.1f} MB/s ({mb(catchup_bytes)} in {t1 - t0:.2f} s, incl. startup)",
         "≥ 100 MB/s on one core"))
    small_size = db_size(pg)
    br = time_branches(ps, tenant_id, timeline_id, BRANCHES)
    rows.append((f"branch creation at {mb(small_size)}", f"median {percentile(br, 0.5):.1f} ms (min {min(br):.1f}, max {max(br):.1f})", "≤ 20 ms"))

    # 2. The big database, end to end through the safekeepers; then lag under a read-write load.
    scale = max(1, math.ceil(DB_SIZE_GB * SCALE_PER_GB))
    lsn0, t0 = flush_lsn(pg), time.monotonic()
    pgbench(pg, "-i", "-s", str(scale), "-q")
    lsn_init, t_init = flush_lsn(pg), time.monotonic()
    t_ingested = wait_for_ingest(ps, tenant_id, timeline_id, lsn_init, timeout_s=3600)
    init_bytes = lsn_int(lsn_init) - lsn_int(lsn0)
    rows.append(
        (f"WAL ingest end to end, pgbench -i -s {scale}",
         f"{init_bytes / 1e6 / (t_ingested - t0):.1f} MB/s ({mb(init_bytes)} in {t_ingested - t0:.1f} s; the primary wrote "
         f"{init_bytes / 1e6 / (t_init - t0):.1f} MB/s; caught up {t_ingested - t_init:.2f} s after pgbench ended)",
         "≥ 100 MB/s on one core"))

    sampler = LagSampler(pg, ps, tenant_id, timeline_id)
    lsn_rw0, t_rw0 = flush_lsn(pg), time.monotonic()
    sampler.start()
    out = pgbench(pg, "-c", "4", "-j", "2", "-T", str(RW_S))
    sampler.stop()
    lsn_rw1 = flush_lsn(pg)
    t_rw1 = wait_for_ingest(ps, tenant_id, timeline_id, lsn_rw1)
    tps = next((float(line.split("=")[1].split()[0]) for line in out.splitlines() if line.startswith("tps")), 0.0)
    rw_bytes = lsn_int(lsn_rw1) - lsn_int(lsn_rw0)
    lag_b, lag_s = sampler.lags()
    rows.append(
        (f"WAL of pgbench rw, 4 clients, {RW_S} s ({tps:.0f} tps)",
         f"{mb(rw_bytes)} at {rw_bytes / 1e6 / RW_S:.1f} MB/s, all ingested {t_rw1 - t_rw0 - RW_S:.2f} s after the run", ""))
    rows.append(
        (f"lag under that load ({len(lag_b)} samples every {LAG_SAMPLE_S} s)",
         f"p50 {percentile(lag_b, 0.5) / 1e3:.0f} kB / {percentile(lag_s, 0.5) * 1000:.0f} ms, "
         f"max {max(lag_b, default=0) / 1e3:.0f} kB / {max(lag_s, default=0) * 1000:.0f} ms",
         "< 1 s"))

    # 3. GetPage@LSN at the last LSN, over the pgbench tables and indexes.
    big_size = db_size(pg)
    by_name = user_relations(pg)
    assert "pgbench_accounts" in by_name and "pgbench_accounts_pkey" in by_name, by_name
    rels = list(by_name.values())
    log = test_output_dir / "pagebench.log"
    warm = pagebench(ps, tenant_id, timeline_id, rels, log, clients=2, scan=True)  # LSN from the HTTP API
    lsn = warm["lsn"]
    assert lsn_int(lsn) >= lsn_int(lsn_rw1)
    assert warm["errors"] == 0 and warm["pages"] == warm["total_blocks"] > 0
    rows.append(
        (f"GetPage warm-up scan, every block once, 2 clients ({warm['total_blocks']} blocks, {mb(warm['total_blocks'] * 8192)})",
         f"{warm['pages_per_s']:.0f} pages/s, p50 {warm['latency_us']['p50']} µs, p99 {warm['latency_us']['p99']} µs", ""))
    runs = {}
    for clients, depth in [(1, 1), (4, 1), (8, 1), (4, 8)]:
        r = pagebench(ps, tenant_id, timeline_id, rels, log, clients=clients, pipeline_depth=depth, duration_s=PAGEBENCH_S, lsn=lsn)
        assert r["errors"] == 0 and r["pages_per_s"] > 0, r
        runs[(clients, depth)] = r
    def latency_row(what, lat, target=""):
        rows.append((what, f"p50 {lat['p50']} µs, p90 {lat['p90']}, p99 {lat['p99']}, p99.9 {lat['p99_9']}, max {lat['max']}", target))

    latency_row("GetPage latency, 1 client, resident, all pgbench relations", runs[(1, 1)]["latency_us"], "p50 ≤ 60 µs, p99 ≤ 300 µs")
    # Heap pages written by COPY are WAL records only (Postgres redo on every read); index pages
    # built by CREATE INDEX are full-page images.
    for name in ["pgbench_accounts", "pgbench_accounts_pkey"]:
        r = pagebench(ps, tenant_id, timeline_id, [by_name[name]], log, duration_s=max(1.0, PAGEBENCH_S / 2), lsn=lsn)
        assert r["errors"] == 0 and r["pages_per_s"] > 0, r
        latency_row(f"  ... {name} only ({r['pages_per_s']:.0f} pages/s)", r["latency_us"])
    for (clients, depth), r in runs.items():
        rows.append(
            (f"GetPage throughput, {clients} client(s), {depth} in flight each",
             f"{r['pages_per_s']:.0f} pages/s (p50 {r['latency_us']['p50']} µs, p99 {r['latency_us']['p99']} µs)",
             "≥ 30k pages/s at 4 clients" if (clients, depth) == (4, 1) else ""))

    # 4. Branch creation on the big timeline.
    br = time_branches(ps, tenant_id, timeline_id, BRANCHES)
    rows.append((f"branch creation at {mb(big_size)}", f"median {percentile(br, 0.5):.1f} ms (min {min(br):.1f}, max {max(br):.1f})", "≤ 20 ms"))

    print(f"\n\npageserver benchmarks: {machine()}; binaries {neon_bin_dir()}; "
          f"database {big_size / 2**30:.2f} GiB (pgbench -s {scale}), BENCH_DB_SIZE_GB={DB_SIZE_GB}")
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"{'measurement':<{w0}} | {'result':<{w1}} | DESIGN target")
    print(f"{'-' * w0}-+-{'-' * w1}-+-{'-' * 24}")
    for a, b, c in rows:
        print(f"{a:<{w0}} | {b:<{w1}} | {c}")
