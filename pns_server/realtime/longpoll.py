"""The long-poll loop: subscribe, read, wait; never holding a database connection."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Generic, TypeVar

from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from pns_server.problems import problem_for, problem_response
from pns_server.realtime.base import Notifier, Subscription

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
log = logging.getLogger(__name__)

# After a failed re-read (database restarting), try again this soon rather than failing the
# wait: the caller would otherwise miss the decision made once the database is back.
RETRY_READ_SECONDS = 0.5
# What a database restart or overload raises; anything else (a 404, a bug) ends the wait.
TRANSIENT = (SQLAlchemyError, OSError)


Disconnected = Callable[[], Awaitable[None]]


def until_disconnected(receive: Receive) -> Disconnected:
    """Returns when the HTTP caller has gone away (ASGI `http.disconnect`)."""

    async def wait() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    return wait


async def long_poll(
    notifier: Notifier,
    topic: str,
    read: Callable[[], Awaitable[T]],
    is_settled: Callable[[T], bool],
    wait: float,
    deadline_of: Callable[[T], datetime | None] = lambda _v: None,
    share_key: str | None = None,
    disconnected: Disconnected | None = None,
) -> T:
    """Return `read()` once it is settled, or after `wait` seconds.

    `read` must open and close its own short session. We subscribe *before* the first
    read, so a change committed between the read and the wait still wakes us.
    `deadline_of` names a moment the state changes by itself (an expiry): we re-read just
    after it, so expiry is reported without anyone touching the row.
    `share_key` (the object and the caller it is read for) lets concurrent waiters woken
    together share one read.
    `disconnected` returns once the caller has gone: the wait ends then, rather than
    holding its slot (and re-reading) for a caller who will never see the answer."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + max(0.0, wait)
    # No closures here: thousands of waits are held at once, and every cell and function
    # object one holds is walked by each full garbage collection.
    watcher: asyncio.Future[None] | None = None
    async with notifier.subscribe(topic) as subscription:
        try:
            value = await _riding_out(notifier, read, share_key, subscription.since, give_up)
            while not is_settled(value) and not notifier.closing:
                left = give_up - loop.time()
                if left <= 0:
                    break
                if disconnected is not None and watcher is None:
                    # Started only once a wait is due: an immediate answer costs no task.
                    watcher = _watch(disconnected, subscription)
                timeout = _timeout(notifier, value, left, deadline_of)
                # Every wait ends in a read, so the last one is not held while waiting: ten
                # thousand waits would hold ten thousand states nobody looks at.
                del value
                woken = await subscription.wait(timeout)
                not_before = subscription.woken_at if woken else time.monotonic()
                if subscription.caller_gone:
                    # The answer goes to nobody: one attempt, no riding out an outage for it.
                    value = await _fresh(notifier, read, share_key, not_before)
                    break
                value = await _riding_out(notifier, read, share_key, not_before, give_up)
        finally:
            if watcher is not None:
                watcher.cancel()
    return value


async def _fresh(
    notifier: Notifier, read: Callable[[], Awaitable[T]], share_key: str | None, not_before: float
) -> T:
    if share_key is None:
        return await read()
    return await notifier.reads.run(share_key, read, not_before)


async def _riding_out(
    notifier: Notifier,
    read: Callable[[], Awaitable[T]],
    share_key: str | None,
    not_before: float,
    give_up: float,
) -> T:
    """A read that rides out a database restart while the wait lasts, trying again every
    half second; once the wait is over (or a caller asked for none) the error is raised."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return await _fresh(notifier, read, share_key, not_before)
        except TRANSIENT:
            if loop.time() >= give_up:
                raise
            log.warning("long-poll read failed; retrying while the wait lasts")
            await asyncio.sleep(min(RETRY_READ_SECONDS, max(give_up - loop.time(), 0.0)))


def _watch(disconnected: Disconnected, subscription: Subscription) -> asyncio.Future[None]:
    """A task that ends when the caller goes; its completion marks and wakes the wait. A
    done-callback rather than a coroutine of ours around it: thousands of these are held."""
    watcher = asyncio.ensure_future(disconnected())
    watcher.add_done_callback(subscription.caller_left)
    return watcher


def _timeout(
    notifier: Notifier, value: T, left: float, deadline_of: Callable[[T], datetime | None]
) -> float:
    """How long the next wait may last: the time left, the re-check period, the deadline."""
    timeout = left
    if notifier.recheck_seconds is not None:
        timeout = min(timeout, notifier.recheck_seconds)
    deadline = deadline_of(value)
    if deadline is not None:
        until_deadline = (deadline - datetime.now(UTC)).total_seconds() + 0.05
        timeout = min(timeout, max(until_deadline, 0.0))
    return timeout


class Rendered(Generic[M]):
    """A read's value and its JSON body, rendered at most once: waiters woken together share
    the read (`share_key`) and so its body too, so ten thousand answers cost one
    serialisation. The body is what the route's `response_model` would send."""

    __slots__ = ("_body", "value")

    def __init__(self, value: M) -> None:
        self.value = value
        self._body: bytes | None = None

    @property
    def body(self) -> bytes:
        if self._body is None:
            self._body = self.value.model_dump_json().encode()
        return self._body


Poll = Callable[[Disconnected], Awaitable[bytes]]


_SET_HERE = frozenset({b"content-length", b"content-type"})
# The scope key under which `LongPollParking` offers a waiting request a place to wait.
PARKING = "pns.longpoll.parking"


class Parked:
    """A request's place in `LongPollParking`: the response that asked to wait there."""

    __slots__ = ("response",)

    def __init__(self) -> None:
        self.response: LongPollResponse | None = None


class LongPollResponse(Response):
    """A 200 JSON answer whose long-poll runs while the response is sent, not in the handler.

    The route's handler returns at once, so everything it held (the solved dependencies,
    the authenticated caller's row, its frames) is gone before the wait starts. Under
    `LongPollParking` the wait is handed to that middleware, so the router, FastAPI's
    request handling and the inner middleware return too: a waiting request keeps only the
    server's frames, the outer middleware's and the wait's own. Without it (this response
    used on its own) the wait runs here, and an error raised by the poll reaches the app's
    error handlers, as nothing has been sent yet."""

    media_type = "application/json"

    def __init__(self, poll: Poll) -> None:
        super().__init__(status_code=200, media_type=self.media_type)
        self._poll = poll

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        parked = scope.get(PARKING)
        if isinstance(parked, Parked) and parked.response is None:
            parked.response = self
            return
        await self.send_answer(await self.wait(receive), scope, receive, send)

    def wait(self, receive: Receive) -> Awaitable[bytes]:
        """The poll, to run until it settles (or the caller goes); its body. Handed over
        rather than awaited here: one coroutine frame fewer held by every wait."""
        return self._poll(until_disconnected(receive))

    async def send_answer(self, body: bytes, scope: Scope, receive: Receive, send: Send) -> None:
        """The two ASGI messages themselves: a woken wait of ten thousand pays for this once
        each, and has no background task for `Response.__call__` to run."""
        headers = [
            (b"content-length", str(len(body)).encode()),
            (b"content-type", b"application/json"),
            *((k, v) for k, v in self.raw_headers if k not in _SET_HERE),
        ]
        await send({"type": "http.response.start", "status": self.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class LongPollParking:
    """Pure ASGI: holds long-polls below the rest of the application.

    A route that must wait answers with a `LongPollResponse`, which parks its poll here
    instead of waiting where it was called; the inner application (the router, FastAPI,
    the middleware inside this one) then returns, and the wait runs in this middleware's
    frame. Ten thousand waiting requests so hold a few frames each rather than the whole
    stack, and the garbage collector, which walks every object they hold, has a fraction
    of the work. A poll that fails is answered here with the problem the app's own error
    handlers would give (`problem_for`), since they have returned by then."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        parked = Parked()
        # The inner application gets a scope of its own: what FastAPI adds to it for the
        # request (three exit stacks, a third of a wait's memory) goes when it returns.
        inner = {**scope, PARKING: parked}
        await self.app(inner, receive, send)
        if "route" in inner:  # the request observer labels the request by its route
            scope["route"] = inner["route"]
        del inner
        response = parked.response
        if response is None:
            return  # answered inside
        try:
            body = await response.wait(receive)
        except Exception as exc:
            await problem_response(problem_for(exc))(scope, receive, send)
            return
        await response.send_answer(body, scope, receive, send)
