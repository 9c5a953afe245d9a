"""Checks of the test harness itself and of the Postgres build it relies on."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys

from fixtures.daemons import Daemon, DaemonSet, live_group_members
from fixtures.osuser import IS_ROOT, pg_os_user
from fixtures.paths import REPO_ROOT, pg_install_dir


def test_postgres_build_is_cached():
    """A second run of the build script with nothing changed reuses the cached install."""
    out = subprocess.run(["bash", str(REPO_ROOT / "postgres" / "build.sh")], capture_output=True, text=True, check=True)
    assert "up to date" in out.stderr, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(pg_install_dir().resolve())


def test_vanilla_pg_runs_with_contrib(vanilla_pg):
    pg = vanilla_pg.start()
    (version,) = pg.safe_psql("show server_version")[0]
    assert version.startswith("15."), version
    if IS_ROOT:
        owner = pwd.getpwuid(os.stat(pg.datadir).st_uid).pw_name
        assert owner == pg_os_user()
    for ext in ["amcheck", "pageinspect", "pg_buffercache", "pg_prewarm"]:
        pg.safe_psql(f"create extension {ext}")
    pg.safe_psql("create table t(id int primary key, v text); insert into t select g, 'x' || g from generate_series(1, 1000) g")
    pg.safe_psql("select bt_index_check('t_pkey', true)")
    (lsn,) = pg.safe_psql("select lsn from page_header(get_raw_page('t', 0))")[0]
    assert lsn != "0/0"
    (n,) = pg.safe_psql("select pg_prewarm('t')")[0]
    assert n >= 1
    (lz4,) = pg.safe_psql("select count(*) from pg_settings where name = 'wal_compression' and 'lz4' = any(enumvals)")[0]
    assert lz4 == 1, "the build lacks lz4 support"


def test_moto_fixture_round_trip(moto_s3):
    c = moto_s3.client()
    c.put_object(Bucket=moto_s3.bucket, Key="a/b", Body=b"hello")
    assert c.get_object(Bucket=moto_s3.bucket, Key="a/b")["Body"].read() == b"hello"
    assert moto_s3.list_keys("a/") == ["a/b"]


def test_log_check_finds_unexpected_errors(tmp_path):
    ds = DaemonSet(output_dir=tmp_path)
    script = "import sys; print('INFO all good'); print('2026 ERROR lost a page'); print('thread main panicked at x.rs:1'); sys.stdout.flush()"
    d = ds.add(Daemon(name="noisy", argv=[sys.executable, "-c", script], log_path=tmp_path / "noisy.log")).start()
    d.proc.wait(timeout=30)
    errors = ds.unexpected_errors()
    assert len(errors) == 2 and "lost a page" in errors[0] and "panicked" in errors[1]
    ds.allow_errors("lost a page", "panicked at")
    assert ds.unexpected_errors() == []


def test_teardown_stops_daemons_and_their_children(tmp_path):
    ds = DaemonSet(output_dir=tmp_path)
    d = ds.add(Daemon(name="sleeper", argv=["sh", "-c", "sleep 1000 & sleep 1000; wait"], log_path=tmp_path / "s.log")).start()
    pgid = d.proc.pid
    ds.stop_all()
    assert not d.is_running()
    left = live_group_members(pgid)
    assert left == [], f"processes left in group {pgid}: {left}"
