from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any

import asyncpg

from pns_server.realtime.base import LocalFanout

log = logging.getLogger(__name__)
CHANNEL = "pns_events"


def asyncpg_dsn(sqlalchemy_url: str) -> str:
    return "postgresql://" + sqlalchemy_url.split("://", 1)[1]


class PostgresNotifier(LocalFanout):
    """Many processes: NOTIFY reaches every replica's LISTEN connection.

    Local waiters are also woken directly, so a decision made on this process does not
    pay the round trip. If the LISTEN connection drops, every waiter is woken (each
    re-reads its row, so nothing published during the outage is missed) and the
    listener reconnects with backoff."""

    # A NOTIFY can be lost if the publishing connection fails while the listener stays up
    # (a reconnect of the listener already wakes everyone): a rare re-read covers that.
    recheck_seconds: float | None = 45.0

    def __init__(self, sqlalchemy_url: str, *, health_interval: float = 5.0) -> None:
        super().__init__()
        self._dsn = asyncpg_dsn(sqlalchemy_url)
        self._health_interval = health_interval
        self._listen: Any = None
        self._publish_conn: Any = None
        self._publish_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="pns-listen")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), 10)

    async def close(self) -> None:
        self.closing = True
        self.wake_all()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for conn in (self._listen, self._publish_conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close(timeout=2)

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.wake(payload)

    async def _supervise(self) -> None:
        delay = 0.1
        while not self.closing:
            lost = asyncio.Event()
            try:
                self._listen = await asyncpg.connect(self._dsn, timeout=10)
                self._listen.add_termination_listener(lambda _c, lost=lost: lost.set())
                await self._listen.add_listener(CHANNEL, self._on_notify)
                self._connected.set()
                # Anything published while we were not listening: let every waiter re-check.
                self.wake_all()
                delay = 0.1
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), self._health_interval)
                    if not lost.is_set():
                        await asyncio.wait_for(self._listen.execute("SELECT 1"), 5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("LISTEN connection lost (%s); reconnecting", type(exc).__name__)
            self._connected.clear()
            self.reconnects += 1
            self.wake_all()
            if self._listen is not None:
                with contextlib.suppress(Exception):
                    self._listen.terminate()
                self._listen = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def publish(self, topics: Iterable[str]) -> None:
        topics = list(topics)
        for topic in topics:
            self.wake(topic)
        async with self._publish_lock:
            # A connection that died while idle fails on first use: retry once on a new one.
            for attempt in (1, 2):
                try:
                    await self._notify(topics)
                    return
                except Exception as exc:
                    self._publish_conn = None
                    if attempt == 2:
                        # Remote waiters still re-read within recheck_seconds.
                        log.warning("NOTIFY failed (%s); remote waiters will re-check", exc)

    async def _notify(self, topics: list[str]) -> None:
        if self._publish_conn is None or self._publish_conn.is_closed():
            self._publish_conn = await asyncpg.connect(self._dsn, timeout=10)
        for topic in topics:
            await self._publish_conn.execute("SELECT pg_notify($1, $2)", CHANNEL, topic)
