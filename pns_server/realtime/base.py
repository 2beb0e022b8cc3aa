from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pns_server.topics import split_topic

if TYPE_CHECKING:
    from pns_server.db import Executor

T = TypeVar("T")
log = logging.getLogger(__name__)


class Subscription:
    """One waiter's wake-up flag. Set by publish, cleared when the waiter has seen it.

    Thousands are held at once, so it is small: no Event (a deque each) and no Timeout
    object; while its waiter sleeps it holds one future and one timer, otherwise nothing."""

    __slots__ = ("_waiter", "_woken", "since", "topic", "woken_at")

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.since = time.monotonic()
        # When the latest wake-up came: a read started after it sees what caused it.
        self.woken_at = self.since
        self._woken = False
        self._waiter: asyncio.Future[None] | None = None

    def wants(self, kind: str) -> bool:
        """Whether a change of this kind (`topics.split_topic`) may matter to the waiter; a
        topic published without a kind wakes every subscriber."""
        return True

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


class _Flight:
    """A read under way, and the futures of the waiters who joined it."""

    __slots__ = ("joined", "started")

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.joined: list[asyncio.Future[Any]] = []

    def join(self) -> asyncio.Future[Any]:
        joined: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.joined.append(joined)
        return joined

    def settle(self, value: Any = None, error: BaseException | None = None) -> None:
        for joined in self.joined:
            if joined.done():
                continue  # that waiter was cancelled: nobody to tell
            if error is None:
                joined.set_result(value)
            else:
                joined.set_exception(error)


class _ReadAbandoned(Exception):
    """The waiter making the read was cancelled: the others share the next one."""


class SharedReads:
    """Waiters of one object, woken by one publish, share one read instead of each querying.

    A waiter joins only a read that *started after* its latest wake-up (`not_before`), so the
    shared result always includes the commit that woke it: no wake-up is lost. A waiter that
    finds an older read under way waits for it to end and shares the next one: thousands of
    long-polls arriving while one read runs cost one more read, not thousands.

    Each joiner awaits a future of its own, settled by the reader: a joiner cancelled
    leaves the others be (what `asyncio.shield` would give, without its two callbacks per
    joiner, for each of ten thousand woken waiters)."""

    def __init__(self) -> None:
        self._flights: dict[str, _Flight] = {}
        # Polls woken together, gathered per key before their read (`longpoll.Rally`, which
        # this module may not name: it imports this one), and the tasks reading for them.
        self.gathering: dict[str, Any] = {}
        self.running: set[asyncio.Task[None]] = set()

    async def run(self, key: str, read: Callable[[], Awaitable[T]], not_before: float) -> T:
        while (flight := self._flights.get(key)) is not None:
            shares = flight.started >= not_before
            try:
                value: T = await flight.join()
            except _ReadAbandoned:
                continue  # share the next read, or make it
            except Exception:
                if shares:
                    raise
                continue  # an older read's failure is not ours: read again
            if shares:
                return value
            # It may have missed the commit we were woken for: not ours to share.
        flight = _Flight()
        self._flights[key] = flight
        try:
            value = await read()
        except BaseException as exc:
            del self._flights[key]
            cancelled = isinstance(exc, asyncio.CancelledError)
            flight.settle(error=_ReadAbandoned() if cancelled else exc)
            raise
        del self._flights[key]
        flight.settle(value)
        return value


class Due(Protocol):
    def due(self) -> None: ...


class Deadlines:
    """The moments many waits end, on one loop timer rather than one each: a loop timer,
    with its callback and the context it copies, is half a kilobyte, and ten thousand
    waits would hold one each. Moments are rounded up to the next `TICK`, so a wait ends
    at most that much late; a removed deadline is gone at once (no stale entry keeps its
    waiter alive until it would have come)."""

    TICK = 0.05

    def __init__(self) -> None:
        self._slots: dict[int, set[Due]] = {}
        self._ticks: list[int] = []  # a heap of the ticks in `_slots`
        self._timer: asyncio.TimerHandle | None = None
        self._timer_tick: int | None = None

    def __len__(self) -> int:
        return sum(len(slot) for slot in self._slots.values())

    def add(self, waiter: Due, delay: float) -> int:
        """Call `waiter.due()` in `delay` seconds (a little later); returns the key that
        `remove` takes."""
        loop = asyncio.get_running_loop()
        tick = math.ceil((loop.time() + max(delay, 0.0)) / self.TICK)
        slot = self._slots.get(tick)
        if slot is None:
            self._slots[tick] = slot = set()
            heapq.heappush(self._ticks, tick)
        slot.add(waiter)
        if self._timer_tick is None or tick < self._timer_tick:
            self._arm(loop, tick)
        return tick

    def remove(self, waiter: Due, tick: int) -> None:
        slot = self._slots.get(tick)
        if slot is not None:
            slot.discard(waiter)  # an empty slot goes when its tick comes

    def _arm(self, loop: asyncio.AbstractEventLoop, tick: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_tick = tick
        self._timer = loop.call_at(tick * self.TICK, self._fire)

    def _fire(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = self._timer_tick = None
        # A millisecond of slack: the loop's clock may fire a timer that early.
        now = loop.time() + 0.001
        due: list[Due] = []
        while self._ticks and self._ticks[0] * self.TICK <= now:
            due.extend(self._slots.pop(heapq.heappop(self._ticks), ()))
        if self._ticks:
            self._arm(loop, self._ticks[0])
        for waiter in due:
            try:
                waiter.due()
            except Exception:  # one waiter's bug must not cost the others their deadline
                log.exception("a deadline's waiter failed")


class LocalFanout:
    """Per-process registry of subscriptions; both backends use it to wake local waiters."""

    # How often a waiter re-reads without a wake-up; None when a wake-up cannot be lost.
    recheck_seconds: float | None = None

    def __init__(self) -> None:
        self._subs: dict[str, set[Subscription]] = defaultdict(set)
        self.closing = False
        self.reads = SharedReads()
        self.deadlines = Deadlines()

    @property
    def waiter_count(self) -> int:
        return sum(len(s) for s in self._subs.values())

    def wake(self, topic: str) -> None:
        subscribed, kind = split_topic(topic)
        for sub in self._subs.get(subscribed, ()):
            if not kind or sub.wants(kind):
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
    deadlines: Deadlines

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def before_commit(self, session: Executor, topics: Iterable[str]) -> None: ...
    def notify_sql(self, topics: Iterable[str]) -> str | None: ...
    async def publish(self, topics: Iterable[str]) -> None: ...
    def subscribe(self, topic: str) -> AbstractAsyncContextManager[Subscription]: ...
    def add(self, sub: Subscription) -> None: ...
    def discard(self, sub: Subscription) -> None: ...
    def wake_all(self) -> None: ...
    @property
    def waiter_count(self) -> int: ...
