"""neon_local errors: each a one-line message naming the object and the fix, a non-zero exit,
and no partial state (config.json, `timeline list`, `endpoint list` unchanged, no process left)."""

from __future__ import annotations

import socket

from fixtures.neon_local import neon_env, one, sql, started_env  # noqa: F401


def _no_process_for(nl, name: str) -> None:
    pid_file = nl.repo_dir / "endpoints" / name / "pid"
    assert not pid_file.exists(), f"{pid_file} left behind"
    status = nl.run("status").stdout
    assert f"endpoint '{name}': stopped" in status, status


def test_unknown_names_duplicates_and_two_primaries(started_env):
    nl = started_env
    main = nl.endpoint("main")
    sql(main, "create table t(a int); insert into t values (1)")
    nl.branch("dev")
    before = nl.state()
    nl.fails("endpoint", "create", "x", "--branch-name", "nope", expect="branch 'nope' does not exist; see 'neon_local timeline list'")
    nl.fails("timeline", "branch", "--branch-name", "x", "--ancestor-branch-name", "nope", expect="branch 'nope' does not exist")
    nl.fails("timeline", "branch", "--branch-name", "dev", expect="branch 'dev' already exists")
    nl.fails("endpoint", "create", "main", "--branch-name", "dev", expect="endpoint 'main' already exists; see 'neon_local endpoint list'")
    nl.fails("endpoint", "start", "nope", expect="endpoint 'nope' does not exist; see 'neon_local endpoint list'")
    nl.fails("endpoint", "stop", "nope", expect="endpoint 'nope' does not exist")
    nl.fails("safekeeper", "stop", "7", expect="safekeeper 7 does not exist")
    err = nl.fails("endpoint", "create", "second", expect="branch 'main' already has endpoint 'main'")
    assert "create a branch" in err
    nl.fails("endpoint", "create", "bad/name", "--branch-name", "dev", expect="may only hold letters")
    nl.fails("endpoint", "create", "e", "--branch-name", "dev", "-c", "shared_buffers", expect="not name=value")
    assert nl.state() == before
    # A read-only endpoint beside the primary is fine; a second primary still is not.
    ro = nl.endpoint("ro", "--lsn", one(main, "select pg_current_wal_insert_lsn()::text"))
    assert one(ro, "select a from t") == 1
    nl.fails("endpoint", "create", "second", expect="already has endpoint 'main'")
    # Once the primary is destroyed, the branch takes a new one.
    nl.run("endpoint", "stop", "main", "--destroy")
    main2 = nl.endpoint("main2")
    assert one(main2, "select a from t") == 1


def test_port_in_use(started_env):
    nl = started_env
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        nl.endpoint("ep", "--pg-port", str(busy), start=False)
        before = nl.state()
        err = nl.fails("endpoint", "start", "ep", expect=f"port {busy} for endpoint 'ep' is in use")
        assert "stop it or change the port" in err
        assert nl.state() == before
        _no_process_for(nl, "ep")
    assert f":{busy}/postgres" in nl.start_endpoint("ep")

    # A daemon's port.
    ps_http = nl.config()["pageserver"]["http_port"]
    nl.run("pageserver", "stop")
    with socket.socket() as s:
        s.bind(("127.0.0.1", ps_http))
        s.listen()
        nl.fails("pageserver", "start", expect=f"port {ps_http} for pageserver is in use")
        assert "pageserver: stopped" in nl.run("status").stdout
    nl.run("pageserver", "start")


def test_stopped_pageserver_and_safekeeper(started_env):
    nl = started_env
    main = nl.endpoint("main")
    sql(main, "create table t(a int); insert into t values (1)")
    commit_end = one(main, "select pg_current_wal_insert_lsn()::text")
    nl.endpoint("other", "--branch-name", "main", "--lsn", commit_end, start=False)
    timelines = nl.state()[1]
    nl.run("pageserver", "stop")
    cfg, eps = nl.config(), nl.run("endpoint", "list").stdout
    fix = "start it with 'neon_local pageserver start'"
    for args in [
        ("timeline", "branch", "--branch-name", "dev"),
        ("timeline", "list"),
        ("tenant", "create"),
        ("tenant", "list"),
        ("endpoint", "create", "ro", "--timestamp", "2030-01-01T00:00:00Z"),
    ]:
        err = nl.fails(*args, expect="pageserver is not answering at http")
        assert fix in err, err
    err = nl.fails("endpoint", "start", "other", expect="endpoint 'other' needs the pageserver")
    assert fix in err, err
    _no_process_for(nl, "other")
    assert nl.config() == cfg and nl.run("endpoint", "list").stdout == eps
    nl.run("pageserver", "start")
    assert nl.state()[1] == timelines, "nothing was created while the pageserver was down"
    assert one(nl.start_endpoint("other"), "select a from t") == 1

    # Two of three safekeepers down: a primary cannot start, a static endpoint can.
    nl.run("endpoint", "stop", "main")
    nl.run("endpoint", "stop", "other")
    nl.run("safekeeper", "stop", "1")
    nl.run("safekeeper", "stop", "3")
    before = nl.state()
    err = nl.fails("endpoint", "start", "main", expect="needs a majority of the 3 safekeepers")
    assert "safekeepers 1, 3 are not answering" in err, err
    _no_process_for(nl, "main")
    assert nl.state() == before
    assert one(nl.start_endpoint("other"), "select a from t") == 1
    nl.run("safekeeper", "start", "1")
    nl.run("safekeeper", "start", "3")

    # A safekeeper down: a new branch would miss its timeline there, so it is refused up front.
    nl.run("safekeeper", "stop", "2")
    before = nl.state()
    err = nl.fails("timeline", "branch", "--branch-name", "dev", expect="safekeeper 2 is not answering")
    assert "neon_local safekeeper start 2" in err
    assert nl.state() == before
    nl.run("safekeeper", "start", "2")
    nl.branch("dev")
    dev = nl.endpoint("dev", "--branch-name", "dev")
    assert one(dev, "select a from t") == 1
