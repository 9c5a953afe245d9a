"""Point in time through neon_local: branches and read-only (static) endpoints at recorded LSNs
and timestamps see exactly the rows committed by then; LSNs outside a branch's history are
refused with a one-line error and leave nothing behind."""

from __future__ import annotations

import time

import psycopg
import pytest

from fixtures.neon_local import lsn_int, lsn_str, neon_env, one, sql, started_env  # noqa: F401


def _batches(connstr: str, n: int) -> list[tuple[int, int, str]]:
    """Commits `n` batches of 10 rows; after each, the WAL insert LSN (the commit's end on a
    quiet primary) and a time strictly between it and the next batch.
    Returns (rows so far, lsn, timestamp)."""
    sql(connstr, "create table pitr(id int primary key, batch int)")
    out = []
    for b in range(1, n + 1):
        with psycopg.connect(connstr, autocommit=True) as c:
            c.execute("insert into pitr select g, %s::int from generate_series(%s::int, %s::int) g", (b, (b - 1) * 10 + 1, b * 10))
            lsn = c.execute("select pg_current_wal_insert_lsn()::text").fetchone()[0]
            time.sleep(0.3)
            ts = c.execute("select to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')").fetchone()[0]
            time.sleep(0.3)
        out.append((b * 10, lsn_int(lsn), ts))
    return out


def test_branch_at_lsn_and_timestamp(started_env):
    nl = started_env
    main = nl.endpoint("main")
    batches = _batches(main, 4)
    sql(main, "insert into pitr select g, 99 from generate_series(1001, 1010) g")

    for i, (rows, lsn, _) in enumerate(batches[:3]):
        reported = nl.branch(f"at_lsn_{i}", "--ancestor-start-lsn", lsn_str(lsn))
        assert reported == lsn, f"branch point reported {lsn_str(reported)}, asked for {lsn_str(lsn)}"
        ep = nl.endpoint(f"at_lsn_{i}", "--branch-name", f"at_lsn_{i}")
        assert one(ep, "select count(*) from pitr") == rows
        assert one(ep, "select max(batch) from pitr") == i + 1
        # The old branch is writable and its writes stay on it.
        sql(ep, "insert into pitr values (5000, -1)")
        assert one(ep, "select count(*) from pitr") == rows + 1
        nl.run("endpoint", "stop", f"at_lsn_{i}", "--destroy")

    _, _, ts = batches[1]
    nl.branch("at_time", "--timestamp", ts)
    ep = nl.endpoint("at_time", "--branch-name", "at_time")
    assert one(ep, "select count(*) from pitr") == 20, f"branch at {ts} sees exactly the first two batches"
    assert one(main, "select count(*) from pitr") == 50, "the parent is unchanged"
    listing = nl.timeline_list()
    for name in ["at_lsn_0", "at_lsn_1", "at_lsn_2", "at_time"]:
        assert f"── {name} [" in listing, listing
    assert f"<- main at {lsn_str(batches[0][1])}" in listing, listing


def test_branch_lsn_out_of_range_fails_cleanly(started_env):
    nl = started_env
    main = nl.endpoint("main")
    sql(main, "create table t(a int); insert into t values (1)")
    info = nl.timeline_list()
    initdb_like = lsn_int(info.split(" at ")[1].split()[0])  # main's current LSN
    before = nl.state()
    err = nl.fails("timeline", "branch", "--branch-name", "too_old", "--ancestor-start-lsn", "0/100", expect="before initdb LSN")
    assert "'main'" in err
    err = nl.fails(
        "timeline", "branch", "--branch-name", "too_new", "--ancestor-start-lsn", lsn_str(initdb_like + (1 << 30)),
        expect="beyond the last LSN",
    )
    assert "'main'" in err
    nl.fails("timeline", "branch", "--branch-name", "bad_time", "--timestamp", "2001-01-01T00:00:00Z", expect="before the first commit")
    nl.fails("timeline", "branch", "--branch-name", "x", "--ancestor-branch-name", "nope", expect="branch 'nope' does not exist")
    nl.fails("timeline", "branch", "--branch-name", "bad name", expect="may only hold")
    assert nl.state() == before, "a failed branch leaves no trace"
    # Static endpoints are held to the same range.
    nl.fails("endpoint", "create", "ro", "--lsn", "0/100", expect="before initdb LSN")
    nl.fails("endpoint", "create", "ro", "--lsn", lsn_str(initdb_like + (1 << 30)), expect="beyond the last LSN")
    assert nl.state() == before

    # Below a branch's own start (by LSN or by a time before it), on the branch itself.
    early = lsn_int(one(main, "select pg_current_wal_insert_lsn()::text"))
    time.sleep(0.3)
    ts = one(main, "select to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
    time.sleep(0.3)
    sql(main, "insert into t values (2)")
    start = nl.branch("b")
    assert start > early
    before = nl.state()
    for args in [
        ("timeline", "branch", "--branch-name", "c", "--ancestor-branch-name", "b", "--ancestor-start-lsn", lsn_str(early)),
        ("timeline", "branch", "--branch-name", "c", "--ancestor-branch-name", "b", "--timestamp", ts),
        ("endpoint", "create", "ro", "--branch-name", "b", "--lsn", lsn_str(early)),
        ("endpoint", "create", "ro", "--branch-name", "b", "--timestamp", ts),
    ]:
        err = nl.fails(*args, expect=f"is before branch 'b' starts at {lsn_str(start)}")
        assert "use its ancestor branch" in err
    assert nl.state() == before
    # On the ancestor, the same time works.
    ro = nl.endpoint("ro", "--timestamp", ts)
    assert one(ro, "select count(*) from t") == 1


def test_static_endpoints_at_lsns_and_timestamp(started_env):
    nl = started_env
    main = nl.endpoint("main")
    batches = _batches(main, 3)
    sql(main, "insert into pitr select g, 99 from generate_series(1001, 1010) g")
    eps = {}
    for i, (rows, lsn, _) in enumerate(batches):
        eps[f"ro{i}"] = (nl.endpoint(f"ro{i}", "--lsn", lsn_str(lsn)), rows)
    eps["ro_time"] = (nl.endpoint("ro_time", "--timestamp", batches[0][2]), 10)
    # Read-only endpoints run beside the primary, which keeps writing.
    sql(main, "insert into pitr select g, 100 from generate_series(2001, 2010) g")
    for name, (connstr, rows) in eps.items():
        assert one(connstr, "select count(*) from pitr") == rows, name
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            sql(connstr, "insert into pitr values (-1, -1)")
    assert one(main, "select count(*) from pitr") == 50
    listing = nl.run("endpoint", "list").stdout
    assert f"static at {lsn_str(batches[0][1])}" in listing, listing
    # A static endpoint survives a restart at the same LSN, and --destroy removes it.
    nl.run("endpoint", "stop", "ro1")
    ro1 = nl.start_endpoint("ro1")
    assert one(ro1, "select count(*) from pitr") == 20
    nl.run("endpoint", "stop", "ro1", "--destroy")
    assert "ro1" not in nl.run("endpoint", "list").stdout
    assert "ro1" not in nl.config()["endpoints"]
    assert not (nl.repo_dir / "endpoints" / "ro1").exists()


def test_endpoints_at_an_lsn_timeline_list_showed(started_env):
    """The LSN `timeline list` showed for a fresh branch (its start, no commit ends there) stays
    usable for a read-only endpoint and for a branch after newer WAL arrived."""
    nl = started_env
    start = nl.timeline_list().split(" at ")[1].split()[0]
    main = nl.endpoint("main")
    sql(main, "create table t(a int); insert into t values (1)")
    nl.branch("later")  # waits until the pageserver has ingested the insert
    ro = nl.endpoint("ro", "--lsn", start)
    assert sql(ro, "select count(*) from pg_class where relname = 't'") == [(0,)]


def test_branch_at_an_lsn_timeline_list_showed(started_env):
    """A branch at the LSN `timeline list` showed for a fresh branch, taken after newer WAL
    arrived, takes a primary."""
    nl = started_env
    start = nl.timeline_list().split(" at ")[1].split()[0]
    main = nl.endpoint("main")
    sql(main, "create table t(a int); insert into t values (1)")
    nl.branch("later")  # waits until the pageserver has ingested the insert
    nl.branch("early", "--ancestor-start-lsn", start)
    early = nl.endpoint("early", "--branch-name", "early")
    assert sql(early, "select count(*) from pg_class where relname = 't'") == [(0,)]
    sql(early, "create table t(b text); insert into t values ('early')")
    nl.run("endpoint", "stop", "early")
    early = nl.start_endpoint("early")
    assert sql(early, "select b from t") == [("early",)]
    assert sql(main, "select a from t") == [(1,)]


def test_pageserver_refuses_a_branch_below_its_ancestors_start(started_env):
    """neon_local refuses this itself; the pageserver's API should too (a timeline has no
    history of its own below its branch point)."""
    nl = started_env
    main = nl.endpoint("main")
    sql(main, "create table t(a int); insert into t values (1)")
    early = one(main, "select pg_current_wal_insert_lsn()::text")
    sql(main, "insert into t values (2)")
    start = nl.branch("b")
    assert lsn_int(early) < start
    cfg = nl.config()
    tenant = cfg["default_tenant"]
    r = nl.ps_http(
        "POST",
        f"/v1/tenant/{tenant}/timeline",
        json={
            "new_timeline_id": "0123456789abcdef0123456789abcdef",
            "ancestor_timeline_id": cfg["branches"][tenant]["b"],
            "ancestor_start_lsn": early,
        },
        timeout=60,
    )
    assert r.status_code == 400, f"{r.status_code}: {r.text}"


def test_branch_below_the_retention_window_fails(neon_env):
    """A tenant created with `-c` settings keeps little history; once GC moved its cutoff, a
    branch or static endpoint below it is refused in one line, naming the cutoff and the fix."""
    nl = neon_env
    nl.run("init")
    nl.run("start")
    nl.fails("tenant", "create", "-c", "pitr_interval", expect="expected key=value")
    nl.fails("tenant", "create", "-c", "pitr_intervall=1h", expect="unknown tenant setting 'pitr_intervall'")
    settings = ["pitr_interval=0s", "gc_horizon=0", "lsn_lease_length=1s", "gc_period=0s", "compaction_period=0s"]
    nl.run("tenant", "create", "--set-default", *[a for s in settings for a in ("-c", s)])
    out = nl.run("tenant", "config", "-c", "pitr_interval=0s", *[a for s in settings[1:] for a in ("-c", s)]).stdout
    assert "pitr_interval = 0s" in out and "lsn_lease_length = 1s" in out, out
    main = nl.endpoint("main")
    sql(main, "create table t(a int); insert into t values (1)")
    old = lsn_int(one(main, "select pg_current_wal_insert_lsn()::text"))
    sql(main, "insert into t select generate_series(2, 1000)")
    nl.run("endpoint", "stop", "main")  # its lease on its start LSN runs out after 1 s
    time.sleep(2)
    conf = nl.config()
    tenant = conf["default_tenant"]
    timeline = conf["branches"][tenant]["main"]
    # GC keeps what is not on disk yet: flush first.
    assert nl.ps_http("PUT", f"/v1/tenant/{tenant}/timeline/{timeline}/checkpoint").ok
    r = nl.ps_http("PUT", f"/v1/tenant/{tenant}/timeline/{timeline}/do_gc")
    assert r.ok, r.text
    cutoff = lsn_int(r.json()["cutoff"])
    assert cutoff > old, r.json()
    before = nl.state()
    err = nl.fails("timeline", "branch", "--branch-name", "old", "--ancestor-start-lsn", lsn_str(old), expect="below the garbage-collection cutoff")
    assert lsn_str(cutoff) in err and "pitr_interval" in err, err
    nl.fails("endpoint", "create", "ro", "--lsn", lsn_str(old), expect="below the garbage-collection cutoff")
    assert nl.state() == before
    # At the cutoff and above, branching works.
    nl.branch("new")
    assert one(nl.start_endpoint("main"), "select count(*) from t") == 1000
