"""The five benchmark scenarios. Each returns rows for its table and result file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench import harness
from bench.harness import (
    CpuMeter,
    Databases,
    Helper,
    Party,
    approve,
    bounded,
    create_approval,
    create_login,
    http_client,
    in_turn_order,
    new_parties,
    new_party,
    percentiles,
    phones,
    profiled,
    providers,
    relays,
    rss_kib,
    signed_answer,
    wait_until_decided,
    wait_until_final,
)
from bench.rawhttp import RawHttp, RawRelay


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
    route_requests: int = 200


QUICK = Size(200, 100, 6.0, (8, 32), 2000, 20, 20, 25, 2, 300)
FULL = Size(1000, 300, 20.0, (4, 16, 32, 64), 10000, 100, 40, 50, 4, 2000, 500)


# -- 1. decision latency --------------------------------------------------------------------
async def decision_latency(
    dbs: Databases, kind: str, tmp: Path, size: Size
) -> list[dict[str, Any]]:
    rows = []
    layouts = [1, 2] if kind == "postgres" else [1]
    for processes in layouts:
        url = await dbs.fresh(kind)
        with relays(url, tmp, processes) as servers:
            async with http_client(servers[0].url) as setup:
                party = await new_party(setup, phones=1, push="none")
                samples: list[float] = []
                answer_calls: list[float] = []
                # Here the load generator plays the phone too: it times the answer itself.
                meter = CpuMeter(
                    relay=servers[0].process.pid if servers[0].process else None,
                    postgres=dbs.postgres_pid(kind),
                )
                raw_waiter, raw_phone = RawRelay(servers[0].port), RawRelay(servers[-1].port)
                # As in the round trips: the first decision of a relay's life prepares its
                # statements, and is reported on its own, not as the steady state's tail.
                cold, _ = await decide_one(raw_waiter, raw_phone, party)
                with meter:
                    await decide_many(size, raw_waiter, raw_phone, party, samples, answer_calls)
                raw_waiter.close()
                raw_phone.close()
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
                "first_ms": round(cold * 1000, 2),
                "answer_call_p50_ms": percentiles(answer_calls)["p50_ms"],
                **meter.per(stats["n"], "decision"),
                **meter.used,
            }
        )
    return rows


async def decide_many(
    size: Size,
    waiter: RawRelay,
    phone_side: RawRelay,
    party: Party,
    samples: list[float],
    answer_calls: list[float],
) -> None:
    for _ in range(size.decisions):
        decided, answered = await decide_one(waiter, phone_side, party)
        samples.append(decided)
        answer_calls.append(answered)


async def decide_one(waiter: RawRelay, phone_side: RawRelay, party: Party) -> tuple[float, float]:
    """A login decided while its long-poll waits: (answer sent -> long-poll returned, the
    answer's own call), in seconds."""
    phone = party.phones[0]
    created = await create_login(waiter, party)
    approval_id = created["approval_id"]
    # As the SDK's login asks.
    poll = asyncio.create_task(
        waiter.get_json(
            f"/v1/approvals/{approval_id}?wait=30&until=final_or_failed",
            party.client.headers,
        )
    )
    await asyncio.sleep(0.02)  # let the long-poll reach its wait
    body = signed_answer(phone, approval_id, created["match_code"])
    started = time.perf_counter()
    await phone_side.post_json(f"/v1/device/approvals/{approval_id}/response", body, phone.headers)
    answered = time.perf_counter() - started
    result = await poll
    decided = time.perf_counter() - started
    assert result["status"] == "approved", result
    return decided, answered


# -- 2. full round trip ---------------------------------------------------------------------
async def one_round_trip(relay: RawRelay, party: Party, phone_process: Helper) -> float:
    """A login as the backup client lives it: create, the user types the number on the phone
    (which answers once the push reached it, in the phones process), long-poll to the end."""
    started = time.perf_counter()
    created = await create_login(relay, party)
    approval_id = created["approval_id"]
    phone_process.tell(op="code", approval_id=approval_id, match_code=created["match_code"])
    state = await wait_until_decided(relay, party, approval_id)
    assert state["status"] == "approved", state
    return time.perf_counter() - started


def relay_pid(server: Any) -> int | None:
    return server.process.pid if server.process is not None else None


async def round_trip(dbs: Databases, kind: str, tmp: Path, size: Size) -> list[dict[str, Any]]:
    url = await dbs.fresh(kind)
    rows: list[dict[str, Any]] = []
    async with providers(tmp) as fakes:
        with relays(url, tmp, 1, **fakes.env) as [server]:
            async with http_client(server.url, 400) as http:
                parties = await new_parties(http, max(size.concurrencies), 1, "apns")
                async with phones(tmp, server.url, fakes, parties) as phone_process:
                    meter = meter_for(dbs, kind, server, fakes, phone_process)
                    # The first login of a relay's life also opens its HTTP/2 connection to
                    # APNs (TLS, a signed provider token) and prepares its statements: it is
                    # reported on its own, not as the tail of the steady state.
                    relay = RawRelay(server.port)
                    cold = await one_round_trip(relay, parties[0], phone_process)
                    with meter:
                        serial = [
                            await one_round_trip(relay, parties[0], phone_process)
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
                            "first_ms": round(cold * 1000, 2),
                            "per_second": round(len(serial) / sum(serial), 1),
                            **meter.per(len(serial), "round_trip"),
                            **meter.used,
                        }
                    )
                    for concurrency in size.concurrencies:
                        meter = meter_for(dbs, kind, server, fakes, phone_process)
                        pace = await sustained(
                            relay, parties[:concurrency], phone_process, size, meter
                        )
                        rows.append(pace | {"database": kind, "processes": 1})
                    relay.close()
    return rows


def meter_for(
    dbs: Databases, kind: str, server: Any, fakes: Any, phone_process: Helper | None
) -> CpuMeter:
    return CpuMeter(
        relay=relay_pid(server),
        postgres=dbs.postgres_pid(kind),
        fake_apns=fakes.apns.pid,
        fake_fcm=fakes.fcm.pid,
        phones=phone_process.pid if phone_process else None,
    )


async def sustained(
    relay: RawRelay, parties: list[Party], phone_process: Helper, size: Size, meter: Any
) -> dict[str, Any]:
    """Each party loops round trips for the scenario's time."""
    samples: list[float] = []
    stop_at = time.monotonic() + size.round_trip_seconds

    async def client_loop(party: Party) -> None:
        while time.monotonic() < stop_at:
            samples.append(await one_round_trip(relay, party, phone_process))

    with meter:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(p) for p in parties))
        elapsed = time.perf_counter() - started
    stats = percentiles(samples)
    return {
        "concurrency": len(parties),
        "round_trips": stats["n"],
        "p50_ms": stats["p50_ms"],
        "p99_ms": stats["p99_ms"],
        "per_second": round(len(samples) / elapsed, 1),
        **meter.per(len(samples), "round_trip"),
        **meter.used,
    }


async def workers(dbs: Databases, kind: str, tmp: Path, size: Size) -> list[dict[str, Any]]:
    """`pns-server serve --workers N` on one port: 1 against 2 relay processes on PostgreSQL
    (SQLite refuses N > 1: it has no cross-process wake-up)."""
    if kind != "postgres":
        return []
    rows: list[dict[str, Any]] = []
    concurrency = max(size.concurrencies)
    for count in (1, 2, 1, 2):  # alternated: the machine is shared, its load drifts
        url = await dbs.fresh(kind)
        async with providers(tmp) as fakes:
            with relays(url, tmp, 1, workers=count, **fakes.env) as [server]:
                async with http_client(server.url, 400) as http:
                    parties = await new_parties(http, concurrency, 1, "apns")
                    async with phones(tmp, server.url, fakes, parties) as phone_process:
                        meter = meter_for(dbs, kind, server, fakes, phone_process)
                        relay = RawRelay(server.port)
                        rows.append(
                            {"database": kind, "workers": count}
                            | await sustained(relay, parties, phone_process, size, meter)
                        )
                        relay.close()
    return rows


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
        # From the decision (its `decided_at`, the relay's clock: the same machine's) to the
        # answer's arrival here.
        self.after_decision = 0.0

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
                arrived = time.perf_counter()
                decided = datetime.fromisoformat(json.loads(body)["decided_at"])
                self.after_decision = time.time() - decided.timestamp()
                return arrived
            self._ask()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def waiters_now(http: httpx.AsyncClient) -> int:
    text = (await http.get("/metrics")).text
    found = re.search(r"^pns_longpoll_waiters (\S+)$", text, re.M)
    return int(float(found.group(1))) if found else 0


async def gc_paused_s(http: httpx.AsyncClient) -> list[tuple[float, int]]:
    """The relay's garbage collections so far, by generation (the last is the full
    collection, which walks every object held): seconds of stopped event loop, and how
    many."""
    text = (await http.get("/metrics")).text
    paused = [(0.0, 0), (0.0, 0), (0.0, 0)]
    for generation in range(3):
        label = f'{{generation="{generation}"}}'
        seconds = re.search(rf"^pns_gc_pause_seconds_sum{label} (\S+)$", text, re.M)
        count = re.search(rf"^pns_gc_pause_seconds_count{label} (\S+)$", text, re.M)
        if seconds and count:
            paused[generation] = (float(seconds.group(1)), int(float(count.group(1))))
    return paused


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
                gc_before = await gc_paused_s(http)
                # The wake on its own: the ramp would drown it in the whole run's profile.
                async with profiled(server, f"longpoll-wake-{kind}"):
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
                gc_after = await gc_paused_s(http)
                gc_during_wake = [
                    (a[0] - b[0], a[1] - b[1]) for a, b in zip(gc_after, gc_before, strict=True)
                ]
                woken_after = sorted(moment - started for moment in woken)
                # Each waiter from its own approval's decision: the hundred answers arrive at
                # once, and the last of them is decided well after the first.
                after_decision = sorted(w.after_decision for w in waits)
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
            "wake_first_ms": round(woken_after[0] * 1000, 1),
            "wake_p50_ms": round(woken_after[len(woken_after) // 2] * 1000, 1),
            "wake_all_ms": round(wake_all * 1000, 1),
            # The relay's event loop stood still this long for its garbage collector.
            "wake_gc_ms": round(sum(g[0] for g in gc_during_wake) * 1000, 1),
            # By generation (young, middle, full): milliseconds, and how many collections.
            "wake_gc_by_generation": [[round(g[0] * 1000, 1), g[1]] for g in gc_during_wake],
            "after_decision_p50_ms": round(after_decision[len(after_decision) // 2] * 1000, 1),
            "after_decision_max_ms": round(after_decision[-1] * 1000, 1),
            "repolls_during_run": repolls,
        }
    ]


# -- 4. push dispatch -----------------------------------------------------------------------
@dataclass
class PushSide:
    """One relay's push figures, summed over its rounds."""

    label: str
    server: Any
    http: httpx.AsyncClient
    parties: list[Party]
    rates: list[float]
    used: dict[str, float]


async def push_dispatch(dbs: Databases, kind: str, tmp: Path, size: Size) -> list[dict[str, Any]]:
    """Rounds of approvals for many phones, each round timed from the first request to the
    last push the fake provider receives. With `--compare DIR`, the relay of that checkout
    is measured too, round for round in turns with this one (each on its own database, the
    same fake providers)."""
    sources: list[Path | None] = [None]
    if harness.COMPARE_WITH is not None:
        sources.append(harness.COMPARE_WITH)
    rows = []
    for service in ("apns", "fcm"):
        async with providers(tmp) as fakes, contextlib.AsyncExitStack() as stack:
            sides = []
            for source in sources:
                url = await dbs.fresh(kind)
                [server] = stack.enter_context(relays(url, tmp, 1, source=source, **fakes.env))
                async with http_client(server.url) as setup:  # see open_rig
                    parties = await new_parties(setup, size.push_parties, size.push_phones, service)
                http = await stack.enter_async_context(http_client(server.url))
                label = "this tree" if source is None else f"compare: {source.name}"
                sides.append(PushSide(label, server, http, parties, [], {}))
            fake = fakes.apns if service == "apns" else fakes.fcm
            per_round = size.push_parties * size.push_phones
            # The rounds on their own: the set-up (pairing every phone) would drown them.
            async with profiled(sides[0].server, f"push-rounds-{service}-{kind}"):
                for round_number in range(1, size.push_rounds + 1):
                    for side in in_turn_order(sides, round_number - 1):
                        meter = meter_for(dbs, kind, side.server, fakes, None)
                        with meter:
                            before = (await fake.ask(op="count"))["count"]
                            started = time.monotonic()
                            await asyncio.gather(
                                *(create_approval(side.http, p) for p in side.parties)
                            )
                            seen = await fake.ask(op="wait", count=before + per_round, timeout=120)
                        got = seen["count"] - before
                        side.rates.append(got / (seen["last_at"] - started))
                        assert got >= per_round, (
                            f"{side.label} round {round_number}: {got} of {per_round}"
                        )
                        for key, value in meter.used.items():
                            side.used[key] = round(side.used.get(key, 0.0) + value, 2)
        for side in sides:
            pushes = per_round * size.push_rounds
            everyone = sum(v for k, v in side.used.items() if k.startswith("cpu_"))
            rows.append(
                {
                    "database": kind,
                    "relay": side.label,
                    "provider": service,
                    "pushes_per_round": per_round,
                    "rounds": size.push_rounds,
                    "pushes_per_s_best": round(max(side.rates), 1),
                    "pushes_per_s_mean": round(sum(side.rates) / len(side.rates), 1),
                    "relay_cpu_ms_per_push": round(
                        1000 * side.used.get("cpu_relay_s", 0.0) / pushes, 2
                    ),
                    "all_cpu_ms_per_push": round(1000 * everyone / pushes, 2),
                    **side.used,
                }
            )
    return rows


# -- 5. OTP verification --------------------------------------------------------------------
@dataclass
class OtpSide:
    """One relay's OTP figures, summed over its turns."""

    label: str
    server: Any
    http: httpx.AsyncClient
    samples: list[float]
    done: int = 0
    refused: int = 0
    elapsed: float = 0.0
    cpu_relay_s: float = 0.0
    cpu_postgres_s: float = 0.0
    cpu_load_generator_s: float = 0.0


async def otp_rate(dbs: Databases, kind: str, tmp: Path, size: Size) -> list[dict[str, Any]]:
    """Verifications at concurrency 1, 20 (the tail the issue names) and 32; each uses its
    own device, since a code is accepted once. With `--compare DIR`, the relay of that
    checkout is measured too, in turns of a quarter of the verifications."""
    turns = 4 if harness.COMPARE_WITH is not None else 1
    sources: list[Path | None] = [None]
    if harness.COMPARE_WITH is not None:
        sources.append(harness.COMPARE_WITH)
    rows = []
    with contextlib.ExitStack() as stack:
        async with contextlib.AsyncExitStack() as astack:
            sides: list[tuple[Path | None, Any, httpx.AsyncClient]] = []
            for source in sources:
                [server] = stack.enter_context(relays(await dbs.fresh(kind), tmp, 1, source=source))
                http = await astack.enter_async_context(http_client(server.url))
                sides.append((source, server, http))
            for concurrency in (1, 20, 32):
                results = []
                for source, server, http in sides:
                    label = "this tree" if source is None else f"compare: {source.name}"
                    results.append(OtpSide(label, server, http, []))
                parties = [
                    await new_parties(side.http, size.otp_parties, 1, "none") for side in results
                ]
                for turn in range(turns):
                    part = range(
                        turn * size.otp_parties // turns, (turn + 1) * size.otp_parties // turns
                    )
                    pairs = list(zip(results, parties, strict=True))
                    for side, side_parties in in_turn_order(pairs, turn):
                        chosen = [side_parties[i] for i in part]
                        await otp_turn(dbs, kind, side, chosen, concurrency)
                for side in results:
                    stats = percentiles(side.samples)
                    rows.append(
                        {
                            "database": kind,
                            "relay": side.label,
                            "verifications": side.done,
                            "refused": side.refused,
                            "concurrency": concurrency,
                            "per_second": round(side.done / side.elapsed, 1),
                            "p50_ms": stats["p50_ms"],
                            "p99_ms": stats["p99_ms"],
                            "max_ms": stats["max_ms"],
                            "relay_cpu_ms_per_verification": round(
                                1000 * side.cpu_relay_s / max(side.done, 1), 2
                            ),
                            "cpu_relay_s": round(side.cpu_relay_s, 2),
                            "cpu_postgres_s": round(side.cpu_postgres_s, 2),
                            "cpu_load_generator_s": round(side.cpu_load_generator_s, 2),
                            "wall_s": round(side.elapsed, 2),
                        }
                    )
    return rows


async def otp_turn(
    dbs: Databases, kind: str, side: OtpSide, parties: list[Party], concurrency: int
) -> None:
    """`concurrency` keep-alive connections, each sending one check after another
    (`RawHttp`: the generator must not be what sets the pace)."""
    free = [RawHttp(side.server.port) for _ in range(concurrency)]
    bodies = [json.dumps({"code": party.phones[0].otp()}).encode() for party in parties]

    async def verify(index: int) -> None:
        connection = free.pop()
        started = time.perf_counter()
        status = await connection.post_json(
            "/v1/otp/verify", bodies[index], parties[index].client.headers
        )
        side.samples.append(time.perf_counter() - started)
        free.append(connection)
        if status != 200:
            side.refused += 1

    meter = CpuMeter(relay=relay_pid(side.server), postgres=dbs.postgres_pid(kind))
    try:
        with meter:
            started = time.perf_counter()
            side.done += await bounded(len(parties), concurrency, verify, time_limit=120)
            side.elapsed += time.perf_counter() - started
    finally:
        for connection in free:
            connection.close()
    side.cpu_relay_s += meter.used["cpu_relay_s"]
    side.cpu_postgres_s += meter.used.get("cpu_postgres_s", 0.0)
    side.cpu_load_generator_s += meter.used.get("cpu_load_generator_s", 0.0)


# -- 6. CPU per request, route by route ------------------------------------------------------
@dataclass
class Rig:
    """One relay under measurement and the parties that call it."""

    label: str
    server: Any
    http: httpx.AsyncClient
    pushing: list[Party]
    quiet: list[Party]
    approvals: list[dict[str, Any]]
    cpu_s: dict[str, float]
    pg_cpu_s: dict[str, float]
    latencies: dict[str, list[float]]

    async def fresh_approvals(self, indexes: range) -> None:
        for i in indexes:
            self.approvals[i] = await create_approval(self.http, self.quiet[i])


async def open_rig(
    stack: contextlib.AsyncExitStack,
    dbs: Databases,
    kind: str,
    tmp: Path,
    env: dict[str, str],
    n: int,
    source: Path | None,
) -> Rig:
    url = await dbs.fresh(kind)
    [server] = stack.enter_context(relays(url, tmp, 1, source=source, **env))
    # The set-up's client leaves dozens of keep-alive connections (parties are made 32 at
    # a time), and httpx checks every idle one on each request until the relay closes them
    # 5 s later: measured through it, the rig set up last paid up to 0.9 ms more per
    # request in the load generator, and showed it as latency. So measure on a new client.
    async with http_client(server.url) as setup:
        pushing = await new_parties(setup, 1, 1, "apns")
        quiet = await new_parties(setup, n, 1, "none")
    http = await stack.enter_async_context(http_client(server.url))
    label = "this tree" if source is None else f"compare: {source.name}"
    return Rig(label, server, http, pushing, quiet, [{}] * n, {}, {}, {})


def route_jobs(rig: Rig) -> list[tuple[str, Any, bool]]:
    """(route, job(index), needs a fresh pending approval per index)."""
    http, quiet = rig.http, rig.quiet

    async def answer_with_waiter(i: int) -> None:
        approval = rig.approvals[i]
        poll = asyncio.create_task(wait_until_final(http, quiet[i], approval["approval_id"]))
        await asyncio.sleep(0.005)
        await approve(http, quiet[i].phones[0], approval["approval_id"], approval["match_code"])
        await poll

    return [
        ("healthz (framework floor)", lambda _i: ok_get(http, "/healthz"), False),
        (
            "client auth (GET /v1/client)",
            lambda _i: ok_get(http, "/v1/client", quiet[0].client.headers),
            False,
        ),
        (
            "device auth (GET /v1/device/approvals, none pending)",
            lambda _i: ok_get(http, "/v1/device/approvals", quiet[0].phones[0].headers),
            False,
        ),
        (
            "create approval + its push (APNs)",
            lambda _i: create_approval(http, rig.pushing[0]),
            False,
        ),
        (
            "device detail (GET /v1/device/approvals/{id})",
            lambda i: ok_get(
                http,
                f"/v1/device/approvals/{rig.approvals[i]['approval_id']}",
                quiet[i].phones[0].headers,
            ),
            True,
        ),
        (
            "signed answer (POST .../response), nobody waiting",
            lambda i: approve(
                http,
                quiet[i].phones[0],
                rig.approvals[i]["approval_id"],
                rig.approvals[i]["match_code"],
            ),
            True,
        ),
        ("signed answer + the long-poll it wakes", answer_with_waiter, True),
        (
            "OTP verify",
            lambda i: ok_post(
                http, "/v1/otp/verify", {"code": quiet[i].phones[0].otp()}, quiet[i].client.headers
            ),
            False,
        ),
    ]


async def measure(rig: Rig, kind: str, dbs: Databases, route: str, job: Any, rows: range) -> None:
    meter = CpuMeter(relay=relay_pid(rig.server), postgres=dbs.postgres_pid(kind))
    samples = rig.latencies.setdefault(route, [])
    async with profiled(rig.server, f"route-{route}-{kind}", rig.label == "this tree"):
        with meter:
            for index in rows:
                started = time.perf_counter()
                await job(index)
                samples.append(time.perf_counter() - started)
    rig.cpu_s[route] = rig.cpu_s.get(route, 0.0) + meter.used["cpu_relay_s"]
    rig.pg_cpu_s[route] = rig.pg_cpu_s.get(route, 0.0) + meter.used.get("cpu_postgres_s", 0.0)


async def route_cost(dbs: Databases, kind: str, tmp: Path, size: Size) -> list[dict[str, Any]]:
    """The relay's CPU per request for each hot route, one request at a time: the relay's
    CPU seconds (from /proc) over the phase divided by the requests made. With `--profile`,
    py-spy samples each phase into its own file. With `--compare DIR`, the relay of that
    checkout is measured too, in turns of a quarter of the requests, so that both see the
    same load on a shared machine."""
    n = size.route_requests
    turns = 4 if harness.COMPARE_WITH is not None else 1
    async with providers(tmp) as fakes, contextlib.AsyncExitStack() as stack:
        rigs = [await open_rig(stack, dbs, kind, tmp, fakes.env, n, None)]
        if harness.COMPARE_WITH is not None:
            rigs.append(await open_rig(stack, dbs, kind, tmp, fakes.env, n, harness.COMPARE_WITH))
        jobs = [route_jobs(rig) for rig in rigs]
        for position, (route, _job, needs_approval) in enumerate(jobs[0]):
            for turn in range(turns):
                part = range(turn * n // turns, (turn + 1) * n // turns)
                for rig, rig_jobs in in_turn_order(list(zip(rigs, jobs, strict=True)), turn):
                    if needs_approval:
                        await rig.fresh_approvals(part)
                    await measure(rig, kind, dbs, route, rig_jobs[position][1], part)
    return [
        {
            "database": kind,
            "relay": rig.label,
            "route": route,
            "requests": n,
            "relay_cpu_ms_per_request": round(1000 * rig.cpu_s[route] / n, 2),
            "postgres_cpu_ms_per_request": round(1000 * rig.pg_cpu_s[route] / n, 2),
            "latency_p50_ms": percentiles(rig.latencies[route])["p50_ms"],
        }
        for route, _job, _fresh in jobs[0]
        for rig in rigs
    ]


async def ok_get(http: httpx.AsyncClient, path: str, headers: Any = None) -> None:
    response = await http.get(path, headers=headers)
    response.raise_for_status()


async def ok_post(http: httpx.AsyncClient, path: str, body: Any, headers: Any) -> None:
    response = await http.post(path, json=body, headers=headers)
    response.raise_for_status()


SCENARIOS = {
    "decision_latency": decision_latency,
    "round_trip": round_trip,
    "longpoll_capacity": longpoll_capacity,
    "push_dispatch": push_dispatch,
    "otp": otp_rate,
    "workers": workers,
    "route_cost": route_cost,
}
