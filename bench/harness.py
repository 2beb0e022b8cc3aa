"""What every scenario needs: databases, relay processes, fake push providers, the simulated
parties (backup clients and phones), statistics and the result files.

The relay always runs as real `pns-server serve` subprocesses; this process is the load
generator (httpx async, plus raw sockets where thousands of connections are needed) and
hosts the fake APNs and FCM, so it is never the process being measured."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import resource
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from tests.fakes.apns import FakeApns, Received
from tests.fakes.fcm import FakeFcm
from tests.fakes.tls import CertificateAuthority
from tests.support.factories import (
    PairedDevice,
    RegisteredClient,
    new_key,
    pairing_token_from,
    public_key_b64,
)
from tests.support.postgres import Cluster, postgres_available, start_cluster
from tests.support.server import LiveServer

RESULTS = Path(__file__).parent / "results"
SECRET_KEY = "bench-secret-key-0123456789abcdef"
ADMIN_TOKEN = "bench-admin-token-0123456789abcdefgh"
LOGIN = {"username": "admin", "hostname": "FILESRV01", "ip": "203.0.113.7", "action": "login"}
HUGE = str(10**9)

# The relay's abuse limits are per client / per IP; one load generator on 127.0.0.1 plays
# thousands of clients and phones, so they are raised out of the way.
LIMITS = {
    "PNS_RATE_CLIENT_PER_MINUTE": HUGE,
    "PNS_RATE_REGISTER_PER_HOUR": HUGE,
    "PNS_RATE_PAIRING_PER_MINUTE": HUGE,
    "PNS_APPROVAL_RATE_PER_MINUTE": HUGE,
    "PNS_MAX_PUSHES_WITHOUT_SUCCESS": HUGE,
}


def raise_open_files_limit() -> int:
    """Lift the soft limit to the hard one; children (the relays) inherit it."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# -- statistics and output ------------------------------------------------------------------
def percentiles(samples_s: list[float]) -> dict[str, float]:
    """p50/p95/p99/max in milliseconds."""
    if not samples_s:
        return {"n": 0}
    ordered = sorted(samples_s)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {
        "n": len(ordered),
        "p50_ms": at(0.50),
        "p95_ms": at(0.95),
        "p99_ms": at(0.99),
        "max_ms": round(ordered[-1] * 1000, 2),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 2),
    }


def table(title: str, rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    out = [f"\n== {title}", line, "-" * len(line)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(out)


def write_result(name: str, parameters: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(
        json.dumps(
            {
                "scenario": name,
                "machine": {
                    "cores": os.cpu_count(),
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                },
                "parameters": parameters,
                "results": rows,
                "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            indent=2,
        )
    )
    return path


async def bounded(
    count: int, concurrency: int, job: Callable[[int], Awaitable[None]], time_limit: float
) -> int:
    """Run job(0..count-1) with at most `concurrency` at once, stopping at `time_limit` s.
    Returns how many finished."""
    done = 0
    next_index = 0
    deadline = time.monotonic() + time_limit

    async def worker() -> None:
        nonlocal done, next_index
        while next_index < count and time.monotonic() < deadline:
            index = next_index
            next_index += 1
            await job(index)
            done += 1

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), time_limit + 60)
    return done


# -- databases ------------------------------------------------------------------------------
class Databases:
    """SQLite files in a temp dir; PostgreSQL in a throwaway cluster started on demand."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="pns-bench-"))
        self.cluster: Cluster | None = None

    def kinds(self, wanted: Iterable[str]) -> list[str]:
        kinds = [k for k in wanted if k != "postgres" or postgres_available()]
        missing = set(wanted) - set(kinds)
        if missing:
            print(f"(skipping {', '.join(missing)}: not installed here)")
        return kinds

    async def fresh(self, kind: str) -> str:
        if kind == "sqlite":
            return f"sqlite:///{self.tmp / (uuid.uuid4().hex + '.db')}"
        if self.cluster is None:
            self.cluster = await asyncio.to_thread(start_cluster)
        name = "b_" + uuid.uuid4().hex[:12]
        conn = await asyncpg.connect(self.cluster.database_url("postgres"))
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.cluster.database_url(name)

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.destroy()


# -- fake providers -------------------------------------------------------------------------
class TappedApns(FakeApns):
    """The fake APNs, plus an event per approval id so a simulated phone reacts to the push."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.arrived: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.first_at: float | None = None
        self.last_at: float = 0.0

    async def _record(self, item: Received) -> None:
        now = time.monotonic()
        self.first_at = self.first_at or now
        self.last_at = now
        self.received.append(item)
        with contextlib.suppress(ValueError, KeyError):
            self.arrived[item.payload["approval_id"]].set()


@dataclass
class Providers:
    apns: TappedApns
    fcm: FakeFcm
    env: dict[str, str]


@contextlib.asynccontextmanager
async def providers(tmp: Path) -> AsyncIterator[Providers]:
    ca = CertificateAuthority()
    async with TappedApns(ca=ca, max_concurrent_streams=1000) as apns:
        with FakeFcm(ca=ca) as fcm:
            env = {
                "PNS_APNS_KEY_FILE": str(apns.write_key(tmp / "AuthKey.p8")),
                "PNS_APNS_KEY_ID": apns.key_id,
                "PNS_APNS_TEAM_ID": apns.team_id,
                "PNS_APNS_TOPIC": apns.topic,
                "PNS_APNS_URL": apns.url,
                "PNS_APNS_SANDBOX_URL": apns.url,
                "PNS_FCM_CREDENTIALS_FILE": str(fcm.write_credentials(tmp / "sa.json")),
                "PNS_FCM_URL": fcm.url,
                "PNS_PUSH_CA_FILE": str(ca.write_ca(tmp / "push-ca.pem")),
            }
            yield Providers(apns, fcm, env)


# -- relays ---------------------------------------------------------------------------------
@contextlib.contextmanager
def relays(
    database_url: str, tmp: Path, count: int = 1, **extra: str
) -> Iterator[list[LiveServer]]:
    """`count` relay processes on one database; the first migrates it before the others start."""
    env = {
        "PNS_DATABASE_URL": database_url,
        "PNS_DATA_DIR": str(tmp),
        "PNS_SECRET_KEY": SECRET_KEY,
        "PNS_ADMIN_TOKEN": ADMIN_TOKEN,
        "PNS_LOG_LEVEL": "warning",
        **LIMITS,
        **extra,
    }
    servers: list[LiveServer] = []
    profilers: list[subprocess.Popen[bytes]] = []
    try:
        for index in range(count):
            server = LiveServer(env, tmp / f"relay-{index}-{uuid.uuid4().hex[:6]}.log")
            servers.append(server)
            server.start(timeout=60)
        if PROFILE_DIR is not None:
            profilers.append(start_profiler(servers[0]))
        yield servers
    finally:
        for profiler in profilers:
            stop_profiler(profiler)
        for server in servers:
            server.stop()


# Set by `bench.run --profile DIR`: py-spy samples the first relay of every scenario.
PROFILE_DIR: Path | None = None


def start_profiler(server: LiveServer) -> subprocess.Popen[bytes]:
    assert PROFILE_DIR is not None and server.process is not None
    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    output = PROFILE_DIR / f"relay-{server.process.pid}.txt"
    py_spy = Path(sys.executable).with_name("py-spy")
    command = [str(py_spy), "record", "--pid", str(server.process.pid), "--format", "raw"]
    return subprocess.Popen(
        [*command, "--rate", "200", "--nonblocking", "--output", str(output)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_profiler(profiler: subprocess.Popen[bytes]) -> None:
    """py-spy writes its output on SIGINT."""
    profiler.send_signal(signal.SIGINT)
    try:
        profiler.wait(30)
    except subprocess.TimeoutExpired:
        profiler.kill()
        profiler.wait()


def http_client(base_url: str, connections: int = 200) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(90.0),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )


# -- the simulated parties ------------------------------------------------------------------
@dataclass
class Party:
    """One backup client and its phones."""

    client: RegisteredClient
    phones: list[PairedDevice] = field(default_factory=list)


def push_block(kind: str) -> dict[str, Any] | None:
    if kind == "apns":
        return {"service": "apns", "token": secrets.token_hex(32), "environment": "production"}
    if kind == "fcm":
        return {"service": "fcm", "token": "fcm-" + secrets.token_urlsafe(120)}
    return None


async def new_party(http: httpx.AsyncClient, phones: int = 1, push: str = "none") -> Party:
    created = await http.post("/v1/clients", json={"name": "BENCH", "edition": "pro"})
    created.raise_for_status()
    body = created.json()
    party = Party(RegisteredClient(body["client_id"], body["client_token"]))
    for _ in range(phones):
        party.phones.append(await pair_phone(http, party.client, push))
    return party


async def pair_phone(http: httpx.AsyncClient, client: RegisteredClient, push: str) -> PairedDevice:
    started = await http.post("/v1/pairings", json={"kind": "app"}, headers=client.headers)
    started.raise_for_status()
    key = new_key()
    android = push == "fcm"
    body: dict[str, Any] = {
        "pairing_token": pairing_token_from(started.json()["qr_payload"]),
        "name": "Bench phone",
        "platform": "android" if android else "ios",
        "os_version": "14" if android else "17.2",
        "app_version": "4.3.0",
        "public_key": public_key_b64(key),
    }
    block = push_block(push)
    if block is not None:
        body["push"] = block
    created = await http.post("/v1/devices", json=body)
    created.raise_for_status()
    data = created.json()
    return PairedDevice(data["device_id"], data["device_token"], data["totp"]["secret"], key)


async def new_parties(
    http: httpx.AsyncClient, count: int, phones: int = 1, push: str = "none"
) -> list[Party]:
    parties: list[Party] = []

    async def make(_index: int) -> None:
        parties.append(await new_party(http, phones, push))

    await bounded(count, 32, make, time_limit=600)
    return parties


def signed_answer(phone: PairedDevice, approval_id: str, match_code: str | None) -> dict[str, Any]:
    timestamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    message = f"pns-approval-v1|{approval_id}|approve|{match_code or ''}|{timestamp}"
    return {
        "decision": "approve",
        "match_code": match_code,
        "fraud": False,
        "timestamp": timestamp,
        "signature": phone.sign(message),
    }


async def create_approval(
    http: httpx.AsyncClient, party: Party, ttl_seconds: int = 60
) -> dict[str, Any]:
    body = {**LOGIN, "ttl_seconds": ttl_seconds}
    response = await http.post("/v1/approvals", json=body, headers=party.client.headers)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


async def approve(
    http: httpx.AsyncClient, phone: PairedDevice, approval_id: str, match_code: str | None
) -> None:
    response = await http.post(
        f"/v1/device/approvals/{approval_id}/response",
        json=signed_answer(phone, approval_id, match_code),
        headers=phone.headers,
    )
    response.raise_for_status()


async def wait_until_final(
    http: httpx.AsyncClient, party: Party, approval_id: str, wait: int = 30
) -> dict[str, Any]:
    """What the SDK does: long-poll, and poll again when a delivery update ends the wait."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        response = await http.get(
            f"/v1/approvals/{approval_id}", params={"wait": wait}, headers=party.client.headers
        )
        response.raise_for_status()
        state: dict[str, Any] = response.json()
        if state["status"] != "pending":
            return state
    raise TimeoutError(approval_id)
