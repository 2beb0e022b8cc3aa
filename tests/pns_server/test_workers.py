"""`pns-server serve --workers N`: refused on SQLite, N real processes on PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from pns_server import cli
from pns_server.config import Settings
from tests.conftest import server_env
from tests.pns_server.approvals.helpers import LOGIN, signed_answer
from tests.support.factories import pair_app_device, register_client
from tests.support.server import LiveServer


def run(settings: Settings, *argv: str) -> int:
    args = cli.build_parser().parse_args(list(argv))
    _help, func, _arguments = cli.COMMANDS[args.command]
    return func(settings, args)


class TestRefusedOnSqlite:
    def test_the_flag(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert run(Settings(data_dir=tmp_path), "serve", "--workers", "2") == 2
        err = capsys.readouterr().err
        assert "2 workers need PostgreSQL" in err
        assert "PNS_DATABASE_URL" in err
        assert not (tmp_path / "pns.db").exists()  # refused before touching anything

    def test_the_variable(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("PNS_WORKERS", "3")
        monkeypatch.setenv("PNS_DATA_DIR", str(tmp_path))
        monkeypatch.delenv("PNS_DATABASE_URL", raising=False)
        assert run(cli.load_settings(), "serve") == 2
        assert "3 workers need PostgreSQL" in capsys.readouterr().err

    def test_zero_is_refused(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert run(Settings(data_dir=tmp_path), "serve", "--workers", "0") == 2
        assert "at least 1" in capsys.readouterr().err


def workers_of(server: LiveServer) -> list[int]:
    """The supervisor's worker processes (multiprocessing also starts a resource tracker)."""
    assert server.process is not None
    pids = []
    for task in Path(f"/proc/{server.process.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"spawn_main" in cmdline:
                pids.append(int(child))
    return pids


def connections_held(pid: int, port: int) -> int:
    """Established TCP connections to `port` that process `pid` holds."""
    established = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                established.add(fields[9])
    held = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in established:
            held += 1
    return held


def wait_until_dead(pid: int, timeout: float = 30) -> None:
    """Until the process has exited (gone, or a zombie: its sockets are closed either way)."""
    deadline = time.monotonic() + timeout
    status = Path(f"/proc/{pid}/status")
    while time.monotonic() < deadline:
        try:
            if "\nState:\tZ" in status.read_text():
                return
        except FileNotFoundError:
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still running")


def wait_for_workers(server: LiveServer, count: int, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = workers_of(server)
        if len(pids) == count:
            return pids
        time.sleep(0.1)
    raise TimeoutError(f"workers: {workers_of(server)}")


@pytest.fixture
def two_workers(database_url: str, tmp_path: Path) -> LiveServer:
    env = server_env(database_url, tmp_path, PNS_WORKERS="2", PNS_MIGRATE_ON_START="true")
    return LiveServer(env, tmp_path / "server.log")


@pytest.mark.slow
@pytest.mark.postgres_only
async def test_two_workers_share_one_port_and_wake_each_other(two_workers: LiveServer) -> None:
    server = two_workers.start(timeout=90)
    try:
        first, second = wait_for_workers(server, 2)
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            client = await register_client(http)
            phone = await pair_app_device(http, client)
            approval = (await http.post("/v1/approvals", json=LOGIN, headers=client.headers)).json()
            approval_id = approval["approval_id"]

            # Twenty long-polls, each on a connection of its own: the kernel spreads them
            # over both workers, so the answer below is taken by one and must wake the other.
            waiters = [httpx.AsyncClient(base_url=server.url, timeout=60) for _ in range(20)]
            try:

                async def final(waiter: httpx.AsyncClient) -> str:
                    while True:
                        got = await waiter.get(
                            f"/v1/approvals/{approval_id}?wait=30", headers=client.headers
                        )
                        status: str = got.json()["status"]
                        if status != "pending":
                            return status

                polls = [asyncio.create_task(final(w)) for w in waiters]
                await asyncio.sleep(1.0)
                assert not any(p.done() for p in polls)
                held = [connections_held(pid, server.port) for pid in (first, second)]
                assert sum(held) >= 20 and min(held) >= 1, held

                answered = await http.post(
                    f"/v1/device/approvals/{approval_id}/response",
                    json=signed_answer(phone, approval_id, "approve", approval["match_code"]),
                    headers=phone.headers,
                )
                assert answered.status_code == 200
                statuses = await asyncio.wait_for(asyncio.gather(*polls), 20)
                assert statuses == ["approved"] * 20
            finally:
                for waiter in waiters:
                    await waiter.aclose()

            # A worker that dies is replaced; the relay answers meanwhile.
            os.kill(first, signal.SIGKILL)
            # A connection the kernel hands to the dying worker's own socket in the moment
            # before the process is gone is reset (SO_REUSEPORT: one socket per worker); the
            # claim is that the relay answers from then on, while the worker is replaced.
            await asyncio.to_thread(wait_until_dead, first)
            for _ in range(10):
                async with httpx.AsyncClient(base_url=server.url, timeout=10) as fresh:
                    got = await fresh.get("/v1/client", headers=client.headers)
                    assert got.status_code == 200
            replaced = await asyncio.to_thread(wait_for_workers, server, 2)
            assert first not in replaced and second in replaced
    finally:
        assert server.stop() == 0  # SIGTERM: every worker stops gracefully


@pytest.mark.slow
@pytest.mark.postgres_only
def test_a_worker_that_cannot_start_stops_the_relay(database_url: str, tmp_path: Path) -> None:
    """A failing start (here: an APNs key file that does not exist) is not retried forever:
    the supervisor stops every worker and exits with an error."""
    env = server_env(
        database_url,
        tmp_path,
        PNS_WORKERS="2",
        PNS_APNS_KEY_FILE=str(tmp_path / "missing.p8"),
        PNS_APNS_KEY_ID="KEY1234567",
        PNS_APNS_TEAM_ID="TEAM123456",
        PNS_APNS_TOPIC="com.example.pns",
    )
    server = LiveServer(env, tmp_path / "server.log")
    with pytest.raises(RuntimeError, match="exited early"):
        server.start(timeout=90)
    assert server.stop() == 1
    assert "could not start" in server.log()
