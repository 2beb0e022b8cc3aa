"""The long-poll loop: subscribe, read, wait; never holding a database connection."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar

from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from pns_server.problems import problem_for, problem_response
from pns_server.realtime.base import Notifier, SharedReads, Subscription

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
log = logging.getLogger(__name__)

# After a failed re-read (database restarting), try again this soon rather than failing the
# wait: the caller would otherwise miss the decision made once the database is back.
RETRY_READ_SECONDS = 0.5
# A wait with this little left is over: a loop timer may fire a millisecond early, and
# waiting out the rest would take a whole tick of `Deadlines` (50 ms).
ALMOST_OVER = 0.002
# What a database restart or overload raises; anything else (a 404, a bug) ends the wait.
TRANSIENT = (SQLAlchemyError, OSError)


Disconnected = Callable[[], Awaitable[None]]
# What a poll ends with: the settled (or last) read, or the error that ended it.
Settle = Callable[[Any], Awaitable[None]]


class Counted(Protocol):
    """The gauge of waits in progress (a Prometheus `Gauge`)."""

    def inc(self) -> None: ...
    def dec(self) -> None: ...


def until_disconnected(receive: Receive) -> Disconnected:
    """Returns when the HTTP caller has gone away (ASGI `http.disconnect`)."""

    async def wait() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    return wait


class Poll(Subscription, Generic[T]):
    """One long-poll, as a small object rather than a coroutine: read, and if the state is
    not settled, wait for a wake-up, a deadline or the end of the wait, then read again.

    While it waits it holds no frame, no task, no future and no loop timer: only this
    object and its places among the notifier's subscriptions and deadlines. A wake-up or
    its deadline starts a task for the next read (one `Rally` task for all the polls of a
    shared read woken together), which ends once it has read (and set the next deadline,
    or settled the poll). Ten thousand waits so cost ten thousand of these, not ten
    thousand coroutines and their tasks.

    The rules (each kept from the coroutine this replaces):
    - it subscribes *before* its first read, so a change committed between the read and the
      wait still wakes it;
    - a wake-up during a read makes it read again at once, and it joins only a shared read
      that started after that wake-up (`SharedReads`), so no wake-up is lost;
    - `deadline` names a moment the state changes by itself (an expiry): it re-reads just
      after it, so expiry is reported without anyone touching the row;
    - a read failing while the database restarts is tried again every half second while
      the wait lasts; any other error ends the poll with that error;
    - once its caller has gone (`lose_caller`), one more read, no riding out an outage;
    - when the notifier closes (shutdown), waits end with the state they last read.

    Subclasses say what to read (`read`), when it is final (`settled`), and optionally
    when it changes by itself (`deadline`), which reads may be shared (`share_key`) and
    which gauge counts it. Whoever starts it (`start`) is given the outcome, exactly once:
    the read that ended it, or the exception."""

    __slots__ = (
        "_busy",
        "_counted",
        "_due_tick",
        "_ended",
        "_settle",
        "_task",
        "caller_gone",
        "give_up",
        "notifier",
    )

    def __init__(self, notifier: Notifier, topic: str, wait: float) -> None:
        super().__init__(topic)
        self.notifier = notifier
        self.give_up = asyncio.get_running_loop().time() + max(0.0, wait)
        self._busy = False  # a read is under way
        self._ended = False
        self._counted = False
        self._settle: Settle | None = None
        self._task: asyncio.Task[None] | None = None
        self._due_tick: int | None = None  # its place in the notifier's `Deadlines`
        # Set (with a wake-up) when the HTTP caller has disconnected: the wait ends.
        self.caller_gone = False

    # -- what a subclass says -------------------------------------------------------------

    async def read(self) -> T:
        """The state, read in a short session of its own."""
        raise NotImplementedError

    def settled(self, value: T) -> bool:
        """Whether the wait may end with this read."""
        raise NotImplementedError

    def deadline(self, value: T) -> datetime | None:
        """When this state changes by itself (an expiry), if it does."""
        return None

    def share_key(self) -> str | None:
        """The object and the caller it is read for: waiters woken together share a read."""
        return None

    def gauge(self) -> Counted | None:
        return None

    # -- running it -----------------------------------------------------------------------

    async def start(self, settle: Settle) -> None:
        """Subscribe and make the first read, in the caller's task; if that settles it (or
        it fails, or no wait was asked) `settle` has been called when this returns."""
        self._settle = settle
        self._busy = True
        if self.give_up > asyncio.get_running_loop().time():
            # The moment that a shared first read must have started after: now, not when
            # the request was parsed, or a commit between the two would go unseen.
            self.since = self.woken_at = time.monotonic()
            self.notifier.add(self)
            if (gauge := self.gauge()) is not None:
                gauge.inc()
                self._counted = True
        await self._run(self.since)

    def stop(self) -> None:
        """Unsubscribe and drop any timer or read under way; the outcome is not given."""
        if self._ended:
            return
        self._ended = True
        # The outcome's receiver holds the request, which holds this poll: without the
        # cycle, an answered request is freed at once, not by the next garbage collection.
        self._settle = None
        self.notifier.discard(self)
        if self._counted and (gauge := self.gauge()) is not None:
            gauge.dec()
        self._forget_deadline()
        task = self._task
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def wake(self) -> None:
        super().wake()
        if not self._busy and not self._ended:
            self._resume(self.woken_at)

    def lose_caller(self) -> None:
        """The HTTP caller has gone: one more read, then the poll ends."""
        self.caller_gone = True
        self.wake()

    def caller_left(self, watch: asyncio.Future[None]) -> None:
        """The done-callback of the task watching for the caller's disconnect (`run_poll`)."""
        if watch.cancelled():
            return  # the wait ended first
        watch.exception()  # a broken receive also means nobody listens (retrieved, not logged)
        self.lose_caller()

    def due(self) -> None:
        """Its deadline has come (`Deadlines`): the end of the wait, an expiry, a re-check."""
        self._due_tick = None
        if not self._busy and not self._ended:
            self._resume(time.monotonic())

    def _resume(self, not_before: float) -> None:
        self._forget_deadline()
        self._busy = True
        key = self.share_key()
        if key is None:
            self._task = asyncio.get_running_loop().create_task(self._run(not_before))
        else:
            Rally.join(self, key, not_before)

    def _wait(self, seconds: float) -> None:
        self._due_tick = self.notifier.deadlines.add(self, seconds)

    def _forget_deadline(self) -> None:
        if self._due_tick is not None:
            self.notifier.deadlines.remove(self, self._due_tick)
            self._due_tick = None

    async def _run(self, not_before: float) -> None:
        try:
            while not self._ended:
                self._woken = False
                try:
                    outcome: T | Exception = await self._read_shared(not_before)
                except Exception as exc:
                    outcome = exc
                if not await self._take(outcome):
                    return
                not_before = self.woken_at  # woken during the read: read again
        finally:
            self._busy = False
            self._task = None

    async def _take(self, outcome: T | Exception) -> bool:
        """What a read means for this poll: it ends, or waits (for a wake-up, its deadline,
        or a retry after a failure the database's restart explains); True when it was woken
        during the read and must read again at once."""
        left = self.give_up - asyncio.get_running_loop().time()
        over = left <= ALMOST_OVER
        if isinstance(outcome, TRANSIENT):
            if self.caller_gone or over:
                await self._end(outcome)
                return False
            log.warning("long-poll read failed; retrying while the wait lasts")
            self._wait(min(RETRY_READ_SECONDS, left))
            return False
        if isinstance(outcome, Exception):
            await self._end(outcome)
            return False
        if self.settled(outcome) or over or self.caller_gone or self.notifier.closing:
            await self._end(outcome)
            return False
        if self._woken:
            return True
        # The state read is not held while waiting: every wait ends in a read.
        self._wait(self._timeout(outcome, left))
        return False

    async def _read_shared(self, not_before: float) -> T:
        key = self.share_key()
        if key is None:
            return await self.read()
        return await self.notifier.reads.run(key, self.read, not_before)

    async def _end(self, outcome: T | Exception) -> None:
        settle = self._settle
        self.stop()
        if settle is not None:
            await settle(outcome)

    def _timeout(self, value: T, left: float) -> float:
        """How long the next wait may last: the time left, the re-check period, the deadline."""
        timeout = left
        if self.notifier.recheck_seconds is not None:
            timeout = min(timeout, self.notifier.recheck_seconds)
        deadline = self.deadline(value)
        if deadline is not None:
            until_deadline = (deadline - datetime.now(UTC)).total_seconds() + 0.05
            timeout = min(timeout, max(until_deadline, 0.0))
        return timeout


class Rally:
    """The polls of one shared read (`share_key`) woken together, read for by one task: ten
    thousand waits woken by a hundred decisions make a hundred tasks and a hundred reads,
    not ten thousand tasks each joining a read. A poll woken once the rally's read has
    started gathers with the next one, whose read starts after its wake-up (as
    `SharedReads` has it), so no wake-up is lost. The answers are sent one after the
    other from the rally's task: the polls of one key are one caller's waits on one
    object."""

    __slots__ = ("key", "not_before", "polls", "reads")

    def __init__(self, key: str, reads: SharedReads) -> None:
        self.key = key
        self.reads = reads
        self.polls: list[Poll[Any]] = []
        self.not_before = 0.0

    @classmethod
    def join(cls, poll: Poll[Any], key: str, not_before: float) -> None:
        reads = poll.notifier.reads
        rally = reads.gathering.get(key)
        if rally is None:
            rally = reads.gathering[key] = cls(key, reads)
            task = asyncio.get_running_loop().create_task(rally.run())
            reads.running.add(task)  # the loop keeps only a weak reference
            task.add_done_callback(reads.running.discard)
        rally.polls.append(poll)
        rally.not_before = max(rally.not_before, not_before)

    async def run(self) -> None:
        polls = self.polls
        del self.reads.gathering[self.key]  # a poll woken from now on joins the next rally
        try:
            while polls:
                for poll in polls:
                    poll._woken = False
                try:
                    outcome: Any = await self.reads.run(self.key, polls[0].read, self.not_before)
                except Exception as exc:
                    outcome = exc
                again: list[Poll[Any]] = []
                for poll in polls:
                    if poll._ended:
                        continue
                    try:
                        read_again = await poll._take(outcome)
                    except Exception as exc:  # a bug in one poll leaves the others be
                        log.exception("a long-poll failed after its read")
                        await poll._end(exc)
                        continue
                    if read_again:
                        again.append(poll)
                        self.not_before = max(self.not_before, poll.woken_at)
                    else:
                        poll._busy = False
                del outcome
                polls = again
        finally:
            for poll in polls:
                poll._busy = False


class FunctionPoll(Poll[T]):
    """A `Poll` made of functions, for waits that are few (a pairing) and for tests."""

    __slots__ = ("_deadline_of", "_is_settled", "_read", "_share_key")

    def __init__(
        self,
        notifier: Notifier,
        topic: str,
        read: Callable[[], Awaitable[T]],
        is_settled: Callable[[T], bool],
        wait: float,
        deadline_of: Callable[[T], datetime | None] | None = None,
        share_key: str | None = None,
    ) -> None:
        super().__init__(notifier, topic, wait)
        self._read = read
        self._is_settled = is_settled
        self._deadline_of = deadline_of
        self._share_key = share_key

    async def read(self) -> T:
        return await self._read()

    def settled(self, value: T) -> bool:
        return self._is_settled(value)

    def deadline(self, value: T) -> datetime | None:
        return None if self._deadline_of is None else self._deadline_of(value)

    def share_key(self) -> str | None:
        return self._share_key


class Outcome(Generic[T]):
    """A poll's outcome, for a caller that awaits it."""

    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: asyncio.Future[T] = asyncio.get_running_loop().create_future()

    async def settle(self, outcome: T | Exception) -> None:
        if self.future.done():
            return  # its caller was cancelled
        if isinstance(outcome, Exception):
            self.future.set_exception(outcome)
        else:
            self.future.set_result(outcome)


async def run_poll(poll: Poll[T], disconnected: Disconnected | None = None) -> T:
    """Run `poll` in this task and return its final read (or raise its error).
    `disconnected` returns once the caller has gone: the wait then ends, rather than
    holding its slot (and re-reading) for a caller who will never see the answer."""
    outcome: Outcome[T] = Outcome()
    watcher: asyncio.Future[None] | None = None
    try:
        await poll.start(outcome.settle)
        if disconnected is not None and not outcome.future.done():
            watcher = _watch(disconnected, poll)
        return await outcome.future
    finally:
        if watcher is not None:
            watcher.cancel()
        poll.stop()


async def long_poll(
    notifier: Notifier,
    topic: str,
    read: Callable[[], Awaitable[T]],
    is_settled: Callable[[T], bool],
    wait: float,
    deadline_of: Callable[[T], datetime | None] | None = None,
    share_key: str | None = None,
    disconnected: Disconnected | None = None,
) -> T:
    """Return `read()` once it is settled, or after `wait` seconds: a `FunctionPoll` run
    in this task (see `Poll` for the rules). `read` must open and close its own short
    session."""
    poll = FunctionPoll(notifier, topic, read, is_settled, wait, deadline_of, share_key)
    return await run_poll(poll, disconnected)


def _watch(disconnected: Disconnected, poll: Poll[Any]) -> asyncio.Future[None]:
    """A task that ends when the caller goes; its completion marks and wakes the poll. A
    done-callback rather than a coroutine of ours around it."""
    watcher = asyncio.ensure_future(disconnected())
    watcher.add_done_callback(poll.caller_left)
    return watcher


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


_SET_HERE = frozenset({b"content-length", b"content-type"})
# The scope key under which `LongPollParking` offers a waiting request a place to wait.
PARKING = "pns.longpoll.parking"


class Parked:
    """A request's place in `LongPollParking`, and where its poll's outcome goes: the
    request's own `send`. The answer is sent from the task of the read that settled the
    poll, while the request's task waits in `receive`, which returns once the answer is
    complete (or the caller has gone)."""

    __slots__ = ("done", "gone", "receive", "response", "scope", "send")

    def __init__(
        self, scope: Scope, receive: Receive, send: Send, response: LongPollResponse | None = None
    ) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self.response = response  # set by the response that asks to wait here
        self.done = False
        # Made only when the caller has gone before the answer: the request waits on it.
        self.gone: asyncio.Future[None] | None = None

    async def wait(self, poll: Poll[Rendered[Any]]) -> None:
        """Start the poll, then wait in the request's task for the end of the answer or of
        the caller: nothing else of the request is held while the poll waits."""
        try:
            await poll.start(self.settle)
            while not self.done:
                try:
                    message = await self.receive()
                except OSError:
                    break  # a broken receive also means nobody listens
                if message["type"] == "http.disconnect":
                    break
            if not self.done:
                self.gone = asyncio.get_running_loop().create_future()
                poll.lose_caller()
                await self.gone  # the answer goes to nobody, but the request is logged
        finally:
            poll.stop()

    async def settle(self, outcome: Rendered[Any] | Exception) -> None:
        try:
            if isinstance(outcome, Exception):
                await problem_response(problem_for(outcome))(self.scope, self.receive, self.send)
            elif self.response is not None:
                await self.response.send_answer(outcome.body, self.send)
        except Exception:
            # Sent from a read's task, which nobody awaits: say it here or it goes unseen.
            log.exception("a long-poll's answer could not be sent")
        finally:
            self.done = True
            if self.gone is not None and not self.gone.done():
                self.gone.set_result(None)


class LongPollResponse(Response):
    """A 200 JSON answer whose long-poll runs after the handler has returned.

    The route's handler returns at once, so everything it held (the solved dependencies,
    the authenticated caller's row, its frames) is gone before the wait starts. Under
    `LongPollParking` the poll is handed to that middleware, so the router, FastAPI's
    request handling and the inner middleware return too. Without it (this response used
    on its own) the poll runs here. Either way an error ending the poll is answered with
    the problem the app's error handlers would give (`problem_for`)."""

    media_type = "application/json"

    def __init__(self, poll: Poll[Rendered[Any]]) -> None:
        super().__init__(status_code=200, media_type=self.media_type)
        self.poll = poll

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        parked = scope.get(PARKING)
        if isinstance(parked, Parked) and parked.response is None:
            parked.response = self
            return
        await Parked(scope, receive, send, self).wait(self.poll)

    async def send_answer(self, body: bytes, send: Send) -> None:
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
    the middleware inside this one) then returns, and the request waits in this
    middleware's frame for its answer. Ten thousand waiting requests so hold a few frames
    each rather than the whole stack, and the garbage collector, which walks every object
    they hold, has a fraction of the work."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        parked = Parked(scope, receive, send)
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
        await parked.wait(response.poll)
