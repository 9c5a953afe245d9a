"""neon_local: the README quickstart, branching through the CLI, and its error messages."""

from __future__ import annotations

import os
import random
import subprocess

import pytest

from fixtures.paths import REPO_ROOT, neon_bin, pg_bin


@pytest.fixture
def repo_env(test_output_dir, daemons, port_allocator):
    # Shifted daemon ports (the defaults may be taken on a developer's machine), and endpoint
    # ports below the kernel's ephemeral range, where client connections cannot occupy them.
    env = dict(
        os.environ,
        NEON_REPO_DIR=str(test_output_dir / "neon_repo"),
        NEON_LOCAL_PORT_OFFSET=str(random.randrange(100, 1500, 10)),
        NEON_LOCAL_ENDPOINT_PORT_BASE=str(port_allocator.get()),
    )
    yield env
    # Stop whatever the CLI started, even after a failure.
    subprocess.run([str(neon_bin("neon_local")), "stop", "--mode", "immediate"], env=env, capture_output=True, timeout=120)


def neon_local(env, *args, check=True):
    r = subprocess.run([str(neon_bin("neon_local")), *args], env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, f"neon_local {' '.join(args)} failed: {r.stdout}{r.stderr}"
    return r


def psql(connstr, sql):
    return subprocess.run([str(pg_bin("psql")), connstr, "-AtXc", sql], capture_output=True, text=True, timeout=60, check=True).stdout.strip()


def test_quickstart_twice_and_psql(repo_env):
    """The README's first command prints a connection string that works with psql, and running
    it again reuses the environment."""
    out = subprocess.run(["bash", str(REPO_ROOT / "scripts/quickstart.sh")], env=repo_env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    connstr = out.stdout.strip().splitlines()[-1]
    assert connstr.startswith("postgresql://"), out.stdout
    psql(connstr, "create table q(a int); insert into q values (42)")
    again = subprocess.run(["bash", str(REPO_ROOT / "scripts/quickstart.sh")], env=repo_env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip().splitlines()[-1] == connstr
    assert psql(connstr, "select a from q") == "42"


def test_branches_and_errors(repo_env):
    neon_local(repo_env, "init", "--num-safekeepers", "3")
    neon_local(repo_env, "start")
    neon_local(repo_env, "tenant", "create", "--set-default")
    neon_local(repo_env, "endpoint", "create", "main")
    main = neon_local(repo_env, "endpoint", "start", "main").stdout.strip().splitlines()[-1].split("started: ")[1]
    psql(main, "create table t(id int); insert into t select generate_series(1, 100)")
    neon_local(repo_env, "timeline", "branch", "--branch-name", "dev")
    psql(main, "insert into t select generate_series(101, 200)")
    neon_local(repo_env, "endpoint", "create", "dev", "--branch-name", "dev")
    dev = neon_local(repo_env, "endpoint", "start", "dev").stdout.strip().splitlines()[-1].split("started: ")[1]
    assert psql(dev, "select count(*) from t") == "100", "the branch has exactly the rows committed at its branch point"
    psql(dev, "insert into t values (1000)")
    assert psql(dev, "select count(*) from t") == "101"
    assert psql(main, "select count(*) from t") == "200", "the parent does not see the branch's writes"
    listing = neon_local(repo_env, "timeline", "list").stdout
    assert "dev" in listing and "<- main at" in listing

    # Errors: one line, non-zero exit, nothing left behind.
    r = neon_local(repo_env, "endpoint", "create", "x", "--branch-name", "nope", check=False)
    assert r.returncode != 0 and "branch 'nope' does not exist; see 'neon_local timeline list'" in r.stderr
    r = neon_local(repo_env, "endpoint", "create", "main", check=False)
    assert r.returncode != 0 and "endpoint 'main' already exists" in r.stderr
    r = neon_local(repo_env, "endpoint", "create", "second", "--branch-name", "main", check=False)
    assert r.returncode != 0 and "already has endpoint 'main'" in r.stderr, "two primaries on one branch are refused"
    assert "second" not in neon_local(repo_env, "endpoint", "list").stdout
    neon_local(repo_env, "timeline", "branch", "--branch-name", "dev2")
    r = neon_local(repo_env, "endpoint", "create", "busy", "--branch-name", "dev2", "--pg-port", main.rsplit(":", 1)[1].split("/")[0])
    r = neon_local(repo_env, "endpoint", "start", "busy", check=False)
    assert r.returncode != 0 and "in use" in (r.stdout + r.stderr)
    neon_local(repo_env, "pageserver", "stop")
    r = neon_local(repo_env, "timeline", "branch", "--branch-name", "dev3", check=False)
    assert r.returncode != 0 and "is the daemon running" in r.stderr
