"""Compute roles (issue 8 item 4): a spec role's password is stored as a SCRAM-SHA-256 verifier
made by compute_ctl (the plaintext never reaches Postgres); connections from outside loopback
must prove it with SCRAM; the password appears in no log."""

from __future__ import annotations

import subprocess

import psycopg
import pytest

from fixtures.compute import Storage

SECRET = "s3cret-Pa55word-4-app"


def non_loopback_address() -> str | None:
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    return next((a for a in out if "." in a and not a.startswith("127.")), None)


def test_spec_roles_get_scram_and_hba_requires_it(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    addr = non_loopback_address()
    if addr is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect through")
    stack = Storage(daemons, safekeeper_cluster, test_output_dir, port_allocator)
    daemons.allow_errors('password authentication failed for user "app"', "no password")  # the refused logins below
    c = stack.compute("roles", roles=[{"name": "app", "password": SECRET}], settings={"listen_addresses": "*"})
    (verifier,) = c.sql("select rolpassword from pg_authid where rolname = 'app'")[0]
    assert verifier.startswith("SCRAM-SHA-256$4096:") and SECRET not in verifier, verifier

    port = c.spec["pg_port"]

    def connect(host: str, **kw) -> psycopg.Connection:
        return psycopg.connect(host=host, port=port, user="app", dbname="postgres", connect_timeout=10, **kw)

    with connect(addr, password=SECRET) as conn:
        assert conn.execute("select current_user").fetchone() == ("app",)
        assert conn.pgconn.used_password
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(addr, password="wrong")
    with pytest.raises(psycopg.OperationalError, match="password"):
        connect(addr, password="")
    # Loopback stays trusted (compute_ctl, the walproposer and replicas connect there).
    with connect("127.0.0.1") as conn:
        assert not conn.pgconn.used_password
    c.stop()

    # The password is in no log or data file (the spec file itself is the only place it is).
    leaks = []
    for path in test_output_dir.rglob("*"):
        if path.is_file() and path.name != "spec.json":
            try:
                if SECRET.encode() in path.read_bytes():
                    leaks.append(str(path))
            except OSError:
                pass
    assert not leaks, leaks
