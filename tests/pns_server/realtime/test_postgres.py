"""The LISTEN/NOTIFY notifier against a real PostgreSQL: two notifiers stand for two replicas."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from pns_server.config import async_database_url
from pns_server.db import Database, create_engine, publish_after_commit
from pns_server.realtime.postgres import PostgresNotifier
from pns_server.topics import PUSH_FAILED, PUSH_SENT, approval_topic
from tests.pns_server.realtime.test_base import Picky

pytestmark = pytest.mark.postgres_only


@pytest.fixture
async def pair(database_url: str):
    a = PostgresNotifier(async_database_url(database_url), health_interval=0.2)
    b = PostgresNotifier(async_database_url(database_url), health_interval=0.2)
    await a.start()
    await b.start()
    assert a.connected and b.connected
    yield a, b
    await a.close()
    await b.close()


def database_for(notifier: PostgresNotifier, database_url: str) -> Database:
    """A replica's database: topics go out as NOTIFY inside its transactions."""
    engine = create_engine(async_database_url(database_url), pool_size=1)
    return Database(engine, notifier.publish, notifier.before_commit, notifier.notify_sql)


async def commit_topics(notifier: PostgresNotifier, database_url: str, *topics: str) -> None:
    db = database_for(notifier, database_url)
    try:
        async with db.session() as session:
            for topic in topics:
                publish_after_commit(session, topic)
    finally:
        await db.dispose()


async def test_publish_on_one_replica_wakes_a_waiter_on_another(pair, database_url: str) -> None:
    a, b = pair
    async with b.subscribe("approval:1") as sub, b.subscribe("approval:2") as other:
        await commit_topics(a, database_url, "approval:1")
        assert await sub.wait(5)
        assert not await other.wait(0.2)


async def test_a_kind_reaches_another_replica_and_wakes_only_who_wants_it(
    pair, database_url: str
) -> None:
    a, b = pair
    picky = Picky(approval_topic("1"))
    b.add(picky)
    try:
        async with b.subscribe(approval_topic("1")) as plain:
            await commit_topics(a, database_url, approval_topic("1", PUSH_SENT))
            assert await plain.wait(5)
            assert not await picky.wait(0.2)
            await commit_topics(a, database_url, approval_topic("1", PUSH_FAILED))
            assert await picky.wait(5)
    finally:
        b.discard(picky)


async def test_a_dropped_listen_connection_wakes_waiters_and_reconnects(
    pair, database_url: str
) -> None:
    a, b = pair
    reconnects = b.reconnects
    async with b.subscribe("approval:1") as sub:
        admin = await asyncpg.connect(database_url)
        try:
            await admin.execute(
                # Every connection of both "replicas": their listeners and publishers.
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await admin.close()
        # Every waiter is woken to re-read: a NOTIFY sent during the outage is not missed.
        assert await sub.wait(10)
    deadline = asyncio.get_running_loop().time() + 10
    while not (b.connected and b.reconnects > reconnects):
        assert asyncio.get_running_loop().time() < deadline, "listener did not reconnect"
        await asyncio.sleep(0.05)
    async with b.subscribe("approval:3") as sub:
        await commit_topics(a, database_url, "approval:3")
        assert await sub.wait(5)


async def test_notify_goes_out_with_the_commit_and_not_on_rollback(pair, database_url: str) -> None:
    a, b = pair
    db = database_for(a, database_url)
    try:
        async with b.subscribe("approval:7") as sub:
            with pytest.raises(RuntimeError):
                async with db.session() as session:
                    publish_after_commit(session, "approval:7")
                    raise RuntimeError("the request failed")
            assert not await sub.wait(0.5)
            async with db.session() as session:
                publish_after_commit(session, "approval:7")
            assert await sub.wait(5)
    finally:
        await db.dispose()


@pytest.mark.parametrize("topic", ["approval:9", "approval:it's"])
async def test_a_driver_unit_notifies_with_its_commit_and_not_on_rollback(
    pair, database_url: str, topic: str
) -> None:
    """NOTIFY and COMMIT in one round trip, or (a topic that cannot be a literal) the
    parameterised NOTIFY: either way, delivered with the commit, never on rollback."""
    a, b = pair
    db = database_for(a, database_url)
    try:
        async with b.subscribe(topic) as sub:
            with pytest.raises(RuntimeError):
                async with db.unit() as unit:
                    publish_after_commit(unit, topic)
                    raise RuntimeError("the request failed")
            assert not await sub.wait(0.5)
            async with db.unit() as unit:
                publish_after_commit(unit, topic)
            assert await sub.wait(5)
    finally:
        await db.dispose()


def test_notify_sql_writes_only_topics_that_cannot_break_out_of_a_literal() -> None:
    notifier = PostgresNotifier("postgresql+asyncpg://unused/db")
    assert notifier.notify_sql(["pending:ab12", "approval:ff00"]) == (
        "SELECT pg_notify('pns_events', 'approval:ff00'), pg_notify('pns_events', 'pending:ab12')"
    )
    # A push's outcome names its kind after a slash.
    assert notifier.notify_sql(["approval:ff00/sent"]) == (
        "SELECT pg_notify('pns_events', 'approval:ff00/sent')"
    )
    for hostile in ["approval:x'); DROP TABLE clients; --", "a b", "", "x" * 201, "é"]:
        assert notifier.notify_sql(["outbox", hostile]) is None
