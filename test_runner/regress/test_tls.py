"""TLS on the libpq listeners (issue 8 item 2, first increment): with a certificate configured,
the pageserver's page service and a safekeeper answer SSLRequest with TLS; a client verifying
the server against the CA (`sslmode=verify-full`) connects and runs commands; a client that
trusts another CA is refused; plaintext clients still work (TLS is the client's choice until the
computes and daemons all speak it)."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest

from fixtures.remote import RemoteStorageStack
from fixtures.safekeeper import Safekeeper


def make_cert(dir: Path, name: str) -> tuple[Path, Path]:
    cert, key = dir / f"{name}.crt", dir / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def connect(port: int, sslmode: str, rootcert: Path, **kw) -> psycopg.Connection:
    return psycopg.connect(host="localhost", port=port, user="cloud_admin", dbname="postgres", sslmode=sslmode, sslrootcert=str(rootcert), autocommit=True, connect_timeout=10, **kw)


def test_tls_on_page_service_and_safekeeper(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    cert, key = make_cert(test_output_dir, "server")
    other_ca, _ = make_cert(test_output_dir, "other")
    stack = RemoteStorageStack(daemons, safekeeper_cluster, test_output_dir, port_allocator, f"ssl_cert_file = '{cert}'\nssl_key_file = '{key}'\n")
    ps, tenant, timeline = stack.ps, stack.tenant_id, stack.timeline_id
    lsn = ps.timeline(tenant, timeline)["last_record_lsn"]

    with connect(ps.pg_port, "verify-full", cert) as c:
        assert c.pgconn.ssl_in_use
        (until,) = c.execute(f"lease lsn {tenant} {timeline} {lsn}").fetchone()
        assert int(until) > 0
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        connect(ps.pg_port, "verify-full", other_ca)
    with connect(ps.pg_port, "disable", cert) as c:
        assert not c.pgconn.ssl_in_use
        c.execute(f"lease lsn {tenant} {timeline} {lsn}")

    # A safekeeper with the same certificate.
    sk = Safekeeper(daemons, 9, test_output_dir / "sk_tls", port_allocator.get(), port_allocator.get(),
                    extra_args=["--ssl-cert-file", str(cert), "--ssl-key-file", str(key)]).start()
    with psycopg.connect(host="localhost", port=sk.pg_port, user="cloud_admin", dbname="postgres", sslmode="verify-full", sslrootcert=str(cert), autocommit=True, connect_timeout=10,
                         options=f"-c tenant_id={uuid.uuid4().hex} -c timeline_id={uuid.uuid4().hex}") as c:
        assert c.pgconn.ssl_in_use
