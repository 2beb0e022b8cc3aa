from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from pns_server.db import Executor

T = TypeVar("T")


class Subscription:
    """One waiter's wake-up flag. Set by publish, cleared when the waiter has seen it.

    Thousands are held at once, so it is small: no Event (a deque each) and no Timeout
    object; while its waiter sleeps it holds one future and one timer, otherwise nothing."""

    __slots__ = ("_waiter", "_woken", "caller_gone", "since", "topic", "woken_at")

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.since = time.monotonic()
        # When the latest wake-up came: a read started after it sees what caused it.
        self.woken_at = self.since
        self._woken = False
        self._waiter: asyncio.Future[None] | None = None
        # Set (with a wake-up) when the HTTP caller has disconnected: the wait ends.
        self.caller_gone = False

    def wake(self) -> None:
        self.woken_at = time.monotonic()
        self._woken = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self, timeout: float) -> bool:
        """True when woken (the state may have changed), False on timeout."""
        if not self._woken and timeout > 0:
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            timer = loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        if not self._woken:
            return False
        self._woken = False
        return True


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


@dataclass
class _Flight:
    started: float
    future: asyncio.Future[Any]


class SharedReads:
    """Waiters of one object, woken by one publish, share one read instead of each querying.

    A waiter joins only a read that *started after* its latest wake-up (`not_before`), so the
    shared result always includes the commit that woke it: no wake-up is lost. A waiter that
    finds an older read under way waits for it to end and shares the next one: thousands of
    long-polls arriving while one read runs cost one more read, not thousands."""

    def __init__(self) -> None:
        self._flights: dict[str, _Flight] = {}

    async def run(self, key: str, read: Callable[[], Awaitable[T]], not_before: float) -> T:
        while (flight := self._flights.get(key)) is not None:
            if flight.started < not_before:
                # It may have missed the commit we were woken for: not ours to share.
                await asyncio.wait([flight.future])
                continue
            try:
                value: T = await asyncio.shield(flight.future)
                return value
            except asyncio.CancelledError:
                if not flight.future.cancelled():
                    raise  # we were cancelled ourselves
                # the reading request went away: share the next read, or make it
        flight = _Flight(time.monotonic(), asyncio.get_running_loop().create_future())
        self._flights[key] = flight
        try:
            value = await read()
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                flight.future.cancel()
            else:
                flight.future.set_exception(exc)
                flight.future.exception()  # joined waiters re-raise it; never "unretrieved"
            raise
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
        flight.future.set_result(value)
        return value


class LocalFanout:
    """Per-process registry of subscriptions; both backends use it to wake local waiters."""

    # How often a waiter re-reads without a wake-up; None when a wake-up cannot be lost.
    recheck_seconds: float | None = None

    def __init__(self) -> None:
        self._subs: dict[str, set[Subscription]] = defaultdict(set)
        self.closing = False
        self.reads = SharedReads()

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

    def subscribe(self, topic: str) -> Subscribed:
        return Subscribed(self, Subscription(topic))

    def add(self, sub: Subscription) -> None:
        self._subs[sub.topic].add(sub)
        if self.closing:
            sub.wake()

    def discard(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.topic)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.topic]


class Subscribed:
    """`async with notifier.subscribe(topic) as sub`: registered for the block. A class, not
    an `asynccontextmanager`: that is three more objects (and a generator frame) for each
    of the thousands of waits held at once."""

    __slots__ = ("fanout", "sub")

    def __init__(self, fanout: LocalFanout, sub: Subscription) -> None:
        self.fanout = fanout
        self.sub = sub

    async def __aenter__(self) -> Subscription:
        self.fanout.add(self.sub)
        return self.sub

    async def __aexit__(self, *_exc: object) -> None:
        self.fanout.discard(self.sub)


class Notifier(Protocol):
    """What the rest of the relay may use of a backend (memory or LISTEN/NOTIFY)."""

    closing: bool
    recheck_seconds: float | None
    reads: SharedReads

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def before_commit(self, session: Executor, topics: Iterable[str]) -> None: ...
    def notify_sql(self, topics: Iterable[str]) -> str | None: ...
    async def publish(self, topics: Iterable[str]) -> None: ...
    def subscribe(self, topic: str) -> AbstractAsyncContextManager[Subscription]: ...
    def wake_all(self) -> None: ...
    @property
    def waiter_count(self) -> int: ...
