"""Encryption at rest of remote storage (issue 8, item 3; DESIGN D9).

With `[remote_storage.encryption]` in pageserver.toml, no object the pageserver uploads (layers,
index_part.json, the wrapped data keys) holds a marker string written into the database, while
the same run without encryption does find it (so the scan can fail); a pageserver that lost its
disk restores from the encrypted objects and serves the same data; one flipped byte in a remote
layer object makes the read that downloads it fail with an authentication error; and a
pageserver configured with a different key cannot read the objects at all."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

import pytest
import requests

from fixtures.daemons import wait_until
from fixtures.neon_local import neon_env, one, sql  # noqa: F401
from fixtures.safekeeper import lsn_int
from fixtures.remote import LocalRemote, RemoteStorageStack, checkpoint_and_upload, remote  # noqa: F401

log = logging.getLogger(__name__)

MARKER = b"ENC-AT-REST-MARKER-7c1e"
S3_PREFIX = "pageserver"
ROWS = 60_000
AUTH_ERROR = "failed authentication"


def write_kek(path: Path) -> Path:
    path.write_text(secrets.token_hex(32) + "\n")
    os.chmod(path, 0o600)
    return path


def encryption_section(kek_file: Path, kek_id: str = "k1") -> str:
    return f"[remote_storage.encryption]\nkek_id = '{kek_id}'\nkek_file = '{kek_file}'\n"


SUMS = "select count(*), sum(id), sum(length(v)), count(*) filter (where v like 'ENC-AT-REST-MARKER-7c1e-%') from marked"


def write_marked_rows(stack: RemoteStorageStack) -> list:
    c = stack.compute("compute1")
    c.sql("create table marked(id int primary key, v text)")
    c.sql(f"insert into marked select g, '{MARKER.decode()}-' || g from generate_series(1, {ROWS}) g")
    expected = c.sql(SUMS)
    assert expected[0][0] == ROWS and expected[0][3] == ROWS, expected
    c.stop()
    return expected


def holding_marker(objects: dict[str, bytes]) -> list[str]:
    return sorted(key for key, body in objects.items() if MARKER in body)


def layer_keys(objects: dict[str, bytes], stack: RemoteStorageStack) -> list[str]:
    prefix = f"tenants/{stack.tenant_id}/timelines/{stack.timeline_id}/"
    return sorted(k for k in objects if k.startswith(prefix) and not k.endswith("index_part.json"))


def test_unencrypted_upload_holds_the_marker(remote, daemons, safekeeper_cluster, test_output_dir, port_allocator):
    """The control: without encryption the scan below finds the marker in the uploaded layers,
    so its absence with encryption means something."""
    stack = RemoteStorageStack(daemons, safekeeper_cluster, test_output_dir, port_allocator, remote.conf())
    write_marked_rows(stack)
    checkpoint_and_upload(stack.ps, stack.tenant_id, stack.timeline_id, stack.safekeepers)
    objects = remote.objects()
    found = holding_marker(objects)
    assert found, f"no plaintext marker in {len(objects)} unencrypted objects: the scan cannot tell"
    assert all(k in layer_keys(objects, stack) for k in found), found


def test_encrypted_upload_restore_and_tampering(remote, daemons, safekeeper_cluster, test_output_dir, port_allocator):
    kek = write_kek(test_output_dir / "k1.key")
    conf = remote.conf() + encryption_section(kek)
    stack = RemoteStorageStack(daemons, safekeeper_cluster, test_output_dir, port_allocator, conf)
    ps, tenant, timeline = stack.ps, stack.tenant_id, stack.timeline_id
    expected = write_marked_rows(stack)
    info = checkpoint_and_upload(stack.ps, stack.tenant_id, stack.timeline_id, stack.safekeepers)

    # No uploaded object holds the marker; every data object is in the encrypted format, and
    # the tenant's wrapped data key sits under _encryption_keys/.
    objects = remote.objects()
    layers = layer_keys(objects, stack)
    index_key = f"tenants/{tenant}/timelines/{timeline}/index_part.json"
    assert len(layers) >= 2 and index_key in objects, sorted(objects)
    assert holding_marker(objects) == [], "plaintext marker found at rest"
    key_objects = [k for k in objects if k.startswith("_encryption_keys/")]
    assert key_objects and all(k.startswith(f"_encryption_keys/tenant-{tenant}/k1/") for k in key_objects), key_objects
    for key, body in objects.items():
        if key not in key_objects:
            assert body[:4] == b"NEOE", f"{key} is not in the encrypted format"
    local_dir = ps.workdir / "tenants" / tenant / "timelines" / timeline
    local_bytes = sum(p.stat().st_size for p in local_dir.iterdir() if p.name != "metadata")
    remote_bytes = sum(len(objects[k]) for k in layers)
    log.info("%d layers: %d bytes local, %d bytes encrypted (+%.3f%%)", len(layers), local_bytes, remote_bytes, 100 * (remote_bytes - local_bytes) / local_bytes)

    # Wipe the pageserver's disk: it restores from the encrypted index and layers (the layer
    # checksums in the index are of the plaintext, and downloads are checked against them).
    stack.wipe_and_restart()
    assert ps.timeline(tenant, timeline)["disk_consistent_lsn"] == info["disk_consistent_lsn"]
    c2 = stack.compute("compute2")
    assert c2.sql(SUMS) == expected
    assert c2.sql("select v from marked where id = 4242") == [(f"{MARKER.decode()}-4242",)]
    c2.stop()

    # A pageserver holding another key under the same id cannot read the index: the tenant is
    # not restored, and the log says why.
    daemons.allow_errors(AUTH_ERROR)
    mark = len(ps.daemon.log_text())
    stack.wipe_and_restart(remote.conf() + encryption_section(write_kek(test_output_dir / "other.key")))
    wait_until("the pageserver to log the authentication failure", lambda: AUTH_ERROR in ps.daemon.log_text()[mark:], timeout_s=30)
    assert requests.get(f"{ps.http}/v1/tenant/{tenant}/timeline/{timeline}", timeout=10).status_code == 404
    log_text = ps.daemon.log_text()[mark:]
    log.info("with another KEK: %s", next(line for line in log_text.splitlines() if AUTH_ERROR in line))
    assert "could not be unwrapped with key-encryption key" in log_text and "encryption.kek_file" in log_text

    # Back to the right key, with one byte of the largest layer flipped in remote storage: the
    # read that downloads that layer fails with an authentication error, and nothing is served.
    victim = max(layers, key=lambda k: len(objects[k]))
    body = bytearray(objects[victim])
    body[len(body) // 2] ^= 0x01
    remote.put(victim, bytes(body))
    mark = len(ps.daemon.log_text())
    stack.wipe_and_restart(conf)
    # (compute2 wrote a little WAL, which may have been uploaded since.)
    assert lsn_int(ps.timeline(tenant, timeline)["disk_consistent_lsn"]) >= lsn_int(info["disk_consistent_lsn"])
    with pytest.raises(RuntimeError, match=AUTH_ERROR) as failed:
        ps.backup_tar(tenant, timeline)
    log.info("fullbackup over the tampered layer: %s", failed.value)
    assert victim.rsplit("/", 1)[1] in str(failed.value)
    wait_until("the pageserver to log it", lambda: AUTH_ERROR in ps.daemon.log_text()[mark:], timeout_s=30)

    # Restoring the original bytes makes the same read work again.
    remote.put(victim, objects[victim])
    ps.backup_tar(tenant, timeline)


def test_neon_local_init_with_encryption(neon_env, test_output_dir):
    """`neon_local init --remote-storage local --encryption-kek-file F`: the pageserver's layers and
    the safekeepers' offloaded WAL segments both reach `.neon/remote_storage` encrypted (no
    marker in any object), and the stack restarts and serves the rows."""
    nl = neon_env
    kek = write_kek(test_output_dir / "neon_local.key")
    bad_key = test_output_dir / "short.key"
    bad_key.write_text("abcd\n")
    for args, expect in [
        (("--encryption-kek-file", str(kek)), "needs --remote-storage"),
        (("--remote-storage", "local", "--encryption-kek-file", str(bad_key)), "must hold a 256-bit key"),
        (("--remote-storage", "local", "--encryption-kek-file", str(kek), "--encryption-kek-id", "a/b"), "must be 1 to 64"),
    ]:
        nl.fails("init", *args, expect=expect)
        assert not nl.repo_dir.exists(), f"init {args} left {nl.repo_dir} behind"

    out = nl.run("init", "--remote-storage", "local", "--encryption-kek-file", str(kek)).stdout
    assert "encrypted under key-encryption key 'kek1'" in out, out
    assert "[remote_storage.encryption]" in (nl.repo_dir / "pageserver" / "pageserver.toml").read_text()
    nl.run("start")
    nl.run("tenant", "create", "--set-default")
    main = nl.endpoint("main")
    # ~25 MB of WAL: at least one whole segment for the safekeepers to offload.
    sql(main, f"create table marked(id int, v text); insert into marked select g, '{MARKER.decode()}-' || g from generate_series(1, 250000) g")
    remote = LocalRemote(nl.repo_dir / "remote_storage")
    wait_until("a WAL segment offloaded by the safekeepers", lambda: any(k.startswith("wal/") for k in remote.objects()), timeout_s=120, interval_s=1)
    nl.run("stop")  # a fast stop flushes the pageserver's open layer, which is then uploaded
    objects = remote.objects()
    assert any(k.startswith("tenants/") and not k.endswith("index_part.json") for k in objects), sorted(objects)
    assert holding_marker(objects) == [], "plaintext marker found at rest"
    for key, body in objects.items():
        if not key.startswith("_encryption_keys/"):
            assert body[:4] == b"NEOE", f"{key} is not in the encrypted format"
    nl.run("start")
    assert one(nl.start_endpoint("main"), "select count(*) from marked where v like 'ENC-AT-REST-MARKER-7c1e-%'") == 250000
