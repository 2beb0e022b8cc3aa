"""What every scenario needs: databases, relay processes, fake push providers, the simulated
parties (backup clients and phones), CPU accounting, statistics and the result files.

The relay always runs as real `pns-server serve` subprocesses; the fake APNs, the fake FCM
and the simulated phones each run in a helper process of their own (`bench.procs`); this
process is the load generator (httpx async, plus raw sockets where thousands of connections
are needed). Every measured phase reports the CPU seconds each of these processes used."""

from __future__ import annotations

import asyncio
import contextlib
import gc
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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from cryptography.hazmat.primitives import serialization

from bench.rawhttp import RawRelay
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
def in_turn_order(sides: list[Any], turn: int) -> list[Any]:
    """The sides of a comparison in the order they go in `turn`: this tree first in even
    turns, last in odd ones. Whoever goes first in a turn was measured to do worse under
    load on PostgreSQL (OTP at concurrency 20 and 32), so neither side always does."""
    return sides if turn % 2 == 0 else sides[::-1]


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

    def postgres_pid(self, kind: str) -> int | None:
        """The postmaster, whose children are the backends serving the relays."""
        if kind != "postgres" or self.cluster is None:
            return None
        return int((self.cluster.root / "data" / "postmaster.pid").read_text().split()[0])

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.destroy()


# -- helper processes -----------------------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent


class Helper:
    """One helper process of `bench.procs` (fake APNs, fake FCM or the phones), driven over
    its stdin/stdout with one JSON object per line."""

    def __init__(self, role: str, tmp: Path, *args: str) -> None:
        self.role, self.tmp, self.args = role, tmp, args
        self.process: asyncio.subprocess.Process | None = None
        self.ready: dict[str, Any] = {}
        self._lock = asyncio.Lock()
        self._next_id = 0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self) -> Helper:
        log = open(self.tmp / f"{self.role}.log", "ab")  # noqa: SIM115 - the child owns it
        with log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.procs",
                self.role,
                str(self.tmp),
                *self.args,
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                limit=2**24,
            )
        self.ready = (await self._line())["ready"]
        return self

    async def _line(self) -> dict[str, Any]:
        assert self.process is not None and self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 180)
        if not line:
            raise RuntimeError(f"bench helper {self.role} exited; see {self.role}.log")
        result: dict[str, Any] = json.loads(line)
        return result

    def tell(self, **request: Any) -> None:
        """A message that needs no answer (a typed match code)."""
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(json.dumps(request).encode() + b"\n")

    async def ask(self, **request: Any) -> dict[str, Any]:
        assert self.process is not None and self.process.stdin is not None
        async with self._lock:
            self._next_id += 1
            self.process.stdin.write(json.dumps({**request, "id": self._next_id}).encode() + b"\n")
            await self.process.stdin.drain()
            while True:
                reply = await self._line()
                if reply.get("id") == self._next_id:
                    return reply

    async def close(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


@dataclass
class Providers:
    apns: Helper
    fcm: Helper
    env: dict[str, str]


@contextlib.asynccontextmanager
async def providers(tmp: Path) -> AsyncIterator[Providers]:
    """The fake APNs and FCM, each in a process of its own."""
    apns, fcm = Helper("apns", tmp), Helper("fcm", tmp)
    try:
        await asyncio.gather(apns.start(), fcm.start())
        bundle = tmp / "push-ca.pem"
        bundle.write_text(
            Path(apns.ready["ca_file"]).read_text() + Path(fcm.ready["ca_file"]).read_text()
        )
        env = {**apns.ready["env"], **fcm.ready["env"], "PNS_PUSH_CA_FILE": str(bundle)}
        yield Providers(apns, fcm, env)
    finally:
        await asyncio.gather(apns.close(), fcm.close())


@contextlib.asynccontextmanager
async def phones(
    tmp: Path, relay_url: str, fakes: Providers, parties: list[Party]
) -> AsyncIterator[Helper]:
    """The parties' phones in a process of their own, listening to the fake APNs."""
    helper = Helper("phones", tmp, relay_url, str(fakes.apns.ready["device_channel"]))
    try:
        await helper.start()
        records = [
            {
                "device_id": phone.device_id,
                "token": phone.token,
                "push_token": phone.body["push_token"],
                "key_pem": phone.private_key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ).decode(),
            }
            for party in parties
            for phone in party.phones
        ]
        await helper.ask(op="load", phones=records)
        yield helper
    finally:
        await helper.close()


# -- CPU accounting -------------------------------------------------------------------------
TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (worker processes, PostgreSQL backends)."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                found += process_tree(int(child))
    return found


def cpu_seconds(pid: int, tree: bool = True) -> float:
    """User + system CPU of one process, from /proc/<pid>/stat. With `tree`, also of its
    live descendants and of the children they already reaped (cutime/cstime: PostgreSQL
    backends that ended, relay workers that were replaced)."""
    total = 0
    for member in process_tree(pid) if tree else [pid]:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{member}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
            if tree:
                total += int(fields[13]) + int(fields[14])  # cutime, cstime
    return total / TICKS


class CpuMeter:
    """CPU seconds each process (with its children) used during a measured phase, so a
    reader sees which of relay, database, fakes, phones and load generator was the limit.

    The load generator's own garbage collector is paused for the phase, as `timeit` does:
    with thousands of parties in its memory one of its full collections takes 50-80 ms, and
    would count as the relay's latency. The relay's collections are not touched."""

    def __init__(self, **pids: int | None) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid is not None}
        self.pids["load_generator"] = os.getpid()
        self.started: dict[str, float] = {}
        self.wall_started = 0.0
        self.used: dict[str, float] = {}
        self.collecting = True

    def __enter__(self) -> CpuMeter:
        self.collecting = gc.isenabled()
        gc.disable()
        self.started = {name: self._cpu(name, pid) for name, pid in self.pids.items()}
        self.wall_started = time.perf_counter()
        return self

    @staticmethod
    def _cpu(name: str, pid: int) -> float:
        # The load generator's children are the relays and helpers, counted on their own.
        return cpu_seconds(pid, tree=name != "load_generator")

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.wall_started
        self.used = {
            f"cpu_{name}_s": round(self._cpu(name, pid) - self.started[name], 2)
            for name, pid in self.pids.items()
        }
        self.used["wall_s"] = round(wall, 2)
        if self.collecting:
            gc.enable()

    def per(self, count: int, unit: str) -> dict[str, float]:
        """CPU milliseconds per unit of work: the relay's, and every process's together.
        On a busy shared machine these are steadier than rates: a process's CPU time does
        not grow while it waits for a core."""
        relay = self.used.get("cpu_relay_s", 0.0)
        everyone = sum(v for k, v in self.used.items() if k.startswith("cpu_"))
        return {
            f"relay_cpu_ms_per_{unit}": round(1000 * relay / max(count, 1), 2),
            f"all_cpu_ms_per_{unit}": round(1000 * everyone / max(count, 1), 2),
        }


# -- relays ---------------------------------------------------------------------------------
class RelayFrom(LiveServer):
    """A relay run from another checkout of the project (`bench.run --compare DIR`): its
    process starts in DIR, so `python -m pns_server.cli` imports DIR's code."""

    def __init__(self, source: Path, env: dict[str, str], log_path: Path) -> None:
        super().__init__(env, log_path)
        self.source = source

    def start(self, timeout: float = 30.0) -> LiveServer:
        here = Path.cwd()
        os.chdir(self.source)  # the child inherits it; the bench's own imports are done
        try:
            return super().start(timeout)
        finally:
            os.chdir(here)


@contextlib.contextmanager
def relays(
    database_url: str,
    tmp: Path,
    count: int = 1,
    workers: int = 1,
    source: Path | None = None,
    **extra: str,
) -> Iterator[list[LiveServer]]:
    """`count` relay processes on one database; the first migrates it before the others start.
    `workers` > 1 runs each as `pns-server serve` with PNS_WORKERS (one port, N processes).
    `source`: run the relay code of that checkout instead of this one."""
    env = {
        "PNS_WORKERS": str(workers),
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
            log = tmp / f"relay-{index}-{uuid.uuid4().hex[:6]}.log"
            server = LiveServer(env, log) if source is None else RelayFrom(source, env, log)
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
# Set by `bench.run --compare DIR`: route_cost also measures the relay of that checkout,
# phase for phase in turn with this one, so both see the same machine load.
COMPARE_WITH: Path | None = None


def start_profiler(server: LiveServer, name: str = "relay") -> subprocess.Popen[bytes]:
    assert PROFILE_DIR is not None and server.process is not None
    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
    output = PROFILE_DIR / f"{slug}-{server.process.pid}.txt"
    py_spy = Path(sys.executable).with_name("py-spy")
    command = [str(py_spy), "record", "--pid", str(server.process.pid), "--format", "raw"]
    command.append("--subprocesses")  # `--workers N`: the relay processes are its children
    return subprocess.Popen(
        [*command, "--rate", "200", "--nonblocking", "--output", str(output)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@contextlib.asynccontextmanager
async def profiled(server: LiveServer, name: str, wanted: bool = True) -> AsyncIterator[None]:
    """py-spy on `server` for this block alone, when `bench.run --profile DIR` asked for it
    (and `wanted`): a phase's profile without the set-up around it."""
    if PROFILE_DIR is None or not wanted:
        yield
        return
    profiler = start_profiler(server, name)
    await asyncio.sleep(1.0)  # py-spy attaches before the block's work starts
    try:
        yield
    finally:
        stop_profiler(profiler)


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
    return PairedDevice(
        data["device_id"],
        data["device_token"],
        data["totp"]["secret"],
        key,
        {"push_token": block["token"] if block else None},
    )


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


async def create_login(relay: RawRelay, party: Party) -> dict[str, Any]:
    """`create_approval` over the load generator's raw connections."""
    body: dict[str, Any] = await relay.post_json(
        "/v1/approvals", {**LOGIN, "ttl_seconds": 60}, party.client.headers
    )
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
    """What the SDK's `login()` without `on_progress` does: long-poll, asking the relay to
    answer only with the decision or once every push failed (`until=final_or_failed`; a
    relay that predates it answers push outcomes too, and this polls again)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        response = await http.get(
            f"/v1/approvals/{approval_id}",
            params={"wait": wait, "until": "final_or_failed"},
            headers=party.client.headers,
        )
        response.raise_for_status()
        state: dict[str, Any] = response.json()
        if login_over(state):
            return state
    raise TimeoutError(approval_id)


async def wait_until_decided(
    relay: RawRelay, party: Party, approval_id: str, wait: int = 30
) -> dict[str, Any]:
    """`wait_until_final` over the load generator's raw connections."""
    path = f"/v1/approvals/{approval_id}?wait={wait}&until=final_or_failed"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state: dict[str, Any] = await relay.get_json(path, party.client.headers)
        if login_over(state):
            return state
    raise TimeoutError(approval_id)


def login_over(state: dict[str, Any]) -> bool:
    """Where the SDK's login stops long-polling: a decision, or every push failed."""
    return state["status"] != "pending" or all_failed(state["delivery"])


def all_failed(delivery: dict[str, Any]) -> bool:
    """The SDK's `Delivery.all_failed`: where its login gives up on push."""
    return bool(delivery["failed"] > 0 and delivery["queued"] == 0 and delivery["sent"] == 0)
