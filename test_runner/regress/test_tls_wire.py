"""No plaintext page or WAL bytes on the wire when TLS is on (issue 8 acceptance).

A recording TCP proxy on 127.0.0.1 sits in front of every storage connection the data takes:

- `compute->pageserver`: the compute's page service connections (compute_ctl's basebackup, the
  neon extension's GetPage@LSN requests and their 8 KiB page images);
- `walproposer->skN`: the walproposer's connections to each of the three safekeepers (the WAL);
- `pageserver->skN`: the pageserver's WAL receiver (and its TIMELINE_STATUS polls) to each
  safekeeper (the WAL again).

The certificates cover 127.0.0.1, so the clients still verify the servers (verify-full) through
the proxies. The compute writes a random marker in many rows of a table with a random name: it
travels as WAL to the safekeepers and from them to the pageserver; then a fresh compute (new
data directory, empty buffers) reads the table back, so the pages travel in GetPage responses.

With TLS on, the marker, the table name and the heap page header pattern are in none of the
captured bytes; every connection begins with SSLRequest, the server's 'S' and a TLS handshake,
and after that each direction is a sequence of TLS records and nothing else; every route carried
enough bytes that a bypass (or a proxy that recorded nothing) would show. The control run, the
same stack with TLS off, finds the marker in each route's bytes: the capture sees what it should.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from fixtures.compute import Compute
from fixtures.daemons import wait_until
from fixtures.pageserver import Pageserver
from fixtures.safekeeper import Safekeeper, lsn_int
from regress.test_tls import make_certs

SSL_REQUEST = bytes.fromhex("0000000804d2162f")
# pd_special = 8192 and pd_pagesize_version = 8192 | 4, little-endian: bytes 16..20 of every heap
# page (a heap page has no special space).
HEAP_PAGE_HEADER = bytes.fromhex("00200420")
ROWS = 3000


@dataclass
class Conn:
    up: bytearray = field(default_factory=bytearray)  # client -> server
    down: bytearray = field(default_factory=bytearray)  # server -> client


class RecordingProxy:
    """Listens on 127.0.0.1:<free port>, forwards each connection to 127.0.0.1:`target` and
    keeps every byte of both directions, per connection."""

    def __init__(self, name: str, target: int):
        self.name = name
        self.target = target
        self.conns: list[Conn] = []
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._spawn(self._accept_loop)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True, name=f"proxy-{self.name}")
        with self._lock:
            self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(("127.0.0.1", self.target), timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            conn = Conn()
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self.conns.append(conn)
                self._socks += [client, server]
            self._spawn(self._pump, client, server, conn.up)
            self._spawn(self._pump, server, client, conn.down)

    def _pump(self, src: socket.socket, dst: socket.socket, buf: bytearray) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    buf += data
                dst.sendall(data)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def snapshot(self) -> list[Conn]:
        with self._lock:
            return [Conn(bytearray(c.up), bytearray(c.down)) for c in self.conns]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks = list(self._socks)
        # shutdown() wakes the thread blocked in accept() (close() alone does not, on Linux).
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=10)


def tls_records(stream: bytes, where: str) -> list[int]:
    """The content types of the TLS records `stream` consists of (it must be nothing else; the
    last record may be cut short by the connection closing)."""
    types = []
    i = 0
    while i < len(stream):
        if len(stream) - i < 5:
            break  # a header cut short at the end
        ctype, major, minor, length = stream[i], stream[i + 1], stream[i + 2], int.from_bytes(stream[i + 3 : i + 5], "big")
        assert ctype in (20, 21, 22, 23), f"{where}: byte {i} is not a TLS record (type {ctype}): {bytes(stream[i:i + 16]).hex()}"
        assert major == 3 and minor in (1, 3), f"{where}: TLS record at byte {i} has version {major}.{minor}"
        assert length <= 16384 + 2048, f"{where}: TLS record at byte {i} is {length} bytes"
        types.append(ctype)
        i += 5 + length
    return types


def check_tls_conn(c: Conn, where: str) -> None:
    """SSLRequest, 'S', then TLS records only, handshake first, both ways."""
    if not c.up and not c.down:
        return  # connected and closed without a byte (e.g. at teardown)
    assert c.up[:8] == SSL_REQUEST, f"{where}: the client's first bytes are not SSLRequest: {bytes(c.up[:16]).hex()}"
    assert c.down[:1] == b"S", f"{where}: the server did not accept SSLRequest: {bytes(c.down[:16]).hex()}"
    up, down = tls_records(c.up[8:], f"{where} (client)"), tls_records(c.down[1:], f"{where} (server)")
    assert up and up[0] == 22, f"{where}: the client's first TLS record is not a handshake: {up[:3]}"
    assert down and down[0] == 22, f"{where}: the server's first TLS record is not a handshake: {down[:3]}"


def find(needle: bytes, conns: list[Conn]) -> int:
    return sum(bytes(c.up).count(needle) + bytes(c.down).count(needle) for c in conns)


def total(conns: list[Conn]) -> int:
    return sum(len(c.up) + len(c.down) for c in conns)


@pytest.mark.parametrize("tls", [True, False], ids=["tls_on", "tls_off_control"])
def test_no_plaintext_on_the_wire(tls, daemons, test_output_dir: Path, port_allocator):
    certs = make_certs(test_output_dir / "certs", "wire") if tls else None
    sk_ports = [(port_allocator.get(), port_allocator.get()) for _ in range(3)]
    proxies: list[RecordingProxy] = []

    def proxy(name: str, target: int) -> RecordingProxy:
        p = RecordingProxy(name, target)
        proxies.append(p)
        return p

    try:
        sks = []
        for i, (pg_port, http_port) in enumerate(sk_ports):
            # Peer recovery goes straight to the peers: not a route under test.
            peers = [p for j, (p, _) in enumerate(sk_ports) if j != i]
            extra = ["--ssl-cert-file", str(certs.cert), "--ssl-key-file", str(certs.key), "--ssl-ca-file", str(certs.ca)] if certs else []
            sks.append(Safekeeper(daemons, i + 1, test_output_dir / f"safekeeper{i + 1}", pg_port, http_port, peers=peers, extra_args=extra,
                                  tls_ca=certs.ca if certs else None).start())
        wp_proxies = [proxy(f"walproposer->sk{sk.id}", sk.pg_port) for sk in sks]
        ps_sk_proxies = [proxy(f"pageserver->sk{sk.id}", sk.pg_port) for sk in sks]

        ps_conf = f"ssl_cert_file = '{certs.cert}'\nssl_key_file = '{certs.key}'\nssl_ca_file = '{certs.ca}'\n" if certs else ""
        ps = Pageserver(daemons, test_output_dir / "pageserver", port_allocator.get(), port_allocator.get(), [p.addr for p in ps_sk_proxies],
                        extra_conf=ps_conf, tls_ca=certs.ca if certs else None).start()
        page_proxy = proxy("compute->pageserver", ps.pg_port)

        tenant, timeline = uuid.uuid4().hex, uuid.uuid4().hex
        ps.create_tenant(tenant)
        start_lsn = ps.create_timeline(tenant, timeline)["last_record_lsn"]
        for sk in sks:
            sk.create_timeline(tenant, timeline, start_lsn)
        daemons.allow_errors("walproposer", "Postgres ended the replication stream", "disconnected")

        def compute(name: str) -> Compute:
            spec = {
                "tenant_id": tenant,
                "timeline_id": timeline,
                "pageserver": page_proxy.addr,
                "safekeepers": [p.addr for p in wp_proxies],
                "mode": "primary",
                "pg_port": port_allocator.get(),
            }
            return Compute(daemons, name, test_output_dir / name, spec, port_allocator.get(), ssl_ca_file=certs.ca if certs else None).start()

        marker = secrets.token_hex(16)  # 32 characters, new every run
        table = f"wire_{secrets.token_hex(8)}"
        c1 = compute("compute1")
        c1.sql(f"create table {table}(id int, payload text)")
        c1.sql(f"insert into {table} select g, '{marker}' from generate_series(1, {ROWS}) g")
        flush = c1.sql("select pg_current_wal_flush_lsn()::text")[0][0]
        wait_until("the pageserver to ingest the marker rows", lambda: lsn_int(ps.timeline(tenant, timeline)["last_record_lsn"]) >= lsn_int(flush), timeout_s=60)
        c1.stop()

        # A fresh compute reads every page of the table from the pageserver (GetPage@LSN).
        c2 = compute("compute2")
        assert c2.sql(f"select count(*) from {table} where payload = '{marker}'") == [(ROWS,)]
        c2.stop()
        # Let the WAL receiver's polls and the last feedback pass, then stop the pageserver so
        # that its connections end before the proxies close.
        time.sleep(1)
        ps.stop()

        routes = {p.name: p.snapshot() for p in proxies}
    finally:
        for p in proxies:
            p.close()

    summary = {name: (len(conns), total(conns)) for name, conns in routes.items()}
    print(f"\nTLS {'on' if tls else 'off'}: route -> (connections, bytes): {summary}")
    page = routes["compute->pageserver"]
    wal_wp = [c for name, conns in routes.items() if name.startswith("walproposer->") for c in conns]
    wal_ps = [c for name, conns in routes.items() if name.startswith("pageserver->") for c in conns]
    table_bytes = ROWS * len(marker)
    # Enough bytes on every route that the data could not have gone another way unnoticed: the
    # page images of the table (about 20 pages) and the WAL of its rows.
    assert total(page) >= 20 * 8192, f"compute->pageserver carried only {total(page)} bytes"
    for name in (f"walproposer->sk{sk.id}" for sk in sks):
        assert total(routes[name]) >= table_bytes, f"{name} carried only {total(routes[name])} bytes"
    assert total(wal_ps) >= table_bytes, f"the pageserver's WAL receiver carried only {total(wal_ps)} bytes"

    secrets_ = {"marker": marker.encode(), "table name": table.encode()}
    if tls:
        for name, conns in routes.items():
            for i, c in enumerate(conns):
                check_tls_conn(c, f"{name} connection {i}")
            for what, needle in secrets_.items():
                assert find(needle, conns) == 0, f"the {what} is in the bytes of {name}"
            # Four bytes can occur by chance in ciphertext (about once in 4 GB): a handful
            # would mean plaintext pages (the control run sees one per page, dozens).
            n = find(HEAP_PAGE_HEADER, conns)
            assert n <= 2, f"the heap page header pattern is {n} times in the bytes of {name}"
    else:
        # Control: the capture sees the plaintext (the pages hold every row; the WAL nearly every
        # row: a record cut by a WAL page header splits its marker).
        assert find(marker.encode(), page) >= ROWS, "control: the marker is not in the GetPage responses"
        assert find(HEAP_PAGE_HEADER, page) >= 20, "control: no heap pages in the GetPage responses"
        assert find(table.encode(), page + wal_wp) > 0, "control: the table name is in neither pages nor WAL"
        for name in (f"walproposer->sk{sk.id}" for sk in sks):
            assert find(marker.encode(), routes[name]) >= ROWS * 9 // 10, f"control: the marker is not in the WAL on {name}"
        assert find(marker.encode(), wal_ps) >= ROWS * 9 // 10, "control: the marker is not in the WAL the pageserver received"
