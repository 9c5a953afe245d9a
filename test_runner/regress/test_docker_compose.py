"""docker-compose.yml and docker/ against the code they configure.

No Docker engine here: nothing is started. These checks catch what would otherwise drift
silently -- a flag a binary no longer accepts, a pageserver.toml key the pageserver rejects, a
compute spec whose ids or safekeepers no longer match the init job and the services.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib

import pytest

from fixtures.paths import REPO_ROOT, neon_bin

yaml = pytest.importorskip("yaml", reason="PyYAML (a dependency of moto[server]) is not installed")

COMPOSE = REPO_ROOT / "docker-compose.yml"
DOCKER = REPO_ROOT / "docker"
SAFEKEEPERS = ["safekeeper1", "safekeeper2", "safekeeper3"]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def spec() -> dict:
    return json.loads((DOCKER / "compute-spec.json").read_text())


def _help(*argv: str) -> str:
    out = subprocess.run([str(neon_bin(argv[0])), *argv[1:], "--help"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_services(compose):
    assert set(compose["services"]) == {"pageserver", *SAFEKEEPERS, "init", "compute"}
    deps = compose["services"]["compute"]["depends_on"]
    assert deps["init"]["condition"] == "service_completed_successfully"
    for s in ["pageserver", *SAFEKEEPERS]:
        assert deps[s]["condition"] == "service_healthy"
        assert compose["services"]["init"]["depends_on"][s]["condition"] == "service_healthy"
        assert "/v1/status" in " ".join(compose["services"][s]["healthcheck"]["test"])
    for name, svc in compose["services"].items():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("./"):
                assert (REPO_ROOT / src).exists(), f"{name} mounts missing {src}"
            else:
                assert src in compose["volumes"], f"{name} uses undeclared volume {src}"


def test_command_flags_are_accepted(compose):
    """Every --flag in a service's command appears in that binary's --help."""
    helps = {
        "pageserver": _help("pageserver"),
        "safekeeper": _help("safekeeper"),
        "compute_ctl": _help("compute_ctl", "run"),
    }
    checked = 0
    for name, svc in compose["services"].items():
        cmd = svc["command"]
        if cmd[0] not in helps:
            continue
        text = helps[cmd[0]]
        for arg in cmd[1:]:
            if arg.startswith("--"):
                flag = arg.split("=")[0]
                assert re.search(rf"(^|[\s,]){re.escape(flag)}(?![\w-])", text), f"{name}: {cmd[0]} does not accept {flag}"
                checked += 1
    assert checked >= 4 * 5 + 1


def test_safekeeper_commands(compose):
    for n, name in enumerate(SAFEKEEPERS, start=1):
        cmd = compose["services"][name]["command"]
        arg = lambda f: cmd[cmd.index(f) + 1]  # noqa: E731
        assert arg("--id") == str(n)
        peers = set(arg("--peers").split(","))
        assert peers == {f"{s}:5454" for s in SAFEKEEPERS if s != name}
        assert arg("--listen-pg").endswith(":5454") and arg("--listen-http").endswith(":7676")
        assert json.loads(arg("--remote-storage")) == {"local_path": "/data/remote_storage"}


def _struct_fields(src: str, name: str) -> set[str]:
    body = re.search(rf"pub struct {name} \{{(.*?)\n\}}", src, re.S)
    assert body, f"struct {name} not found"
    return set(re.findall(r"^\s*pub (\w+):", body.group(1), re.M))


def test_pageserver_toml_keys_are_known(compose):
    conf = tomllib.loads((DOCKER / "pageserver.toml").read_text())
    known = _struct_fields((REPO_ROOT / "pageserver/src/config.rs").read_text(), "ConfFile")
    assert "remote_storage" in known and "listen_pg_addr" in known
    assert set(conf) <= known, f"keys the pageserver rejects (deny_unknown_fields): {set(conf) - known}"
    local_fs = _struct_fields((REPO_ROOT / "libs/remote_storage/src/config.rs").read_text(), "LocalFsConfig")
    assert set(conf["remote_storage"]) <= local_fs
    assert conf["safekeepers"] == [f"{s}:5454" for s in SAFEKEEPERS]
    # Addresses are parsed as socket addresses (IP, not host names).
    for k in ["listen_pg_addr", "listen_http_addr"]:
        assert re.fullmatch(r"0\.0\.0\.0:\d+", conf[k]), conf[k]
    ps = compose["services"]["pageserver"]
    workdir = ps["command"][ps["command"].index("--workdir") + 1]
    assert f"./docker/pageserver.toml:{workdir}/pageserver.toml:ro" in ps["volumes"]
    pg_install = compose["services"]["compute"]["command"]
    assert conf["pg_distrib_dir"] == pg_install[pg_install.index("--pg-install") + 1]
    vol_paths = {v.split(":")[1] for v in ps["volumes"]}
    assert conf["remote_storage"]["local_path"] in vol_paths


def test_compute_spec(compose, spec):
    fields = _struct_fields((REPO_ROOT / "compute_ctl/src/spec.rs").read_text(), "ComputeSpec")
    assert set(spec) <= fields, f"unknown spec fields (deny_unknown_fields): {set(spec) - fields}"
    for required in ["tenant_id", "timeline_id", "pageserver", "mode", "pg_port"]:
        assert required in spec
    assert spec["mode"] == "primary" and spec["safekeepers"], "a primary needs safekeepers"
    env = compose["services"]["init"]["environment"]
    assert spec["tenant_id"] == env["TENANT_ID"] and spec["timeline_id"] == env["TIMELINE_ID"]
    for i in [spec["tenant_id"], spec["timeline_id"]]:
        assert re.fullmatch(r"[0-9a-f]{32}", i)
    assert spec["safekeepers"] == [f"{s}:5454" for s in SAFEKEEPERS]
    assert env["SAFEKEEPERS_HTTP"].split() == [f"http://{s}:7676" for s in SAFEKEEPERS]
    assert spec["pageserver"] == "pageserver:64000"
    assert all(isinstance(v, str) for v in spec["settings"].values())
    # Reachable from the host: listening beyond loopback, and a password (pg_hba asks for SCRAM).
    assert spec["settings"]["listen_addresses"] == "*"
    assert any(r["name"] == "cloud_admin" and r.get("password") for r in spec["roles"])
    assert f"127.0.0.1:{spec['pg_port']}:{spec['pg_port']}" in compose["services"]["compute"]["ports"]


def test_init_script_parses():
    subprocess.run(["bash", "-n", str(DOCKER / "init-tenant.sh")], check=True, timeout=10)
