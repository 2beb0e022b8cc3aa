"""Async engine and units of work: `Database.session()` (the ORM, for the cold routes) and
`Database.unit()` / `unit_read()` (the driver connection, for the routes every login runs;
see `pns_server.driver`). Only `session()` and `unit()` commit. Realtime topics queued in a
unit go out with the commit: NOTIFY inside the same transaction on PostgreSQL (delivered
at commit), then `publish` after it (wakes this process's waiters), so a woken long-poll
always reads the new state and no request waits on a side connection. A unit may also
hand work on to this process for when it ends (`when_unit_ends`). Units and sessions wait
for their connection in arrival order: on SQLite for their turn (`SqliteTurns`), on
PostgreSQL in `ConnectionQueue`, which keeps each connection between requests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from sqlalchemy import QueuePool, event, exc
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from pns_server.connection_queue import ConnectionQueue, WaitObserver, driver_of
from pns_server.driver import DriverUnit
from pns_server.errors import PnsError
from pns_server.sqlite_loop import CONNECTION_PRAGMAS, Checkpointer, LoopSqlite

TOPICS_KEY = "pns_topics"
UNIT_END_KEY = "pns_unit_end"

log = logging.getLogger("pns.db")

# What runs a unit's statements: an ORM session, or (hot routes) the driver connection.
Executor = AsyncSession | DriverUnit
Publisher = Callable[[Iterable[str]], Awaitable[None]]
InTransaction = Callable[[Executor, Iterable[str]], Awaitable[None]]
# The NOTIFY of these topics as one SQL string, or None to send it as a statement.
NotifySql = Callable[[Iterable[str]], str | None]


def publish_after_commit(session: Executor, topic: str) -> None:
    """Queue a realtime topic; it is published only if the transaction commits."""
    session.info.setdefault(TOPICS_KEY, set()).add(topic)


def when_unit_ends(unit: DriverUnit, callback: Callable[[bool], None]) -> None:
    """Call `callback(committed)` once the unit (`Database.unit`) ends: True once its
    COMMIT succeeded, False when it rolled back or the COMMIT's outcome is unknown (a
    connection lost while committing), so work handed on for a commit must also be safe
    to lose when the rows did commit. Called before the commit's topics are published; a
    callback must not block (it runs on the request's path)."""
    unit.info.setdefault(UNIT_END_KEY, []).append(callback)


def _run_unit_end(unit: DriverUnit | None, committed: bool) -> None:
    for callback in unit.info.pop(UNIT_END_KEY, ()) if unit is not None else ():
        try:
            callback(committed)
        except Exception:
            log.exception("a unit's end callback failed (committed: %s)", committed)


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let us emit BEGIN ourselves: pysqlite's implicit BEGIN is DEFERRED, and two deferred
        # writers deadlock on the lock upgrade instead of waiting for busy_timeout.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in CONNECTION_PRAGMAS:
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Straight on the driver: one hand-off to aiosqlite's thread instead of the three a
        # statement through SQLAlchemy's cursor costs (open, execute, close).
        conn.connection.dbapi_connection.run_async(lambda driver: driver.execute("BEGIN IMMEDIATE"))


def create_engine(url: str, *, pool_size: int = 10, pool_timeout: float = 30.0) -> AsyncEngine:
    # hide_parameters: a database error's text (logged, or raised to an operator) never
    # carries statement parameters, which hold match codes, token hashes and sealed secrets.
    if url.startswith("sqlite"):
        # SQLite has one writer at a time and every transaction here is a writer (BEGIN
        # IMMEDIATE). With several connections the others sleep in SQLite's busy handler
        # (steps of up to 100 ms) and wake in no order: that was the OTP tail at concurrency
        # 20. So the relay's transactions wait for their turn in the relay instead
        # (`SqliteTurns`): it comes the moment the previous one ends, in arrival order. This
        # engine's one connection serves the ORM sessions in their turns; the driver units
        # hold one of an engine of their own. (`pool_size` only matters for PostgreSQL.)
        # The pool's own ROLLBACK on return is replaced by `_end_stray_transactions`, which
        # skips it for a connection whose unit ended its transaction itself (see there).
        engine = create_async_engine(
            url,
            pool_size=1,
            max_overflow=0,
            pool_timeout=pool_timeout,
            hide_parameters=True,
            pool_reset_on_return=None,
        )
        _configure_sqlite(engine)
        _end_stray_transactions(engine)
        return engine
    # At most twice `pool_size` connections for the relay's units and sessions, each checked
    # out once and kept by `ConnectionQueue`, which hands out the one used last and makes
    # requests wait in arrival order; the pool only opens them. None is closed between
    # requests: under a load above the pool, overflow connections closed on their return
    # once forked and authenticated a backend every few requests and prepared every
    # statement again, and PostgreSQL's CPU tripled (`bench --only otp`,
    # docs/benchmarks.md). The one overflow connection is for the readiness check beside
    # the queue. The pool's own last-in-first-out order now matters only for connections
    # given back to it (a cancelled request's), probed at their next checkout.
    engine = create_async_engine(
        url,
        pool_size=2 * pool_size,
        max_overflow=1,
        pool_use_lifo=True,
        pool_timeout=pool_timeout,
        hide_parameters=True,
    )
    _probe_on_checkout(engine)
    _end_stray_transactions(engine)
    return engine


def _end_stray_transactions(engine: AsyncEngine) -> None:
    """Never hand out a connection still inside a transaction.

    A unit of work ends its transaction itself, but a request cancelled between its BEGIN
    (or the checkout probe's) and the block that rolls back on error would return its
    connection mid-transaction. On PostgreSQL SQLAlchemy's own reset does not see a
    transaction it did not begin, and the next unit would commit what this one left. So
    on return to the pool a connection still in a transaction is rolled back: one flag
    read, a round trip only in that case.

    On SQLite the flag cannot be trusted: a unit cancelled while its BEGIN IMMEDIATE waits
    in aiosqlite's thread has no transaction yet when its connection returns, and one a
    moment later. There every connection is rolled back on return (a ROLLBACK queued
    behind whatever is left in that thread ends it), unless its unit marked it `settled`:
    it ended its transaction itself and left nothing running, so the ROLLBACK, a hand-off
    to the thread (~50 us of CPU), would do nothing."""
    postgres = engine.dialect.name == "postgresql"

    @event.listens_for(engine.sync_engine, "reset")
    def _reset(dbapi_connection: Any, record: Any, state: Any) -> None:
        if not state.asyncio_safe:
            return  # collected outside the event loop: SQLAlchemy terminates it
        if not postgres:
            if not record.info.pop(SETTLED, False):
                dbapi_connection.rollback()
            return
        if dbapi_connection.driver_connection.is_in_transaction():
            dbapi_connection.run_async(lambda connection: connection.execute("ROLLBACK"))


# Set by a unit on its SQLite connection once it has ended its own transaction (see above).
SETTLED = "pns_settled"


# What the checkout probe sends: a unit of work's BEGIN is as good a probe as `SELECT 1`
# (one round trip, not two), and a driver read needs none (its first statement is retried
# on a new connection if the one it got was dead). A context variable: it reaches the
# pool's greenlet, and no other request.
_PROBE: ContextVar[str | None] = ContextVar("pns_checkout_probe", default="SELECT 1")


def _probe_on_checkout(engine: AsyncEngine) -> None:
    """Hand out only live connections, at the cost of one round trip per checkout.

    A PostgreSQL restart closes every pooled connection, and under load the event loop may
    not yet have read the close when a request checks one out (a check of the driver's
    "closed" flag alone let such connections through). So every checkout sends `SELECT 1`
    first, as a simple query outside any transaction; a connection that fails it makes the
    pool drop every connection opened before it and retry with a new one, and the request
    goes through. SQLAlchemy's own `pool_pre_ping` does the same in three round trips on
    asyncpg (BEGIN, the ping, ROLLBACK, for pgbouncer's transaction mode); this needs one."""

    @event.listens_for(engine.sync_engine, "checkout")
    def _probe(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        probe = _PROBE.get()
        if probe is None:
            return
        try:
            dbapi_connection.run_async(lambda driver: driver.execute(probe))
        except Exception as error:
            raise exc.InvalidatePoolError(
                f"connection failed its checkout probe: {error!r}"
            ) from error


@dataclass(frozen=True, slots=True)
class ConnectionStats:
    in_use: int
    idle: int
    waiting: int


class SqliteTurns:
    """SQLite: the driver units' one connection, held open and taken in turns.

    SQLite has one writer at a time, so the units take turns on one connection that stays
    open, in arrival order (an asyncio lock wakes its waiters first come, first served),
    and run their statements on the event loop (`pns_server.sqlite_loop`). ORM sessions
    take the same turns on the main engine's connection, so no two of the relay's
    transactions ever meet on SQLite's lock (see `create_engine`).

    A unit cancelled while its statement waits in the connection's thread may leave a
    transaction behind it (its BEGIN IMMEDIATE lands a moment later): the next turn rolls
    back first unless the last one marked the connection settled, as the pool's return
    does (`_end_stray_transactions`). A turn that ends with enough rows changed since the
    last checkpoint starts one beside the units (`Checkpointer`): the next turn does not
    wait for it, unless the log has grown long enough to need one that runs alone."""

    def __init__(self, engine: AsyncEngine, waited: WaitObserver | None = None) -> None:
        database, options = engine.dialect.create_connect_args(engine.url)
        self._database: str = database[0]
        self._options = dict(options)
        self._timeout = engine.pool.timeout()  # type: ignore[attr-defined]
        self._lock = asyncio.Lock()
        self._held: LoopSqlite | None = None
        self._checkpointer = Checkpointer(self._database, self._options)
        self._catch_up_due = False
        self.waiting = 0  # units and sessions waiting for their turn now
        self._waited = waited

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Wait for this process's turn on SQLite, as long as the pool would wait."""
        try:
            if self._lock.locked():
                self.waiting += 1
                loop = asyncio.get_running_loop()
                began = loop.time()
                try:
                    async with asyncio.timeout(self._timeout):
                        await self._lock.acquire()
                finally:
                    self.waiting -= 1
                    if self._waited is not None:
                        self._waited(loop.time() - began)
            else:
                await self._lock.acquire()  # free: taken at once (the timer costs ~15 us)
        except TimeoutError:
            raise exc.TimeoutError(
                f"no turn on the database after {self._timeout:g} s "
                "(PNS_DB_POOL_TIMEOUT_SECONDS): every unit before it still running"
            ) from None
        try:
            if self._catch_up_due:
                # Here, not as the last turn ended: a cancellation while it runs finds no
                # unit begun, rather than one committed and not yet waking its waiters. It
                # stays due until it has run: the next turn begins with it instead.
                await self._checkpointer.catch_up()
                self._catch_up_due = False
            yield
            held = self._held
            if held is not None and held.checkpoint_due():
                self._checkpoint(held)
        finally:
            self._lock.release()

    @property
    def checkpoint_running(self) -> bool:
        return self._checkpointer.running

    @property
    def in_turn(self) -> bool:
        return self._lock.locked()

    def _checkpoint(self, held: LoopSqlite) -> None:
        """Start one beside the units; or, once the log is long, or when the one started
        256 changes ago still runs (the writes outpace it: a slow disk), have the next turn
        begin with one that no unit runs beside (`Checkpointer.catch_up`): the log stays
        bounded whatever the disk's speed."""
        checkpointer = self._checkpointer
        if checkpointer.log_must_start_over or not checkpointer.start():
            self._catch_up_due = True
        held.checkpoint_started()

    async def connection(self) -> LoopSqlite:
        """The held connection, settled: call only during a turn."""
        held = self._held
        if held is None or held.invalidated:
            held = self._held = await self._open()
        if not held.info.get(SETTLED, False):
            await held.rollback()
            held.info[SETTLED] = True
        return held

    async def _open(self) -> LoopSqlite:
        connection = await LoopSqlite.open(self._database, **self._options)
        connection.info[SETTLED] = True
        return connection

    async def dispose(self) -> None:
        """Close the held connection once a unit still on it has ended (waiting as long as
        for a turn): its thread would otherwise keep the process from exiting."""
        with contextlib.suppress(exc.TimeoutError):
            async with self.turn():
                await self._close_held()
        await self._close_held()  # a unit that outlived the wait: the process is ending
        await self._checkpointer.close()

    async def _close_held(self) -> None:
        held, self._held = self._held, None
        if held is not None and not held.invalidated:
            await held.close()


class Database:
    def __init__(
        self,
        engine: AsyncEngine,
        publish: Publisher | None = None,
        before_commit: InTransaction | None = None,
        notify_sql: NotifySql | None = None,
        waited: WaitObserver | None = None,
    ) -> None:
        """`waited` is told how long each request that had to wait for its connection (on
        SQLite, its turn) waited: the metrics."""
        self.engine = engine
        self.sessionmaker = async_sessionmaker(engine, expire_on_commit=False)
        self._publish = publish
        self._before_commit = before_commit
        self._notify_sql = notify_sql
        sqlite = engine.dialect.name == "sqlite"
        self._turns = SqliteTurns(engine, waited) if sqlite else None
        self._queue: ConnectionQueue | None = None
        if self._turns is None:
            pool = engine.pool
            assert isinstance(pool, QueuePool), "create_engine() makes PostgreSQL's pool"
            self._queue = ConnectionQueue(
                lambda probe: self._open(probe=probe),
                capacity=pool.size(),
                timeout=pool.timeout(),
                waited=waited,
            )

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def connections_in_use(self) -> int:
        """Connections out for work now: not those kept between units (PostgreSQL)."""
        if self._queue is not None:
            return self._queue.in_use
        checked_out: int = self.engine.pool.checkedout()  # type: ignore[attr-defined]
        return checked_out

    def connection_stats(self) -> ConnectionStats:
        """This process's database connections now, for the metrics. On SQLite, the one
        connection the turns are taken on, and the requests waiting for their turn."""
        if self._queue is not None:
            queue = self._queue
            return ConnectionStats(in_use=queue.in_use, idle=queue.idle, waiting=queue.waiting)
        assert self._turns is not None
        in_turn = int(self._turns.in_turn)
        return ConnectionStats(in_use=in_turn, idle=1 - in_turn, waiting=self._turns.waiting)

    @property
    def checkpoint_running(self) -> bool:
        """A SQLite checkpoint is copying the log into the database beside the units."""
        return self._turns is not None and self._turns.checkpoint_running

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A unit of work: commits when the block succeeds, rolls back when it raises."""
        kept_error: PnsError | None = None
        async with self._session_bind() as bind, self.sessionmaker(bind=bind) as session:
            try:
                yield session
                await self._commit(session)
            except PnsError as error:
                # `commit=True`: the work done before the error must persist (failure counters).
                if not error.commit:
                    await session.rollback()
                    raise
                await self._commit(session)
                kept_error = error
            except BaseException:
                await session.rollback()
                raise
            topics = session.info.pop(TOPICS_KEY, None)
        await self._after_commit(topics, kept_error)

    @asynccontextmanager
    async def unit(self) -> AsyncIterator[DriverUnit]:
        """`session()` for the routes every login runs: the same unit of work (commit when
        the block succeeds, the same `PnsError.commit` rule, topics out with the commit),
        its Core statements run on the driver connection (see `pns_server.driver`)."""
        kept_error: PnsError | None = None
        sqlite = self.dialect != "postgresql"
        unit: DriverUnit | None = None
        committed = False
        try:
            async with self._unit_connection(probe="BEGIN") as connection:
                unit = self._driver_unit(connection)
                if sqlite:
                    connection.info.pop(SETTLED, None)
                    # SQLite: take the write lock at BEGIN (see `_configure_sqlite`).
                    await unit.run_sql("BEGIN IMMEDIATE")
                try:
                    yield unit
                except PnsError as error:
                    if not error.commit:
                        await self._rollback_unit(unit)
                        raise
                    kept_error = error
                except BaseException:
                    await self._rollback_unit(unit)
                    raise
                try:
                    await self._commit_unit(unit)
                except BaseException:
                    await self._rollback_unit(unit)
                    raise
                committed = True
                if sqlite:
                    connection.info[SETTLED] = True
        finally:
            _run_unit_end(unit, committed)
        assert unit is not None  # the block above either set it or raised
        await self._after_commit(unit.info.pop(TOPICS_KEY, None), kept_error)

    async def _after_commit(self, topics: set[str] | None, kept_error: PnsError | None) -> None:
        """Wake this process's waiters, then raise the error the committed work answered."""
        if topics and self._publish is not None:
            await self._publish(topics)
        if kept_error is not None:
            raise kept_error

    @asynccontextmanager
    async def unit_read(self) -> AsyncIterator[DriverUnit]:
        """`read()` on the driver connection: for statements that change nothing, each
        consistent on its own (no transaction: one round trip each). Never write in it.

        On PostgreSQL the connection is not probed at checkout: if the first statement finds
        it dead (a restart the event loop has not noticed yet), the statement is sent again
        on a newly probed connection, which a read may always be."""
        if self._turns is not None:
            async with self._turns.turn():
                unit = self._driver_unit(await self._turns.connection())
                try:
                    yield unit
                finally:
                    if not unit.broken:
                        # Statements without a transaction (isolation_level None): even
                        # one cancelled while it waits in the connection's thread leaves
                        # none behind.
                        unit.connection.info[SETTLED] = True
            return
        assert self._queue is not None
        unit = self._driver_unit(await self._queue.take(None))
        unit.reconnect = self._reconnect
        try:
            yield unit
        except BaseException as error:
            await self._give_back(unit.connection, error)
            raise
        await self._give_back(unit.connection, None)

    @asynccontextmanager
    async def unit_alone(self) -> AsyncIterator[DriverUnit]:
        """PostgreSQL: `unit_read` whose statements after the first may also write, each its
        own transaction (autocommit), so a write must be whole in one statement (data-
        modifying CTEs). The first must be a read, or a write that may run twice (one
        conditional on what it changes): it alone is sent again on a new connection when it
        finds this one dead, and may have run before the connection died. Topics queued with
        `publish_after_commit` wake this process's waiters when the block ends, even by an
        error: queue one only once the statement it announces has run (and committed), and
        NOTIFY the other processes in that statement itself. Not on SQLite, whose writers
        take the write lock at BEGIN (`_configure_sqlite`)."""
        if self.dialect != "postgresql":
            raise RuntimeError("unit_alone() is for PostgreSQL; use unit() on SQLite")
        async with self.unit_read() as unit:
            try:
                yield unit
            finally:
                topics = unit.info.pop(TOPICS_KEY, None)
                if topics and self._publish is not None:
                    await self._publish(topics)

    async def _reconnect(self, dead: AsyncConnection) -> tuple[AsyncConnection, Any]:
        assert self._queue is not None
        connection = await self._queue.replace(dead)
        return connection, driver_of(connection)

    def turn(self) -> contextlib.AbstractAsyncContextManager[None]:
        """SQLite: this process's turn on the database (see `SqliteTurns`), for work on
        `engine` itself, which would otherwise meet the units on SQLite's lock (nothing to
        wait for on PostgreSQL). Sessions and units take it themselves."""
        return self._turns.turn() if self._turns is not None else contextlib.nullcontext()

    @asynccontextmanager
    async def _unit_connection(self, *, probe: str) -> AsyncIterator[AsyncConnection | LoopSqlite]:
        """A unit's connection: SQLite's held one during a turn, or one from the pool."""
        if self._turns is not None:
            async with self._turns.turn():
                yield await self._turns.connection()
            return
        async with self._connection(probe=probe) as connection:
            yield connection

    @asynccontextmanager
    async def _session_bind(self) -> AsyncIterator[AsyncEngine | AsyncConnection]:
        """What a session runs on: the engine in SQLite's turn, or a queued connection."""
        if self._queue is None:
            async with self.turn():
                yield self.engine
            return
        async with self._connection(probe="SELECT 1") as connection:
            yield connection

    @asynccontextmanager
    async def _connection(self, *, probe: str | None) -> AsyncIterator[AsyncConnection]:
        assert self._queue is not None
        connection = await self._queue.take(probe)
        try:
            yield connection
        except BaseException as error:
            await self._give_back(connection, error)
            raise
        await self._give_back(connection, None)

    async def _give_back(
        self, connection: AsyncConnection | LoopSqlite, error: BaseException | None
    ) -> None:
        """Kept for the next unit after a clean end or a refusal (`PnsError`: the unit rolled
        back between statements); after anything else a statement may still be running on
        it, so it goes back to the pool (`ConnectionQueue.give_back`)."""
        assert self._queue is not None and isinstance(connection, AsyncConnection)
        await self._queue.give_back(connection, clean=error is None or isinstance(error, PnsError))

    async def _open(self, *, probe: str | None) -> AsyncConnection:
        """A pooled connection, checked out with `probe` (PostgreSQL; see `_PROBE`)."""
        connection = self.engine.connect()
        token = _PROBE.set(probe)
        try:
            await connection.start()
        finally:
            _PROBE.reset(token)
        return connection

    def _driver_unit(self, connection: AsyncConnection | LoopSqlite) -> DriverUnit:
        if isinstance(connection, LoopSqlite):
            return DriverUnit(connection, connection, self.engine.dialect)
        return DriverUnit(connection, driver_of(connection), self.engine.dialect)

    async def _commit_unit(self, unit: DriverUnit) -> None:
        topics = unit.info.get(TOPICS_KEY)
        if topics:
            # PostgreSQL: the NOTIFY and the COMMIT in one round trip (one simple query).
            notify = self._notify_sql(topics) if self._notify_sql is not None else None
            if notify is not None:
                await unit.commit_after(notify)
                return
            if self._before_commit is not None:
                await self._before_commit(unit, topics)
        await unit.run_sql("COMMIT")

    async def _rollback_unit(self, unit: DriverUnit) -> None:
        if unit.broken:
            return  # invalidated: the server ends its transaction with the connection
        try:
            await unit.run_sql("ROLLBACK")
        except exc.DBAPIError:
            # Never hand out a connection that may still be in a transaction; the original
            # error is what the caller sees.
            with contextlib.suppress(exc.DBAPIError):
                await unit.invalidate()

    async def _commit(self, session: AsyncSession) -> None:
        topics = session.info.get(TOPICS_KEY)
        if topics and self._before_commit is not None:
            await self._before_commit(session, topics)
        await session.commit()

    async def dispose(self) -> None:
        if self._turns is not None:
            await self._turns.dispose()
        if self._queue is not None:
            await self._queue.close_idle()
        await self.engine.dispose()
