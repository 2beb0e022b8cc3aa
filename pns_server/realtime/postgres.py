from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import asyncpg
from sqlalchemy import text

from pns_server.realtime.base import LocalFanout

if TYPE_CHECKING:
    from pns_server.db import Executor

log = logging.getLogger(__name__)
CHANNEL = "pns_events"
# Built once: it runs in every committing unit of work that wakes someone.
SAFE_TOPIC = re.compile(r"[A-Za-z0-9:/_-]{1,200}")
NOTIFY = text("SELECT pg_notify(:channel, topic) FROM unnest(CAST(:topics AS text[])) topic")


def asyncpg_dsn(sqlalchemy_url: str) -> str:
    return "postgresql://" + sqlalchemy_url.split("://", 1)[1]


class PostgresNotifier(LocalFanout):
    """Many processes: NOTIFY reaches every replica's LISTEN connection.

    NOTIFY is sent inside the request's own transaction (`before_commit`): PostgreSQL
    delivers it at commit and drops it on rollback, and no request ever waits on a
    connection of ours. The LISTEN connection is off the request path: if it drops or goes
    silent (a NAT forgetting it), the health check notices within `health_interval` +
    `HEALTH_TIMEOUT` seconds, every waiter is woken (each re-reads its row, so nothing
    published meanwhile is missed) and the listener reconnects with backoff. Local waiters
    are woken directly after commit, so a decision made on this process pays no round trip."""

    # The listener can miss NOTIFYs while it is silently cut off, until the health check
    # replaces it (which wakes everyone); a rare re-read is the last line behind that.
    recheck_seconds: float | None = 45.0
    HEALTH_TIMEOUT = 5.0
    CONNECT_TIMEOUT = 10.0

    def __init__(
        self,
        sqlalchemy_url: str,
        *,
        listen_url: str | None = None,
        health_interval: float = 5.0,
    ) -> None:
        super().__init__()
        self._dsn = asyncpg_dsn(listen_url or sqlalchemy_url)
        self._health_interval = health_interval
        self._listen: Any = None
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="pns-listen")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), self.CONNECT_TIMEOUT)

    async def close(self) -> None:
        self.closing = True
        self.wake_all()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._listen is not None:
            # terminate, not close: a silent peer would make a polite close wait.
            with contextlib.suppress(Exception):
                self._listen.terminate()

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.wake(payload)

    async def _supervise(self) -> None:
        delay = 0.1
        while not self.closing:
            lost = asyncio.Event()
            try:
                self._listen = await asyncpg.connect(self._dsn, timeout=self.CONNECT_TIMEOUT)
                self._listen.add_termination_listener(lambda _c, lost=lost: lost.set())
                await asyncio.wait_for(
                    self._listen.add_listener(CHANNEL, self._on_notify), self.HEALTH_TIMEOUT
                )
                self._connected.set()
                # Anything published while we were not listening: let every waiter re-check.
                self.wake_all()
                delay = 0.1
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), self._health_interval)
                    if not lost.is_set():
                        await asyncio.wait_for(
                            self._listen.execute("SELECT 1"), self.HEALTH_TIMEOUT
                        )
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

    async def before_commit(self, session: Executor, topics: Iterable[str]) -> None:
        """NOTIFY every replica, in the committing transaction (delivered at commit)."""
        await session.execute(NOTIFY, {"channel": CHANNEL, "topics": sorted(topics)})

    def notify_sql(self, topics: Iterable[str]) -> str | None:
        """`before_commit`'s NOTIFY as one SQL string, so a unit on the driver connection
        sends it with its COMMIT in one round trip. The topics become literals, so only
        topics made of the characters ids and topic names use are written this way (all of
        ours); anything else gets None, and the parameterised statement instead."""
        ordered = sorted(topics)
        if not all(SAFE_TOPIC.fullmatch(topic) for topic in ordered):
            return None
        calls = ", ".join(f"pg_notify('{CHANNEL}', '{topic}')" for topic in ordered)
        return f"SELECT {calls}"

    async def publish(self, topics: Iterable[str]) -> None:
        """After commit: wake this process's waiters (other replicas got the NOTIFY)."""
        for topic in topics:
            self.wake(topic)
