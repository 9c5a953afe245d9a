"""TLS on the listeners (issue 8 item 2, server side). With a certificate configured:

- the pageserver's page service and a safekeeper's libpq listener answer SSLRequest with TLS; a
  client verifying the server against the CA (`sslmode=verify-full`) connects and runs
  commands; a client that trusts another CA is refused; a plaintext client is refused with the
  "TLS required" error (28000) before any authentication;
- the HTTP APIs of the pageserver, a safekeeper and compute_ctl are HTTPS only: a client
  verifying against the CA gets answers, plain http:// to the same port gets none, a client
  trusting another CA refuses the server.

The certificates are what an operator would make: a CA, and a server certificate for
localhost/127.0.0.1 signed by it (openssl CLI)."""

from __future__ import annotations

import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import requests

from fixtures.compute import Compute, Storage
from fixtures.safekeeper import Safekeeper

EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def openssl(dir: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=dir, check=True, capture_output=True, timeout=60)


@dataclass
class Certs:
    ca: Path  # the CA certificate clients trust
    cert: Path  # the server certificate (localhost, 127.0.0.1), signed by the CA
    key: Path


def make_certs(dir: Path, name: str) -> Certs:
    """A CA named `name` and a server certificate for localhost signed by it."""
    dir.mkdir(parents=True, exist_ok=True)
    openssl(dir, "req", "-x509", *EC_KEY, "-days", "2", "-subj", f"/CN={name} test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout", f"{name}_ca.key", "-out", f"{name}_ca.crt")
    openssl(dir, "req", *EC_KEY, "-subj", "/CN=localhost", "-keyout", f"{name}_server.key", "-out", f"{name}_server.csr")
    (dir / f"{name}_server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    openssl(dir, "x509", "-req", "-in", f"{name}_server.csr", "-CA", f"{name}_ca.crt", "-CAkey", f"{name}_ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}_server.ext", "-out", f"{name}_server.crt")
    return Certs(ca=dir / f"{name}_ca.crt", cert=dir / f"{name}_server.crt", key=dir / f"{name}_server.key")


def connect(port: int, sslmode: str, rootcert: Path, **kw) -> psycopg.Connection:
    return psycopg.connect(host="localhost", port=port, user="cloud_admin", dbname="postgres", sslmode=sslmode, sslrootcert=str(rootcert), autocommit=True, connect_timeout=10, **kw)


def check_plaintext_refused(port: int, rootcert: Path, **kw) -> None:
    """A client that does not ask for TLS gets the "TLS required" error, nothing else."""
    with pytest.raises(psycopg.OperationalError, match="this server requires TLS: connect with sslmode=verify-full"):
        connect(port, "disable", rootcert, **kw)


def check_https_only(port: int, path: str, certs: Certs, other: Certs) -> None:
    """`path` answers over HTTPS verified against the CA; plain HTTP and a client trusting
    another CA get nothing."""
    r = requests.get(f"https://localhost:{port}{path}", verify=str(certs.ca), timeout=10)
    assert r.status_code == 200, r.text
    r = requests.get(f"https://127.0.0.1:{port}{path}", verify=str(certs.ca), timeout=10)
    assert r.status_code == 200, r.text
    # rustls answers the plaintext request with a TLS alert and closes: no HTTP response.
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://localhost:{port}{path}", timeout=10)
    with pytest.raises(requests.exceptions.SSLError, match="certificate verify failed"):
        requests.get(f"https://localhost:{port}{path}", verify=str(other.ca), timeout=10)


def test_tls_on_page_service_and_safekeeper(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    certs = make_certs(test_output_dir / "certs", "ours")
    other = make_certs(test_output_dir / "certs", "other")
    stack = Storage(daemons, safekeeper_cluster, test_output_dir, port_allocator, f"ssl_cert_file = '{certs.cert}'\nssl_key_file = '{certs.key}'\n",
                    pageserver_tls_ca=certs.ca)
    ps, tenant, timeline = stack.ps, stack.tenant_id, stack.timeline_id
    lsn = ps.timeline(tenant, timeline)["last_record_lsn"]

    with connect(ps.pg_port, "verify-full", certs.ca) as c:
        assert c.pgconn.ssl_in_use
        (until,) = c.execute(f"lease lsn {tenant} {timeline} {lsn}").fetchone()
        assert int(until) > 0
    with connect(ps.pg_port, "require", certs.ca) as c:
        assert c.pgconn.ssl_in_use
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        connect(ps.pg_port, "verify-full", other.ca)
    check_plaintext_refused(ps.pg_port, certs.ca)
    # The page service still works after the refusals.
    with connect(ps.pg_port, "verify-full", certs.ca) as c:
        c.execute(f"lease lsn {tenant} {timeline} {lsn}")
    check_https_only(ps.http_port, "/v1/status", certs, other)
    assert ps.timeline(tenant, timeline)["timeline_id"] == timeline  # the fixture's own HTTPS calls

    # A safekeeper with the same certificate.
    sk = Safekeeper(daemons, 9, test_output_dir / "sk_tls", port_allocator.get(), port_allocator.get(),
                    extra_args=["--ssl-cert-file", str(certs.cert), "--ssl-key-file", str(certs.key)], tls_ca=certs.ca).start()
    options = f"-c tenant_id={uuid.uuid4().hex} -c timeline_id={uuid.uuid4().hex}"
    with connect(sk.pg_port, "verify-full", certs.ca, options=options) as c:
        assert c.pgconn.ssl_in_use
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        connect(sk.pg_port, "verify-full", other.ca, options=options)
    check_plaintext_refused(sk.pg_port, certs.ca, options=options)
    check_https_only(sk.http_port, "/v1/status", certs, other)
    start_lsn = ps.timeline(tenant, timeline)["last_record_lsn"]
    sk_tenant, sk_timeline = uuid.uuid4().hex, uuid.uuid4().hex
    assert sk.create_timeline(sk_tenant, sk_timeline, start_lsn)["timeline_id"] == sk_timeline


def test_https_on_compute_ctl(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    """compute_ctl run --ssl-cert-file/--ssl-key-file: its HTTP API is HTTPS only. (The storage
    here is plaintext: compute-to-storage TLS is the client side's business.)"""
    certs = make_certs(test_output_dir / "certs", "ours")
    other = make_certs(test_output_dir / "certs", "other")
    stack = Storage(daemons, safekeeper_cluster, test_output_dir, port_allocator)
    compute = Compute(daemons, "compute_tls", test_output_dir / "compute_tls", stack.spec(), port_allocator.get(),
                      ssl_cert_file=certs.cert, ssl_key_file=certs.key, tls_ca=certs.ca).start()
    assert compute.status()["status"] == "running"
    check_https_only(compute.http_port, "/status", certs, other)
    assert compute.sql("select 1") == [(1,)]
    compute.stop()
