"""Limits of the pageserver's HTTP API (issue 8 item 7): request bodies over the limit get 413
and change nothing; one tenant's requests in flight are bounded (429 beyond
`http_tenant_concurrency_limit`) without holding up other tenants."""

from __future__ import annotations

import threading
import time
import uuid

import requests

from fixtures.remote import RemoteStorageStack


def test_body_and_tenant_concurrency_limits(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    stack = RemoteStorageStack(daemons, safekeeper_cluster, test_output_dir, port_allocator, "http_tenant_concurrency_limit = 1\nwait_lsn_timeout = '4s'\n")
    ps, tenant, timeline = stack.ps, stack.tenant_id, stack.timeline_id
    tenants_before = requests.get(f"{ps.http}/v1/tenant", timeout=10).json()

    # A body over the limit: 413, nothing created.
    huge = {"tenant_id": uuid.uuid4().hex, "config": {"pitr_interval": "x" * (300 * 1024)}}
    r = requests.post(f"{ps.http}/v1/tenant", json=huge, timeout=30)
    assert r.status_code == 413 and "limit" in r.json()["msg"], r.text
    assert requests.get(f"{ps.http}/v1/tenant", timeout=10).json() == tenants_before

    # One request of the tenant in flight (a branch waiting for WAL that does not come)...
    other = uuid.uuid4().hex
    ps.create_tenant(other)
    far = "FF/0"
    body = {"new_timeline_id": uuid.uuid4().hex, "ancestor_timeline_id": timeline, "ancestor_start_lsn": far}
    result = {}
    t = threading.Thread(target=lambda: result.update(r=requests.post(f"{ps.http}/v1/tenant/{tenant}/timeline", json=body, timeout=60)))
    t.start()
    time.sleep(1.0)
    # ...a second one of the same tenant is refused, another tenant is served.
    r = requests.get(f"{ps.http}/v1/tenant/{tenant}/timeline", timeout=10)
    assert r.status_code == 429 and "in flight" in r.json()["msg"], r.text
    assert requests.get(f"{ps.http}/v1/tenant/{other}", timeout=10).ok
    t.join(timeout=30)
    assert result["r"].status_code == 400 and "did not arrive" in result["r"].text, result["r"].text
    # Once it finished, the tenant is served again, and the refused requests created nothing.
    r = requests.get(f"{ps.http}/v1/tenant/{tenant}/timeline", timeout=10)
    assert r.ok and [tl["timeline_id"] for tl in r.json()] == [timeline], r.text
