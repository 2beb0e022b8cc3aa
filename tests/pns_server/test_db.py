"""The engine: SQLite transactions queue in the relay; PostgreSQL connections that a restart
closed are never handed to a request (a one-round-trip probe per checkout)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import event, func, literal_column, select, text

from pns_server.config import async_database_url
from pns_server.db import Database, create_engine, when_unit_ends
from pns_server.errors import PnsError
from pns_server.models import Base
from tests.support.postgres import Cluster, postgres_available, start_cluster

ONE = select(literal_column("1"))


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


async def test_sqlite_units_and_sessions_take_one_queue_in_arrival_order(tmp_path: Path) -> None:
    """Units hold a connection of their own and sessions use the pool's, but both take
    the same turns: none waits on SQLite's lock (a busy-timeout sleep would let later ones
    overtake, or fail after ten seconds), and each begins in the order it asked."""
    db = Database(create_engine(f"sqlite+aiosqlite:///{tmp_path / 'q.db'}", pool_timeout=30))
    try:
        async with db.unit() as unit:
            await unit.run_sql("CREATE TABLE t (n INTEGER)")
        began: list[int] = []

        async def unit_writer(n: int) -> None:
            async with db.unit() as unit:
                await unit.run_sql(f"INSERT INTO t VALUES ({n})")
                began.append(n)
                await asyncio.sleep(0.005)  # hold the write lock across an await

        async def session_writer(n: int) -> None:
            async with db.session() as session:
                await session.execute(text("INSERT INTO t VALUES (:n)"), {"n": n})
                began.append(n)
                await asyncio.sleep(0.005)

        async def reader(n: int) -> None:
            async with db.unit_read() as unit:
                await unit.execute(ONE)
                began.append(n)

        kinds = (unit_writer, session_writer, reader)
        tasks = []
        for n in range(30):
            tasks.append(asyncio.create_task(kinds[n % 3](n)))
            await asyncio.sleep(0)  # each asks before the next
        await asyncio.gather(*tasks)
        assert began == list(range(30))
        async with db.unit_read() as unit:
            count = select(func.count()).select_from(text("t"))
            assert await unit.scalar(count) == 20
    finally:
        await db.dispose()


async def test_sqlite_units_keep_one_connection_open(tmp_path: Path) -> None:
    """No checkout per unit: every unit and read runs on the same driver connection,
    outside the pool the sessions use; one its unit invalidated is replaced at the next."""
    db = Database(create_engine(f"sqlite+aiosqlite:///{tmp_path / 'kept.db'}"))
    pool = db.engine.pool
    try:
        drivers = []
        for _ in range(3):
            async with db.unit() as unit:
                await unit.execute(ONE)
                assert pool.checkedout() == 0  # type: ignore[attr-defined]
                drivers.append(unit.driver)
            async with db.unit_read() as unit:
                await unit.execute(ONE)
                drivers.append(unit.driver)
        assert all(driver is drivers[0] for driver in drivers)
        with pytest.raises(RuntimeError):
            async with db.unit() as unit:
                await unit.invalidate()  # as a failed ROLLBACK does
                raise RuntimeError("the unit failed")
        async with db.unit() as unit:
            assert await unit.scalar(ONE) == 1
            assert unit.driver is not drivers[0]
    finally:
        await db.dispose()


async def test_sqlite_dispose_waits_for_the_unit_on_the_held_connection(tmp_path: Path) -> None:
    """Closing the database lets a unit still running finish, then closes its connection:
    no thread of the driver is left behind (one would keep the process from exiting)."""
    before = set(threading.enumerate())
    db = Database(create_engine(f"sqlite+aiosqlite:///{tmp_path / 'closed.db'}"))
    async with db.unit() as unit:
        await unit.run_sql("CREATE TABLE t (n INTEGER)")
    async with db.session() as session:
        await session.execute(text("INSERT INTO t VALUES (1)"))
    started = asyncio.Event()

    async def slow_unit() -> int:
        async with db.unit() as unit:
            started.set()
            await asyncio.sleep(0.2)
            await unit.run_sql("INSERT INTO t VALUES (2)")
            return int(await unit.scalar(select(func.count()).select_from(text("t"))))

    running = asyncio.create_task(slow_unit())
    await started.wait()
    await db.dispose()
    assert running.done() and await running == 2
    async with asyncio.timeout(5):
        while set(threading.enumerate()) - before:
            await asyncio.sleep(0.01)


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
        async def one(kind: int) -> int:
            # Each kind of unit: the ORM session, the driver unit (whose checkout probe is
            # its BEGIN) and the driver read.
            if kind == 0:
                async with db.session() as session:
                    await asyncio.sleep(0.01)  # overlap: the pool opens several connections
                    return int((await session.execute(text("SELECT 1"))).scalar_one())
            context = db.unit() if kind == 1 else db.unit_read()
            async with context as unit:
                await asyncio.sleep(0.01)
                return int(await unit.scalar(ONE))

        return list(await asyncio.gather(*(one(n % 3) for n in range(12))))

    try:
        assert await burst() == [1] * 12
        if loop_saw_the_close:
            await asyncio.to_thread(own_cluster.stop, "fast")
            await asyncio.to_thread(own_cluster.start)
            await asyncio.sleep(0.1)  # the event loop reads the closed sockets
        else:
            # Blocking calls: the loop cannot read any close before the burst begins.
            own_cluster.stop("fast")
            own_cluster.start()
        assert await burst() == [1] * 12
    finally:
        await db.dispose()


@pytest.mark.postgres_only
async def test_a_load_above_the_pool_size_reuses_its_connections(database_url: str) -> None:
    """Up to twice `pool_size` connections, opened as the load needs them and then kept:
    bursts of that many units open no connection after the first (an overflow connection,
    closed on its return, was opened again by nearly every burst)."""
    engine = create_engine(async_database_url(database_url), pool_size=2)
    opened: list[object] = []
    event.listen(
        engine.sync_engine, "connect", lambda connection, _record: opened.append(connection)
    )
    db = Database(engine)

    async def hold() -> None:
        async with db.unit_read() as unit:
            await unit.scalar(select(func.pg_sleep(0.02)))

    try:
        for _ in range(10):
            await asyncio.gather(*(hold() for _ in range(4)))
        assert len(opened) == 4
    finally:
        await db.dispose()


async def backend_of(db: Database) -> int:
    """The PostgreSQL backend a unit ran on, held a moment so that a burst needs one each."""
    async with db.unit() as unit:
        await unit.scalar(select(func.pg_sleep(0.02)))
        return int(await unit.scalar(select(func.pg_backend_pid())))


@pytest.mark.postgres_only
async def test_after_a_burst_one_unit_at_a_time_keeps_to_one_warm_connection(
    database_url: str,
) -> None:
    """The pool hands out the connection used last: after a burst opened several, units
    one at a time all run on the same backend (in arrival order they took turns on every
    connection the burst opened, each one cold for the statements it had not run)."""
    db = Database(create_engine(async_database_url(database_url), pool_size=2))
    try:
        assert len(set(await asyncio.gather(*(backend_of(db) for _ in range(4))))) == 4
        assert len({await backend_of(db) for _ in range(8)}) == 1
    finally:
        await db.dispose()


@pytest.mark.postgres_only
async def test_an_idle_connection_closed_by_the_server_is_replaced_at_its_next_use(
    database_url: str,
) -> None:
    """Units one at a time leave the burst's other connections idle at the bottom of the
    pool; PostgreSQL ending one of them (`idle_session_timeout`, an operator) fails no
    unit when the next burst reaches it."""
    db = Database(create_engine(async_database_url(database_url), pool_size=2))
    try:
        burst = set(await asyncio.gather(*(backend_of(db) for _ in range(4))))
        warm = await backend_of(db)
        for pid in burst - {warm}:
            async with db.unit_read() as unit:
                assert await unit.scalar(select(func.pg_terminate_backend(pid)))
        again = await asyncio.gather(*(backend_of(db) for _ in range(4)))
        assert len(set(again)) == 4 and not (set(again) & (burst - {warm}))
    finally:
        await db.dispose()


@pytest.mark.postgres_only
async def test_reads_skip_begin_and_commit_on_postgres(database_url: str) -> None:
    """`Database.unit_read()` runs each statement as its own implicit transaction (one
    round trip, no BEGIN/COMMIT); `session()` and `unit()` are one explicit transaction."""
    db = Database(create_engine(async_database_url(database_url), pool_size=1))
    xid = text("SELECT txid_current()")
    xid_on_driver = select(func.txid_current().label("xid"))
    try:
        async with db.unit_read() as unit:
            first = await unit.scalar(xid_on_driver)
            assert await unit.scalar(xid_on_driver) != first
        async with db.session() as session:
            first = (await session.execute(xid)).scalar_one()
            assert (await session.execute(xid)).scalar_one() == first
        async with db.unit() as unit:
            first = await unit.scalar(xid_on_driver)
            assert await unit.scalar(xid_on_driver) == first
    finally:
        await db.dispose()


async def test_a_unit_cancelled_while_its_begin_waits_leaves_no_transaction(
    tmp_path: Path,
) -> None:
    """SQLite: a unit's BEGIN IMMEDIATE can wait in its connection's thread (another
    process holds the write lock) when its request is cancelled. Its connection is handed
    back with no transaction yet, and one begins a moment later; a unit that ended its own
    transaction marks its connection so the next turn skips its ROLLBACK, and this one must
    not be marked: the next unit would find the transaction and fail to begin."""
    path = tmp_path / "cancelled.db"
    db = Database(create_engine(f"sqlite+aiosqlite:///{path}"))
    try:
        async with db.unit() as unit:
            await unit.run_sql("CREATE TABLE t (n INTEGER)")
        other_process = sqlite3.connect(path, isolation_level=None)
        other_process.execute("BEGIN IMMEDIATE")

        async def write(n: int) -> None:
            async with db.unit() as unit:
                await unit.run_sql(f"INSERT INTO t VALUES ({n})")

        waiting = asyncio.create_task(write(1))
        await asyncio.sleep(0.3)  # its BEGIN IMMEDIATE now waits for the other's lock
        waiting.cancel()
        await asyncio.sleep(0.1)
        other_process.execute("ROLLBACK")
        other_process.close()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        async with asyncio.timeout(10):
            await write(2)
        async with db.unit_read() as unit:
            assert await unit.scalar(select(literal_column("n")).select_from(text("t"))) == 2
    finally:
        await db.dispose()


async def test_a_connection_returned_mid_transaction_is_rolled_back(database_url: str) -> None:
    """A request cancelled between its BEGIN and its block would return its connection
    inside a transaction: the pool rolls it back, so the next unit neither commits what it
    left (PostgreSQL) nor fails to begin (SQLite)."""
    db = Database(create_engine(async_database_url(database_url), pool_size=1))
    now = "now()" if db.dialect == "postgresql" else "'2026-11-30 09:00:00.000000'"
    stray = (
        "INSERT INTO clients (id, token_hash, name, edition, created_at, pushes_since_success,"
        " otp_consecutive_failures, otp_failures_since_success, otp_lock_count)"
        f" VALUES ('stray', 'stray', 'stray', 'pro', {now}, 0, 0, 0, 0)"
    )
    begin = "BEGIN" if db.dialect == "postgresql" else "BEGIN IMMEDIATE"
    try:
        for _ in range(2):
            async with db.engine.connect() as connection:
                raw = await connection.get_raw_connection()
                await raw.driver_connection.execute(begin)
                await raw.driver_connection.execute(stray)
            # The connection just returned (on SQLite the sessions' one; units hold their own).
            async with db.unit() if db.dialect == "postgresql" else db.session() as work:
                await work.execute(ONE)
        async with db.unit_read() as unit:
            count = select(func.count()).select_from(Base.metadata.tables["clients"])
            assert await unit.scalar(count) == 0
    finally:
        await db.dispose()


async def test_a_units_end_tells_its_callbacks_whether_it_committed(database_url: str) -> None:
    """`when_unit_ends`: True once the COMMIT succeeded (also for an error that keeps the
    work done before it), False after a rollback; a callback that fails is logged and
    neither stops the others nor undoes the commit."""
    db = Database(create_engine(async_database_url(database_url), pool_size=1))
    ended: list[tuple[str, bool]] = []

    def note(name: str) -> Callable[[bool], None]:
        return lambda committed: ended.append((name, committed))

    def fail(_committed: bool) -> None:
        raise RuntimeError("a broken callback")

    insert = "INSERT INTO clients_kept (name) VALUES ('{}')"
    try:
        async with db.unit() as unit:
            await unit.run_sql("CREATE TABLE clients_kept (name VARCHAR(20))")
        async with db.unit() as unit:
            when_unit_ends(unit, fail)
            when_unit_ends(unit, note("committed"))
            await unit.run_sql(insert.format("committed"))
        with pytest.raises(RuntimeError):
            async with db.unit() as unit:
                when_unit_ends(unit, note("raised"))
                await unit.run_sql(insert.format("raised"))
                raise RuntimeError("the block failed")
        with pytest.raises(PnsError):
            async with db.unit() as unit:
                when_unit_ends(unit, note("refused"))
                await unit.run_sql(insert.format("refused"))
                raise PnsError("refused, nothing kept")
        with pytest.raises(PnsError):
            async with db.unit() as unit:
                when_unit_ends(unit, note("kept"))
                await unit.run_sql(insert.format("kept"))
                raise PnsError("refused, the work before kept", commit=True)
        assert ended == [("committed", True), ("raised", False), ("refused", False), ("kept", True)]
        async with db.unit_read() as unit:
            names = select(literal_column("name")).select_from(text("clients_kept"))
            assert sorted(await unit.scalars(names)) == ["committed", "kept"]
    finally:
        await db.dispose()


async def test_statements_alone_are_refused_on_sqlite(tmp_path: Path) -> None:
    """SQLite's writers take the write lock at BEGIN; a write outside a unit would not."""
    db = Database(create_engine(f"sqlite+aiosqlite:///{tmp_path / 'alone.db'}"))
    try:
        with pytest.raises(RuntimeError, match="PostgreSQL"):
            async with db.unit_alone():
                pass
    finally:
        await db.dispose()
