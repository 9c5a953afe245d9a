"""The README's first command from a fresh clone: it builds everything, brings the stack up and
prints a connection string that psql accepts; a second run reuses the environment.

Slow: the clone builds the workspace. It builds into its own target dir (kept in the cache
folder between runs), because a build of the clone in the shared target dir would replace the
binaries the rest of the suite runs with the clone's."""

from __future__ import annotations

import os
import subprocess

import pytest

from fixtures.neon_local import _free_offset
from fixtures.paths import REPO_ROOT, pg_bin


@pytest.mark.slow
def test_quickstart_from_a_fresh_clone(test_output_dir, port_allocator):
    clone = test_output_dir / "clone"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO_ROOT), str(clone)], check=True, timeout=300)
    cache = os.environ.get("NEON_CACHE_DIR", "/var/cache/neon" if os.getuid() == 0 else os.path.expanduser("~/.cache/neon"))
    # scripts/env.sh links target/ to the shared cache only when target/ does not exist yet.
    target = os.path.join(cache, "cargo-target-quickstart-test")
    os.makedirs(target, exist_ok=True)
    os.symlink(target, clone / "target")
    env = dict(
        os.environ,
        NEON_LOCAL_PORT_OFFSET=str(_free_offset()),
        NEON_LOCAL_ENDPOINT_PORT_BASE=str(port_allocator.get()),
    )
    for k in ["NEON_REPO_DIR", "PG_INSTALL_DIR", "NEON_BIN_DIR", "CARGO_TARGET_DIR"]:
        env.pop(k, None)
    neon_local = str(clone / "target" / "debug" / "neon_local")
    try:
        first = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=clone, env=env, capture_output=True, text=True, timeout=3600)
        assert first.returncode == 0, first.stderr[-3000:]
        connstr = first.stdout.strip().splitlines()[-1]
        assert connstr.startswith("postgresql://cloud_admin@127.0.0.1:"), first.stdout
        assert (clone / ".neon" / "config.json").exists(), "state lives in the clone's .neon/"
        psql = [str(pg_bin("psql")), connstr, "-AtXc"]
        subprocess.run(psql + ["create table q(a int); insert into q values (42)"], check=True, timeout=60)
        again = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=clone, env=env, capture_output=True, text=True, timeout=3600)
        assert again.returncode == 0, again.stderr[-3000:]
        assert again.stdout.strip().splitlines()[-1] == connstr
        out = subprocess.run(psql + ["select a from q"], capture_output=True, text=True, check=True, timeout=60)
        assert out.stdout.strip() == "42"
    finally:
        subprocess.run(
            [neon_local, "stop", "--mode", "immediate"],
            cwd=clone, env=dict(env, NEON_REPO_DIR=str(clone / ".neon")), capture_output=True, timeout=120,
        )
