"""The CLIs against a real relay process. Their behaviour does not depend on the database,
so one relay on SQLite serves a whole module (each test registers its own installation):
starting a server per test would cost seconds each."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from client_sdk.cli import client as client_cli
from client_sdk.cli import device as device_cli
from tests.conftest import server_env
from tests.support.server import LiveServer


@pytest.fixture(scope="module")
def relay(sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data_dir = tmp_path_factory.mktemp("relay")
    database = data_dir / "pns.db"
    shutil.copyfile(sqlite_template, database)
    env = server_env(f"sqlite:///{database}", data_dir, PNS_RATE_REGISTER_PER_HOUR="1000")
    with LiveServer(env, data_dir / "server.log") as server:
        yield server


@dataclass
class Cli:
    server: LiveServer
    config_home: Path
    capsys: pytest.CaptureFixture[str]

    def client(self, *argv: str) -> tuple[int, Any]:
        return self._run(client_cli.main, argv)

    def device(self, *argv: str) -> tuple[int, Any]:
        return self._run(device_cli.main, argv)

    def _run(self, main: Any, argv: tuple[str, ...]) -> tuple[int, Any]:
        self.capsys.readouterr()
        code = main(["--json", *argv])
        out = self.capsys.readouterr().out
        return code, json.loads(out)

    def spawn(self, module: str, *argv: str, **kwargs: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", module, *argv],
            env={**os.environ, "XDG_CONFIG_HOME": str(self.config_home)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kwargs,
        )

    def pair_phone(self) -> str:
        code, pairing = self.client("pair", "--no-wait")
        assert code == 0
        code, paired = self.device("pair", pairing["qr_payload"], "--name", "Test phone")
        assert code == 0
        return str(paired["device_id"])


@pytest.fixture
def cli(
    relay: LiveServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Iterator[Cli]:
    home = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    monkeypatch.delenv("PNS_SERVER", raising=False)
    monkeypatch.delenv("PNS_CLIENT_TOKEN", raising=False)
    yield Cli(relay, home, capsys)


@pytest.fixture
def registered(cli: Cli) -> Cli:
    code, body = cli.client("--server", cli.server.url, "register", "--name", "FILESRV01")
    assert code == 0, body
    return cli
