"""PostgreSQL: this process's connections, handed to its units and sessions in arrival order.

A checkout from SQLAlchemy's pool and its return cost a unit two greenlet hand-offs and
the pool's bookkeeping: about 0.12 ms of CPU on a one-row read and 0.15 on a unit of
work, as much as the statement itself, and a login checks out six times. So the relay
checks each connection out of the pool once and keeps it: a unit or session that ends
cleanly hands its connection to the first one waiting, or leaves it here for the next.

Keeping connections beside the pool's own queue was tried first and widened the tail: a
tenth of the units waited in the pool's queue behind later ones that found a kept
connection. Here there is one queue for everything that runs on the relay's connections,
in arrival order, as SQLite's turns are (`SqliteTurns`); the pool only opens and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import exc
from sqlalchemy.ext.asyncio import AsyncConnection

# Opens a connection out of the pool, sending `probe` at its checkout (`db._PROBE`).
Opener = Callable[[str | None], Awaitable[AsyncConnection]]
# Told how long a request waited, in seconds, when it had to wait (the metrics).
WaitObserver = Callable[[float], None]


def driver_of(connection: AsyncConnection) -> Any:
    """The asyncpg or aiosqlite connection under a pooled SQLAlchemy one, checked out.

    Read through the sync connection: its accessor does I/O only to replace a connection
    invalidated since checkout, which callers rule out, so it needs none of the greenlet
    hand-off `get_raw_connection()` makes for that case (~20 us per unit)."""
    sync_connection = connection.sync_connection
    assert sync_connection is not None, "a started connection"
    return sync_connection.connection.driver_connection


class ConnectionQueue:
    """At most `capacity` connections, each checked out of the pool once and kept.

    `take()` hands out the connection left last, so a light load keeps to the few
    connections it needs, warm (in arrival order a burst's connections took turns ever
    after, each cold for the statements it had not run: prepared again and planned
    afresh, and a round trip one at a time took 40 logins to come down from 30-40 ms to
    12). It opens a new one while fewer than `capacity` are open, or waits in arrival
    order for one to come back, at most `timeout` seconds (then `sqlalchemy.exc.
    TimeoutError`, as the pool's own wait). A kept connection skips the pool's probe at
    checkout, so `take()` sends `probe` itself: a unit of work's BEGIN, a session's
    `SELECT 1`, or none for a read (whose first statement is sent again on a new
    connection if it finds this one dead). One that fails it is dropped with every other
    one kept, as the pool drops every connection older than one that fails: a restart
    ended them all.

    `give_back()` keeps only a connection left clean: not invalidated, not inside a
    transaction. Any other, or one whose block was cancelled (a statement may still run
    on it), goes back to the pool, which ends what it left; its place goes to the next
    waiter, who opens a new one."""

    def __init__(
        self,
        open_connection: Opener,
        *,
        capacity: int,
        timeout: float,
        waited: WaitObserver | None = None,
    ) -> None:
        self._open_connection = open_connection
        self._waited = waited
        self.capacity = capacity
        self.timeout = timeout
        self._idle: list[AsyncConnection] = []
        # A waiter is handed a connection, or None: a place to open one in.
        self._waiters: deque[asyncio.Future[AsyncConnection | None]] = deque()
        self._places_taken = 0  # connections open or opening: idle, in use, or handed over

    @property
    def in_use(self) -> int:
        """Connections out for work now (or being opened for it)."""
        return self._places_taken - len(self._idle)

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def take(self, probe: str | None) -> AsyncConnection:
        if self._idle:  # then nobody waits: a connection coming back goes to a waiter first
            connection: AsyncConnection | None = self._idle.pop()
        elif self._places_taken < self.capacity and not self._waiters:
            self._places_taken += 1
            connection = None
        else:
            connection = await self._wait()
        if connection is None:
            return await self._open_in_place(probe)
        if probe is None:
            return connection
        try:
            alive = await self._passes(connection, probe)
            if not alive:
                await self._drop_idle()
                await _discard(connection)
        except BaseException:  # cancelled with the probe in flight, or while dropping
            await self._free_place(connection)
            raise
        return connection if alive else await self._open_in_place(probe)

    async def replace(self, dead: AsyncConnection) -> AsyncConnection:
        """A probed connection in place of one found dead (and every one kept with it).
        If that fails, `dead` still holds the place: its holder gives it back."""
        await self._drop_idle()
        await _discard(dead)
        return await self._open_connection("SELECT 1")

    async def give_back(self, connection: AsyncConnection, *, clean: bool) -> None:
        """Hand `connection` on if `clean` and it is, else back to the pool (see above)."""
        if clean and not connection.invalidated and not driver_of(connection).is_in_transaction():
            self._hand_on(connection)
            return
        try:
            await connection.close()  # the pool ends what it left, or discards it
        finally:
            self._hand_on(None)

    async def close_idle(self) -> None:
        await self._drop_idle()

    async def _wait(self) -> AsyncConnection | None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[AsyncConnection | None] = loop.create_future()
        self._waiters.append(waiter)
        began = loop.time()
        try:
            async with asyncio.timeout(self.timeout):
                return await waiter
        except BaseException as error:
            if waiter.done() and not waiter.cancelled():
                self._hand_on(waiter.result())  # handed over as this one gave up: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if isinstance(error, TimeoutError):
                raise exc.TimeoutError(
                    f"no database connection came free within {self.timeout:g} s "
                    f"({self.capacity} in use; PNS_DB_POOL_SIZE)"
                ) from None
            raise
        finally:
            if self._waited is not None:
                self._waited(loop.time() - began)

    def _hand_on(self, connection: AsyncConnection | None) -> None:
        """To the first waiter still waiting; else kept idle, or its place freed."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # a cancelled waiter leaves the queue when it next runs
                waiter.set_result(connection)
                return
        if connection is None:
            self._places_taken -= 1
        else:
            self._idle.append(connection)

    async def _free_place(self, connection: AsyncConnection) -> None:
        """Drop a connection whose state is unknown; its place goes to the next waiter."""
        try:
            await _discard(connection)
        finally:
            self._hand_on(None)

    async def _open_in_place(self, probe: str | None) -> AsyncConnection:
        try:
            return await self._open_connection(probe)
        except BaseException:
            self._hand_on(None)
            raise

    async def _passes(self, connection: AsyncConnection, probe: str) -> bool:
        try:
            await driver_of(connection).execute(probe)
        except Exception:
            return False
        return True

    async def _drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        self._places_taken -= len(idle)
        if idle:
            # Shielded: a request cancelled meanwhile must not leave some of them open and
            # checked out of the pool, with their places here free for new ones.
            await asyncio.shield(_discard_all(idle))


async def _discard_all(connections: list[AsyncConnection]) -> None:
    for connection in connections:
        await _discard(connection)


async def _discard(connection: AsyncConnection) -> None:
    """Closed for good: a connection found dead, or kept beside one that was."""
    with contextlib.suppress(Exception):
        await connection.invalidate()
    await connection.close()
