"""`GET .../get_lsn_by_timestamp`: commits made at known wall-clock times are found again, and a
branch at the LSN returned for a time holds exactly the rows committed by then."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta, timezone

import requests

from fixtures.pipeline import postgres_from_backup, start_pipeline
from fixtures.safekeeper import lsn_int


def lsn_by_timestamp(ps, tenant_id: str, timeline_id: str, when: datetime) -> dict:
    r = requests.get(
        f"{ps.http}/v1/tenant/{tenant_id}/timeline/{timeline_id}/get_lsn_by_timestamp",
        params={"timestamp": when.isoformat()},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_lsn_by_timestamp(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    p = start_pipeline(daemons, safekeeper_cluster, test_output_dir, port_allocator)
    ps, tenant_id, timeline_id = p.ps, p.tenant_id, p.timeline_id
    info = ps.timeline(tenant_id, timeline_id)
    # Nothing committed yet (initdb's transactions are in the imported data, not in WAL).
    nodata = lsn_by_timestamp(ps, tenant_id, timeline_id, datetime.now(timezone.utc))
    assert nodata["kind"] == "nodata" and lsn_int(nodata["lsn"]) >= lsn_int(info["last_record_lsn"]), nodata

    p.pg.safe_psql("create table t(i int)")
    # Commit rows 1..4, each at its own time; `between[k]` lies after row k's commit and before
    # row k+1's.
    between: dict[int, datetime] = {}
    for k in range(1, 5):
        p.pg.safe_psql(f"insert into t values ({k})")
        if k < 4:
            time.sleep(0.3)
            between[k] = datetime.now(timezone.utc)
            time.sleep(0.3)
    p.wait_ingested()

    last = ps.timeline(tenant_id, timeline_id)["last_record_lsn"]
    past = lsn_by_timestamp(ps, tenant_id, timeline_id, datetime(2000, 1, 1, tzinfo=timezone.utc))
    assert past == {"lsn": info["initdb_lsn"], "kind": "past"}
    future = lsn_by_timestamp(ps, tenant_id, timeline_id, datetime.now(timezone.utc) + timedelta(hours=1))
    assert future == {"lsn": last, "kind": "future"}
    # Offsets other than UTC name the same instant.
    local = between[2].astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert lsn_by_timestamp(ps, tenant_id, timeline_id, local) == lsn_by_timestamp(ps, tenant_id, timeline_id, between[2])

    found = {k: lsn_by_timestamp(ps, tenant_id, timeline_id, t) for k, t in between.items()}
    assert all(f["kind"] == "present" for f in found.values()), found
    lsns = [lsn_int(found[k]["lsn"]) for k in sorted(found)]
    assert lsns == sorted(set(lsns)), f"one LSN per commit, growing: {found}"
    assert lsns[-1] < lsn_int(last)
    found[4] = future

    # A branch at each LSN, read by stock Postgres from its full backup, has exactly the rows
    # committed by then. The branch knows the start of the commit record it begins after, which
    # its backup needs.
    for k in (1, 3, 4):
        branch_id = uuid.uuid4().hex
        branch = ps.create_timeline(tenant_id, branch_id, ancestor=timeline_id, ancestor_lsn=found[k]["lsn"])
        assert branch["last_record_lsn"] == found[k]["lsn"]
        copy = postgres_from_backup(daemons, ps, ps.backup_tar(tenant_id, branch_id, full=True), test_output_dir / f"at_{k}", port_allocator.get())
        copy.start()
        assert copy.safe_psql("select count(*), coalesce(max(i), 0) from t")[0] == (k, k)
        copy.stop()

    # A static backup of the timeline itself at such an LSN works too (no branch needed).
    copy = postgres_from_backup(daemons, ps, ps.backup_tar(tenant_id, timeline_id, lsn=found[2]["lsn"], full=True), test_output_dir / "static_2", port_allocator.get())
    copy.start()
    assert copy.safe_psql("select count(*), max(i) from t")[0] == (2, 2)
    copy.stop()

    # Bad requests say what is wrong.
    url = f"{ps.http}/v1/tenant/{tenant_id}/timeline/{timeline_id}/get_lsn_by_timestamp"
    for params in [{}, {"timestamp": "yesterday"}, {"timestamp": "2024-02-30T00:00:00Z"}, {"timestamp": "2024-01-01T00:00:00"}]:
        r = requests.get(url, params=params, timeout=10)
        assert r.status_code == 400 and "timestamp" in r.json()["msg"], (params, r.status_code, r.text)
    r = requests.get(f"{ps.http}/v1/tenant/{tenant_id}/timeline/{uuid.uuid4().hex}/get_lsn_by_timestamp", params={"timestamp": "2024-01-01T00:00:00Z"}, timeout=10)
    assert r.status_code == 404, r.text
    p.stop_compute()
