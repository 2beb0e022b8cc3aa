"""The engine: SQLite transactions queue in the relay; PostgreSQL connections that a restart
closed are never handed to a request (a one-round-trip probe per checkout)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import text

from pns_server.config import async_database_url
from pns_server.db import Database, create_engine
from tests.support.postgres import Cluster, postgres_available, start_cluster


async def test_sqlite_transactions_wait_their_turn_in_arrival_order(tmp_path: Path) -> None:
    """Twenty concurrent writers: none fails on the database lock, and each begins in the
    order it asked (a busy-timeout sleep would let later ones overtake)."""
    db = Database(create_engine(f"sqlite+aiosqlite:///{tmp_path / 'q.db'}", pool_timeout=30))
    try:
        async with db.session() as session:
            await session.execute(text("CREATE TABLE t (n INTEGER)"))
        began: list[int] = []

        async def writer(n: int) -> None:
            async with db.session() as session:
                await session.execute(text("INSERT INTO t VALUES (:n)"), {"n": n})
                began.append(n)
                await asyncio.sleep(0.005)  # hold the write lock across an await

        tasks = []
        for n in range(20):
            tasks.append(asyncio.create_task(writer(n)))
            await asyncio.sleep(0)  # each asks before the next
        await asyncio.gather(*tasks)
        assert began == list(range(20))
        async with db.session() as session:
            assert (await session.execute(text("SELECT count(*) FROM t"))).scalar() == 20
    finally:
        await db.dispose()


@pytest.fixture
async def own_cluster() -> AsyncIterator[Cluster]:
    if not postgres_available():
        pytest.skip("PostgreSQL is not installed here")
    cluster = await asyncio.to_thread(start_cluster)
    try:
        yield cluster
    finally:
        await asyncio.to_thread(cluster.destroy)


@pytest.mark.slow
@pytest.mark.parametrize("loop_saw_the_close", [True, False])
async def test_connections_a_postgres_restart_closed_are_never_handed_out(
    own_cluster: Cluster, loop_saw_the_close: bool
) -> None:
    """The pool is full of connections the restart closed and nothing else (no dispatcher, no
    readiness probe) touched them: the first sessions after the restart all succeed, whether
    or not the event loop has read the closed sockets before the sessions begin (under load
    it has not: the driver still believes its connections open)."""
    conn = await asyncpg.connect(own_cluster.database_url("postgres"))
    await conn.execute('CREATE DATABASE "restart"')
    await conn.close()
    url = async_database_url(own_cluster.database_url("restart"))
    db = Database(create_engine(url, pool_size=5))

    async def burst() -> list[int]:
        async def one() -> int:
            async with db.session() as session:
                await asyncio.sleep(0.01)  # overlap, so the pool opens several connections
                return int((await session.execute(text("SELECT 1"))).scalar_one())

        return list(await asyncio.gather(*(one() for _ in range(10))))

    try:
        assert await burst() == [1] * 10
        if loop_saw_the_close:
            await asyncio.to_thread(own_cluster.stop, "fast")
            await asyncio.to_thread(own_cluster.start)
            await asyncio.sleep(0.1)  # the event loop reads the closed sockets
        else:
            # Blocking calls: the loop cannot read any close before the burst begins.
            own_cluster.stop("fast")
            own_cluster.start()
        assert await burst() == [1] * 10
    finally:
        await db.dispose()


@pytest.mark.postgres_only
async def test_reads_skip_begin_and_commit_on_postgres(database_url: str) -> None:
    """`Database.read()` runs each statement as its own implicit transaction (one round
    trip, no BEGIN/COMMIT); `session()` is one explicit transaction."""
    db = Database(create_engine(async_database_url(database_url), pool_size=1))
    xid = text("SELECT txid_current()")
    try:
        async with db.read() as session:
            first = (await session.execute(xid)).scalar_one()
            assert (await session.execute(xid)).scalar_one() != first
        async with db.session() as session:
            first = (await session.execute(xid)).scalar_one()
            assert (await session.execute(xid)).scalar_one() == first
    finally:
        await db.dispose()
