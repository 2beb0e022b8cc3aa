"""PostgreSQL's connections: checked out of the pool once, kept between units and
sessions, and handed out in arrival order (`pns_server.connection_queue`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event, exc, func, literal_column, select, text

from pns_server.config import async_database_url
from pns_server.db import Database, create_engine
from pns_server.driver import DriverUnit
from pns_server.errors import PnsError
from tests.support.tcp_proxy import TcpProxy

ONE = select(literal_column("1"))


BACKEND = select(func.pg_backend_pid())


async def backend_of(work: Callable[[], AbstractAsyncContextManager[DriverUnit]]) -> int:
    """The PostgreSQL backend a unit (`db.unit`, `db.unit_read`, `db.unit_alone`) ran on."""
    async with work() as unit:
        return int(await unit.scalar(BACKEND))


async def cancel_while_it_runs(work: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """Start `work`, let its statement run on the server (it sets the event just before),
    then cancel it, as a client that goes away would."""
    started = asyncio.Event()
    task = asyncio.create_task(work(started))
    await started.wait()
    await asyncio.sleep(0.1)  # the statement is running on the server
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def count_checkouts(db: Database) -> list[object]:
    checkouts: list[object] = []
    event.listen(db.engine.sync_engine, "checkout", lambda *_: checkouts.append(None))
    return checkouts


@pytest.mark.postgres_only
async def test_units_and_sessions_one_after_another_check_out_of_the_pool_once(
    database_url: str,
) -> None:
    """A unit or session that ends cleanly leaves its connection for the next one: units
    of work, reads, statements alone and ORM sessions, one after another, take one
    connection out of the pool in all (a checkout and its return cost a unit as much CPU
    as its statement)."""
    db = Database(create_engine(async_database_url(database_url), pool_size=2))
    checkouts = count_checkouts(db)
    backends: set[int] = set()
    try:
        for _ in range(4):
            async with db.unit() as unit:
                backends.add(int(await unit.scalar(BACKEND)))
            async with db.unit_read() as unit:
                backends.add(int(await unit.scalar(BACKEND)))
            async with db.unit_alone() as unit:
                backends.add(int(await unit.scalar(BACKEND)))
            async with db.session() as session:
                backends.add(int((await session.execute(BACKEND)).scalar_one()))
        with pytest.raises(PnsError):  # refused between statements: the connection is clean
            async with db.unit() as unit:
                backends.add(int(await unit.scalar(BACKEND)))
                raise PnsError("refused")
        async with db.unit_read() as unit:
            backends.add(int(await unit.scalar(BACKEND)))
        assert len(checkouts) == 1 and len(backends) == 1
        assert db.connections_in_use == 0
    finally:
        await db.dispose()


@pytest.mark.postgres_only
async def test_a_session_commits_on_its_kept_connection_and_leaves_it_clean(
    database_url: str,
) -> None:
    """A session on a kept connection commits what it wrote, rolls back what it refused,
    and leaves no transaction behind for the unit after it (which would otherwise commit
    or see the session's work)."""
    db = Database(create_engine(async_database_url(database_url), pool_size=1))
    try:
        async with db.session() as session:
            await session.execute(text("CREATE TEMP TABLE t (n int)"))
            await session.execute(text("INSERT INTO t VALUES (1)"))
        with pytest.raises(PnsError):
            async with db.session() as session:
                await session.execute(text("INSERT INTO t VALUES (2)"))
                raise PnsError("refused")
        async with db.unit_read() as unit:  # a temp table: only its own connection sees it
            rows = select(func.array_agg(literal_column("n"))).select_from(text("t"))
            assert await unit.scalar(rows) == [1]
            assert not unit.driver.is_in_transaction()
        assert db.connections_in_use == 0
    finally:
        await db.dispose()


@pytest.mark.postgres_only
async def test_waiters_get_connections_in_arrival_order(database_url: str) -> None:
    """With every connection out, units and sessions wait in one queue: each gets the next
    connection given back in the order it asked, and one that asks just as a connection
    is handed to a waiter queues behind the others instead of taking it."""
    db = Database(create_engine(async_database_url(database_url), pool_size=1))
    began: list[str] = []

    async def unit(name: str) -> None:
        async with db.unit() as work:
            began.append(name)
            await work.scalar(ONE)

    async def session(name: str) -> None:
        async with db.session() as work:
            began.append(name)
            await work.execute(ONE)

    try:
        async with contextlib.AsyncExitStack() as held:
            first = await held.enter_async_context(db.unit())
            async with db.unit() as second:  # the pool's two connections
                await first.scalar(ONE)
                await second.scalar(ONE)
                waiting = []
                for n in range(6):
                    waiting.append(asyncio.create_task((unit if n % 2 else session)(f"w{n}")))
                    await asyncio.sleep(0.02)  # each asks before the next
                assert not began and db.connections_in_use == 2
            # `second` went to w0; this unit asks before w0 has run.
            await unit("late")
            await asyncio.gather(*waiting)
        assert began == ["w0", "w1", "w2", "w3", "w4", "w5", "late"]
        assert db.connections_in_use == 0
    finally:
        await db.dispose()


@pytest.mark.postgres_only
async def test_a_waiter_cancelled_as_it_is_handed_a_connection_passes_it_on(
    database_url: str,
) -> None:
    """A request cancelled in the moment between being handed a connection and running
    (a client gone, a timeout) hands it to the next waiter: no connection is lost."""
    db = Database(create_engine(async_database_url(database_url), pool_size=1, pool_timeout=5))
    checkouts = count_checkouts(db)

    async def read() -> int:
        async with db.unit_read() as unit:
            return int(await unit.scalar(ONE))

    try:
        async with contextlib.AsyncExitStack() as held:
            await held.enter_async_context(db.unit_read())
            async with db.unit_read():
                cancelled = asyncio.create_task(read())
                await asyncio.sleep(0.02)
                after = asyncio.create_task(read())
                await asyncio.sleep(0.02)
            cancelled.cancel()  # it was handed the connection just given back
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            async with asyncio.timeout(2):
                assert await after == 1
        assert db.connections_in_use == 0 and len(checkouts) == 2
        assert await asyncio.gather(*(read() for _ in range(2))) == [1, 1]
        assert len(checkouts) == 2
    finally:
        await db.dispose()


@pytest.mark.postgres_only
async def test_a_wait_longer_than_the_pool_timeout_is_the_pools_timeout_error(
    database_url: str,
) -> None:
    """The wait for a connection ends after the pool's timeout with SQLAlchemy's own
    TimeoutError (answered as 503, `database_unavailable`), and leaves the queue."""
    db = Database(create_engine(async_database_url(database_url), pool_size=1, pool_timeout=0.2))
    try:
        async with db.unit_read(), db.unit_read():
            with pytest.raises(exc.TimeoutError, match=r"0\.2 s"):
                async with db.unit_read():
                    pass
        async with db.unit_read() as unit:
            assert await unit.scalar(ONE) == 1
        assert db.connections_in_use == 0
    finally:
        await db.dispose()


async def test_a_connection_that_cannot_be_opened_frees_its_place() -> None:
    """A connection the pool failed to open (PostgreSQL down) leaves no place taken: the
    next requests try again at once instead of waiting for places that never come back."""
    url = "postgresql+asyncpg://pns:pns@127.0.0.1:9/pns"  # the discard port: refused
    db = Database(create_engine(url, pool_size=1, pool_timeout=30))
    try:
        for _ in range(4):
            with pytest.raises((OSError, exc.DBAPIError)):
                async with asyncio.timeout(10), db.unit():
                    pass
        assert db.connections_in_use == 0
    finally:
        await db.dispose()


@pytest.mark.postgres_only
async def test_a_kept_connection_the_server_ended_fails_no_unit_or_session(
    database_url: str,
) -> None:
    """A kept connection is not probed by the pool: PostgreSQL ending it (an operator,
    `idle_session_timeout`, a restart) fails neither the next unit of work (its BEGIN finds
    it dead and it takes a new one), nor the next session (its `SELECT 1`), nor the next
    read (its first statement is sent again on a new one)."""
    db = Database(create_engine(async_database_url(database_url), pool_size=2))
    admin = await asyncpg.connect(database_url)

    async def session_backend() -> int:
        async with db.session() as session:
            return int((await session.execute(BACKEND)).scalar_one())

    try:
        for next_backend in (
            lambda: backend_of(db.unit),
            lambda: backend_of(db.unit_read),
            lambda: backend_of(db.unit_alone),
            session_backend,
        ):
            kept = await backend_of(db.unit_read)
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", kept)
            assert await next_backend() != kept
        assert db.connections_in_use == 0
    finally:
        await admin.close()
        await db.dispose()


@pytest.mark.postgres_only
async def test_a_unit_cancelled_mid_statement_leaves_its_connection_to_the_pool(
    database_url: str,
) -> None:
    """A unit cancelled while its statement runs is not kept for the next one (the
    statement may still be running on it): it goes back to the pool, which ends whatever
    it left and probes it before handing it out again, so the next unit checks out."""
    db = Database(create_engine(async_database_url(database_url), pool_size=2))
    checkouts = count_checkouts(db)

    async def sleeps(started: asyncio.Event) -> None:
        async with db.unit() as unit:
            started.set()
            await unit.scalar(select(func.pg_sleep(5)))

    try:
        await cancel_while_it_runs(sleeps)
        assert db.connections_in_use == 0 and len(checkouts) == 1
        for _ in range(3):
            async with db.unit() as unit:
                assert await unit.scalar(ONE) == 1
        assert len(checkouts) == 2
    finally:
        await db.dispose()


@pytest.mark.postgres_only
async def test_a_request_cancelled_while_its_probe_hangs_frees_its_place(
    database_url: str, proxy: TcpProxy
) -> None:
    """A kept connection that went silent (a NAT or firewall forgot the flow) hangs the
    BEGIN that probes it; the request is cancelled (its client left). The connection is
    dropped and its place freed: the next units open new connections instead of waiting
    for places that never come back."""
    url = async_database_url(proxy.url_for(database_url))
    db = Database(create_engine(url, pool_size=1, pool_timeout=2))
    try:
        kept = await backend_of(db.unit)
        for _ in range(2):  # as many as there are places: none may stay taken
            assert proxy.black_hole() >= 1
            hanging = asyncio.create_task(backend_of(db.unit))
            await asyncio.sleep(0.3)
            assert not hanging.done()
            hanging.cancel()
            with pytest.raises(asyncio.CancelledError):
                await hanging
            assert db.connections_in_use == 0
            async with asyncio.timeout(5):  # on a new connection, forwarded
                kept_now = await backend_of(db.unit)
            assert kept_now != kept
            kept = kept_now
    finally:
        await db.dispose()


@pytest.mark.postgres_only
async def test_a_read_that_cannot_reconnect_gives_its_place_back_once(
    database_url: str, proxy: TcpProxy
) -> None:
    """A read finds its kept connection dead and PostgreSQL unreachable: the read fails
    with the database's error, and the dead connection's place is freed once, not twice
    (counted twice, the relay would open more connections than the pool holds)."""
    db = Database(create_engine(async_database_url(proxy.url_for(database_url)), pool_size=1))
    try:
        async with db.unit_read() as unit:
            assert await unit.scalar(ONE) == 1
        await proxy.close()  # every connection through it closed, and no new one taken
        with pytest.raises((OSError, exc.DBAPIError)):
            async with db.unit_read() as unit:
                await unit.scalar(ONE)
        assert db.connections_in_use == 0
    finally:
        await db.dispose()


@pytest.mark.postgres_only
async def test_a_session_cancelled_mid_statement_leaves_its_connection_to_the_pool(
    database_url: str,
) -> None:
    """As a unit's: an ORM session cancelled while its statement runs is not kept for the
    next one; its place is free at once, and the next session runs."""
    db = Database(create_engine(async_database_url(database_url), pool_size=1, pool_timeout=5))

    async def sleeps(started: asyncio.Event) -> None:
        async with db.session() as session:
            started.set()
            await session.execute(select(func.pg_sleep(5)))

    try:
        await cancel_while_it_runs(sleeps)
        assert db.connections_in_use == 0
        for _ in range(3):  # more than the two places: none is held by the cancelled one
            async with asyncio.timeout(4), db.session() as session:
                assert (await session.execute(ONE)).scalar_one() == 1
        assert db.connections_in_use == 0
    finally:
        await db.dispose()
