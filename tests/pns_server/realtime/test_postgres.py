"""The LISTEN/NOTIFY notifier against a real PostgreSQL: two notifiers stand for two replicas."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from pns_server.config import async_database_url
from pns_server.realtime.postgres import PostgresNotifier

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


async def test_publish_on_one_replica_wakes_a_waiter_on_another(pair) -> None:
    a, b = pair
    async with b.subscribe("approval:1") as sub, b.subscribe("approval:2") as other:
        await a.publish(["approval:1"])
        assert await sub.wait(5)
        assert not await other.wait(0.2)


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
        await a.publish(["approval:3"])
        assert await sub.wait(5)


async def test_publish_reconnects_after_its_connection_was_killed(pair, database_url: str) -> None:
    a, b = pair
    async with b.subscribe("warm-up") as sub:
        await a.publish(["warm-up"])  # opens a's publishing connection
        assert await sub.wait(5)
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query LIKE '%pg_notify%' "
            "AND pid <> pg_backend_pid()"
        )
    finally:
        await admin.close()
    deadline = asyncio.get_running_loop().time() + 10
    while not b.connected:  # the publisher's kill may have caught b's listener too
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    async with b.subscribe("approval:9") as sub:
        await a.publish(["approval:9"])
        assert await sub.wait(5)
