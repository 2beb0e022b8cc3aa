from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from pns_server.realtime.base import LocalFanout

if TYPE_CHECKING:
    from pns_server.db import Executor


class MemoryNotifier(LocalFanout):
    """One process: publishing wakes this process's waiters directly."""

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self.closing = True
        self.wake_all()

    async def before_commit(self, session: Executor, topics: Iterable[str]) -> None:
        return None  # nothing leaves the process

    def notify_sql(self, topics: Iterable[str]) -> str | None:
        return None  # nothing leaves the process

    async def publish(self, topics: Iterable[str]) -> None:
        for topic in topics:
            self.wake(topic)
