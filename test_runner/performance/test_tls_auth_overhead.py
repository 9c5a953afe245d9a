"""What JWT auth + TLS cost (issue 8 acceptance: GetPage latency and pgbench TPS with TLS and
auth on vs off, measured in the same run, and the ratio recorded). Figures are printed in a
table; nothing is timed-asserted (only sanity: no errors, TPS > 0, pages/s > 0).

Two `neon_local` stacks side by side in one test (each: pageserver, 3 safekeepers, one primary
endpoint), identical but for `init`:

- off: `neon_local init` — plaintext everywhere, no tokens;
- on: `neon_local init --auth` — JWT auth and TLS on every daemon and the compute: the
  compute's GetPage@LSN connections to the pageserver, the walproposer's WAL to the
  safekeepers, the pageserver's WAL receiver, and pgbench's own connections to the endpoint
  (its URL carries sslmode=verify-full) are TLS, each checked against the stack's CA.

Each gets a pgbench database (`pgbench -i -s BENCH_TLS_SCALE`, default 10, ≈ 150 MB), the
pageserver ingests all of it, and the endpoint restarts (a compute keeps the blocks it wrote
locally; the restarted one reads every block from the pageserver). Then, one stack at a time
(the other idle):

1. GetPage@LSN via `pagebench` against each page service, 1 client, 1 request in flight, random
   blocks of pgbench_accounts and its primary key at the LSN after the load: a warm-up scan of
   every block first, then `BENCH_TLS_ROUNDS` rounds (default 2) of `BENCH_TLS_PAGEBENCH_S`
   (default 10 s) per side, interleaved off/on/off/on. On the secured stack pagebench connects
   with `--ssl-ca-file` (verify-full) and a tenant token (NEON_AUTH_TOKEN); the LSN is read over
   HTTPS by the test and passed with `--lsn`. Reported: median over rounds of p50 and p99 and
   pages/s.
2. pgbench select-only (`-S`), then TPC-B-like read-write (which makes the blocks it updates
   local to the compute), on the endpoint with shared_buffers = `BENCH_TLS_SHARED_BUFFERS`
   (default 16MB, so that most reads are GetPage@LSN requests; commits wait for the
   safekeepers), `BENCH_TLS_CLIENTS` clients (default 4, 2 threads), `BENCH_TLS_SECONDS`
   (default 20) per run, `BENCH_TLS_ROUNDS` rounds per kind interleaved off/on/off/on.
   Reported: mean TPS over the rounds (and each run) and mean latency. A third variant runs
   pgbench against the secured stack with its own connection in plaintext (loopback,
   `sslmode=disable`): what TLS + auth cost inside the stack, apart from the client's TLS to
   Postgres (stock Postgres SSL, paid the same without us).

Ratios are on/off (TPS, pages/s: below 1 is slower with TLS; latencies: above 1 is slower).

Run (debug binaries from target/debug unless NEON_BIN_DIR says otherwise; about 5 minutes on 2
cores at the defaults):

    .venv/bin/pytest test_runner/performance/test_tls_auth_overhead.py -m performance -s

With release binaries (the figures to quote):

    cargo build --release --bins
    NEON_BIN_DIR=target/release .venv/bin/pytest test_runner/performance/test_tls_auth_overhead.py -m performance -s

Quick smoke run:

    BENCH_TLS_SCALE=2 BENCH_TLS_SECONDS=5 BENCH_TLS_PAGEBENCH_S=3 BENCH_TLS_ROUNDS=1 \\
        .venv/bin/pytest test_runner/performance/test_tls_auth_overhead.py -m performance -s
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from fixtures.bench import machine
from fixtures.neon_local import NeonLocal, _free_offset, lsn_int, one, pgbench, sql
from fixtures.paths import neon_bin, neon_bin_dir

SCALE = int(os.environ.get("BENCH_TLS_SCALE", "10"))
SECONDS = int(os.environ.get("BENCH_TLS_SECONDS", "20"))
CLIENTS = int(os.environ.get("BENCH_TLS_CLIENTS", "4"))
ROUNDS = int(os.environ.get("BENCH_TLS_ROUNDS", "2"))
PAGEBENCH_S = float(os.environ.get("BENCH_TLS_PAGEBENCH_S", "10"))
# Small, so that most pgbench reads miss the compute's buffers and are GetPage@LSN requests.
SHARED_BUFFERS = os.environ.get("BENCH_TLS_SHARED_BUFFERS", "16MB")

SIDES = ("off", "on")


class Stack:
    """One neon_local environment with a pgbench database on its endpoint."""

    def __init__(self, name: str, nl: NeonLocal):
        self.name = name
        self.nl = nl
        self.connstr = ""
        self.tenant = ""
        self.timeline = ""

    @property
    def secured(self) -> bool:
        return self.name == "on"

    def init(self) -> None:
        # Not NeonLocal.run: with NEON_TEST_AUTH_TLS=1 it would add --auth to the plain stack.
        argv = [str(neon_bin("neon_local")), "init", "--num-safekeepers", "3"] + (["--auth"] if self.secured else [])
        r = subprocess.run(argv, env=self.nl.env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{' '.join(argv)}: {r.stdout}{r.stderr}"
        conf = self.nl.config()
        assert bool(conf.get("auth")) == bool(conf.get("tls")) == self.secured, f"stack {self.name}: auth {conf.get('auth')}, tls {conf.get('tls')}"
        self.nl.run("start")
        self.nl.run("tenant", "create", "--set-default")
        self.connstr = self.nl.endpoint("bench", "-c", f"shared_buffers={SHARED_BUFFERS}")
        ep = self.nl.config()["endpoints"]["bench"]
        self.tenant, self.timeline = ep["tenant_id"], ep["timeline_id"]
        # pgbench's connections to the endpoint are TLS exactly on the secured stack.
        assert one(self.connstr, "select ssl from pg_stat_ssl where pid = pg_backend_pid()") == self.secured

    def ps_timeline(self) -> dict:
        r = self.nl.ps_http("GET", f"/v1/tenant/{self.tenant}/timeline/{self.timeline}")
        assert r.ok, r.text
        return r.json()

    def load(self) -> str:
        """pgbench -i; waits until the pageserver has ingested it, restarts the endpoint; returns
        the LSN."""
        pgbench(self.connstr, "-i", "-q", "-s", str(SCALE), timeout=1800)
        flush = one(self.connstr, "select pg_current_wal_flush_lsn()::text")
        deadline = time.monotonic() + 600
        while lsn_int(self.ps_timeline()["last_record_lsn"]) < lsn_int(flush):
            assert time.monotonic() < deadline, f"stack {self.name}: the pageserver did not ingest up to {flush}"
            time.sleep(0.05)
        # A compute keeps the blocks it wrote in local files (pgxn/neon/pagestore_smgr.c): the
        # restarted one holds none, so its reads are GetPage@LSN requests.
        self.nl.run("endpoint", "stop", "bench")
        self.connstr = self.nl.start_endpoint("bench")
        return self.ps_timeline()["last_record_lsn"]

    def relations(self) -> list[str]:
        """spcnode/dbnode/relnode of pgbench_accounts and its primary key."""
        rows = sql(
            self.connstr,
            "select coalesce(nullif(c.reltablespace, 0), d.dattablespace), d.oid, pg_relation_filenode(c.oid) "
            "from pg_class c, pg_database d where d.datname = current_database() "
            "and c.relname in ('pgbench_accounts', 'pgbench_accounts_pkey')",
        )
        assert len(rows) == 2, rows
        return [f"{s}/{d}/{r}" for s, d, r in rows]

    def pagebench(self, relations: list[str], lsn: str, log: Path, scan: bool = False) -> dict:
        conf = self.nl.config()
        argv = [
            str(neon_bin("pagebench")),
            "--page-service", f"127.0.0.1:{conf['pageserver']['pg_port']}",
            "--tenant-id", self.tenant,
            "--timeline-id", self.timeline,
            "--relations", ",".join(relations),
            "--lsn", lsn,
            "--clients", "1",
            "--pipeline-depth", "1",
            "--duration-s", str(PAGEBENCH_S),
        ]
        if scan:
            argv.append("--scan")
        env = dict(os.environ)
        env.pop("NEON_AUTH_TOKEN", None)
        if self.secured:
            argv += ["--ssl-ca-file", str(self.nl.repo_dir / "tls" / "ca.crt")]
            env["NEON_AUTH_TOKEN"] = self.nl.run("auth-token", "--scope", "tenant", "--tenant-id", self.tenant).stdout.strip()
        with open(log, "ab") as f:
            f.write(("\n$ " + " ".join(argv) + "\n").encode())
            f.flush()
            out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=f, env=env, timeout=600)
            f.write(out.stdout)
        assert out.returncode == 0, f"pagebench on stack {self.name} failed (see {log}): {out.stdout.decode()}"
        res = json.loads(out.stdout)
        assert res["errors"] == 0 and res["zero_pages"] == 0 and res["pages_per_s"] > 0, f"stack {self.name}: {res}"
        return res

    def pgbench_run(self, select_only: bool, app_tls: bool = True) -> tuple[float, float]:
        """TPS (without connection time) and mean latency (ms) of one run. `app_tls=False`: pgbench
        talks to the endpoint in plaintext over loopback (what pg_hba allows there), so only the
        storage side (compute ↔ pageserver, safekeepers) is secured."""
        args = ["-c", str(CLIENTS), "-j", str(min(CLIENTS, 2)), "-T", str(SECONDS), "-n"] + (["-S"] if select_only else [])
        connstr = self.connstr if app_tls else self.connstr.partition("?")[0] + "?sslmode=disable"
        out = pgbench(connstr, *args, timeout=SECONDS + 300).stdout
        tps = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out)
        lat = re.search(r"latency average = ([0-9.]+) ms", out)
        assert tps and lat, out
        failed = re.search(r"number of failed transactions: (\d+)", out)
        assert failed is None or failed.group(1) == "0", out
        assert float(tps.group(1)) > 0, out
        return float(tps.group(1)), float(lat.group(1))


@pytest.fixture
def stacks(test_output_dir, port_allocator):
    made: dict[str, Stack] = {}
    offsets: list[int] = []
    try:
        for side in SIDES:
            off = _free_offset()
            while off in offsets:
                off = _free_offset()
            offsets.append(off)
            repo = test_output_dir / f"neon_{side}"
            env = dict(os.environ, NEON_REPO_DIR=str(repo), NEON_LOCAL_PORT_OFFSET=str(off), NEON_LOCAL_ENDPOINT_PORT_BASE=str(port_allocator.get()))
            made[side] = Stack(side, NeonLocal(env, repo))
            made[side].init()
        yield made
    finally:
        for s in made.values():
            subprocess.run([str(neon_bin("neon_local")), "stop", "--mode", "immediate"], env=s.nl.env, capture_output=True, timeout=120)
        problems = [p for s in made.values() for p in s.nl.log_problems()]
        assert not problems, "panics in the logs:\n" + "\n".join(problems[:10])


def ratio(on: float, off: float) -> str:
    return f"{on / off:.3f}" if off else "-"


@pytest.mark.performance
def test_tls_auth_overhead(stacks: dict[str, Stack], test_output_dir: Path):
    t0 = time.monotonic()
    lsns = {side: stacks[side].load() for side in SIDES}
    rels = {side: stacks[side].relations() for side in SIDES}
    load_s = time.monotonic() - t0
    log = test_output_dir / "pagebench.log"

    # GetPage@LSN, 1 client: warm-up scans, then interleaved rounds.
    for side in SIDES:
        stacks[side].pagebench(rels[side], lsns[side], log, scan=True)
    pb: dict[str, list[dict]] = {side: [] for side in SIDES}
    for _ in range(ROUNDS):
        for side in SIDES:
            pb[side].append(stacks[side].pagebench(rels[side], lsns[side], log))

    # pgbench, interleaved per kind; "on-storage" is the secured stack with pgbench's own
    # connection in plaintext: what TLS + auth cost inside the stack, apart from the client's TLS
    # to Postgres (stock Postgres SSL, the same with or without us).
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    variants = (("off", "off", True), ("on", "on", True), ("on-storage", "on", False))
    # Select-only first: read-write makes the blocks it updates local to the compute.
    for kind in ("select-only", "read-write"):
        for _ in range(ROUNDS):
            for name, side, app_tls in variants:
                runs.setdefault((kind, name), []).append(stacks[side].pgbench_run(select_only=kind == "select-only", app_tls=app_tls))

    rows: list[tuple[str, float, float]] = []  # (metric, off, on)
    for kind in ("read-write", "select-only"):
        tps = {name: statistics.mean(t for t, _ in runs[(kind, name)]) for name, _, _ in variants}
        lat = {name: statistics.mean(lt for _, lt in runs[(kind, name)]) for name, _, _ in variants}
        rows.append((f"pgbench {kind} TPS (mean of {ROUNDS})", tps["off"], tps["on"]))
        rows.append((f"pgbench {kind} latency avg, ms", lat["off"], lat["on"]))
        rows.append((f"  same, pgbench->endpoint plaintext: TPS", tps["off"], tps["on-storage"]))
    med = {side: {k: statistics.median(r["latency_us"][k] if k in ("p50", "p99") else r[k] for r in pb[side]) for k in ("p50", "p99", "pages_per_s")} for side in SIDES}
    rows.append(("GetPage@LSN p50, us (1 client)", med["off"]["p50"], med["on"]["p50"]))
    rows.append(("GetPage@LSN p99, us (1 client)", med["off"]["p99"], med["on"]["p99"]))
    rows.append(("GetPage@LSN pages/s (1 client)", med["off"]["pages_per_s"], med["on"]["pages_per_s"]))

    print(f"\n\nTLS + auth overhead: {machine()}; binaries {neon_bin_dir()}")
    print(f"pgbench scale {SCALE}, {CLIENTS} clients x {SECONDS} s x {ROUNDS} rounds per kind, interleaved off/on; "
          f"pagebench 1 client x {PAGEBENCH_S:g} s x {ROUNDS} rounds at {lsns['off']} (off) / {lsns['on']} (on); load {load_s:.0f} s; endpoint shared_buffers {SHARED_BUFFERS}")
    w = max(len(r[0]) for r in rows)
    print(f"{'metric':<{w}}  {'off':>10}  {'on (TLS+auth)':>13}  {'on/off':>7}")
    for name, off, on in rows:
        print(f"{name:<{w}}  {off:>10.2f}  {on:>13.2f}  {ratio(on, off):>7}")
    print("\nruns (TPS / latency ms):")
    for (kind, side), rs in runs.items():
        print(f"  {kind:<11} {side:<10}: " + ", ".join(f"{t:.1f} / {lt:.2f}" for t, lt in rs))
    print("pagebench rounds (p50 us / p99 us / pages/s):")
    for side in SIDES:
        print(f"  {side:<3}: " + ", ".join(f"{r['latency_us']['p50']} / {r['latency_us']['p99']} / {r['pages_per_s']:.0f}" for r in pb[side]))
    print()
