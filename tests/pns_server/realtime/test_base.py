from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from pns_server.realtime.base import Deadlines, LocalFanout, Subscription
from pns_server.topics import PUSH_FAILED, PUSH_SENT, approval_topic


class Waiter:
    def __init__(self) -> None:
        self.came: float | None = None

    def due(self) -> None:
        self.came = asyncio.get_running_loop().time()


class TestDeadlines:
    async def test_each_comes_in_its_time_and_in_order(self) -> None:
        deadlines, loop = Deadlines(), asyncio.get_running_loop()
        late, early = Waiter(), Waiter()
        started = loop.time()
        deadlines.add(late, 0.3)
        deadlines.add(early, 0.1)
        while late.came is None:
            await asyncio.sleep(0.01)
        assert early.came is not None
        assert 0.1 <= early.came - started < 0.1 + Deadlines.TICK + 0.05
        assert 0.3 <= late.came - started < 0.3 + Deadlines.TICK + 0.05
        assert len(deadlines) == 0

    async def test_a_removed_deadline_never_comes_and_holds_nothing(self) -> None:
        deadlines = Deadlines()
        kept, removed = Waiter(), Waiter()
        deadlines.add(kept, 0.1)
        tick = deadlines.add(removed, 0.1)
        deadlines.remove(removed, tick)
        gone = weakref.ref(removed)
        del removed
        gc.collect()
        assert gone() is None  # not held until the moment it would have come
        while kept.came is None:
            await asyncio.sleep(0.01)
        assert len(deadlines) == 0

    async def test_a_sooner_deadline_added_later_is_not_kept_waiting(self) -> None:
        deadlines, loop = Deadlines(), asyncio.get_running_loop()
        far, near = Waiter(), Waiter()
        deadlines.add(far, 30)
        started = loop.time()
        deadlines.add(near, 0.05)
        while near.came is None and loop.time() - started < 5:
            await asyncio.sleep(0.01)
        assert near.came is not None and near.came - started < 1
        assert far.came is None

    async def test_a_failing_waiter_costs_the_others_nothing(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        class Broken(Waiter):
            def due(self) -> None:
                raise RuntimeError("a bug")

        deadlines = Deadlines()
        deadlines.add(Broken(), 0.05)
        # The same tick; a tick's waiters come in no set order, so with a hundred others
        # nearly all would be lost behind the broken one.
        others = [Waiter() for _ in range(100)]
        for waiter in others:
            deadlines.add(waiter, 0.05)
        async with asyncio.timeout(5):
            while not all(waiter.came for waiter in others):
                await asyncio.sleep(0.01)
        assert "a deadline's waiter failed" in caplog.text


class Picky(Subscription):
    """A waiter that only a push given up concerns (as `until=final_or_failed`)."""

    def wants(self, kind: str) -> bool:
        return kind == PUSH_FAILED


class TestKinds:
    async def test_a_kind_wakes_only_the_subscribers_that_want_it(self) -> None:
        fanout = LocalFanout()
        picky, plain = Picky(approval_topic("a1")), Subscription(approval_topic("a1"))
        other = Subscription(approval_topic("a2"))
        for sub in (picky, plain, other):
            fanout.add(sub)
        fanout.wake(approval_topic("a1", PUSH_SENT))
        assert (await picky.wait(0), await plain.wait(0), await other.wait(0)) == (
            False,
            True,
            False,
        )
        fanout.wake(approval_topic("a1", PUSH_FAILED))
        assert (await picky.wait(0), await plain.wait(0)) == (True, True)
        # The decision names no kind: it wakes everyone subscribed to the approval.
        fanout.wake(approval_topic("a1"))
        assert (await picky.wait(0), await plain.wait(0), await other.wait(0)) == (
            True,
            True,
            False,
        )
