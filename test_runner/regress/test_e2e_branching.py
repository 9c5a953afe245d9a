"""Branching while a write load runs, through neon_local: flat (several branches off main) and
cascaded (a branch of a branch of a branch). Each branch has exactly the rows committed at its
branch point (checked row by row with a ledger writer's LSN brackets, and with pgbench's TPC-B
invariants), plus its own writes, which its parent does not see."""

from __future__ import annotations

import subprocess
import time

from fixtures.neon_local import (  # noqa: F401
    Ledger,
    lsn_str,
    neon_env,
    one,
    pgbench,
    pgbench_consistent,
    sql,
    started_env,
)
from fixtures.paths import pg_bin


def _ledger_ids(connstr: str) -> set[int]:
    return {r[0] for r in sql(connstr, "select id from ledger")}


def test_flat_branches_under_pgbench(started_env):
    nl = started_env
    main = nl.endpoint("main")
    pgbench(main, "-i", "-s", "2", "-q")
    Ledger.create(main)
    ledger = Ledger(main).start()
    bench = subprocess.Popen(
        [str(pg_bin("pgbench")), "-n", "-c", "2", "-T", "12", main], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        branches = {}
        for i in range(3):
            time.sleep(2)
            ledger.wait_rows(5)
            branches[f"b{i}"] = nl.branch(f"b{i}")
        out, err = bench.communicate(timeout=60)
        assert bench.returncode == 0, err[-2000:]
    finally:
        if bench.poll() is None:
            bench.kill()
        ledger.stop()
    main_ids = _ledger_ids(main)
    assert ledger.ids() <= main_ids
    lsns = list(branches.values())
    assert lsns == sorted(lsns) and len(set(lsns)) == 3, f"branch points {[lsn_str(x) for x in lsns]}"

    prev = 0
    for name, lsn in branches.items():
        ep = nl.endpoint(name, "--branch-name", name)
        ids = _ledger_ids(ep)
        ledger.check_at(ids, lsn, f"branch {name}")
        assert ids == set(range(1, len(ids) + 1)), "one writer, no failures: the ledger is a gapless prefix"
        assert len(ids) > prev, "later branch points hold more rows"
        prev = len(ids)
        pgbench_consistent(ep)
        # Its own writes: pgbench and the ledger continue on the branch.
        pgbench(ep, "-n", "-t", "20")
        pgbench_consistent(ep)
        sql(ep, "insert into ledger select from generate_series(1, 7)")
        assert one(ep, "select count(*) from ledger") == len(ids) + 7
        nl.run("endpoint", "stop", name)
    pgbench_consistent(main)
    assert _ledger_ids(main) == main_ids, "the parent does not see its branches' writes"
    listing = nl.timeline_list()
    for name, lsn in branches.items():
        assert f"{name} [" in listing and f"<- main at {lsn_str(lsn)}" in listing, listing


def test_cascaded_branches_under_load(started_env):
    """main -> c1 -> c2 -> c3, each branch taken while a writer runs on its parent (and pgbench on
    main). Each level writes its own ledger table, so every table is frozen on the children of
    the branch that writes it."""
    nl = started_env
    conns = {"main": nl.endpoint("main")}
    pgbench(conns["main"], "-i", "-s", "1", "-q")
    bench = subprocess.Popen(
        [str(pg_bin("pgbench")), "-n", "-c", "1", "-T", "15", conns["main"]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    writers: dict[str, Ledger] = {}
    points: dict[str, tuple[str, int]] = {}
    try:
        parent = "main"
        for i in range(1, 4):
            Ledger.create(conns[parent], f"ledger_{parent}")
            writers[parent] = Ledger(conns[parent], f"ledger_{parent}").start()
            writers[parent].wait_rows(20)
            child = f"c{i}"
            points[child] = (parent, nl.branch(child, "--ancestor-branch-name", parent))
            writers[parent].wait_rows(5)
            conns[child] = nl.endpoint(child, "--branch-name", child)
            parent = child
        out, err = bench.communicate(timeout=60)
        assert bench.returncode == 0, err[-2000:]
    finally:
        if bench.poll() is None:
            bench.kill()
        for w in writers.values():
            w.stop()

    frozen: dict[str, set[int]] = {}  # table -> its rows on every descendant of its branch point
    for child, (parent, lsn) in points.items():
        ids = {r[0] for r in sql(conns[child], f"select id from ledger_{parent}")}
        writers[parent].check_at(ids, lsn, f"branch {child} (from {parent}), table ledger_{parent}")
        for table, rows in frozen.items():
            got = {r[0] for r in sql(conns[child], f"select id from {table}")}
            assert got == rows, f"{table} on {child}: {len(got)} rows, its parent had {len(rows)} at the branch point"
        frozen[f"ledger_{parent}"] = ids
        pgbench_consistent(conns[child])
    # Own writes on the last branch stay there.
    sql(conns["c3"], "insert into ledger_main select from generate_series(1, 5)")
    assert one(conns["c3"], "select count(*) from ledger_main") == len(frozen["ledger_main"]) + 5
    assert one(conns["c2"], "select count(*) from ledger_main") == len(frozen["ledger_main"])
    assert {r[0] for r in sql(conns["main"], "select id from ledger_main")} == writers["main"].ids()
    assert not sql(conns["main"], "select 1 from pg_class where relname = 'ledger_c1'"), "a child's table is not in main"
    pgbench_consistent(conns["main"])
    listing = nl.timeline_list()
    for child, (parent, lsn) in points.items():
        assert f"{child} [" in listing and f"<- {parent} at {lsn_str(lsn)}" in listing, listing
    assert "        └── c3 [" in listing, f"c3 is drawn three levels deep:\n{listing}"
