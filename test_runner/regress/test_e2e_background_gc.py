"""Background compaction and GC while the workload runs (issue 7 through neon_local): a tenant
with a small checkpoint distance, compaction every second and GC every two seconds with a 5 s
pitr_interval. Three phases of pgbench and a ledger, each on a freshly started primary (so the
previous compute's lease runs out and GC can advance), a branch after each. At the end: the
branches hold exactly the rows committed at their branch points, pgbench's invariants hold
everywhere, compaction and GC did run (images exist, the cutoff moved past the first branch
point), and a restart of the whole stack changes nothing."""

from __future__ import annotations

import time

from fixtures.neon_local import Ledger, lsn_int, neon_env, one, pgbench, pgbench_consistent, sql  # noqa: F401

SETTINGS = [
    "checkpoint_distance=4194304",
    "compaction_period=1s",
    "compaction_threshold=3",
    "image_creation_threshold=2",
    "gc_period=2s",
    "pitr_interval=5s",
    "gc_horizon=0",
    "lsn_lease_length=3s",
]


def _ids(connstr: str) -> set[int]:
    return {r[0] for r in sql(connstr, "select id from ledger")}


def test_background_compaction_and_gc_under_load(neon_env):
    nl = neon_env
    nl.run("init")
    nl.run("start")
    nl.run("tenant", "create", "--set-default", *[a for s in SETTINGS for a in ("-c", s)])
    conf = nl.config()
    tenant = conf["default_tenant"]
    main_tl = conf["branches"][tenant]["main"]

    def info() -> dict:
        return nl.ps_http("GET", f"/v1/tenant/{tenant}/timeline/{main_tl}", timeout=10).json()

    main = nl.endpoint("main")
    pgbench(main, "-i", "-s", "2", "-q")
    Ledger.create(main)
    acked: list = []
    branches: dict[str, int] = {}
    for phase in range(3):
        if phase:
            main = nl.start_endpoint("main")
        ledger = Ledger(main).start()
        try:
            pgbench(main, "-n", "-c", "2", "-T", "8")
            ledger.wait_rows(5)
            branches[f"b{phase}"] = nl.branch(f"b{phase}")
            ledger.wait_rows(5)
        finally:
            ledger.stop()
        acked += ledger.acked
        pgbench_consistent(main)
        nl.run("endpoint", "stop", "main")
        time.sleep(4)  # this compute's lease runs out; GC may pass its start LSN

    # GC moved past the first branch point while it kept the branch's history.
    deadline = time.monotonic() + 60
    while lsn_int(info()["latest_gc_cutoff_lsn"]) <= branches["b0"]:
        assert time.monotonic() < deadline, f"GC did not advance past b0: {info()}"
        time.sleep(1)
    i = info()
    assert i["image_layer_count"] >= 1 and i["l0_delta_count"] < 3 + 2, i

    checker = Ledger("")
    checker.acked = acked

    def check_everything(where: str) -> None:
        for name, lsn in branches.items():
            ep = nl.endpoint(f"ep_{name}_{where}", "--branch-name", name)
            checker.check_at(_ids(ep), lsn, f"branch {name} ({where})")
            pgbench_consistent(ep)
            nl.run("endpoint", "stop", f"ep_{name}_{where}", "--destroy")
        ep = nl.start_endpoint("main")
        assert {r for r, _, _ in acked} <= _ids(ep)
        pgbench_consistent(ep)
        nl.run("endpoint", "stop", "main")

    check_everything("after_gc")
    nl.run("stop")
    nl.run("start")
    check_everything("after_restart")
    assert one(nl.start_endpoint("main"), "select count(*) > 0 from pgbench_history")
