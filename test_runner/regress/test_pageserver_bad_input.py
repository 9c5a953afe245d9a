"""The pageserver faced with bad input: a damaged layer file, malformed or impossible page service
requests, and bad HTTP requests. Each must get an error that says what is wrong; the pageserver
must stay up and keep serving everything else."""

from __future__ import annotations

import struct
import time
import uuid
from pathlib import Path

import pytest
import requests

from fixtures.daemons import wait_until
from fixtures.pageserver import Pageserver
from fixtures.pagestream import BLCKSZ, Pagestream, PagestreamError, RelTag
from fixtures.pipeline import start_pipeline
from fixtures.pq_raw import RawPq
from fixtures.safekeeper import lsn_int, lsn_str

LAYER_BLOCK = 8192
DEFAULTTABLESPACE_OID = 1663


# --- the layer file format (pageserver/src/layer/*.rs), as much as needed to find a value blob


def layer_index(path: Path) -> list[tuple[tuple[int, int, int, int, int, int], int, int]]:
    """Every index entry of a layer file: (key fields, LSN (0 for images), blob offset)."""
    data = path.read_bytes()
    assert data[:4] == b"NPLF", f"{path} is not a layer file"
    kind = data[6]
    index_start, _root, value_count, _blocks = struct.unpack(">IIQI", data[92:112])
    key_len = 26 if kind == 1 else 18
    entries = []
    blkno = index_start
    while len(entries) < value_count:
        block = data[blkno * LAYER_BLOCK : (blkno + 1) * LAYER_BLOCK]
        level, klen, count = block[4], block[5], struct.unpack(">H", block[6:8])[0]
        assert level == 0 and klen == key_len, "leaves come first and are contiguous"
        for i in range(count):
            at = 8 + i * (key_len + 8)
            key = struct.unpack(">BIIIBI", block[at : at + 18])
            lsn = struct.unpack(">Q", block[at + 18 : at + 26])[0] if kind == 1 else 0
            (value,) = struct.unpack(">Q", block[at + key_len : at + key_len + 8])
            entries.append((key, lsn, value & ~(1 << 63)))
        blkno += 1
    return entries


def flip_byte_in_blob(path: Path, offset: int) -> int:
    """Flips one byte in the middle of the payload of the blob at `offset`; returns its position."""
    with open(path, "r+b") as f:
        f.seek(offset)
        (len_flags,) = struct.unpack(">I", f.read(4))
        length = len_flags & 0x7FFFFFFF
        assert length > 0, "an empty blob has no payload byte to damage"
        pos = offset + 8 + length // 2
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x5A]))
    return pos


def test_corrupt_layer_file_is_detected_and_named(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    p = start_pipeline(daemons, safekeeper_cluster, test_output_dir, port_allocator)
    ps, tenant_id, timeline_id = p.ps, p.tenant_id, p.timeline_id
    p.pg.safe_psql("create table t(id int primary key, v text)")
    p.pg.safe_psql("insert into t select g, md5(g::text) || repeat('y', 200) from generate_series(1, 3000) g")
    p.pg.safe_psql("update t set v = 'changed' where id % 5 = 0")
    relnode, dbnode = p.pg.safe_psql("select pg_relation_filenode('t'), (select oid from pg_database where datname = current_database())")[0]
    nblocks = p.pg.safe_psql("select pg_relation_size('t') / 8192")[0][0]
    assert nblocks > 10
    p.wait_ingested()
    p.stop_compute()
    r = requests.put(f"{ps.http}/v1/tenant/{tenant_id}/timeline/{timeline_id}/checkpoint", timeout=60)
    assert r.status_code == 200, r.text
    ps.stop()

    # The newest version of block 3 of t, in whichever layer holds it: damage its value blob.
    tl_dir = ps.workdir / "tenants" / tenant_id / "timelines" / timeline_id
    target_blk = 3
    newest = None  # (lsn, layer path, blob offset)
    layers = [f for f in tl_dir.iterdir() if "__" in f.name]
    assert layers, f"no layer files in {tl_dir}"
    for layer in layers:
        for key, lsn, offset in layer_index(layer):
            if key == (0, DEFAULTTABLESPACE_OID, dbnode, relnode, 0, target_blk) and (newest is None or lsn > newest[0]):
                newest = (lsn, layer, offset)
    assert newest is not None, "block 3 of t must be in a layer file after the checkpoint"
    damaged_lsn, damaged_layer, offset = newest
    flip_byte_in_blob(damaged_layer, offset)

    # Restart, so no cache holds the good bytes.
    ps.start()
    last = ps.timeline(tenant_id, timeline_id)["last_record_lsn"]
    rel = RelTag(DEFAULTTABLESPACE_OID, dbnode, relnode, 0)
    daemons.allow_errors(r"checksum \(crc32c\) mismatch")
    with Pagestream(ps.pg_port, tenant_id, timeline_id) as stream:
        with pytest.raises(PagestreamError) as e:
            stream.get_page(rel, target_blk, last)
        msg = str(e.value)
        assert damaged_layer.name in msg and "checksum" in msg, msg
        # Every other block reads fine, on the same stream.
        pages = list(stream.get_pages(rel, [b for b in range(nblocks) if b != target_blk], last))
        errors = [x for x in pages if isinstance(x, PagestreamError)]
        assert not errors, errors[:3]
        assert all(len(x) == BLCKSZ for x in pages)
        # Below the damaged version, the block is readable too.
        assert len(stream.get_page(rel, target_blk, lsn_str(damaged_lsn - 8))) == BLCKSZ
        # And the damaged read fails the same way again: detected every time, never served.
        with pytest.raises(PagestreamError, match="checksum"):
            stream.get_page(rel, target_blk, last)

    # A full backup reads every block: it fails, naming the file; a compute backup needs no
    # relation data and works.
    with pytest.raises(RuntimeError) as e:
        ps.backup_tar(tenant_id, timeline_id, full=True)
    assert damaged_layer.name in str(e.value) and "checksum" in str(e.value), e.value
    assert len(ps.backup_tar(tenant_id, timeline_id, full=False)) > 0
    assert requests.get(f"{ps.http}/v1/status", timeout=5).ok
    assert ps.daemon is not None and ps.daemon.is_running()
    log = ps.daemon.log_text()
    assert any("ERROR" in line and damaged_layer.name in line for line in log.splitlines()), "the corruption must be logged as an error"


# --- malformed and impossible page service requests


def standalone_pageserver(daemons, test_output_dir, port_allocator) -> tuple[Pageserver, str, str]:
    """A pageserver without safekeepers (no WAL arrives) and a freshly bootstrapped timeline."""
    ps = Pageserver(daemons, test_output_dir / "pageserver", port_allocator.get(), port_allocator.get(), [], extra_conf="wait_lsn_timeout = '1s'").start()
    tenant_id, timeline_id = uuid.uuid4().hex, uuid.uuid4().hex
    ps.create_tenant(tenant_id)
    ps.create_timeline(tenant_id, timeline_id)
    return ps, tenant_id, timeline_id


def expect_error(conn: RawPq, *needles: str) -> str:
    """Reads to the ErrorResponse and the ReadyForQuery after it; returns the error text."""
    tag, payload = conn.read_until_error_or({b"Z"})
    assert tag == b"E", f"expected an error, got {tag!r} {payload!r}"
    text = payload.decode(errors="replace")
    for n in needles:
        assert n in text, f"{n!r} not in {text!r}"
    tag, _ = conn.read_until_error_or({b"Z"})
    assert tag == b"Z", "the session goes on after the error"
    return text


def test_malformed_page_service_requests(daemons, test_output_dir, port_allocator):
    ps, tenant_id, timeline_id = standalone_pageserver(daemons, test_output_dir, port_allocator)
    last = ps.timeline(tenant_id, timeline_id)["last_record_lsn"]

    conn = RawPq(ps.pg_port, {"user": "test"})
    # Unknown commands and bad arguments.
    conn.query("hello world")
    expect_error(conn, "does not understand")
    conn.query(f"pagestream {tenant_id}")
    expect_error(conn, "does not understand")
    conn.query(f"pagestream not-a-tenant {timeline_id}")
    expect_error(conn, "not-a-tenant")
    missing_tenant = uuid.uuid4().hex
    conn.query(f"pagestream {missing_tenant} {timeline_id}")
    expect_error(conn, missing_tenant, "not found")
    missing_tl = uuid.uuid4().hex
    conn.query(f"basebackup {tenant_id} {missing_tl}")
    expect_error(conn, missing_tl, "not found")
    conn.query(f"fullbackup {tenant_id} {timeline_id} not-an-lsn")
    expect_error(conn)
    far = lsn_str(lsn_int(last) + (1 << 30))
    conn.query(f"basebackup {tenant_id} {timeline_id} {far}")
    expect_error(conn, far)

    # Garbage CopyData ends the stream with an error; the session stays usable.
    for garbage in [b"\xff\x00\x01garbage", b"", b"\x02\x00\x00", b"\x02" + bytes(40)]:
        conn.query(f"pagestream {tenant_id} {timeline_id}")
        tag, _ = conn.read_until_error_or({b"W"})
        assert tag == b"W"
        conn.copy_data(garbage)
        expect_error(conn, "bad pagestream request")
    conn.query(f"pagestream {tenant_id} {timeline_id}")
    assert conn.read_until_error_or({b"W"})[0] == b"W"
    conn.send(b"c", b"")  # CopyDone: a clean end
    tag, _ = conn.read_until_error_or({b"Z"})
    assert tag == b"Z"
    conn.close()

    with Pagestream(ps.pg_port, tenant_id, timeline_id) as stream:
        # A relation that does not exist: the error names it.
        missing = RelTag(DEFAULTTABLESPACE_OID, 5, 999_999, 0)
        with pytest.raises(PagestreamError, match="999999"):
            stream.get_page(missing, 0, last)
        with pytest.raises(PagestreamError, match="999999"):
            stream.nblocks(missing, last)
        assert stream.exists(missing, last) is False
        # Relation 0 names nothing.
        with pytest.raises(PagestreamError, match="relfilenode 0"):
            stream.get_page(RelTag(DEFAULTTABLESPACE_OID, 5, 0, 0), 0, last)
        # An LSN far in the future: an error after wait_lsn_timeout (1s here), naming the LSN.
        started = time.monotonic()
        with pytest.raises(PagestreamError) as e:
            stream.get_page(RelTag(DEFAULTTABLESPACE_OID, 5, 1259, 0), 0, far)
        assert "timed out" in str(e.value) and far in str(e.value), e.value
        assert time.monotonic() - started < 30
        # The stream still answers.
        assert stream.nblocks(RelTag(DEFAULTTABLESPACE_OID, 5, 1259, 0), last) > 0
    assert requests.get(f"{ps.http}/v1/status", timeout=5).ok


# --- bad HTTP requests


def test_bad_http_requests(daemons, test_output_dir, port_allocator):
    ps, tenant_id, timeline_id = standalone_pageserver(daemons, test_output_dir, port_allocator)
    info = ps.timeline(tenant_id, timeline_id)
    base = ps.http

    def check(r: requests.Response, status: int, *needles: str) -> None:
        assert r.status_code == status, (r.request.method, r.request.url, r.status_code, r.text)
        msg = r.json()["msg"]
        for n in needles:
            assert n.lower() in msg.lower(), f"{n!r} not in {msg!r}"

    # Bodies that are not what the endpoint takes.
    check(requests.post(f"{base}/v1/tenant", data="{not json", headers={"Content-Type": "application/json"}, timeout=10), 400, "tenant create request")
    check(requests.post(f"{base}/v1/tenant", data="[1, 2]", headers={"Content-Type": "application/json"}, timeout=10), 400, "tenant create request")
    check(requests.post(f"{base}/v1/tenant", json={"tenant_id": uuid.uuid4().hex, "bogus": 1}, timeout=10), 400, "bogus")
    check(requests.post(f"{base}/v1/tenant", json={"tenant_id": "xyz"}, timeout=10), 400, "tenant_id")
    check(requests.post(f"{base}/v1/tenant", data="{}", timeout=10), 400, "content-type")
    check(requests.post(f"{base}/v1/tenant/{tenant_id}/timeline", json={}, timeout=10), 400, "new_timeline_id")
    check(requests.post(f"{base}/v1/tenant/{tenant_id}/timeline", json={"new_timeline_id": uuid.uuid4().hex, "pg_version": 14}, timeout=10), 400, "version")
    check(requests.post(f"{base}/v1/tenant/{tenant_id}/timeline", json={"new_timeline_id": uuid.uuid4().hex, "ancestor_start_lsn": "0/1"}, timeout=10), 400, "ancestor_timeline_id")
    check(requests.post(f"{base}/v1/tenant/{tenant_id}/timeline", json={"new_timeline_id": uuid.uuid4().hex, "ancestor_timeline_id": timeline_id, "ancestor_start_lsn": "zz"}, timeout=10), 400)
    check(requests.post(f"{base}/v1/tenant", json={"config": {"checkpoint_distanse": "1"}}, timeout=10), 400, "unknown tenant setting")
    check(requests.post(f"{base}/v1/tenant", json={"config": {"checkpoint_distance": "0"}}, timeout=10), 400, "checkpoint_distance")

    # Bad and unknown ids.
    check(requests.get(f"{base}/v1/tenant/not-hex", timeout=10), 400)
    check(requests.get(f"{base}/v1/tenant/{tenant_id}/timeline/123", timeout=10), 400)
    missing = uuid.uuid4().hex
    check(requests.get(f"{base}/v1/tenant/{missing}", timeout=10), 404, missing, "not found")
    check(requests.get(f"{base}/v1/tenant/{missing}/timeline", timeout=10), 404, missing)
    check(requests.get(f"{base}/v1/tenant/{tenant_id}/timeline/{missing}", timeout=10), 404, missing, "not found")
    check(requests.put(f"{base}/v1/tenant/{tenant_id}/timeline/{missing}/checkpoint", timeout=10), 404, missing)
    check(requests.post(f"{base}/v1/tenant/{missing}/timeline", json={"new_timeline_id": uuid.uuid4().hex}, timeout=10), 404, missing)
    check(requests.post(f"{base}/v1/tenant/{tenant_id}/timeline", json={"new_timeline_id": uuid.uuid4().hex, "ancestor_timeline_id": missing}, timeout=10), 404, missing)
    check(requests.get(f"{base}/v1/no/such/route", timeout=10), 404, "no such route")

    # Creating what exists.
    check(requests.post(f"{base}/v1/tenant", json={"tenant_id": tenant_id}, timeout=10), 409, tenant_id, "already exists")
    check(requests.post(f"{base}/v1/tenant/{tenant_id}/timeline", json={"new_timeline_id": timeline_id}, timeout=10), 409, timeline_id, "already exists")

    # Branch points outside the timeline's history.
    below = lsn_str(lsn_int(info["initdb_lsn"]) - 8)
    check(
        requests.post(f"{base}/v1/tenant/{tenant_id}/timeline", json={"new_timeline_id": uuid.uuid4().hex, "ancestor_timeline_id": timeline_id, "ancestor_start_lsn": below}, timeout=10),
        400, "below the initdb LSN", info["initdb_lsn"],
    )
    above = lsn_str(lsn_int(info["last_record_lsn"]) + 4096)
    check(
        requests.post(f"{base}/v1/tenant/{tenant_id}/timeline", json={"new_timeline_id": uuid.uuid4().hex, "ancestor_timeline_id": timeline_id, "ancestor_start_lsn": above}, timeout=30),
        400, "above the last ingested record", info["last_record_lsn"],
    )
    # None of this left a timeline behind, and the server still answers.
    r = requests.get(f"{base}/v1/tenant/{tenant_id}/timeline", timeout=10)
    assert [t["timeline_id"] for t in r.json()] == [timeline_id]
    assert requests.get(f"{base}/v1/status", timeout=5).ok
    wait_until("pageserver still running", lambda: ps.daemon is not None and ps.daemon.is_running())
