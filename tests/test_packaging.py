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
import tomllib
import uuid
import zipfile
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pns_server.config import Settings
from tests.conftest import SECRET_KEY, _create_database
from tests.support.postgres import Cluster, free_port

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCK = ROOT / "requirements" / "server.lock"
DISTRIBUTION = "pns-relay"


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


class TestDistribution:
    project = PYPROJECT["project"]

    def test_a_name_we_own_that_can_never_be_uploaded_by_accident(self) -> None:
        assert self.project["name"] == DISTRIBUTION
        # The package index refuses every upload carrying a "Private ::" classifier.
        assert "Private :: Do Not Upload" in self.project["classifiers"]

    def test_pns_server_goes_through_the_sdk_only_guard(self) -> None:
        assert self.project["scripts"]["pns-server"] == "pns_server.entry:main"

    def test_the_0x_frameworks_have_upper_bounds(self) -> None:
        requirements = [Requirement(r) for r in self.project["optional-dependencies"]["server"]]
        bounded = {r.name: r.specifier for r in requirements}
        for name in ("fastapi", "uvicorn", "starlette", "httpx", "asyncpg", "aiosqlite"):
            assert any(spec.operator == "<" for spec in bounded[name]), name


def _lock_entries() -> dict[str, tuple[str, list[str], list[str]]]:
    """name -> (version, hashes, what it is there for) from the uv/pip-tools format."""
    entries: dict[str, tuple[str, list[str], list[str]]] = {}
    name = ""
    in_via = False
    for line in LOCK.read_text().splitlines():
        pinned = re.match(r"^([A-Za-z0-9._-]+)==(\S+)", line)
        if pinned:
            name = canonicalize_name(pinned.group(1))
            entries[name] = (pinned.group(2), [], [])
            in_via = False
        elif name and (digest := re.search(r"--hash=(sha256:[0-9a-f]{64})", line)):
            entries[name][1].append(digest.group(1))
        elif name and (via := re.match(r"^\s+# via\s*(.*)$", line)):
            in_via = True
            if via.group(1):
                entries[name][2].append(via.group(1).strip())
        elif name and in_via and (more := re.match(r"^\s+#\s+(\S.*)$", line)):
            entries[name][2].append(more.group(1).strip())
    return entries


class TestLock:
    """requirements/server.lock is what the image installs: it must match pyproject."""

    entries = _lock_entries()

    def test_every_pin_has_hashes(self) -> None:
        assert len(self.entries) > 20
        for name, (_version, hashes, _via) in self.entries.items():
            assert hashes, f"{name} has no --hash"

    def test_the_direct_dependencies_are_exactly_pyprojects_and_satisfy_its_bounds(
        self,
    ) -> None:
        """Fails when pyproject's SDK or server dependencies change and `make lock` was not
        run: a dependency added or dropped, or a bound the pinned version no longer meets."""
        wanted = [
            Requirement(r)
            for r in [
                *PYPROJECT["project"]["dependencies"],
                *PYPROJECT["project"]["optional-dependencies"]["server"],
            ]
        ]
        from_pyproject = f"{DISTRIBUTION} (pyproject.toml)"
        direct = {name for name, (_v, _h, via) in self.entries.items() if from_pyproject in via}
        names = {canonicalize_name(r.name) for r in wanted}
        assert direct == names, f"lock is stale, run `make lock`: {sorted(direct ^ names)}"
        for requirement in wanted:
            version = self.entries[canonicalize_name(requirement.name)][0]
            assert requirement.specifier.contains(version, prereleases=True), (
                f"{requirement} but the lock pins {version}: run `make lock`"
            )

    def test_the_relay_installs_none_of_firebase_admins_baggage(self) -> None:
        for heavy in ("firebase-admin", "grpcio", "google-cloud-firestore", "requests"):
            assert heavy not in self.entries


class TestDockerfile:
    text = (ROOT / "Dockerfile").read_text()

    def test_multi_stage_on_one_exact_slim_python_release(self) -> None:
        stages = re.findall(r"^FROM (\S+)", self.text, re.MULTILINE)
        assert len(stages) == 2
        assert len(set(stages)) == 1
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", stages[0])

    def test_installs_the_lock_with_hashes_then_our_wheel_without_resolving(self) -> None:
        assert "source=requirements/server.lock" in self.text
        install = re.search(r"pip install ([^\n]*?)\\?\n?\s*-r /tmp/server\.lock", self.text)
        assert install and "--require-hashes" in install.group(1)
        assert "--only-binary :all:" in install.group(1)
        assert re.search(r"pip install [^\n]*--no-deps /wheels/pns_relay-\*\.whl", self.text)
        assert "pip check" in self.text

    def test_runs_as_a_numeric_non_root_user_with_a_self_contained_healthcheck(self) -> None:
        user = re.findall(r"^USER (\S+)", self.text, re.MULTILINE)
        assert user and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", user[-1])
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
    [wheel] = out.glob("pns_relay-*.whl")
    return wheel


@pytest.mark.slow
@pytest.mark.postgres_only
def test_wheel_serves_from_an_empty_venv_on_fresh_postgres(
    tmp_path: Path, pg_cluster: Cluster | None
) -> None:
    if pg_cluster is None:
        pytest.skip("PostgreSQL is not installed here (CI requires it)")
    wheel = _build_wheel(tmp_path / "dist")
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    assert "pns_server/migrations/env.py" in names
    assert any(n.startswith("pns_server/migrations/versions/") for n in names)
    [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
    headers = archive.read(metadata).decode().splitlines()
    assert f"Name: {DISTRIBUTION}" in headers
    assert "Classifier: Private :: Do Not Upload" in headers

    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    # This interpreter's pip installs into the empty venv (--python): no pip bootstrap, no
    # bytecode compilation. The same steps as the image: the lock, hash-checked and binary
    # only, then our wheel without resolving anything, then a consistency check.
    pip = (sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"))
    for step in (
        # http-ece is published as a source archive only (pure Python).
        (
            "install",
            "-q",
            "--no-compile",
            "--require-hashes",
            "--only-binary",
            ":all:",
            "--no-binary",
            "http-ece",
        ),
        ("install", "-q", "--no-compile", "--no-index", "--no-deps", str(wheel)),
        ("check",),
    ):
        if "--require-hashes" in step:
            step = (*step, "-r", str(LOCK))
        subprocess.run([*pip, *step], check=True, timeout=600)

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
