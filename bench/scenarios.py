"""The five benchmark scenarios. Each returns rows for its table and result file."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.harness import (
    Databases,
    Party,
    approve,
    bounded,
    create_approval,
    http_client,
    new_parties,
    new_party,
    percentiles,
    providers,
    relays,
    rss_kib,
    signed_answer,
    wait_until_final,
)


@dataclass(frozen=True)
class Size:
    """How big one run is; `quick` for `make bench`, `full` for `make bench-full`."""

    decisions: int
    round_trips_serial: int
    round_trip_seconds: float
    concurrencies: tuple[int, ...]
    waits: int
    wait_parties: int
    push_parties: int
    push_phones: int
    push_rounds: int
    otp_parties: int


QUICK = Size(200, 100, 6.0, (8, 32), 2000, 20, 20, 25, 2, 300)
FULL = Size(1000, 300, 20.0, (4, 16, 32, 64), 10000, 100, 40, 50, 4, 2000)


# -- 1. decision latency --------------------------------------------------------------------
async def decision_latency(
    dbs: Databases, kind: str, tmp: Path, size: Size
) -> list[dict[str, Any]]:
    rows = []
    layouts = [1, 2] if kind == "postgres" else [1]
    for processes in layouts:
        url = await dbs.fresh(kind)
        with relays(url, tmp, processes) as servers:
            async with (
                http_client(servers[0].url) as waiter,
                http_client(servers[-1].url) as phone_side,
            ):
                party = await new_party(waiter, phones=1, push="none")
                phone = party.phones[0]
                samples: list[float] = []
                answer_calls: list[float] = []
                for _ in range(size.decisions):
                    created = await create_approval(waiter, party)
                    approval_id = created["approval_id"]
                    poll = asyncio.create_task(
                        waiter.get(
                            f"/v1/approvals/{approval_id}",
                            params={"wait": 30},
                            headers=party.client.headers,
                        )
                    )
                    await asyncio.sleep(0.02)  # let the long-poll reach its wait
                    body = signed_answer(phone, approval_id, created["match_code"])
                    started = time.perf_counter()
                    answered = await phone_side.post(
                        f"/v1/device/approvals/{approval_id}/response",
                        json=body,
                        headers=phone.headers,
                    )
                    answer_calls.append(time.perf_counter() - started)
                    answered.raise_for_status()
                    result = await poll
                    samples.append(time.perf_counter() - started)
                    assert result.json()["status"] == "approved", result.text
        stats = percentiles(samples)
        rows.append(
            {
                "database": kind,
                "processes": processes,
                "samples": stats["n"],
                "p50_ms": stats["p50_ms"],
                "p95_ms": stats["p95_ms"],
                "p99_ms": stats["p99_ms"],
                "max_ms": stats["max_ms"],
                "answer_call_p50_ms": percentiles(answer_calls)["p50_ms"],
            }
        )
    return rows


# -- 2. full round trip ---------------------------------------------------------------------
async def one_round_trip(http: httpx.AsyncClient, party: Party, apns: Any) -> float:
    started = time.perf_counter()
    created = await create_approval(http, party)
    approval_id = created["approval_id"]
    arrived = apns.arrived[approval_id]
    final = asyncio.create_task(wait_until_final(http, party, approval_id))
    await asyncio.wait_for(arrived.wait(), 60)
    phone = party.phones[0]
    details = await http.get(f"/v1/device/approvals/{approval_id}", headers=phone.headers)
    details.raise_for_status()
    await approve(http, phone, approval_id, created["match_code"])
    state = await final
    assert state["status"] == "approved", state
    apns.arrived.pop(approval_id, None)
    return time.perf_counter() - started


async def round_trip(dbs: Databases, kind: str, tmp: Path, size: Size) -> list[dict[str, Any]]:
    url = await dbs.fresh(kind)
    rows: list[dict[str, Any]] = []
    async with providers(tmp) as fakes:
        with relays(url, tmp, 1, **fakes.env) as [server]:
            async with http_client(server.url, 400) as http:
                parties = await new_parties(http, max(size.concurrencies), 1, "apns")
                serial = [
                    await one_round_trip(http, parties[0], fakes.apns)
                    for _ in range(size.round_trips_serial)
                ]
                stats = percentiles(serial)
                rows.append(
                    {
                        "database": kind,
                        "processes": 1,
                        "concurrency": 1,
                        "round_trips": stats["n"],
                        "p50_ms": stats["p50_ms"],
                        "p99_ms": stats["p99_ms"],
                        "per_second": round(len(serial) / sum(serial), 1),
                    }
                )
                for concurrency in size.concurrencies:
                    rows.append(
                        await sustained([http], parties[:concurrency], fakes.apns, size, kind)
                    )
    if kind == "postgres":
        rows.append(await scaled_out(await dbs.fresh(kind), tmp, size))
    return rows


async def scaled_out(url: str, tmp: Path, size: Size) -> dict[str, Any]:
    """The same load spread over two relay processes sharing PostgreSQL (one per core)."""
    async with providers(tmp) as fakes:
        with relays(url, tmp, 2, **fakes.env) as servers:
            async with (
                http_client(servers[0].url, 400) as first,
                http_client(servers[1].url, 400) as second,
            ):
                parties = await new_parties(first, max(size.concurrencies), 1, "apns")
                return await sustained([first, second], parties, fakes.apns, size, "postgres")


async def sustained(
    relays_http: list[httpx.AsyncClient], parties: list[Party], apns: Any, size: Size, kind: str
) -> dict[str, Any]:
    """Each party loops round trips for the scenario's time, parties spread over the relays."""
    samples: list[float] = []
    stop_at = time.monotonic() + size.round_trip_seconds

    async def client_loop(index: int, party: Party) -> None:
        http = relays_http[index % len(relays_http)]
        while time.monotonic() < stop_at:
            samples.append(await one_round_trip(http, party, apns))

    started = time.perf_counter()
    await asyncio.gather(*(client_loop(i, p) for i, p in enumerate(parties)))
    elapsed = time.perf_counter() - started
    stats = percentiles(samples)
    return {
        "database": kind,
        "processes": len(relays_http),
        "concurrency": len(parties),
        "round_trips": stats["n"],
        "p50_ms": stats["p50_ms"],
        "p99_ms": stats["p99_ms"],
        "per_second": round(len(samples) / elapsed, 1),
    }


# -- 3. long-poll capacity ------------------------------------------------------------------
class RawWait:
    """One client's long-poll on its own keep-alive socket, asked again whenever it returns
    still pending (the API caps a wait at 60 s, so a 10,000-wait ramp outlasts the first
    waits, as real clients do). Thousands of these are cheap for the generator."""

    def __init__(self, port: int, path: str, token: str) -> None:
        self.port, self.path, self.token = port, path, token
        self.writer: asyncio.StreamWriter | None = None
        self.final: asyncio.Task[float] | None = None
        self.asked = 0

    async def open(self) -> None:
        reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._ask()
        await self.writer.drain()
        self.final = asyncio.create_task(self._until_final(reader))

    def _ask(self) -> None:
        assert self.writer is not None
        self.asked += 1
        self.writer.write(
            f"GET {self.path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {self.token}\r\n"
            "\r\n".encode()
        )

    async def _until_final(self, reader: asyncio.StreamReader) -> float:
        """The moment an answer that is no longer pending arrived."""
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"content-length: *(\d+)", head, re.I)
            body = await reader.readexactly(int(length.group(1)) if length else 0)
            if b'"pending"' not in body:
                return time.perf_counter()
            self._ask()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def waiters_now(http: httpx.AsyncClient) -> int:
    text = (await http.get("/metrics")).text
    found = re.search(r"^pns_longpoll_waiters (\S+)$", text, re.M)
    return int(float(found.group(1))) if found else 0


async def until_waiting(http: httpx.AsyncClient, count: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    seen = await waiters_now(http)
    while seen < count and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        seen = await waiters_now(http)
    return seen


async def longpoll_capacity(
    dbs: Databases, kind: str, tmp: Path, size: Size
) -> list[dict[str, Any]]:
    url = await dbs.fresh(kind)
    waits: list[RawWait] = []
    with relays(url, tmp, 1) as [server]:
        assert server.process is not None
        pid = server.process.pid
        async with http_client(server.url) as http:
            parties = await new_parties(http, size.wait_parties, 1, "none")
            approvals = [await create_approval(http, p, ttl_seconds=300) for p in parties]
            rss_before = rss_kib(pid)
            ramp_started = time.perf_counter()
            batch = 250
            try:
                for start in range(0, size.waits, batch):
                    for index in range(start, min(start + batch, size.waits)):
                        slot = index % len(parties)
                        wait = RawWait(
                            server.port,
                            f"/v1/approvals/{approvals[slot]['approval_id']}?wait=60",
                            parties[slot].client.token,
                        )
                        waits.append(wait)
                    await asyncio.gather(*(w.open() for w in waits[start:]))
                    await until_waiting(http, len(waits), 30)
                ramp = time.perf_counter() - ramp_started
                held = await waiters_now(http)
                rss_after = rss_kib(pid)
                started = time.perf_counter()
                await asyncio.gather(
                    *(
                        approve(http, p.phones[0], a["approval_id"], a["match_code"])
                        for p, a in zip(parties, approvals, strict=True)
                    )
                )
                woken = await asyncio.wait_for(
                    asyncio.gather(*(w.final for w in waits if w.final)), 120
                )
                wake_all = max(woken) - started
                repolls = sum(w.asked for w in waits) - len(waits)
            finally:
                for wait in waits:
                    wait.close()
    per_thousand = (rss_after - rss_before) / max(held, 1) * 1000 / 1024
    return [
        {
            "database": kind,
            "waits_asked": size.waits,
            "waits_held": held,
            "ramp_s": round(ramp, 1),
            "rss_before_mb": round(rss_before / 1024, 1),
            "rss_held_mb": round(rss_after / 1024, 1),
            "mb_per_1000_waits": round(per_thousand, 1),
            "wake_all_ms": round(wake_all * 1000, 1),
            "repolls_during_run": repolls,
        }
    ]


# -- 4. push dispatch -----------------------------------------------------------------------
async def push_dispatch(dbs: Databases, kind: str, tmp: Path, size: Size) -> list[dict[str, Any]]:
    rows = []
    for service in ("apns", "fcm"):
        url = await dbs.fresh(kind)
        async with providers(tmp) as fakes:
            with relays(url, tmp, 1, **fakes.env) as [server]:
                async with http_client(server.url) as http:
                    parties = await new_parties(http, size.push_parties, size.push_phones, service)

                    def received(service: str = service) -> int:
                        if service == "apns":
                            return len(fakes.apns.received)
                        return len(fakes.fcm.state.received)

                    per_round = size.push_parties * size.push_phones
                    rates = []
                    for round_number in range(1, size.push_rounds + 1):
                        before = received()
                        started = time.perf_counter()
                        await asyncio.gather(*(create_approval(http, p) for p in parties))
                        deadline = time.monotonic() + 120
                        while received() < before + per_round and time.monotonic() < deadline:
                            await asyncio.sleep(0.005)
                        elapsed = time.perf_counter() - started
                        got = received() - before
                        rates.append(got / elapsed)
                        assert got >= per_round, f"round {round_number}: {got} of {per_round}"
        rows.append(
            {
                "database": kind,
                "provider": service,
                "pushes_per_round": per_round,
                "rounds": size.push_rounds,
                "pushes_per_s_best": round(max(rates), 1),
                "pushes_per_s_mean": round(sum(rates) / len(rates), 1),
            }
        )
    return rows


# -- 5. OTP verification --------------------------------------------------------------------
async def otp_rate(dbs: Databases, kind: str, tmp: Path, size: Size) -> list[dict[str, Any]]:
    url = await dbs.fresh(kind)
    with relays(url, tmp, 1) as [server]:
        async with http_client(server.url) as http:
            parties = await new_parties(http, size.otp_parties, 1, "none")
            samples: list[float] = []
            refused = 0

            async def verify(index: int) -> None:
                nonlocal refused
                party = parties[index]
                started = time.perf_counter()
                response = await http.post(
                    "/v1/otp/verify",
                    json={"code": party.phones[0].otp()},
                    headers=party.client.headers,
                )
                samples.append(time.perf_counter() - started)
                if response.status_code != 200:
                    refused += 1

            started = time.perf_counter()
            done = await bounded(len(parties), 32, verify, time_limit=120)
            elapsed = time.perf_counter() - started
    stats = percentiles(samples)
    return [
        {
            "database": kind,
            "verifications": done,
            "refused": refused,
            "concurrency": 32,
            "per_second": round(done / elapsed, 1),
            "p50_ms": stats["p50_ms"],
            "p99_ms": stats["p99_ms"],
        }
    ]


SCENARIOS = {
    "decision_latency": decision_latency,
    "round_trip": round_trip,
    "longpoll_capacity": longpoll_capacity,
    "push_dispatch": push_dispatch,
    "otp": otp_rate,
}
