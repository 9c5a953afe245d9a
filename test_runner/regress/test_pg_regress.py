"""Postgres's own regression and isolation suites against a stateless primary, then a fresh compute on the same
timeline: the database the suite leaves behind reads back identically (pg_dump) from the
pageserver, and amcheck finds nothing wrong with any heap table or B-tree index."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from fixtures.compute import Storage
from fixtures.osuser import as_pg_user, give_to_pg_user
from fixtures.paths import REPO_ROOT, pg_bin, pg_install_dir

EXPECTED_DIFFS_FILE = REPO_ROOT / "test_runner" / "regress" / "pg_regress_expected_diffs.txt"


def expected_diffs() -> dict[str, str]:
    out = {}
    for line in EXPECTED_DIFFS_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, reason = line.partition(" ")
            out[name] = reason.strip()
    return out


def run_suite(tool: str, src: Path, workdir: Path, port: int, schedule: str, extra: list[str]) -> tuple[str, set[str]]:
    """Runs `tool` (pg_regress or pg_isolation_regress) from a copy of `src` owned by the Postgres
    OS user (the tests write result files and COPY from files the server reads)."""
    shutil.copytree(src, workdir, ignore=shutil.ignore_patterns("*.o", "results", "log", "tmp_check"))
    give_to_pg_user(workdir)
    argv = as_pg_user([
        str(pg_bin(tool)), "--host=127.0.0.1", f"--port={port}", "--user=cloud_admin",
        "--inputdir=.", f"--bindir={pg_install_dir() / 'bin'}", f"--schedule={schedule}", *extra,
    ])
    r = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=900, env={"PATH": "/usr/bin:/bin", "HOME": str(workdir)})
    (workdir / "run.out").write_text(r.stdout + r.stderr)
    failed = set(re.findall(r"^\s*(?:test\s+)?(\S+)\s+\.\.\. FAILED", r.stdout, re.M))
    summary = re.search(r"(\d+) of (\d+) tests (?:failed|passed)|All (\d+) tests passed", r.stdout)
    assert summary, f"{tool} did not finish (exit {r.returncode}): {(r.stdout + r.stderr)[-3000:]}"
    return r.stdout, failed


def dump(compute, dbname: str) -> str:
    """A logical dump without what legitimately changes across a compute restart: unlogged tables'
    rows (emptied, as after a crash of stock Postgres), sequences' positions (a sequence logs 32
    values ahead and a new compute resumes after the logged ones, as stock does after a crash)
    and pg_dump's per-run `\\restrict` key."""
    r = subprocess.run(
        [str(pg_bin("pg_dump")), "--no-unlogged-table-data", compute.connstr.rsplit("/", 1)[0] + f"/{dbname}"],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    keep = [line for line in r.stdout.splitlines() if not line.startswith(("SELECT pg_catalog.setval(", "\\restrict", "\\unrestrict"))]
    return "\n".join(keep)


AMCHECK_BTREE = """
select count(*) from (
  select bt_index_check(c.oid, true) from pg_index i
  join pg_class c on c.oid = i.indexrelid join pg_am a on a.oid = c.relam
  where a.amname = 'btree' and c.relkind = 'i' and c.relpersistence = 'p' and i.indisvalid and i.indisready) s
"""
AMCHECK_HEAP = """
select c.oid::regclass::text, v.blkno, v.offnum, v.msg from pg_class c join pg_am a on a.oid = c.relam,
  verify_heapam(c.oid) v where c.relkind in ('r', 'm', 't') and c.relpersistence = 'p' and a.amname = 'heap'
"""


def test_pg_regress_then_fresh_compute(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    storage = Storage(daemons, safekeeper_cluster, test_output_dir, port_allocator)
    # The suites provoke errors on purpose; the server logs them with their statements.
    daemons.allow_errors(r"\[\d+\] (ERROR|FATAL|STATEMENT):  ", r"-- ERROR\b")
    c1 = storage.compute("compute1")
    src = pg_install_dir() / "src" / "src" / "test" / "regress"
    out, failed = run_suite("pg_regress", src, test_output_dir / "regress", c1.spec["pg_port"], "parallel_schedule",
                            [f"--dlpath={pg_install_dir() / 'lib' / 'postgresql'}"])
    expected = expected_diffs()
    unexpected = failed - expected.keys()
    diffs = (test_output_dir / "regress" / "regression.diffs")
    assert not unexpected, f"unexpected regression failures {sorted(unexpected)}; see {diffs}"
    assert re.search(r"All \d+ tests passed|\d+ of \d+ tests failed", out)
    # The isolation suite (concurrency: locks, SSI, multixacts, ...) on the same compute.
    iso_src = pg_install_dir() / "src" / "src" / "test" / "isolation"
    _, iso_failed = run_suite("pg_isolation_regress", iso_src, test_output_dir / "isolation", c1.spec["pg_port"],
                              "isolation_schedule", ["--dbname=isolation_regression"])
    assert not iso_failed, f"isolation failures {sorted(iso_failed)}; see {test_output_dir / 'isolation' / 'output_iso'}"
    before = dump(c1, "regression")
    assert len(before) > 1_000_000, "the suite should leave a large regression database behind"
    c1.stop()

    # Everything the suite wrote now comes from the pageserver.
    c2 = storage.compute("compute2")
    after = dump(c2, "regression")
    if after != before:
        (test_output_dir / "before.sql").write_text(before)
        (test_output_dir / "after.sql").write_text(after)
        raise AssertionError(f"pg_dump of 'regression' changed across the restart; diff {test_output_dir}/before.sql after.sql")
    c2.sql("create extension if not exists amcheck", "regression")
    n_indexes = c2.sql(AMCHECK_BTREE, "regression")[0][0]
    assert n_indexes > 300, n_indexes
    assert c2.sql(AMCHECK_HEAP, "regression") == []
    c2.stop()
