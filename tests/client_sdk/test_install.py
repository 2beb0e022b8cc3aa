"""A plain `pip install .` gives a working SDK without any of the server's dependencies, and
a `pns-server` that says so in one line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

CHECK = textwrap.dedent(
    """
    import importlib.util, sys

    server_deps = ["fastapi", "sqlalchemy", "pydantic", "uvicorn", "alembic", "asyncpg"]
    present = [name for name in server_deps if importlib.util.find_spec(name) is not None]
    assert not present, f"server dependencies installed: {present}"

    import client_sdk
    from client_sdk import AsyncPnsClient, DeviceClient, KeyStore, PnsClient, PnsError

    assert client_sdk.__file__.startswith(sys.prefix), client_sdk.__file__
    loaded = [name for name in server_deps if name in sys.modules]
    assert not loaded, f"importing client_sdk loaded {loaded}"
    with PnsClient("http://127.0.0.1:9", token="t", key_store=KeyStore()) as client:
        assert client.base_url == "http://127.0.0.1:9"
    AsyncPnsClient("http://127.0.0.1:9")
    device = DeviceClient("http://127.0.0.1:9")
    assert device.public_key and device.to_state()["private_key_pem"].startswith("-----BEGIN")
    try:
        PnsClient("http://127.0.0.1:9", retries=0).ping()
    except PnsError as exc:
        print("refused as", type(exc).__name__)
    print("sdk ok", len(client_sdk.__all__))
    """
)


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.slow
def test_sdk_installs_and_imports_without_server_dependencies(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    created = run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    python = venv / "bin" / "python"

    installed = run(
        python,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        REPO_ROOT,
        cwd=tmp_path,
    )
    assert installed.returncode == 0, installed.stderr

    # -I: isolated mode, so the source tree is not on sys.path; only the installed copy counts.
    checked = run(python, "-I", "-c", CHECK, cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "sdk ok" in checked.stdout
    assert "refused as ConnectError" in checked.stdout

    # The wheel's `pns-server` script is there too: it must say what is missing, not crash.
    for args in (["serve"], ["--version"]):
        server = run(venv / "bin" / "pns-server", *args, cwd=tmp_path)
        assert server.returncode == 2, server.stdout + server.stderr
        assert server.stdout == ""
        [line] = server.stderr.splitlines()
        assert line.startswith("pns-server: only the SDK of pns-relay is installed here")
        assert "[server]" in line and "Traceback" not in line
