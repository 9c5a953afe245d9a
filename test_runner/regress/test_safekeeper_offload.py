"""Safekeeper WAL offload (issue 7, item 6) through a whole neon_local stack, on LocalFs and on
moto's S3: with one safekeeper down, whole segments still reach remote storage; once the
pageserver has the WAL durable remotely, every safekeeper removes its old local WAL; a safekeeper
whose disk is then wiped is rebuilt (its old WAL can only come from remote storage, through a
peer reading it back), and its WAL digest over the whole timeline equals the others'."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import requests

from fixtures.neon_local import lsn_int, lsn_str, neon_env, sql  # noqa: F401

SEG = 16 * 1024 * 1024


def _wait(what: str, cond, timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            v = cond()
        except (requests.RequestException, OSError, KeyError):
            v = None
        if v:
            return v
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.5)


class Stack:
    def __init__(self, nl, storage: str, moto=None):
        self.nl = nl
        self.storage = storage
        self.moto = moto
        conf = nl.config()
        self.tenant = conf["default_tenant"]
        self.timeline = conf["branches"][self.tenant]["main"]
        self.sks = {sk["id"]: sk for sk in conf["safekeepers"]}
        self.ps_http = f"http://127.0.0.1:{conf['pageserver']['http_port']}"

    def sk_url(self, id: int, path: str) -> str:
        return f"http://127.0.0.1:{self.sks[id]['http_port']}/v1/tenant/{self.tenant}/timeline{path}"

    def status(self, id: int) -> dict:
        r = requests.get(self.sk_url(id, f"/{self.timeline}"), timeout=10)
        r.raise_for_status()
        return r.json()

    def digest(self, id: int, from_lsn: int, until_lsn: int) -> str:
        r = requests.get(
            self.sk_url(id, f"/{self.timeline}/digest"),
            params={"from_lsn": lsn_str(from_lsn), "until_lsn": lsn_str(until_lsn)},
            timeout=120,
        )
        assert r.ok, f"digest on safekeeper {id}: {r.text}"
        return r.json()["sha256"]

    def remote_segments(self) -> dict[str, int]:
        """Offloaded segment name -> object size."""
        rel = f"wal/{self.tenant}/{self.timeline}/"
        if self.storage == "local":
            d = self.nl.repo_dir / "remote_storage" / rel
            return {p.name: p.stat().st_size for p in d.iterdir() if p.is_file()} if d.exists() else {}
        out = {}
        for page in self.moto.client().get_paginator("list_objects_v2").paginate(
            Bucket=self.moto.bucket, Prefix="neon_local/" + rel
        ):
            for o in page.get("Contents", []):
                out[o["Key"].rsplit("/", 1)[1]] = o["Size"]
        return out

    def sk_log(self, id: int) -> str:
        return (self.nl.repo_dir / "safekeepers" / f"sk{id}" / "log").read_text(errors="replace")


def _segment_name(segno: int) -> str:
    return f"00000001{segno // 0x100:08X}{segno % 0x100:08X}"


def _write_segments(connstr: str, n: int, first_id: int) -> None:
    """About `n` segments of WAL: real rows, then a switch to the next segment, each time."""
    for i in range(n):
        lo = first_id + i * 2000
        sql(connstr, f"insert into t select g, repeat('x', 400) from generate_series({lo}, {lo + 1999}) g")
        sql(connstr, "select pg_switch_wal()")


def _current_lsn(connstr: str) -> int:
    return lsn_int(sql(connstr, "select pg_current_wal_flush_lsn()::text")[0][0])


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_safekeeper_offload(neon_env, storage, request):
    nl = neon_env
    moto = None
    if storage == "s3":
        moto = request.getfixturevalue("moto_s3")
        nl.env.update(moto.env())
        nl.run(
            "init", "--remote-storage", "s3", "--s3-endpoint", moto.endpoint, "--s3-bucket", moto.bucket,
            "--s3-region", moto.region, "--s3-prefix", "neon_local",
        )
    else:
        nl.run("init", "--remote-storage", "local")
    nl.run("start")
    nl.run("tenant", "create", "--set-default")
    st = Stack(nl, storage, moto)
    main = nl.endpoint("main")
    sql(main, "create table t(a int, pad text)")
    start = lsn_int(st.status(1)["timeline_start_lsn"])

    # Safekeeper 1 (the lowest id, the uploader while it is alive) is down: 2 takes over.
    nl.run("safekeeper", "stop", "1")
    _write_segments(main, 4, 0)
    lsn = _current_lsn(main)
    due = range(start // SEG, lsn // SEG)
    assert len(due) >= 4, f"only {len(due)} whole segments between {lsn_str(start)} and {lsn_str(lsn)}"
    t0 = time.monotonic()
    _wait(
        "every whole committed segment in remote storage",
        lambda: all(_segment_name(s) in st.remote_segments() for s in due),
    )
    upload_wait_s = time.monotonic() - t0
    objects = st.remote_segments()
    assert all(objects[_segment_name(s)] == SEG for s in due), objects
    assert "offloaded WAL segment" in st.sk_log(2), "safekeeper 2 should have uploaded while 1 was down"
    assert "offloaded WAL segment" not in st.sk_log(3), "only one safekeeper uploads"
    for id in (2, 3):
        _wait(f"safekeeper {id}'s backup LSN", lambda id=id: lsn_int(st.status(id)["backup_lsn"]) >= (lsn // SEG) * SEG)
        assert st.status(id)["last_backup_error"] is None
    print(f"{storage}: {len(due)} segments offloaded {upload_wait_s:.1f} s after the last was written")

    # Safekeeper 1 comes back; the pageserver makes everything durable remotely; then every
    # safekeeper removes its WAL below min(commit, backup, remote-consistent).
    nl.run("safekeeper", "start", "1")
    _write_segments(main, 1, 100_000)
    r = requests.put(
        f"{st.ps_http}/v1/tenant/{st.tenant}/timeline/{st.timeline}/checkpoint",
        params={"wait_until_uploaded": "true"},
        timeout=300,
    )
    assert r.ok, r.text
    sql(main, "insert into t values (-1, 'after the checkpoint')")
    for id in (1, 2, 3):
        _wait(
            f"safekeeper {id} to remove its offloaded WAL",
            lambda id=id: lsn_int(st.status(id)["wal_start_lsn"]) >= (lsn // SEG) * SEG,
            timeout_s=180,
        )
        s = st.status(id)
        assert lsn_int(s["wal_start_lsn"]) <= min(lsn_int(s["backup_lsn"]), lsn_int(s["remote_consistent_lsn"])), s
    local_files = sorted(p.name for p in (nl.repo_dir / "safekeepers" / "sk2" / "data" / st.tenant / st.timeline).iterdir())
    assert _segment_name(start // SEG) not in local_files, local_files

    # Safekeeper 3 loses its disk. Nobody holds the timeline's first segments locally any more:
    # the rebuild must read them from remote storage (a peer serves them to the walproposer).
    nl.run("safekeeper", "stop", "3", "--mode", "immediate")
    shutil.rmtree(nl.repo_dir / "safekeepers" / "sk3" / "data")
    nl.run("safekeeper", "start", "3")
    s1 = st.status(1)
    r = requests.post(
        st.sk_url(3, ""),
        json={"timeline_id": st.timeline, "start_lsn": s1["timeline_start_lsn"], "pg_version": s1["pg_version"],
              "system_id": s1["system_id"]},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    sql(main, "insert into t values (-2, 'after the rebuild')")
    end = _current_lsn(main)
    for id in (1, 2, 3):
        _wait(f"safekeeper {id} to commit {lsn_str(end)}", lambda id=id: lsn_int(st.status(id)["commit_lsn"]) >= end,
              timeout_s=180)
    digests = {id: st.digest(id, start, end) for id in (1, 2, 3)}
    assert len(set(digests.values())) == 1, f"WAL digests over {lsn_str(start)}..{lsn_str(end)} differ: {digests}"
    assert sql(main, "select count(*) from t")[0][0] == 4 * 2000 + 2000 + 2


def test_backup_error_is_shown_then_cleared(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    """Safekeepers alone (a Postgres primary and the walproposer, no pageserver): an upload that
    fails shows in the timeline status naming the object, and offload resumes once the storage
    is fixed. Nothing is removed locally: no pageserver reported a remote-consistent LSN."""
    import json
    import uuid

    from fixtures.safekeeper import WALPROPOSER_PG_CONF, Walproposer, start_timeline_on, wait_for_commit_lsn
    from fixtures.vanilla_pg import VanillaPostgres

    remote = test_output_dir / "remote"
    remote.mkdir()
    (remote / "wal").write_text("a file where the wal/ folder belongs")
    for i, sk in enumerate(safekeeper_cluster):
        sk.stop()
        # Both spellings --remote-storage accepts: a TOML inline table and JSON.
        sk.remote_storage = f"{{local_path = '{remote}'}}" if i == 0 else json.dumps({"local_path": str(remote)})
        sk.start()
    pg = VanillaPostgres(daemons, test_output_dir / "primary" / "pgdata", port_allocator.get())
    daemons.watch_log(pg.log_path)
    pg.initdb(WALPROPOSER_PG_CONF).start()
    tenant_id, timeline_id = uuid.uuid4().hex, uuid.uuid4().hex
    start = start_timeline_on(pg, safekeeper_cluster, tenant_id, timeline_id)
    Walproposer(daemons, pg, safekeeper_cluster, tenant_id, timeline_id).start()
    with pg.connect() as conn:
        conn.execute("create table t(a int, pad text)")
        for i in range(2):
            conn.execute("insert into t select g, repeat('y', 300) from generate_series(1, 3000) g")
            conn.execute("select pg_switch_wal()")
        lsn = conn.execute("select pg_current_wal_flush_lsn()::text").fetchone()[0]
    wait_for_commit_lsn(safekeeper_cluster, tenant_id, timeline_id, lsn, quorum=3)

    def errors():
        return [e for sk in safekeeper_cluster if (e := sk.timeline_status(tenant_id, timeline_id)["last_backup_error"])]

    err = _wait("an offload error in the timeline status", lambda: errors())[0]
    assert f"wal/{tenant_id}/{timeline_id}" in err and "check" in err, err
    assert lsn_int(safekeeper_cluster[0].timeline_status(tenant_id, timeline_id)["backup_lsn"]) <= lsn_int(start) + SEG

    (remote / "wal").unlink()
    due = range(lsn_int(start) // SEG, lsn_int(lsn) // SEG)
    assert len(due) >= 2
    for sk in safekeeper_cluster:
        _wait(
            f"safekeeper {sk.id} to offload everything",
            lambda sk=sk: lsn_int(sk.timeline_status(tenant_id, timeline_id)["backup_lsn"]) >= (lsn_int(lsn) // SEG) * SEG,
            timeout_s=90,
        )
    assert not errors()
    folder = remote / "wal" / tenant_id / timeline_id
    assert sorted(p.name for p in folder.iterdir()) == [_segment_name(s) for s in due]
    assert all(p.stat().st_size == SEG for p in folder.iterdir())
    for sk in safekeeper_cluster:
        st = sk.timeline_status(tenant_id, timeline_id)
        assert st["wal_start_lsn"] == st["timeline_start_lsn"], "removed WAL no pageserver has durable"
    ds = {sk.id: sk.digest(tenant_id, timeline_id, start, lsn) for sk in safekeeper_cluster}
    assert len(set(ds.values())) == 1, ds
