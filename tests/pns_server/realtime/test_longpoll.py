from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from pns_server.realtime.longpoll import long_poll
from pns_server.realtime.memory import MemoryNotifier


class Counter:
    """A stand-in for a row read in its own short session."""

    def __init__(self, value: str = "pending") -> None:
        self.value = value
        self.reads = 0

    async def read(self) -> str:
        self.reads += 1
        return self.value


def settled(value: str) -> bool:
    return value != "pending"


async def test_returns_at_once_when_settled() -> None:
    row = Counter("approved")
    assert await long_poll(MemoryNotifier(), "t", row.read, settled, wait=30) == "approved"
    assert row.reads == 1


async def test_wakes_on_publish_and_reads_the_new_state() -> None:
    notifier, row = MemoryNotifier(), Counter()
    task = asyncio.create_task(long_poll(notifier, "t", row.read, settled, wait=30))
    while notifier.waiter_count == 0:
        await asyncio.sleep(0)
    row.value = "approved"
    started = asyncio.get_running_loop().time()
    await notifier.publish(["t"])
    assert await asyncio.wait_for(task, 5) == "approved"
    assert asyncio.get_running_loop().time() - started < 1
    assert notifier.waiter_count == 0


async def test_a_change_between_subscribe_and_first_read_is_not_lost() -> None:
    notifier = MemoryNotifier()

    class ChangesDuringRead(Counter):
        async def read(self) -> str:
            value = await super().read()
            if self.reads == 1:
                self.value = "approved"  # committed right after our first read...
                await notifier.publish(["t"])  # ...and published before we wait
            return value

    row = ChangesDuringRead()
    assert await asyncio.wait_for(long_poll(notifier, "t", row.read, settled, 30), 5) == "approved"


async def test_in_memory_waits_do_not_reread_without_a_wakeup() -> None:
    row = Counter()
    assert await long_poll(MemoryNotifier(), "t", row.read, settled, wait=0.3) == "pending"
    assert row.reads == 2  # the first read and the final one, nothing in between


async def test_a_notifier_that_can_lose_wakeups_rereads() -> None:
    notifier = MemoryNotifier()
    notifier.recheck_seconds = 0.05
    row = Counter()
    await long_poll(notifier, "t", row.read, settled, wait=0.4)
    assert row.reads >= 4


async def test_rereads_right_after_the_deadline() -> None:
    expires = datetime.now(UTC) + timedelta(seconds=0.2)

    async def read() -> str:
        return "expired" if datetime.now(UTC) >= expires else "pending"

    loop = asyncio.get_running_loop()
    started = loop.time()
    value = await long_poll(MemoryNotifier(), "t", read, settled, 30, lambda _v: expires)
    assert value == "expired"
    assert loop.time() - started < 2


async def test_closing_releases_waiters_with_the_current_state() -> None:
    notifier, row = MemoryNotifier(), Counter()
    task = asyncio.create_task(long_poll(notifier, "t", row.read, settled, wait=60))
    while notifier.waiter_count == 0:
        await asyncio.sleep(0)
    await notifier.close()
    assert await asyncio.wait_for(task, 5) == "pending"
