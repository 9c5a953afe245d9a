"""JWT auth (issue 8 items 1 and 6): every HTTP route and libpq command of the pageserver, the
safekeeper and compute_ctl against {no token, expired, wrong signature, wrong scope, other
tenant's token, valid}. Only the valid cells get through; a refused cell changes nothing (state,
LSN leases included, read back after each route's or command's refusals); each refusal is an
audit line; no token appears in any log. Also: the pageserver's token for the safekeepers from
`safekeeper_auth_token_path`."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest
import requests

from fixtures.daemons import wait_until
from fixtures.neon_local import neon_env  # noqa: F401
from fixtures.pageserver import Pageserver
from fixtures.paths import neon_bin
from fixtures.pq_raw import RawPq
from fixtures.safekeeper import Safekeeper

CELLS = ["none", "expired", "bad_signature", "wrong_scope", "other_tenant", "valid"]


class Minter:
    """Keys and tokens through `neon_auth` (the same code the daemons verify with)."""

    def __init__(self, dir: Path):
        self.dir = dir
        subprocess.run([neon_bin("neon_auth"), "keygen", dir / "keys"], check=True, capture_output=True)
        subprocess.run([neon_bin("neon_auth"), "keygen", dir / "other"], check=True, capture_output=True)
        self.public_key = dir / "keys" / "public.pem"
        self.minted: list[str] = []

    def token(self, scope: str, tenant_id: str | None = None, exp_secs: int = 3600, other_key: bool = False) -> str:
        key = self.dir / ("other" if other_key else "keys") / "private.pem"
        argv = [neon_bin("neon_auth"), "token", "--private-key", key, "--scope", scope, "--exp-secs", str(exp_secs)]
        if tenant_id:
            argv += ["--tenant-id", tenant_id]
        tok = subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()
        self.minted.append(tok)
        return tok

    def pageserver_conf(self) -> str:
        """pageserver.toml lines: tokens checked with our public key on HTTP and libpq."""
        return f"auth_validation_public_key_path = '{self.public_key}'\nhttp_auth_type = 'NeonJWT'\npg_auth_type = 'NeonJWT'\n"

    def safekeeper_flags(self) -> list[str]:
        """The safekeeper's flags for the same."""
        return ["--auth-validation-public-key-path", str(self.public_key), "--http-auth-type", "NeonJWT", "--pg-auth-type", "NeonJWT"]


def cell_token(m: Minter, cell: str, valid_scope: str, tenant: str, other_tenant: str, wrong: str | None = None) -> str | None:
    """The token of a cell for a route whose valid token is `valid_scope` (for `tenant`);
    `wrong`: the wrong scope to use (default: safekeeperdata for tenant routes)."""
    t = tenant if valid_scope == "tenant" else None
    if cell == "none":
        return None
    if cell == "expired":
        return m.token(valid_scope, t, exp_secs=-60)
    if cell == "bad_signature":
        return m.token(valid_scope, t, other_key=True)
    if cell == "wrong_scope":
        # A tenant route refuses the safekeepers' scope; a management route a tenant token.
        if wrong:
            return m.token(wrong)
        return m.token("safekeeperdata") if valid_scope == "tenant" else m.token("tenant", tenant)
    if cell == "other_tenant":
        return m.token("tenant", other_tenant)
    return m.token(valid_scope, t)


@pytest.fixture
def auth_pageserver(daemons, test_output_dir, port_allocator):
    m = Minter(test_output_dir / "auth")
    ps = Pageserver(
        daemons,
        test_output_dir / "pageserver",
        port_allocator.get(),
        port_allocator.get(),
        [],
        extra_conf=m.pageserver_conf(),
    ).start()
    return ps, m


def req(ps: Pageserver, method: str, path: str, token: str | None, body=None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, f"{ps.http}{path}", json=body, headers=headers, timeout=120)


def state(ps: Pageserver, admin: str, tenants: list[str]) -> dict:
    """Everything a refused request could have changed, read with an admin token: tenants, their
    config, each timeline's layers and LSNs, and its LSN leases (which basebackups and `lease lsn`
    take, and nothing else shows)."""
    out: dict = {"tenants": sorted(t["id"] for t in req(ps, "GET", "/v1/tenant", admin).json())}
    for t in tenants:
        if t not in out["tenants"]:
            continue
        timelines = req(ps, "GET", f"/v1/tenant/{t}/timeline", admin).json()
        out[t] = {
            "config": req(ps, "GET", f"/v1/tenant/{t}/config", admin).json()["tenant_specific_overrides"],
            "timelines": sorted(
                (i["timeline_id"], i["layer_count"], i["disk_consistent_lsn"], i["last_record_lsn"], i["latest_gc_cutoff_lsn"])
                for i in timelines
            ),
            "leases": {i["timeline_id"]: leases(ps, admin, t, i["timeline_id"]) for i in timelines},
        }
    return out


def leases(ps: Pageserver, token: str, tenant: str, timeline: str) -> dict[str, int]:
    """The timeline's unexpired LSN leases: LSN -> valid_until (Unix ms)."""
    r = req(ps, "GET", f"/v1/tenant/{tenant}/timeline/{timeline}/lsn_leases", token)
    assert r.status_code == 200, r.text
    return {x["lsn"]: x["valid_until"] for x in r.json()}


def test_pageserver_http_matrix(auth_pageserver, daemons):
    ps, m = auth_pageserver
    admin = m.token("admin")
    a, b, c = (uuid.uuid4().hex for _ in range(3))
    tl, tl_del, tl_new = (uuid.uuid4().hex for _ in range(3))
    for t in (a, b, c):
        assert req(ps, "POST", "/v1/tenant", admin, {"tenant_id": t}).status_code == 201
    for x in (tl, tl_del):
        r = req(ps, "POST", f"/v1/tenant/{a}/timeline", m.token("pageserverapi"), {"new_timeline_id": x})
        assert r.status_code == 201, r.text
    new_tenant = uuid.uuid4().hex
    p = f"/v1/tenant/{a}/timeline/{tl}"
    # (method, path, body, valid scope, ok statuses for the valid cell). Destructive routes last.
    routes = [
        ("GET", "/v1/tenant", None, "pageserverapi", {200}),
        ("POST", "/v1/tenant", {"tenant_id": new_tenant}, "pageserverapi", {201}),
        ("GET", f"/v1/tenant/{a}", None, "tenant", {200}),
        ("GET", f"/v1/tenant/{a}/config", None, "tenant", {200}),
        ("PUT", f"/v1/tenant/{a}/config", {"pitr_interval": "1h"}, "pageserverapi", {200}),
        ("GET", f"/v1/tenant/{a}/timeline", None, "tenant", {200}),
        ("POST", f"/v1/tenant/{a}/timeline", {"new_timeline_id": tl_new}, "tenant", {201}),
        ("GET", p, None, "tenant", {200}),
        ("GET", f"{p}/get_lsn_by_timestamp?timestamp=2100-01-01T00:00:00Z", None, "tenant", {200}),
        ("GET", f"{p}/lsn_leases", None, "tenant", {200}),
        ("PUT", f"{p}/checkpoint", None, "pageserverapi", {200}),
        ("PUT", f"{p}/compact?force=true", None, "pageserverapi", {200}),
        ("PUT", f"{p}/do_gc", None, "pageserverapi", {200}),
        # Without remote storage these fail after auth (400/404): still not 401/403.
        ("DELETE", f"{p}/layer/000000000000000000000000000000000000-FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF__0000000000000000-0000000000000001", None, "pageserverapi", {400, 404}),
        ("POST", f"/v1/tenant/{uuid.uuid4().hex}/attach", None, "pageserverapi", {400, 404, 409}),
        ("DELETE", f"/v1/tenant/{a}/timeline/{tl_del}", None, "pageserverapi", {200}),
        ("DELETE", f"/v1/tenant/{c}", None, "pageserverapi", {200}),
    ]
    tenants = [a, b, c, new_tenant]
    refusals = 0
    for method, path, body, scope, ok in routes:
        before = state(ps, admin, tenants)
        for cell in CELLS[:-1]:
            r = req(ps, method, path, cell_token(m, cell, scope, a, b), body)
            expected = 403 if cell in ("wrong_scope", "other_tenant") else 401
            assert r.status_code == expected, f"{method} {path} [{cell}]: {r.status_code} {r.text}"
            assert r.json()["msg"], "a refusal says why"
            refusals += 1
        assert state(ps, admin, tenants) == before, f"{method} {path}: a refused request changed state"
        r = req(ps, method, path, cell_token(m, "valid", scope, a, b), body)
        assert r.status_code in ok, f"{method} {path} [valid]: {r.status_code} {r.text}"

    after = state(ps, admin, tenants)
    assert new_tenant in after["tenants"] and c not in after["tenants"]
    assert tl_new in [x[0] for x in after[a]["timelines"]] and tl_del not in [x[0] for x in after[a]["timelines"]]
    assert after[a]["config"] == {"pitr_interval": "1h"}
    # Reasons are distinct and readable.
    assert "expired" in req(ps, "GET", "/v1/tenant", m.token("admin", exp_secs=-5)).json()["msg"]
    assert "signature" in req(ps, "GET", "/v1/tenant", m.token("admin", other_key=True)).json()["msg"]
    assert "not tenant" in req(ps, "GET", f"/v1/tenant/{a}", m.token("tenant", b)).json()["msg"]
    assert req(ps, "GET", "/v1/tenant", "garbage").status_code == 401
    # Open routes.
    assert requests.get(f"{ps.http}/v1/status", timeout=5).ok
    assert requests.get(f"{ps.http}/metrics", timeout=5).ok

    ps.stop()
    log = ps.daemons.daemons[0].log_text()
    audit_denied = [line for line in log.splitlines() if "audit" in line and "denied" in line]
    assert len(audit_denied) >= refusals, f"{len(audit_denied)} audit lines for {refusals} refusals"
    assert any(f'object="/v1/tenant/{c}"' in line and 'operation="DELETE"' in line for line in log.splitlines() if 'outcome="allowed"' in line)
    assert_no_secrets(ps.workdir.parent, m)


def pq_command(ps: Pageserver, token: str | None, command: str) -> tuple[str, bytes]:
    """('login', error) | ('error', error) | ('ok', first answer tag)."""
    try:
        c = RawPq(ps.pg_port, {"user": "cloud_admin"}, password=token or "")
    except RuntimeError as e:
        return "login", str(e).encode()
    try:
        c.query(command)
        tag, payload = c.read_until_error_or({b"H", b"W", b"T"})
        return ("error", payload) if tag == b"E" else ("ok", tag)
    finally:
        c.close()


def test_page_service_matrix(auth_pageserver):
    """Every page service command (each form of it) × the cells. Each command runs on a fresh
    branch, so its valid cell's effect is visible: after the refused cells the pageserver's state
    (tenants, timelines, LSNs, layers, every timeline's leases) is read back unchanged, and after
    the valid cell the lease a basebackup or `lease lsn` takes is there."""
    ps, m = auth_pageserver
    admin = m.token("admin")
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    tl = uuid.uuid4().hex
    for t in (a, b):
        assert req(ps, "POST", "/v1/tenant", admin, {"tenant_id": t}).status_code == 201
    info = req(ps, "POST", f"/v1/tenant/{a}/timeline", admin, {"new_timeline_id": tl}).json()
    lsn = info["last_record_lsn"]
    # Another tenant's timeline, whose state the refused cells must not touch either.
    tl_b = uuid.uuid4().hex
    assert req(ps, "POST", f"/v1/tenant/{b}/timeline", admin, {"new_timeline_id": tl_b}).status_code == 201
    # (command with {t} and {tl} for tenant and timeline, whether its valid cell leases `lsn`)
    commands = [
        ("pagestream {t} {tl}", False),
        ("basebackup {t} {tl}", True),
        ("basebackup {t} {tl} latest", True),
        (f"basebackup {{t}} {{tl}} {lsn}", True),
        (f"basebackup {{t}} {{tl}} {lsn} readonly", True),
        ("fullbackup {t} {tl}", True),
        (f"fullbackup {{t}} {{tl}} {lsn}", True),
        # No running-xacts record without a compute: the valid cell fails after auth, no lease.
        ("basebackup {t} {tl} standby", False),
        (f"basebackup {{t}} {{tl}} standby {lsn}", False),
        (f"lease lsn {{t}} {{tl}} {lsn}", True),
    ]
    for template, leases_lsn in commands:
        br = uuid.uuid4().hex
        r = req(ps, "POST", f"/v1/tenant/{a}/timeline", admin, {"new_timeline_id": br, "ancestor_timeline_id": tl, "ancestor_start_lsn": lsn})
        assert r.status_code == 201, r.text
        command = template.format(t=a, tl=br)
        before = state(ps, admin, [a, b])
        assert before[a]["leases"][br] == {}, "a new branch has no lease"
        for cell in CELLS[:-1]:
            outcome, detail = pq_command(ps, cell_token(m, cell, "tenant", a, b), command)
            if cell in ("none", "expired", "bad_signature"):
                assert outcome == "login" and b"28P01" in detail, f"{command} [{cell}]: {outcome} {detail!r}"
            else:
                assert outcome == "error" and b"28000" in detail, f"{command} [{cell}]: {outcome} {detail!r}"
        assert state(ps, admin, [a, b]) == before, f"{command}: a refused cell changed the pageserver's state"
        outcome, detail = pq_command(ps, cell_token(m, "valid", "tenant", a, b), command)
        assert outcome == "ok" or b"no running-transactions record" in detail, f"{command} [valid]: {outcome} {detail!r}"
        after = state(ps, admin, [a, b])
        if leases_lsn:
            # The valid cell did take effect: readback sees it (the refused ones would have too).
            assert list(leases(ps, m.token("tenant", a), a, br)) == [lsn], f"{command}: {after[a]['leases'][br]}"
            after[a]["leases"][br] = {}
        assert after == before, f"{command} [valid]: changed more than its lease"
        # Management tokens reach every tenant.
        outcome, detail = pq_command(ps, m.token("pageserverapi"), command)
        assert outcome == "ok" or b"no running-transactions record" in detail, f"{command}: {detail!r}"

    # A command naming no tenant: only management tokens get as far as the usage error.
    before = state(ps, admin, [a, b])
    for tok, code in [(m.token("tenant", a), b"28000"), (m.token("safekeeperdata"), b"28000"), (m.token("pageserverapi"), b"0A000")]:
        outcome, detail = pq_command(ps, tok, "status")
        assert outcome == "error" and code in detail, f"status: {outcome} {detail!r}"
    assert state(ps, admin, [a, b]) == before
    # Leases are a tenant's own business: another tenant's token cannot read them.
    r = req(ps, "GET", f"/v1/tenant/{a}/timeline/{tl}/lsn_leases", m.token("tenant", b))
    assert r.status_code == 403, r.text
    ps.stop()
    assert_no_secrets(ps.workdir.parent, m)


def assert_no_secrets(root: Path, m: Minter) -> None:
    """No token and no private key material in any file under the test's output but the keys."""
    secrets = list(m.minted)
    for d in ("keys", "other"):
        pem = (m.dir / d / "private.pem").read_text()
        secrets.append("".join(pem.splitlines()[1:-1]))
    checked = 0
    for f in root.rglob("*"):
        if not f.is_file() or m.dir in f.parents:
            continue
        text = f.read_bytes().decode(errors="replace")
        checked += 1
        for s in secrets:
            # Each half of a token too: a log must not carry its signature or its claims part.
            for piece in [s] + s.split("."):
                if len(piece) >= 20:
                    assert piece not in text, f"secret material found in {f}"
    assert checked > 0


def test_safekeeper_matrix(daemons, test_output_dir, port_allocator):
    m = Minter(test_output_dir / "auth")
    sk = Safekeeper(
        daemons, 1, test_output_dir / "sk1", port_allocator.get(), port_allocator.get(), sync=False,
        extra_args=m.safekeeper_flags(),
    ).start()
    base = f"http://127.0.0.1:{sk.http_port}"
    admin = m.token("admin")
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    tl, tl_del, tl_new = (uuid.uuid4().hex for _ in range(3))
    start = "0/1000028"

    def call(method, path, token, body=None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.request(method, f"{base}{path}", json=body, headers=headers, timeout=30)

    for x in (tl, tl_del):
        r = call("POST", f"/v1/tenant/{a}/timeline", m.token("safekeeperdata"), {"timeline_id": x, "start_lsn": start, "pg_version": 150018})
        assert r.status_code == 201, r.text

    def sk_state() -> dict:
        out = {}
        for x in (tl, tl_del, tl_new):
            r = call("GET", f"/v1/tenant/{a}/timeline/{x}", admin)
            out[x] = r.json() if r.ok else r.status_code
        return out

    routes = [
        ("GET", f"/v1/tenant/{a}/timeline/{tl}", None, {200}),
        ("GET", f"/v1/tenant/{a}/timeline/{tl}/digest?from_lsn={start}&until_lsn={start}", None, {200, 400}),
        ("POST", f"/v1/tenant/{a}/timeline", {"timeline_id": tl_new, "start_lsn": start, "pg_version": 150018}, {201}),
        ("DELETE", f"/v1/tenant/{a}/timeline/{tl_del}", None, {200}),
    ]
    refusals = 0
    for method, path, body, ok in routes:
        before = sk_state()
        for cell in CELLS[:-1]:
            r = call(method, path, cell_token(m, cell, "tenant", a, b, wrong="pageserverapi"), body)
            expected = 403 if cell in ("wrong_scope", "other_tenant") else 401
            assert r.status_code == expected, f"{method} {path} [{cell}]: {r.status_code} {r.text}"
            refusals += 1
        assert sk_state() == before, f"{method} {path}: a refused request changed state"
        r = call(method, path, cell_token(m, "valid", "tenant", a, b), body)
        assert r.status_code in ok, f"{method} {path} [valid]: {r.status_code} {r.text}"
    # safekeeperdata reaches every tenant's routes; non-tenant routes need it.
    assert call("GET", f"/v1/tenant/{a}/timeline/{tl}", m.token("safekeeperdata")).ok
    assert requests.get(f"{base}/v1/status", timeout=5).ok and requests.get(f"{base}/metrics", timeout=5).ok
    after = sk_state()
    assert after[tl_del] == 404 and isinstance(after[tl_new], dict)

    # libpq: every command of the endpoint.
    options = f"-c tenant_id={a} -c timeline_id={tl}"
    commands = ["IDENTIFY_SYSTEM", "TIMELINE_STATUS", f"START_REPLICATION PHYSICAL {start}", "START_WAL_PUSH"]
    for command in commands:
        before = sk_state()
        for cell in CELLS:
            if cell == "valid":
                # Read back after the refused cells, before the valid one can change anything.
                assert sk_state() == before, f"{command}: a refused cell changed the safekeeper's state"
            tok = cell_token(m, cell, "tenant", a, b, wrong="pageserverapi")
            try:
                c = RawPq(sk.pg_port, {"user": "test", "options": options}, password=tok or "")
            except RuntimeError as e:
                assert cell in ("none", "expired", "bad_signature") and "28P01" in str(e), f"{command} [{cell}]: {e}"
                continue
            try:
                c.query(command)
                tag, payload = c.read_until_error_or({b"T", b"W"})
            finally:
                c.close()
            if cell == "valid":
                assert tag != b"E" or b"28000" not in payload and b"28P01" not in payload, f"{command}: {payload!r}"
            else:
                assert tag == b"E" and b"28000" in payload, f"{command} [{cell}]: {tag!r} {payload!r}"
        # The valid cells only read (a walproposer that sends nothing changes nothing either).
        assert sk_state() == before, f"{command} [valid]: state changed"
    sk.stop()
    log = (test_output_dir / "safekeeper1.log").read_text()
    assert sum(1 for line in log.splitlines() if "audit" in line and 'outcome="denied"' in line) >= refusals
    assert_no_secrets(test_output_dir, m)


def create_timeline_everywhere(ps: Pageserver, sk: Safekeeper, m: Minter, tenant: str, timeline: str) -> str:
    """A new tenant and timeline on the pageserver, and the timeline on `sk` at its start LSN
    (each through its API with the token it needs); returns that LSN."""
    api = m.token("pageserverapi")
    assert req(ps, "POST", "/v1/tenant", api, {"tenant_id": tenant}).status_code == 201
    start = req(ps, "POST", f"/v1/tenant/{tenant}/timeline", api, {"new_timeline_id": timeline}).json()["last_record_lsn"]
    r = requests.post(
        f"http://127.0.0.1:{sk.http_port}/v1/tenant/{tenant}/timeline",
        json={"timeline_id": timeline, "start_lsn": start, "pg_version": 150018},
        headers={"Authorization": f"Bearer {m.token('safekeeperdata')}"},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    return start


def test_compute_with_auth(daemons, test_output_dir, port_allocator):
    """The whole stack with auth on: a compute reaches its tenant through its token alone (the
    neon extension's pageserver reads, the walproposer's safekeepers, basebackup and leases), and
    compute_ctl's HTTP API takes the matrix; no token appears in any log (Postgres's included)."""
    from fixtures.compute import Compute

    m = Minter(test_output_dir / "auth")
    sk = Safekeeper(daemons, 1, test_output_dir / "sk1", port_allocator.get(), port_allocator.get(), sync=False, extra_args=m.safekeeper_flags()).start()
    ps = Pageserver(
        daemons,
        test_output_dir / "pageserver",
        port_allocator.get(),
        port_allocator.get(),
        [sk.addr],
        extra_conf=m.pageserver_conf(),
        env={**os.environ, "NEON_AUTH_TOKEN": m.token("safekeeperdata")},
    ).start()
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    tl = uuid.uuid4().hex
    create_timeline_everywhere(ps, sk, m, a, tl)
    daemons.allow_errors("walproposer", "Postgres ended the replication stream", "disconnected")
    spec = {"tenant_id": a, "timeline_id": tl, "pageserver": f"127.0.0.1:{ps.pg_port}", "safekeepers": [sk.addr], "mode": "primary", "pg_port": port_allocator.get()}
    compute = Compute(daemons, "compute", test_output_dir / "compute", spec, port_allocator.get(), auth_token=m.token("tenant", a), auth_public_key=m.public_key).start()
    compute.sql("create table t as select g, repeat('x', 500) v from generate_series(1, 20000) g")
    compute.sql("checkpoint")
    assert compute.sql("select count(*) from t") == [(20000,)]
    # Reads through the pageserver: a second compute on the same timeline after the first stops.
    base = f"http://127.0.0.1:{compute.http_port}"
    for method, path in [("GET", "/status"), ("GET", "/metrics"), ("POST", "/terminate")]:
        for cell in CELLS[:-1]:
            tok = cell_token(m, cell, "tenant", a, b, wrong="pageserverapi")
            r = requests.request(method, f"{base}{path}", headers={"Authorization": f"Bearer {tok}"} if tok else {}, timeout=10)
            expected = 403 if cell in ("wrong_scope", "other_tenant") else 401
            assert r.status_code == expected, f"{method} {path} [{cell}]: {r.status_code} {r.text}"
        # Nothing happened: still running and answering.
        assert compute.status()["status"] == "running"
        assert compute.sql("select count(*) from t") == [(20000,)]
        if method == "GET":
            r = requests.request(method, f"{base}{path}", headers=compute.headers(), timeout=10)
            assert r.ok, r.text
    r = requests.post(f"{base}/terminate", headers={"Authorization": f"Bearer {m.token('admin')}"}, timeout=10)
    assert r.ok
    compute.daemon.proc.wait(timeout=60)
    compute.stop()
    # A new compute reads every page back from the pageserver with its token.
    spec2 = dict(spec, pg_port=port_allocator.get())
    c2 = Compute(daemons, "compute2", test_output_dir / "compute2", spec2, port_allocator.get(), auth_token=m.token("tenant", a), auth_public_key=m.public_key).start()
    assert c2.sql("select count(*), sum(length(v)) from t") == [(20000, 20000 * 500)]
    c2.stop()
    # A compute with another tenant's token gets nowhere (its start fails on the safekeepers or
    # the pageserver with an authentication error).
    spec3 = dict(spec, pg_port=port_allocator.get())
    daemons.allow_errors("authentication failed", "audit", "compute_ctl", "FAILED")
    with pytest.raises((RuntimeError, TimeoutError)):
        Compute(daemons, "compute3", test_output_dir / "compute3", spec3, port_allocator.get(), auth_token=m.token("tenant", b)).start(timeout_s=30)
    daemons.stop_all()
    assert_no_secrets(test_output_dir, m)


def test_pageserver_safekeeper_token_file(daemons, test_output_dir, port_allocator):
    """`safekeeper_auth_token_path`: the pageserver streams WAL from an auth-enabled safekeeper
    with the token in that file alone ($NEON_AUTH_TOKEN unset). The file is read at each
    connection: with a token the safekeeper refuses, no WAL arrives; once the file holds a valid
    token, WAL arrives without a restart. Neither token is in any log."""
    from fixtures.compute import Compute

    m = Minter(test_output_dir / "auth")
    sk = Safekeeper(daemons, 1, test_output_dir / "sk1", port_allocator.get(), port_allocator.get(), sync=False, extra_args=m.safekeeper_flags()).start()
    a, other = uuid.uuid4().hex, uuid.uuid4().hex
    tl = uuid.uuid4().hex
    # Kept beside the keys (outside the pageserver's config, and outside what assert_no_secrets reads).
    token_file = m.dir / "pageserver-safekeeper.jwt"
    token_file.write_text(m.token("tenant", other) + "\n")
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "NEON_AUTH_TOKEN"}
    ps = Pageserver(
        daemons,
        test_output_dir / "pageserver",
        port_allocator.get(),
        port_allocator.get(),
        [sk.addr],
        extra_conf=(
            m.pageserver_conf() + f"safekeeper_auth_token_path = '{token_file}'\n"
        ),
        env=env,
    ).start()
    api = m.token("pageserverapi")
    create_timeline_everywhere(ps, sk, m, a, tl)
    daemons.allow_errors("walproposer", "Postgres ended the replication stream", "disconnected", "authentication failed", "audit")
    spec = {"tenant_id": a, "timeline_id": tl, "pageserver": f"127.0.0.1:{ps.pg_port}", "safekeepers": [sk.addr], "mode": "primary", "pg_port": port_allocator.get()}
    compute = Compute(daemons, "compute", test_output_dir / "compute", spec, port_allocator.get(), auth_token=m.token("tenant", a), auth_public_key=m.public_key).start()
    compute.sql("create table t as select g from generate_series(1, 10000) g")
    end = compute.sql("select pg_current_wal_flush_lsn()::text")[0][0]

    def ingested() -> str:
        return req(ps, "GET", f"/v1/tenant/{a}/timeline/{tl}", api).json()["last_record_lsn"]

    def lsn(s: str) -> int:
        hi, lo = s.split("/")
        return (int(hi, 16) << 32) | int(lo, 16)

    # The wrong token: the safekeeper refuses the WAL receiver (audited), nothing is ingested.
    sk_log = test_output_dir / "safekeeper1.log"

    def refusals() -> int:
        return sum(1 for line in sk_log.read_text().splitlines() if f"timeline {a}/{tl}" in line and 'outcome="denied"' in line)

    # Several attempts (the WAL receiver retries with backoff), none of them getting WAL.
    wait_until("the safekeeper refusing the pageserver's wrong token 3 times", lambda: refusals() >= 3)
    assert lsn(ingested()) < lsn(end), "WAL arrived with a token for another tenant"
    # Rotation: the valid token in the same file, no restart.
    token_file.write_text(m.token("safekeeperdata") + "\n")
    wait_until(f"the pageserver ingesting up to {end}", lambda: lsn(ingested()) >= lsn(end), timeout_s=60)
    compute.stop()
    daemons.stop_all()
    assert_no_secrets(test_output_dir, m)


def test_neon_local_init_auth(neon_env):
    """`neon_local init --auth`: the whole local stack with tokens; the CLI works as before, a
    compute reads and writes through its own token, the daemons refuse callers without one, and
    no token is in any file of the environment but the private key's folder."""
    from fixtures.neon_local import sql

    out = neon_env.run("init", "--num-safekeepers", "3", "--auth").stdout
    assert "auth and TLS are on" in out and "Authorization: Bearer" in out and "PGPASSWORD" in out and "--cacert" in out
    neon_env.run("start")
    neon_env.run("tenant", "create", "--set-default")
    connstr = neon_env.endpoint("main")
    assert "sslmode=verify-full" in connstr, connstr
    sql(connstr, "create table t as select g from generate_series(1, 1000) g")
    assert sql(connstr, "select count(*) from t") == [(1000,)]
    assert sql(connstr, "select ssl from pg_stat_ssl where pid = pg_backend_pid()") == [(True,)]
    neon_env.branch("b1")
    neon_env.run("endpoint", "stop", "main")
    connstr = neon_env.start_endpoint("main")
    assert sql(connstr, "select count(*) from t") == [(1000,)]
    conf = neon_env.config()
    ps_port = conf["pageserver"]["http_port"]
    tenant = conf["default_tenant"]
    assert neon_env.http("GET", ps_port, "/v1/tenant", token=False).status_code == 401
    assert neon_env.http("GET", ps_port, "/v1/status", token=False).ok
    # HTTPS only: a plaintext request to the same port gets no answer.
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{ps_port}/v1/status", timeout=5)
    tok = neon_env.run("auth-token", "--scope", "pageserverapi").stdout.strip()
    assert neon_env.http("GET", ps_port, "/v1/tenant", token=False, headers={"Authorization": f"Bearer {tok}"}).ok
    tenant_tok = neon_env.run("auth-token", "--scope", "tenant", "--tenant-id", tenant).stdout.strip()
    r = neon_env.http("GET", ps_port, f"/v1/tenant/{tenant}/timeline", token=False, headers={"Authorization": f"Bearer {tenant_tok}"})
    assert r.ok and len(r.json()) == 2
    sk = conf["safekeepers"][0]
    assert neon_env.http("GET", sk["http_port"], f"/v1/tenant/{tenant}/timeline/{r.json()[0]['timeline_id']}", token=False).status_code == 401
    ep = conf["endpoints"]["main"]
    assert neon_env.http("GET", ep["http_port"], "/status", token=False).status_code == 401
    # The page service refuses a plaintext client before it may even try a password.
    with pytest.raises(RuntimeError, match="28000"):
        RawPq(conf["pageserver"]["pg_port"], {"user": "x"}, password="")
    neon_env.run("stop")
    # No token (neither the ones neon_local minted for the daemons nor ours) in any file.
    auth_dir = neon_env.repo_dir / "auth"
    header = tok.split(".")[0]
    private = "".join((auth_dir / "private.pem").read_text().splitlines()[1:-1])
    for f in neon_env.repo_dir.rglob("*"):
        if f.is_file() and auth_dir not in f.parents:
            text = f.read_bytes().decode(errors="replace")
            assert private not in text, f"private key in {f}"
            # Every token starts with the same header part: none may appear at all.
            assert header not in text, f"a token in {f}"
    # Nor the TLS private key, but where it is served from (its folder, and each compute's copy).
    tls_key = "".join((neon_env.repo_dir / "tls" / "server.key").read_text().splitlines()[1:-1])
    for f in neon_env.repo_dir.rglob("*"):
        if f.is_file() and f.name != "server.key":
            assert tls_key not in f.read_bytes().decode(errors="replace"), f"the TLS key in {f}"
