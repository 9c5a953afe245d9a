"""Failures under a running compute, all through neon_local: pageserver restart and kill -9,
safekeepers stopped and killed one at a time (and two at once), compute kill -9. Every
acknowledged commit survives (a ledger writer records them)."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from fixtures.neon_local import Ledger, connect, neon_env, one, retry_sql, sql, started_env  # noqa: F401


def _all_acked_present(connstr: str, ledger: Ledger) -> None:
    ids = {r[0] for r in sql(connstr, f"select id from {ledger.table}")}
    missing = ledger.ids() - ids
    assert not missing, f"{len(missing)} acknowledged rows lost, e.g. {sorted(missing)[:5]}"


def _cold_table(nl, main: str) -> str:
    """A table whose pages are not in the compute's buffers (the compute restarted after it
    was written), so reading it needs the pageserver."""
    sql(main, "create table cold(id int, pad text); insert into cold select g, repeat('x', 200) from generate_series(1, 20000) g")
    nl.run("endpoint", "stop", "main")
    return nl.start_endpoint("main")


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_pageserver_restart_under_compute(started_env, mode):
    """The pageserver stopped (or killed) and started again under a running primary: writes go
    on meanwhile, reads that need the pageserver work again right after, nothing is lost."""
    nl = started_env
    main = nl.endpoint("main")
    Ledger.create(main)
    main = _cold_table(nl, main)
    ledger = Ledger(main, tolerate_errors=True).start()
    ledger.wait_rows(20)

    nl.run("pageserver", "stop", "--mode", mode)
    # Writes go to the safekeepers: the ledger keeps committing while the pageserver is down.
    ledger.wait_rows(30, timeout_s=20)
    nl.run("pageserver", "start")
    rows, took = retry_sql(main, "select count(*), sum(id) from cold", timeout_s=30)
    assert rows == [(20000, 20000 * 20001 // 2)]
    assert took < 5, f"reads came back {took:.1f} s after the pageserver"
    ledger.wait_rows(20)
    ledger.stop()
    assert not ledger.errors, f"writes failed while the pageserver was down: {ledger.errors[:3]}"

    # Nothing lost: a fresh compute reads everything back from the restarted pageserver.
    nl.run("endpoint", "stop", "main")
    main = nl.start_endpoint("main")
    _all_acked_present(main, ledger)
    assert one(main, "select count(*) from cold") == 20000


def test_query_stalls_through_pageserver_restart(started_env):
    """A read issued while the pageserver is down for 2 s waits for it and then succeeds."""
    nl = started_env
    main = _cold_table(nl, nl.endpoint("main"))
    nl.run("pageserver", "stop", "--mode", "immediate")
    result = {}

    def cold_read():
        try:
            t0 = time.monotonic()
            result["rows"] = (sql(main, "select count(*) from cold"), time.monotonic() - t0)
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    reader = threading.Thread(target=cold_read)
    reader.start()
    time.sleep(2)
    nl.run("pageserver", "start")
    reader.join(timeout=90)
    assert "error" not in result, result.get("error")
    rows, took = result["rows"]
    assert rows == [(20000,)]
    assert 1.5 < took < 30, f"the read took {took:.1f} s; the pageserver was down for 2 s"


def test_safekeepers_one_at_a_time_and_two_down(started_env):
    nl = started_env
    main = nl.endpoint("main")
    Ledger.create(main)
    ledger = Ledger(main).start()  # no errors tolerated: one safekeeper down must not matter
    ledger.wait_rows(20)
    for sk, mode in [("1", "fast"), ("2", "immediate"), ("3", "immediate")]:
        nl.run("safekeeper", "stop", sk, "--mode", mode)
        ledger.wait_rows(50, timeout_s=30)
        nl.run("safekeeper", "start", sk)
        ledger.wait_rows(20, timeout_s=30)
    # Restart (fast) each one too.
    for sk in ["1", "2", "3"]:
        nl.run("safekeeper", "restart", sk)
        ledger.wait_rows(20, timeout_s=30)
    ledger.stop()

    # Two of three down: no quorum, a commit blocks. (statement_timeout cannot show it: Postgres
    # disables it before the commit's wait for the synchronous standby, here the walproposer.)
    nl.run("safekeeper", "stop", "1")
    nl.run("safekeeper", "stop", "2", "--mode", "immediate")
    result = {}

    def commit():
        try:
            t0 = time.monotonic()
            result["id"] = one(main, "insert into ledger default values returning id")
            result["took"] = time.monotonic() - t0
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    blocked = threading.Thread(target=commit)
    blocked.start()
    blocked.join(timeout=4)
    assert blocked.is_alive(), f"a commit without a safekeeper quorum returned: {result}"
    with connect(main) as c:
        c.execute("set statement_timeout = '2s'")
        waits = c.execute("select wait_event from pg_stat_activity where query like 'insert into ledger%'").fetchall()
    assert waits == [("SyncRep",)], waits
    # One back: the blocked commit goes through, and new ones too.
    nl.run("safekeeper", "start", "2")
    blocked.join(timeout=30)
    assert not blocked.is_alive() and "error" not in result, result
    assert result["took"] >= 4
    (rows, took) = retry_sql(main, "insert into ledger default values returning id", timeout_s=30)
    assert took < 10
    nl.run("safekeeper", "start", "1")
    nl.run("endpoint", "stop", "main")
    main = nl.start_endpoint("main")
    _all_acked_present(main, ledger)
    ids = {r[0] for r in sql(main, "select id from ledger")}
    assert result["id"] in ids and rows[0][0] in ids


def test_compute_kill9_keeps_acknowledged_commits(started_env):
    nl = started_env
    main = nl.endpoint("main")
    Ledger.create(main)
    for _ in range(3):
        ledger = Ledger(main, tolerate_errors=True).start()
        ledger.wait_rows(100)
        nl.run("endpoint", "stop", "main", "--mode", "immediate")
        time.sleep(0.5)
        ledger.stop()
        assert ledger.errors, "the writer noticed the compute die"
        main = nl.start_endpoint("main")
        _all_acked_present(main, ledger)
        # A fresh writer goes on where the old one stopped.
        assert one(main, "select max(id) from ledger") >= max(ledger.ids())


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_whole_stack_stop_and_start_with_branches(started_env, mode):
    """`neon_local stop` (or kill -9 of everything) and `start`: every branch, at every depth,
    comes back with its acknowledged rows; the pageserver reloads its timelines in ancestor
    order and re-ingests what it had not flushed from the safekeepers."""
    nl = started_env
    main = nl.endpoint("main")
    Ledger.create(main)
    writers = {"main": Ledger(main).start()}
    writers["main"].wait_rows(30)
    nl.branch("a")
    a = nl.endpoint("a", "--branch-name", "a")
    writers["a"] = Ledger(a).start()
    writers["a"].wait_rows(30)
    nl.branch("b", "--ancestor-branch-name", "a")
    b = nl.endpoint("b", "--branch-name", "b")
    sql(b, "create table only_b(x int); insert into only_b values (42)")
    for w in writers.values():
        w.wait_rows(30)
    # Everything at once, while the writers run (they stop at the first error).
    nl.run("stop", "--mode", mode)
    for w in writers.values():
        w.halt()
    status = nl.run("status").stdout
    assert "running" not in status, status
    nl.run("start")
    conns = {name: nl.start_endpoint(name) for name in ["main", "a", "b"]}
    for name, w in writers.items():
        _all_acked_present(conns[name], w)
    assert one(conns["b"], "select x from only_b") == 42
    # And they keep working.
    for name, c in conns.items():
        sql(c, "insert into ledger default values")
    listing = nl.timeline_list()
    assert "<- main at" in listing and "<- a at" in listing, listing


def _sk_status(nl, sk: dict) -> dict:
    cfg = nl.config()
    t = cfg["default_tenant"]
    tl = cfg["branches"][t]["main"]
    return nl.http("GET", sk["http_port"], f"/v1/tenant/{t}/timeline/{tl}", timeout=5).json()


def _pageserver_source(nl) -> dict:
    """The safekeeper the pageserver streams from (its log's last choice)."""
    import re

    deadline = time.monotonic() + 20
    while not (found := re.findall(r"from safekeeper 127\.0\.0\.1:(\d+)", (nl.repo_dir / "pageserver" / "log").read_text())):
        assert time.monotonic() < deadline, "the pageserver does not stream from any safekeeper"
        time.sleep(0.1)
    return next(sk for sk in nl.config()["safekeepers"] if sk["pg_port"] == int(found[-1]))


def test_compute_restart_when_pageserver_source_missed_the_sync(started_env):
    """A hang once seen after compute kill -9 (fixed in the pageserver's WAL receiver): the killed compute leaves WAL on
    the safekeepers beyond their commit LSN; the new compute's sync-safekeepers commits it on two
    of them, while the third, which the pageserver streams from, is frozen (SIGSTOP) and misses
    that commit. The pageserver must still get the WAL (from another safekeeper) so the compute
    can start."""
    import os
    import re
    import signal
    import subprocess

    from fixtures.paths import pg_bin

    nl = started_env
    main = nl.endpoint("main")
    subprocess.run([str(pg_bin("pgbench")), "-i", "-s", "1", "-q", main], check=True, capture_output=True, timeout=120)
    source = _pageserver_source(nl)
    others = [sk for sk in nl.config()["safekeepers"] if sk["id"] != source["id"]]
    for _ in range(5):
        bench = subprocess.Popen([str(pg_bin("pgbench")), "-n", "-c", "4", "-T", "20", main],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2)
        nl.run("endpoint", "stop", "main", "--mode", "immediate")
        bench.wait(timeout=30)
        src = _sk_status(nl, source)
        if any(_sk_status(nl, sk)["flush_lsn"] != src["commit_lsn"] for sk in others):
            break  # the others hold WAL beyond what the pageserver's safekeeper knows as committed
        main = nl.start_endpoint("main")
    else:
        pytest.skip("could not kill the compute with uncommitted WAL on the safekeepers")
    pid = int((nl.repo_dir / "safekeepers" / f"sk{source['id']}" / "pid").read_text())
    os.kill(pid, signal.SIGSTOP)
    try:
        result = {}
        ep_log = nl.repo_dir / "endpoints" / "main" / "log"
        seen = len(ep_log.read_text())
        starter = threading.Thread(target=lambda: result.update(r=nl.run("endpoint", "start", "main", check=False)))
        starter.start()
        deadline = time.monotonic() + 30
        while "safekeepers synced" not in ep_log.read_text()[seen:]:
            assert time.monotonic() < deadline, "sync-safekeepers did not finish"
            time.sleep(0.05)
    finally:
        os.kill(pid, signal.SIGCONT)
    synced = re.findall(r"committed WAL up to ([0-9A-F]+/[0-9A-F]+)", ep_log.read_text()[seen:])[-1]
    starter.join(timeout=20)
    assert not starter.is_alive(), (
        f"the compute did not start within 20 s of the sync at {synced}; safekeeper {source['id']} "
        f"(the pageserver's source) has commit LSN {_sk_status(nl, source)['commit_lsn']}"
    )
    assert result["r"].returncode == 0, result["r"].stderr


def test_pageserver_kill_under_pgbench_then_many_branches(started_env):
    """kill -9 of the pageserver in the middle of a pgbench run: it re-ingests from the
    safekeepers what it had not flushed; a fresh compute and ten branches (taken before and
    after the kill) all see consistent TPC-B tables, and survive a second kill."""
    import subprocess

    from fixtures.neon_local import pgbench, pgbench_consistent
    from fixtures.paths import pg_bin

    nl = started_env
    main = nl.endpoint("main")
    pgbench(main, "-i", "-s", "2", "-q")
    bench = subprocess.Popen([str(pg_bin("pgbench")), "-n", "-c", "4", "-T", "10", main],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for i in range(5):
        time.sleep(0.5)
        nl.branch(f"pre{i}")
    nl.run("pageserver", "stop", "--mode", "immediate")
    time.sleep(1)
    nl.run("pageserver", "start")
    for i in range(5):
        time.sleep(0.5)
        nl.branch(f"post{i}")
    _, err = bench.communicate(timeout=60)
    assert bench.returncode == 0, err[-2000:]
    expect = sql(main, "select sum(abalance), count(*) from pgbench_history, (select sum(abalance) abalance from pgbench_accounts) a")
    nl.run("pageserver", "restart", "--mode", "immediate")
    main = _restart_endpoint(nl, "main")
    pgbench_consistent(main)
    assert sql(main, "select sum(abalance), count(*) from pgbench_history, (select sum(abalance) abalance from pgbench_accounts) a") == expect
    history = []
    for name in [f"pre{i}" for i in range(5)] + [f"post{i}" for i in range(5)]:
        ep = nl.endpoint(name, "--branch-name", name)
        pgbench_consistent(ep)
        history.append(one(ep, "select count(*) from pgbench_history"))
        nl.run("endpoint", "stop", name)
    assert history == sorted(history), f"later branches hold more history: {history}"
    assert history[-1] <= expect[0][1]


def _restart_endpoint(nl, name: str) -> str:
    nl.run("endpoint", "stop", name)
    return nl.start_endpoint(name)
