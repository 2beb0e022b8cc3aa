from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol


class Subscription:
    """One waiter's wake-up flag. Set by publish, cleared when the waiter has seen it."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._event = asyncio.Event()

    def wake(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        """True when woken (the state may have changed), False on timeout."""
        if timeout <= 0 and not self._event.is_set():
            return False
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return False
        self._event.clear()
        return True


class Notifier(Protocol):
    closing: bool

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def publish(self, topics: Iterable[str]) -> None: ...
    def subscribe(self, topic: str) -> AbstractAsyncContextManager[Subscription]: ...
    @property
    def waiter_count(self) -> int: ...


class LocalFanout:
    """Per-process registry of subscriptions; both backends use it to wake local waiters."""

    # How often a waiter re-reads without a wake-up; None when a wake-up cannot be lost.
    recheck_seconds: float | None = None

    def __init__(self) -> None:
        self._subs: dict[str, set[Subscription]] = defaultdict(set)
        self.closing = False

    @property
    def waiter_count(self) -> int:
        return sum(len(s) for s in self._subs.values())

    def wake(self, topic: str) -> None:
        for sub in self._subs.get(topic, ()):
            sub.wake()

    def wake_all(self) -> None:
        for subs in self._subs.values():
            for sub in subs:
                sub.wake()

    @asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[Subscription]:
        sub = Subscription(topic)
        self._subs[topic].add(sub)
        if self.closing:
            sub.wake()
        try:
            yield sub
        finally:
            subs = self._subs.get(topic)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[topic]
