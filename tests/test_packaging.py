"""The shipped artefacts: the wheel the image installs, its entrypoint, and the files an
operator copies (.env.example, Dockerfile, docker-compose.yml). No Docker engine here, so the
image's own command runs from a freshly built wheel in an empty virtual environment."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

import httpx
import pytest

from pns_server.config import Settings
from tests.conftest import SECRET_KEY, _create_database
from tests.support.postgres import Cluster, free_port

ROOT = Path(__file__).resolve().parent.parent


def _env_example_names() -> set[str]:
    text = (ROOT / ".env.example").read_text()
    return set(re.findall(r"^#?\s*(PNS_[A-Z0-9_]+)=", text, re.MULTILINE))


def test_env_example_lists_every_setting_and_nothing_else() -> None:
    expected = {"PNS_" + name.upper() for name in Settings.model_fields}
    assert _env_example_names() == expected


def test_env_example_comments_every_setting() -> None:
    lines = (ROOT / ".env.example").read_text().splitlines()
    for index, line in enumerate(lines):
        if re.match(r"^#?\s*PNS_[A-Z0-9_]+=", line):
            above = lines[index - 1]
            assert above.startswith("#"), f"no comment above {line!r}"


class TestDockerfile:
    text = (ROOT / "Dockerfile").read_text()

    def test_multi_stage_on_slim_python(self) -> None:
        stages = re.findall(r"^FROM (\S+)", self.text, re.MULTILINE)
        assert len(stages) == 2
        assert all(s.startswith("python:3.11-slim") for s in stages)

    def test_runs_as_non_root_with_a_self_contained_healthcheck(self) -> None:
        user = re.findall(r"^USER (\S+)", self.text, re.MULTILINE)
        assert user and user[-1] not in ("root", "0")
        healthcheck = re.search(r"^HEALTHCHECK [^\n]*\\\n\s*CMD (.+)$", self.text, re.MULTILINE)
        assert healthcheck, "no HEALTHCHECK"
        command = healthcheck.group(1)
        assert command.startswith('["python"') and "urllib" in command and "/healthz" in command

    def test_entrypoint_is_pns_server_serve_on_all_interfaces(self) -> None:
        assert 'ENTRYPOINT ["pns-server"]' in self.text
        assert 'CMD ["serve"]' in self.text
        assert "PNS_HOST=0.0.0.0" in self.text
        assert "--no-cache-dir" in self.text


def test_compose_runs_relay_and_postgres_15() -> None:
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    db, relay = compose["services"]["db"], compose["services"]["relay"]
    assert db["image"] == "postgres:15"
    assert "healthcheck" in db and "healthcheck" in relay
    assert relay["depends_on"]["db"]["condition"] == "service_healthy"
    volume = db["volumes"][0].split(":")[0]
    assert volume in compose["volumes"]
    assert set(relay["secrets"]) == {"apns_key", "fcm_credentials"}


def _build_wheel(out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True,
        timeout=300,
    )
    [wheel] = out.glob("pns-*.whl")
    return wheel


@pytest.mark.slow
@pytest.mark.postgres_only
def test_wheel_serves_from_an_empty_venv_on_fresh_postgres(
    tmp_path: Path, pg_cluster: Cluster | None
) -> None:
    if pg_cluster is None:
        pytest.skip("PostgreSQL is not installed here (CI requires it)")
    wheel = _build_wheel(tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pns_server/migrations/env.py" in names
    assert any(n.startswith("pns_server/migrations/versions/") for n in names)

    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    # This interpreter's pip installs into the empty venv (--python): no pip bootstrap, no
    # bytecode compilation, same result for the import test below.
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")),
            *("install", "-q", "--no-compile", f"{wheel}[server]"),
        ],
        check=True,
        timeout=600,
    )

    # A fresh, empty database: the entrypoint must migrate it itself.
    name = "pkg_" + uuid.uuid4().hex[:12]
    asyncio.run(_create_database(pg_cluster.database_url("postgres"), name))
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PNS_DATABASE_URL": pg_cluster.database_url(name),
        "PNS_SECRET_KEY": SECRET_KEY,
        "PNS_HOST": "127.0.0.1",
        "PNS_PORT": str(port),
        "PNS_LOG_FORMAT": "json",
    }
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(venv / "bin" / "pns-server"), "serve"],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            status = None
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    status = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code
                except httpx.HTTPError:
                    status = None
                if status == 200:
                    break
                time.sleep(0.1)
            assert status == 200, log_path.read_text()
            process.send_signal(signal.SIGTERM)
            assert process.wait(20) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    located = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import pns_server; print(pns_server.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    ).stdout
    assert located.startswith(str(venv))


def test_grafana_dashboard_uses_only_metrics_we_export() -> None:
    import json

    from pns_server.metrics import Metrics

    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(pns_[a-z_]+)", e)}
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "gauge": ("",),
        "info": ("_info",),
    }
    exported = {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in suffixes[family.type]
    }
    assert used <= exported, used - exported
    # Every metric the issue names has a panel.
    for required in (
        "pns_http_requests_total",
        "pns_approvals_decided_total",
        "pns_push_sends_total",
        "pns_outbox_pending",
        "pns_longpoll_waiters",
        "pns_otp_verifications_total",
        "pns_devices",
    ):
        assert required in used


def test_compose_passes_the_database_password_unescaped_and_trusts_only_its_gateway() -> None:
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env = compose["services"]["relay"]["environment"]
    # A password inside the URL would break on `@`, `/`, `:` or `%`: it travels on its own.
    assert "POSTGRES_PASSWORD" not in env["PNS_DATABASE_URL"]
    assert env["PNS_DATABASE_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    gateway = compose["networks"]["pns"]["ipam"]["config"][0]["gateway"]
    assert env["PNS_FORWARDED_ALLOW_IPS"] == gateway
    assert {"pns"} == set(compose["services"]["relay"]["networks"])


def test_env_example_ships_no_working_password() -> None:
    values = dict(
        re.findall(r"^([A-Z][A-Z0-9_]+)=(.*)$", (ROOT / ".env.example").read_text(), re.M)
    )
    for name in ("POSTGRES_PASSWORD", "PNS_SECRET_KEY", "PNS_ADMIN_TOKEN"):
        assert values.get(name, "") == "", f"{name} must be left for the operator to fill in"
