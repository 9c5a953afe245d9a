"""`neon_local init --remote-storage local|s3`: the pageserver offloads layers there; bad
combinations of options fail in one line before anything is created."""

from __future__ import annotations

import time

from fixtures.neon_local import neon_env, one, sql  # noqa: F401


def _write_and_stop(nl) -> None:
    nl.run("start")
    nl.run("tenant", "create", "--set-default")
    main = nl.endpoint("main")
    sql(main, "create table t(a int, pad text); insert into t select g, repeat('x', 500) from generate_series(1, 20000) g")
    nl.run("stop")  # a fast stop flushes the pageserver's open layer


def _wait_for(what: str, cond, timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    while not (v := cond()):
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.2)
    return v


def test_init_remote_storage_local(neon_env):
    nl = neon_env
    out = nl.run("init", "--remote-storage", "local").stdout
    assert "remote storage in" in out
    assert "[remote_storage]" in (nl.repo_dir / "pageserver" / "pageserver.toml").read_text()
    _write_and_stop(nl)
    files = [p for p in (nl.repo_dir / "remote_storage").rglob("*") if p.is_file()]
    assert files, "layers were offloaded to .neon/remote_storage"
    # And the stack comes back with the data.
    nl.run("start")
    assert one(nl.start_endpoint("main"), "select count(*) from t") == 20000


def test_init_remote_storage_s3(neon_env, moto_s3):
    nl = neon_env
    nl.env.update(moto_s3.env())
    nl.run(
        "init", "--remote-storage", "s3", "--s3-endpoint", moto_s3.endpoint, "--s3-bucket", moto_s3.bucket,
        "--s3-region", moto_s3.region, "--s3-prefix", "neon_local",
    )
    _write_and_stop(nl)
    keys = _wait_for("objects in the bucket", lambda: moto_s3.list_keys("neon_local/"))
    assert keys, keys


def test_init_option_errors_leave_nothing(neon_env):
    nl = neon_env
    for args, expect in [
        (("--remote-storage", "s3", "--s3-region", "us-east-1"), "needs --s3-bucket"),
        (("--remote-storage", "s3", "--s3-bucket", "b"), "needs --s3-region"),
        (("--s3-bucket", "b"), "need '--remote-storage s3'"),
        (("--remote-storage", "local", "--s3-prefix", "p"), "not 'local'"),
        (("--remote-storage", "s3", "--s3-bucket", "it's", "--s3-region", "r"), "--s3-bucket 'it's' must be"),
        (("--num-safekeepers", "0"), "at least 1"),
    ]:
        nl.fails("init", *args, expect=expect)
        assert not nl.repo_dir.exists(), f"init {args} left {nl.repo_dir} behind"
    nl.run("init")
    nl.fails("init", expect="already exists; use 'neon_local init --force'")
