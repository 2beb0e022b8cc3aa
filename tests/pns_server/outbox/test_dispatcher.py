"""The outbox dispatcher, driven round by round on a real database with scripted senders."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import event, select, update

from pns_server import driver
from pns_server.models import Delivery, Device
from pns_server.outbox.dispatcher import Dispatcher
from pns_server.push.base import Outcome, PushMessage, PushResult
from pns_server.push.log import LogPushSender
from pns_server.realtime.postgres import CHANNEL, asyncpg_dsn
from pns_server.topics import PUSH_SENT, approval_topic
from tests.pns_server.approvals.helpers import answer, request_approval, runtime_of
from tests.pns_server.approvals.test_until import poll, state_reads, still_waiting
from tests.support.factories import PairedDevice, RegisteredClient, pair_app_device, register_client


class ScriptedSender:
    """A stand-in for a provider (APNs here): answers each send with the next scripted result."""

    service = "apns"

    def __init__(self, *results: PushResult | Exception, delay: float = 0.0) -> None:
        self.script = list(results)
        self.delay = delay
        self.sent: list[PushMessage] = []
        self.started = asyncio.Event()

    async def send(self, message: PushMessage) -> PushResult:
        self.sent.append(message)
        self.started.set()
        if self.delay:
            await asyncio.sleep(self.delay)
        result = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(result, Exception):
            raise result
        return result

    async def close(self) -> None:
        return None


@pytest.fixture
async def manual(app: FastAPI) -> AsyncIterator[Dispatcher]:
    """The app's own dispatcher stopped, so each test drives rounds itself."""
    runtime = runtime_of(app)
    assert runtime.dispatcher is not None
    await runtime.dispatcher.stop()
    yield Dispatcher(runtime, retry_base=1.0)


async def deliveries(app: FastAPI, approval_id: str) -> list[Delivery]:
    async with runtime_of(app).db.session() as session:
        rows = await session.scalars(select(Delivery).where(Delivery.approval_id == approval_id))
        return list(rows)


async def test_log_sender_gets_one_message_per_push_device(
    app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
) -> None:
    android = await pair_app_device(http, client, name="Pixel", platform="android", os_version="14")
    await pair_app_device(http, client, name="Poll only", push=None)
    body = await request_approval(http, client)
    url = f"/v1/approvals/{body['approval_id']}?wait=1"
    state = (await http.get(f"/v1/approvals/{body['approval_id']}", headers=client.headers)).json()
    while state["delivery"]["sent"] < 2:
        state = (await http.get(url, headers=client.headers)).json()
    log_sender = runtime_of(app).senders["log"]
    assert isinstance(log_sender, LogPushSender)
    mine = [m for m in log_sender.sent if m.approval_id == body["approval_id"]]
    assert sorted(m.device_id for m in mine) == sorted([phone.device_id, android.device_id])
    for message in mine:
        assert "FILESRV01" in message.title and "login" in message.title
        # The texts, and data that is the approval's id alone: a random hex id may happen
        # to contain the code's digits (it did: "343" in "...363437...").
        assert body["match_code"] not in message.title + message.body
        assert message.data == {"approval_id": body["approval_id"], "type": "approval"}
    assert state["delivery"] == {"queued": 0, "sent": 2, "failed": 0, "last_error": None}
    metrics = runtime_of(app).metrics.render().decode()
    assert 'pns_push_sends_total{outcome="delivered",service="apns"} 1.0' in metrics


async def test_retry_with_backoff_then_delivered(
    app: FastAPI,
    http: httpx.AsyncClient,
    client: RegisteredClient,
    phone: PairedDevice,
    manual: Dispatcher,
) -> None:
    sender = ScriptedSender(
        PushResult(Outcome.RETRY, reason="TooManyRequests", status_code=429),
        PushResult(Outcome.DELIVERED),
    )
    runtime_of(app).senders["apns"] = sender
    body = await request_approval(http, client)
    before = datetime.now(UTC)
    assert await manual.run_once() == 1
    [delivery] = await deliveries(app, body["approval_id"])
    assert (delivery.status, delivery.attempts, delivery.last_error) == (
        "queued",
        1,
        "TooManyRequests",
    )
    # Backoff: 1 s with jitter in [0.5, 1].
    assert before + timedelta(seconds=0.5) <= delivery.next_attempt_at
    assert delivery.next_attempt_at <= datetime.now(UTC) + timedelta(seconds=1)
    state = (await http.get(f"/v1/approvals/{body['approval_id']}", headers=client.headers)).json()
    assert state["delivery"]["queued"] == 1
    assert state["delivery"]["last_error"] == "TooManyRequests"

    assert await manual.run_once() == 0  # not due yet
    assert await manual.run_once(now=delivery.next_attempt_at + timedelta(seconds=0.01)) == 1
    [delivery] = await deliveries(app, body["approval_id"])
    assert (delivery.status, delivery.attempts, delivery.last_error) == ("sent", 2, None)
    assert len(sender.sent) == 2


async def test_retry_after_past_expiry_gives_up(
    app: FastAPI,
    http: httpx.AsyncClient,
    client: RegisteredClient,
    phone: PairedDevice,
    manual: Dispatcher,
) -> None:
    runtime_of(app).senders["apns"] = ScriptedSender(
        PushResult(Outcome.RETRY, reason="ServiceUnavailable", retry_after=3600)
    )
    body = await request_approval(http, client)
    await manual.run_once()
    [delivery] = await deliveries(app, body["approval_id"])
    assert delivery.status == "failed"
    assert delivery.last_error is not None and "gave up" in delivery.last_error
    state = (await http.get(f"/v1/approvals/{body['approval_id']}", headers=client.headers)).json()
    assert state["delivery"]["failed"] == 1
    assert state["status"] == "pending"  # the phone can still poll and answer


async def test_backoff_grows_and_honours_retry_after(manual: Dispatcher) -> None:
    assert 0.5 <= manual.backoff(1, None) <= 1.0
    assert 4.0 <= manual.backoff(4, None) <= 8.0
    assert manual.backoff(30, None) <= manual.retry_max
    assert manual.backoff(1, 30.0) == 30.0


async def test_invalid_token_retires_the_device(
    app: FastAPI,
    http: httpx.AsyncClient,
    client: RegisteredClient,
    phone: PairedDevice,
    manual: Dispatcher,
) -> None:
    sender = ScriptedSender(
        PushResult(Outcome.INVALID_TOKEN, reason="Unregistered", status_code=410)
    )
    runtime_of(app).senders["apns"] = sender
    body = await request_approval(http, client)
    await manual.run_once()
    [delivery] = await deliveries(app, body["approval_id"])
    assert delivery.status == "failed"
    assert delivery.last_error is not None and "Unregistered" in delivery.last_error
    async with runtime_of(app).db.session() as session:
        device = await session.get(Device, phone.device_id)
        assert device is not None and device.push_status == "invalid_token"
    # Never sent to again, yet the phone still counts: it can poll.
    again = await request_approval(http, client)
    assert again["devices_notified"] == 1
    assert await deliveries(app, again["approval_id"]) == []
    await manual.run_once()
    assert len(sender.sent) == 1


async def test_config_error_fails_loudly(
    app: FastAPI,
    http: httpx.AsyncClient,
    client: RegisteredClient,
    phone: PairedDevice,
    manual: Dispatcher,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runtime_of(app).senders["apns"] = ScriptedSender(
        PushResult(Outcome.CONFIG_ERROR, reason="InvalidProviderToken", status_code=403)
    )
    body = await request_approval(http, client)
    await manual.run_once()
    [delivery] = await deliveries(app, body["approval_id"])
    assert delivery.status == "failed"
    [line] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert line.levelname == "ERROR" and "CONFIGURATION" in line.getMessage()
    assert "PNS_APNS_KEY_FILE" in line.getMessage()
    metrics = runtime_of(app).metrics.render().decode()
    assert 'pns_push_sends_total{outcome="config_error",service="apns"} 1.0' in metrics
    async with runtime_of(app).db.session() as session:
        device = await session.get(Device, phone.device_id)
        assert device is not None and device.push_status == "ok"


async def test_sender_exception_is_retried(
    app: FastAPI,
    http: httpx.AsyncClient,
    client: RegisteredClient,
    phone: PairedDevice,
    manual: Dispatcher,
) -> None:
    runtime_of(app).senders["apns"] = ScriptedSender(ConnectionResetError("boom"))
    body = await request_approval(http, client)
    await manual.run_once()
    [delivery] = await deliveries(app, body["approval_id"])
    assert delivery.status == "queued"
    assert delivery.last_error == "sender error: ConnectionResetError"


async def test_expired_lease_is_reclaimed_and_a_live_one_is_not(
    app: FastAPI,
    http: httpx.AsyncClient,
    client: RegisteredClient,
    phone: PairedDevice,
    manual: Dispatcher,
) -> None:
    sender = ScriptedSender(PushResult(Outcome.DELIVERED))
    runtime_of(app).senders["apns"] = sender
    body = await request_approval(http, client)
    [delivery] = await deliveries(app, body["approval_id"])
    now = datetime.now(UTC)

    async def lease(until: datetime) -> None:
        async with runtime_of(app).db.session() as session:
            await session.execute(
                update(Delivery)
                .where(Delivery.id == delivery.id)
                .values(status="sending", lease_until=until, attempts=1)
            )

    # Another process claimed it and is still within its lease: hands off.
    await lease(now + timedelta(seconds=30))
    assert await manual.run_once() == 0
    # That process died: the lease runs out and we take over.
    await lease(now - timedelta(seconds=1))
    assert await manual.run_once() == 1
    [delivery] = await deliveries(app, body["approval_id"])
    assert (delivery.status, delivery.attempts) == ("sent", 2)
    assert [m.approval_id for m in sender.sent] == [body["approval_id"]]


async def test_decided_approval_is_not_pushed(
    app: FastAPI,
    http: httpx.AsyncClient,
    client: RegisteredClient,
    phone: PairedDevice,
    manual: Dispatcher,
) -> None:
    sender = ScriptedSender(PushResult(Outcome.DELIVERED))
    runtime_of(app).senders["apns"] = sender
    body = await request_approval(http, client)
    await answer(http, phone, body["approval_id"], "reject")
    assert await manual.run_once() == 0
    [delivery] = await deliveries(app, body["approval_id"])
    assert delivery.status == "dropped"
    assert sender.sent == []


async def test_expired_approval_gives_up(
    app: FastAPI,
    http: httpx.AsyncClient,
    client: RegisteredClient,
    phone: PairedDevice,
    manual: Dispatcher,
) -> None:
    sender = ScriptedSender(PushResult(Outcome.DELIVERED))
    runtime_of(app).senders["apns"] = sender
    body = await request_approval(http, client, ttl_seconds=10)
    # The first round comes after expiry (a backlog, a restart): nothing is sent.
    await manual.run_once(now=datetime.now(UTC) + timedelta(seconds=11))
    assert sender.sent == []
    [delivery] = await deliveries(app, body["approval_id"])
    assert delivery.status == "failed"
    assert delivery.last_error is not None and "expired" in delivery.last_error


async def test_one_claim_per_delivery_across_dispatchers(
    app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, manual: Dispatcher
) -> None:
    sender = ScriptedSender(PushResult(Outcome.DELIVERED), delay=0.05)
    runtime_of(app).senders["apns"] = sender
    for index in range(6):
        await pair_app_device(http, client, name=f"phone {index}")
    body = await request_approval(http, client)
    others = [Dispatcher(runtime_of(app), batch_size=2) for _ in range(3)]
    await asyncio.gather(*(d.run_once() for d in others), manual.run_once())
    while any(d.status != "sent" for d in await deliveries(app, body["approval_id"])):
        await manual.run_once()
    assert sorted(m.device_id for m in sender.sent) == sorted(
        d.device_id for d in await deliveries(app, body["approval_id"])
    )
    assert len(sender.sent) == 6


async def test_stop_lets_the_send_in_flight_finish(
    app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
) -> None:
    runtime = runtime_of(app)
    assert runtime.dispatcher is not None
    await runtime.dispatcher.stop()
    sender = ScriptedSender(PushResult(Outcome.DELIVERED), delay=0.3)
    runtime.senders["apns"] = sender
    dispatcher = Dispatcher(runtime)
    dispatcher.start()
    body = await request_approval(http, client)
    await asyncio.wait_for(sender.started.wait(), 10)
    await dispatcher.stop(timeout=5)
    assert not dispatcher.running
    [delivery] = await deliveries(app, body["approval_id"])
    assert delivery.status == "sent"


class HangingThirdSender:
    """Delivers the first two pushes at once; the third hangs until the process dies."""

    service = "apns"

    def __init__(self) -> None:
        self.sent: list[PushMessage] = []
        self.hanging = asyncio.Event()

    async def send(self, message: PushMessage) -> PushResult:
        self.sent.append(message)
        if len(self.sent) == 3:
            self.hanging.set()
            await asyncio.Event().wait()
        return PushResult(Outcome.DELIVERED)

    async def close(self) -> None:
        return None


async def test_each_outcome_is_recorded_as_it_completes_so_a_crash_resends_only_what_was_in_flight(
    app: FastAPI,
    http: httpx.AsyncClient,
    client: RegisteredClient,
    phone: PairedDevice,
    manual: Dispatcher,
) -> None:
    for name in ("iPad", "Work iPhone"):
        await pair_app_device(http, client, name=name)
    sender = HangingThirdSender()
    runtime_of(app).senders["apns"] = sender
    body = await request_approval(http, client)

    round_ = asyncio.create_task(manual.run_once())
    await asyncio.wait_for(sender.hanging.wait(), 10)
    async with asyncio.timeout(10):
        while sorted(d.status for d in await deliveries(app, body["approval_id"])) != [
            "sending",
            "sent",
            "sent",
        ]:
            await asyncio.sleep(0.02)
    round_.cancel()  # the process dies with one push in flight
    with pytest.raises(asyncio.CancelledError):
        await round_

    # Another relay, once the lease has run out, sends only the push that was in flight.
    again = ScriptedSender(PushResult(Outcome.DELIVERED))
    runtime_of(app).senders["apns"] = again
    later = datetime.now(UTC) + timedelta(seconds=runtime_of(app).settings.push_lease_seconds + 1)
    assert await Dispatcher(runtime_of(app)).run_once(now=later) == 1
    assert [m.device_id for m in again.sent] == [sender.sent[2].device_id]
    assert [d.status for d in await deliveries(app, body["approval_id"])] == ["sent"] * 3


@pytest.mark.parametrize(
    ("result", "level"),
    [
        (PushResult(Outcome.RETRY, reason="InternalServerError", status_code=500), "WARNING"),
        (PushResult(Outcome.INVALID_TOKEN, reason="Unregistered", status_code=410), "INFO"),
        (RuntimeError("boom"), "WARNING"),
    ],
)
async def test_one_line_per_push_that_did_not_go_out(
    app: FastAPI,
    http: httpx.AsyncClient,
    client: RegisteredClient,
    phone: PairedDevice,
    manual: Dispatcher,
    caplog: pytest.LogCaptureFixture,
    result: PushResult | Exception,
    level: str,
) -> None:
    runtime_of(app).senders["apns"] = ScriptedSender(result)
    body = await request_approval(http, client)
    caplog.set_level(logging.INFO, "pns")
    await manual.run_once()
    lines = [r for r in caplog.records if r.name.startswith("pns.push")]
    assert [r.levelname for r in lines] == [level]
    assert body["approval_id"] in lines[0].getMessage()
    assert phone.device_id in lines[0].getMessage()


class HoldFirstSender:
    """Holds the first push it gets until released; answers every other one at once."""

    service = "apns"

    def __init__(self) -> None:
        self.sent: list[PushMessage] = []
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def send(self, message: PushMessage) -> PushResult:
        self.sent.append(message)
        if len(self.sent) == 1:
            self.holding.set()
            await self.release.wait()
        return PushResult(Outcome.DELIVERED)

    async def close(self) -> None:
        return None


async def wait_for_statuses(app: FastAPI, approval_id: str, wanted: list[str]) -> None:
    async with asyncio.timeout(10):
        while sorted(d.status for d in await deliveries(app, approval_id)) != wanted:
            await asyncio.sleep(0.02)


async def test_a_slow_push_does_not_hold_up_the_pushes_claimed_after_it(
    app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
) -> None:
    runtime = runtime_of(app)
    assert runtime.dispatcher is not None
    await runtime.dispatcher.stop()
    sender = HoldFirstSender()
    runtime.senders["apns"] = sender
    other = await register_client(http, name="OTHERSRV")
    await pair_app_device(http, other)
    dispatcher = Dispatcher(runtime)
    dispatcher.start()
    try:
        slow = await request_approval(http, client)
        await asyncio.wait_for(sender.holding.wait(), 10)
        # Claimed while the first push is still in flight, sent and recorded at once.
        quick = await request_approval(http, other)
        await wait_for_statuses(app, quick["approval_id"], ["sent"])
        assert [d.status for d in await deliveries(app, slow["approval_id"])] == ["sending"]
        sender.release.set()
        await wait_for_statuses(app, slow["approval_id"], ["sent"])
        assert [m.approval_id for m in sender.sent] == [slow["approval_id"], quick["approval_id"]]
    finally:
        sender.release.set()
        await dispatcher.stop()
    assert not dispatcher.running


class GateSender:
    """Holds every push until the gate opens; counts how many wait at once."""

    service = "apns"

    def __init__(self) -> None:
        self.sent: list[PushMessage] = []
        self.waiting = 0
        self.most_waiting = 0
        self.gate = asyncio.Event()

    async def send(self, message: PushMessage) -> PushResult:
        self.sent.append(message)
        self.waiting += 1
        self.most_waiting = max(self.most_waiting, self.waiting)
        await self.gate.wait()
        self.waiting -= 1
        return PushResult(Outcome.DELIVERED)

    async def close(self) -> None:
        return None


async def test_no_more_than_concurrency_pushes_are_in_flight_and_the_rest_follow(
    app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
) -> None:
    runtime = runtime_of(app)
    assert runtime.dispatcher is not None
    await runtime.dispatcher.stop()
    for index in range(4):
        await pair_app_device(http, client, name=f"phone {index}")
    sender = GateSender()
    runtime.senders["apns"] = sender
    dispatcher = Dispatcher(runtime, concurrency=2, poll_interval=30)
    dispatcher.start()
    try:
        body = await request_approval(http, client)
        async with asyncio.timeout(10):
            while sender.waiting < 2:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # room for a wrong third claim to show
        assert sender.waiting == 2
        statuses = sorted(d.status for d in await deliveries(app, body["approval_id"]))
        assert statuses == ["queued"] * 3 + ["sending"] * 2
        # Completions make room: the rest are claimed without waiting for the poll interval.
        sender.gate.set()
        await wait_for_statuses(app, body["approval_id"], ["sent"] * 5)
    finally:
        sender.gate.set()
        await dispatcher.stop()
    assert sender.most_waiting == 2 and len(sender.sent) == 5


async def test_an_outage_queues_every_push_of_a_batch_again_with_one_status_read(
    app: FastAPI,
    http: httpx.AsyncClient,
    client: RegisteredClient,
    phone: PairedDevice,
    manual: Dispatcher,
) -> None:
    for index in range(2):
        await pair_app_device(http, client, name=f"phone {index}")
    runtime_of(app).senders["apns"] = ScriptedSender(
        PushResult(Outcome.RETRY, reason="ServiceUnavailable", status_code=503)
    )
    body = await request_approval(http, client)
    before = datetime.now(UTC)
    assert await manual.run_once() == 3
    rows = await deliveries(app, body["approval_id"])
    assert [(d.status, d.attempts, d.last_error) for d in rows] == [
        ("queued", 1, "ServiceUnavailable")
    ] * 3
    assert all(d.next_attempt_at >= before + timedelta(seconds=0.5) for d in rows)


async def test_a_push_that_failed_while_its_approval_was_decided_gives_up(
    app: FastAPI,
    http: httpx.AsyncClient,
    client: RegisteredClient,
    phone: PairedDevice,
    manual: Dispatcher,
) -> None:
    body = await request_approval(http, client)

    class AnswerThenFail(ScriptedSender):
        async def send(self, message: PushMessage) -> PushResult:
            assert (await answer(http, phone, message.approval_id, "reject")).status_code == 200
            return PushResult(Outcome.RETRY, reason="ServiceUnavailable", status_code=503)

    runtime_of(app).senders["apns"] = AnswerThenFail(PushResult(Outcome.DELIVERED))
    assert await manual.run_once() == 1
    [delivery] = await deliveries(app, body["approval_id"])
    assert delivery.status == "failed"
    assert delivery.last_error == "ServiceUnavailable; gave up: approval rejected"


async def test_every_phone_of_an_approval_that_expired_first_fails_in_one_round(
    app: FastAPI,
    http: httpx.AsyncClient,
    client: RegisteredClient,
    phone: PairedDevice,
    manual: Dispatcher,
) -> None:
    for index in range(3):
        await pair_app_device(http, client, name=f"phone {index}")
    sender = ScriptedSender(PushResult(Outcome.DELIVERED))
    runtime_of(app).senders["apns"] = sender
    body = await request_approval(http, client, ttl_seconds=10)
    assert await manual.run_once(now=datetime.now(UTC) + timedelta(seconds=11)) == 4
    rows = await deliveries(app, body["approval_id"])
    assert [(d.status, d.last_error) for d in rows] == [
        ("failed", "the approval expired before the push went out")
    ] * 4
    assert all(d.lease_until is None for d in rows)
    assert sender.sent == []


# Set in the task that drives a round: the running expiry sweep's statements are not counted.
_COUNTING: ContextVar[bool] = ContextVar("counting", default=False)


async def statements_of(
    monkeypatch: pytest.MonkeyPatch, round_: Callable[[], Awaitable[int]]
) -> list[str]:
    """The statements a round runs, PostgreSQL's NOTIFY (the wake-up) included."""
    seen: list[str] = []

    def note(sql: str) -> None:
        if _COUNTING.get():
            seen.append(" ".join(sql.split()))

    monkeypatch.setattr(driver, "statement_listeners", [note])
    token = _COUNTING.set(True)
    try:
        await round_()
    finally:
        _COUNTING.reset(token)
    return seen


def outbox_statements(seen: list[str]) -> list[str]:
    """`claim`, `claimed rows` (SQLite's second read), `finish`, `notify`, and `finish and
    notify` (PostgreSQL's finish that NOTIFYs by itself)."""
    names = []
    for sql in seen:
        if sql.startswith("WITH sent AS (UPDATE deliveries") and "pg_notify" in sql:
            names.append("finish and notify")
        elif "pg_notify" in sql:
            names.append("notify")
        elif sql.startswith("UPDATE deliveries") and "LIMIT" in sql:
            names.append("claim")
        elif sql.startswith("SELECT deliveries.id AS delivery_id"):
            names.append("claimed rows")
        elif sql.startswith("UPDATE deliveries"):
            names.append("finish")
        else:
            names.append(sql)
    return names


async def test_a_batch_is_claimed_in_one_statement_on_postgresql_and_recorded_in_one(
    app: FastAPI,
    http: httpx.AsyncClient,
    client: RegisteredClient,
    phone: PairedDevice,
    manual: Dispatcher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for index in range(2):
        await pair_app_device(http, client, name=f"phone {index}")
    sender = ScriptedSender(PushResult(Outcome.DELIVERED))
    runtime_of(app).senders["apns"] = sender
    body = await request_approval(http, client)
    seen = await statements_of(monkeypatch, manual.run_once)
    assert len(sender.sent) == 3
    assert [d.status for d in await deliveries(app, body["approval_id"])] == ["sent"] * 3
    if runtime_of(app).db.dialect == "postgresql":
        # The approval's long-polls are woken by the NOTIFY the finish sends by itself.
        assert outbox_statements(seen) == ["claim", "finish and notify"]
    else:
        assert outbox_statements(seen) == ["claim", "claimed rows", "finish"]


@pytest.mark.postgres_only
async def test_a_delivered_push_is_recorded_in_one_round_trip_on_postgresql(
    app: FastAPI,
    http: httpx.AsyncClient,
    client: RegisteredClient,
    phone: PairedDevice,
    manual: Dispatcher,
) -> None:
    """What goes over the wire for a push sent and recorded: the claim's transaction, then
    the finish alone, with no BEGIN or COMMIT of its own (before, a transaction of three
    round trips: BEGIN, the finish, the NOTIFY with the COMMIT)."""
    await pair_app_device(http, client, name="iPad")
    runtime_of(app).senders["apns"] = ScriptedSender(PushResult(Outcome.DELIVERED))
    body = await request_approval(http, client)
    db = runtime_of(app).db
    await db.dispose()  # the set-up's connections: the round's are opened for it
    on_the_wire: list[str] = []

    def log_queries(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.driver_connection.add_query_logger(
            lambda logged: on_the_wire.append(" ".join(logged.query.split()))
        )

    event.listen(db.engine.sync_engine, "connect", log_queries)
    try:
        assert await manual.run_once() == 2
        await asyncio.sleep(0.1)  # asyncpg calls its query loggers soon after, not at once
        round_trips = list(on_the_wire)  # the reads below go over the same connections
    finally:
        event.remove(db.engine.sync_engine, "connect", log_queries)
    assert [d.status for d in await deliveries(app, body["approval_id"])] == ["sent"] * 2
    assert [query.split()[0] for query in round_trips] == ["BEGIN", "UPDATE", "COMMIT", "WITH"]
    assert round_trips[-1].startswith("WITH sent AS (UPDATE deliveries")


@pytest.mark.postgres_only
async def test_the_finish_alone_notifies_every_process_with_the_topic_waiters_subscribe_to(
    app: FastAPI,
    http: httpx.AsyncClient,
    client: RegisteredClient,
    phone: PairedDevice,
    manual: Dispatcher,
    database_url: str,
) -> None:
    """The finish builds each approval's topic in SQL: another process, listening as a
    relay does, hears exactly `approval_topic(id, PUSH_SENT)`, once per approval however
    many of its phones the statement marks sent."""
    await pair_app_device(http, client, name="iPad")
    runtime_of(app).senders["apns"] = ScriptedSender(PushResult(Outcome.DELIVERED))
    body = await request_approval(http, client)
    heard: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await listener.add_listener(CHANNEL, lambda *args: heard.put_nowait(args[-1]))
        assert await manual.run_once() == 2
        first = await asyncio.wait_for(heard.get(), 10)
        await asyncio.sleep(0.2)
    finally:
        await listener.close()
    assert first == approval_topic(body["approval_id"], PUSH_SENT)
    assert heard.empty()


@pytest.mark.postgres_only
async def test_a_finish_alone_whose_connection_died_during_the_send_runs_on_a_new_one(
    app: FastAPI,
    http: httpx.AsyncClient,
    client: RegisteredClient,
    phone: PairedDevice,
    manual: Dispatcher,
    database_url: str,
) -> None:
    """PostgreSQL restarted while the push was with its provider: every connection the
    relay keeps is dead when the outcome is recorded. The finish, the first statement of
    its block, is sent again on a new connection, and the client waiting hears the push
    went out."""
    body = await request_approval(http, client)
    admin = await asyncpg.connect(asyncpg_dsn(database_url))

    class EndingEveryConnection(ScriptedSender):
        async def send(self, message: PushMessage) -> PushResult:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            return await super().send(message)

    runtime_of(app).senders["apns"] = EndingEveryConnection(PushResult(Outcome.DELIVERED))
    try:
        waiting = poll(http, client, body["approval_id"], until="change")
        assert await still_waiting(waiting)
        assert await manual.run_once() == 1
        state = (await asyncio.wait_for(waiting, 10)).json()
    finally:
        await admin.close()
    assert (state["status"], state["delivery"]["sent"]) == ("pending", 1)
    assert [d.status for d in await deliveries(app, body["approval_id"])] == ["sent"]


async def test_deliveries_with_nothing_to_send_are_finished_with_their_claim(
    app: FastAPI,
    http: httpx.AsyncClient,
    client: RegisteredClient,
    phone: PairedDevice,
    manual: Dispatcher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await pair_app_device(http, client, name="iPad")
    sender = ScriptedSender(PushResult(Outcome.DELIVERED))
    runtime_of(app).senders["apns"] = sender
    body = await request_approval(http, client, ttl_seconds=10)
    later = datetime.now(UTC) + timedelta(seconds=11)
    seen = await statements_of(monkeypatch, lambda: manual.run_once(now=later))
    assert sender.sent == []
    rows = await deliveries(app, body["approval_id"])
    assert [(d.status, d.lease_until) for d in rows] == [("failed", None)] * 2
    if runtime_of(app).db.dialect == "postgresql":
        assert outbox_statements(seen) == ["claim", "finish"]
    else:
        assert outbox_statements(seen) == ["claim", "claimed rows", "finish"]


async def test_a_push_given_up_for_its_token_wakes_the_wait_for_every_push_failing(
    app: FastAPI,
    http: httpx.AsyncClient,
    client: RegisteredClient,
    phone: PairedDevice,
    manual: Dispatcher,
) -> None:
    """The phone's token went bad after the approval was created (another push found it
    out): its delivery is given up at the claim, and a client waiting for every push to
    fail hears it at once, to offer its one-time password."""
    body = await request_approval(http, client)
    async with runtime_of(app).db.session() as session:
        await session.execute(
            update(Device).where(Device.id == phone.device_id).values(push_status="invalid_token")
        )
    waiting = poll(http, client, body["approval_id"], until="final_or_failed")
    assert await still_waiting(waiting)
    await manual.run_once()
    state = (await asyncio.wait_for(waiting, 10)).json()
    assert (state["status"], state["delivery"]["failed"]) == ("pending", 1)
    assert state["delivery"]["last_error"] == "the device has no valid push token"


async def test_a_push_sent_wakes_only_the_waits_it_can_end(
    app: FastAPI,
    http: httpx.AsyncClient,
    client: RegisteredClient,
    phone: PairedDevice,
    manual: Dispatcher,
) -> None:
    """What the dispatcher publishes with a push delivered: the client that asked for any
    change hears it; one waiting for the decision or a failure is not even woken to read."""
    runtime_of(app).senders["apns"] = ScriptedSender(PushResult(Outcome.DELIVERED))
    body = await request_approval(http, client)
    for until in ("final_or_failed", "final"):
        waiting = poll(http, client, body["approval_id"], until=until)
        assert await still_waiting(waiting)
        with state_reads() as seen:
            assert await manual.run_once() == 1
            await asyncio.sleep(0.3)
        assert (until, len(seen), waiting.done()) == (until, 0, False)
        waiting.cancel()
        await set_queued(app, body["approval_id"])
    waiting = poll(http, client, body["approval_id"], until="change")
    assert await still_waiting(waiting)
    await manual.run_once()
    assert (await asyncio.wait_for(waiting, 10)).json()["delivery"]["sent"] == 1


async def set_queued(app: FastAPI, approval_id: str) -> None:
    """Make the approval's push due again, as if it had not gone out yet."""
    async with runtime_of(app).db.session() as session:
        await session.execute(
            update(Delivery)
            .where(Delivery.approval_id == approval_id)
            .values(status="queued", lease_until=None, next_attempt_at=datetime.now(UTC))
        )
