"""Shared pytest fixtures. See test_runner/README.md."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixtures.daemons import DaemonSet  # noqa: E402
from fixtures.osuser import pg_user_can_enter  # noqa: E402
from fixtures.paths import REPO_ROOT  # noqa: E402
from fixtures.ports import PortAllocator  # noqa: E402
from fixtures.s3 import MotoS3, start_moto  # noqa: E402
from fixtures.vanilla_pg import VanillaPostgres  # noqa: E402


def _output_root() -> Path:
    root = Path(os.environ.get("TEST_OUTPUT", REPO_ROOT / "test_output"))
    root.mkdir(parents=True, exist_ok=True)
    if not pg_user_can_enter(root):
        # The unprivileged Postgres user must reach its data directories.
        root = Path("/tmp/neon_test_output")
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)
    return root


@pytest.fixture(scope="session")
def port_allocator() -> PortAllocator:
    return PortAllocator()


@pytest.fixture
def test_output_dir(request) -> Path:
    """A fresh folder per test. A failed test's logs and data stay there for inspection; a passed
    test's folder is removed (data directories of a whole run add up to tens of GB), unless
    KEEP_TEST_OUTPUT=1."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid.split("::", 1)[-1])[:120]
    d = _output_root() / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    os.chmod(d, 0o755)
    yield d
    call = getattr(request.node, "rep_call", None)
    passed = call is not None and call.passed and not getattr(request.node, "keep_output", False)
    if passed and os.environ.get("KEEP_TEST_OUTPUT") != "1":
        shutil.rmtree(d, ignore_errors=True)


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def daemons(request, test_output_dir) -> DaemonSet:
    """Registry of the test's processes: all stopped at teardown, even after a failure; then the
    test fails if any of their logs holds an ERROR line it did not allow (`daemons.allow_errors`)."""
    ds = DaemonSet(output_dir=test_output_dir)
    yield ds
    ds.stop_all()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.passed:
        errors = ds.unexpected_errors()
        if errors:
            request.node.keep_output = True  # the logs explain the failure
            pytest.fail("daemons logged unexpected errors:\n" + "\n".join(errors[:20]), pytrace=False)


@pytest.fixture
def vanilla_pg(daemons, test_output_dir, port_allocator) -> VanillaPostgres:
    """An initdb'd (not started) stock-behaving Postgres from our build."""
    pg = VanillaPostgres(daemons, test_output_dir / "vanilla_pg" / "pgdata", port_allocator.get())
    daemons.watch_log(pg.log_path)
    return pg.initdb()


@pytest.fixture
def moto_s3(daemons, port_allocator) -> MotoS3:
    """moto's S3 server on a free port with an empty bucket."""
    return start_moto(daemons, port_allocator.get(), bucket="neon-test-bucket")


@pytest.fixture
def safekeeper_cluster(daemons, test_output_dir, port_allocator):
    """Three safekeepers (fsync on), peers of each other, started."""
    from fixtures.safekeeper import Safekeeper

    ports = [(port_allocator.get(), port_allocator.get()) for _ in range(3)]
    sks = []
    for i, (pg_port, http_port) in enumerate(ports):
        peers = [p for j, (p, _) in enumerate(ports) if j != i]
        sks.append(Safekeeper(daemons, i + 1, test_output_dir / f"safekeeper{i + 1}", pg_port, http_port, peers=peers))
    for sk in sks:
        sk.start()
    return sks
