"""The only code that touches the network or waits: the two drivers of the SDK's flows.

`SyncSender.run` and `AsyncSender.run` perform the steps a flow (`client_sdk._flows`)
yields; everything else about a call or a login is decided in the flow, once."""

from __future__ import annotations

import asyncio
import inspect
import ssl
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

from client_sdk._flows import (
    Flow,
    Invoke,
    Sleep,
    Step,
    Unwatch,
    Watch,
    drive,
    exchange,
)
from client_sdk._wire import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    ApiRequest,
    Call,
    Reply,
    timeout_for,
)

T = TypeVar("T")
TimeoutTypes = float | httpx.Timeout | None


def as_timeout(value: TimeoutTypes) -> httpx.Timeout:
    if value is None:
        return DEFAULT_TIMEOUT
    return value if isinstance(value, httpx.Timeout) else httpx.Timeout(value)


class _Sender:
    """What both drivers share: the retry budget and how a request's options are built."""

    def __init__(
        self, headers: Callable[[], dict[str, str]], timeout: TimeoutTypes, retries: int
    ) -> None:
        self.timeout = as_timeout(timeout)
        self.retries = retries
        self._headers = headers

    def _options(self, request: ApiRequest) -> dict[str, Any]:
        return {
            "params": request.params,
            "json": request.json,
            "headers": {**self._headers(), **request.headers},
            "timeout": timeout_for(request, self.timeout),
        }


class SyncSender(_Sender):
    """Drives flows with blocking I/O: requests on an `httpx.Client`, `time.sleep`, and a
    watcher thread for `use_code`."""

    def __init__(
        self,
        base_url: str,
        headers: Callable[[], dict[str, str]],
        *,
        timeout: TimeoutTypes = None,
        retries: int = DEFAULT_RETRIES,
        transport: httpx.BaseTransport | None = None,
        verify: bool | ssl.SSLContext = True,
    ) -> None:
        super().__init__(headers, timeout, retries)
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"), timeout=self.timeout, transport=transport, verify=verify
        )

    def send(self, call: Call[T]) -> T:
        return self.run(exchange(call, self.retries))

    def run(self, flow: Flow[T], use_code: threading.Event | None = None) -> T:
        watch = _ThreadWatch(self, use_code)
        try:
            return drive(flow, lambda step: self._perform(step, watch))
        finally:
            watch.stop()
            flow.close()

    def _perform(self, step: Step, watch: _ThreadWatch) -> Any:
        match step:
            case ApiRequest():
                sent_at = time.time()
                response = self.http.request(step.method, step.path, **self._options(step))
                return Reply(response, sent_at, time.time())
            case Call():
                return self.send(step)
            case Sleep(seconds=seconds):
                time.sleep(seconds)
            case Invoke(callback=callback, argument=argument):
                return callback(argument)
            case Watch(on_set=on_set):
                watch.start(on_set)
            case Unwatch():
                return watch.stop()
        return None

    def close(self) -> None:
        self.http.close()


class _ThreadWatch:
    """`Watch` for the blocking client: a thread that runs the flow once `use_code` is set."""

    def __init__(self, sender: SyncSender, use_code: threading.Event | None) -> None:
        self._sender = sender
        self._use_code = use_code
        self._stop: threading.Event | None = None

    def start(self, on_set: Flow[None]) -> None:
        if self._use_code is None:
            on_set.close()
            return
        self._stop = threading.Event()
        watcher = threading.Thread(
            target=self._watch,
            args=(self._use_code, on_set, self._stop),
            name="pns-login-watch",
            daemon=True,
        )
        watcher.start()

    def _watch(self, use_code: threading.Event, on_set: Flow[None], stop: threading.Event) -> None:
        while not stop.is_set():
            if use_code.wait(0.1):
                self._sender.run(on_set)
                return
        on_set.close()

    def stop(self) -> bool:
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        return self._use_code is not None and self._use_code.is_set()


class AsyncSender(_Sender):
    """Drives flows with asyncio: requests on an `httpx.AsyncClient`, `asyncio.sleep`, and
    a watcher task for `use_code`; callbacks may return coroutines."""

    def __init__(
        self,
        base_url: str,
        headers: Callable[[], dict[str, str]],
        *,
        timeout: TimeoutTypes = None,
        retries: int = DEFAULT_RETRIES,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: bool | ssl.SSLContext = True,
    ) -> None:
        super().__init__(headers, timeout, retries)
        self.http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), timeout=self.timeout, transport=transport, verify=verify
        )

    async def send(self, call: Call[T]) -> T:
        return await self.run(exchange(call, self.retries))

    async def run(self, flow: Flow[T], use_code: asyncio.Event | None = None) -> T:
        """`drive`, awaiting each step."""
        watch = _TaskWatch(self, use_code)
        result: Any = None
        error: Exception | None = None
        try:
            while True:
                try:
                    step = flow.send(result) if error is None else flow.throw(error)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
                try:
                    result, error = await self._perform(step, watch), None
                except Exception as exc:  # the flow decides what a failed step means
                    result, error = None, exc
        finally:
            watch.stop()
            flow.close()

    async def _perform(self, step: Step, watch: _TaskWatch) -> Any:
        match step:
            case ApiRequest():
                sent_at = time.time()
                response = await self.http.request(step.method, step.path, **self._options(step))
                return Reply(response, sent_at, time.time())
            case Call():
                return await self.send(step)
            case Sleep(seconds=seconds):
                await asyncio.sleep(seconds)
            case Invoke(callback=callback, argument=argument):
                value = callback(argument)
                return await value if inspect.isawaitable(value) else value
            case Watch(on_set=on_set):
                watch.start(on_set)
            case Unwatch():
                return watch.stop()
        return None

    async def aclose(self) -> None:
        await self.http.aclose()


class _TaskWatch:
    """`Watch` for the asyncio client: a task that runs the flow once `use_code` is set."""

    def __init__(self, sender: AsyncSender, use_code: asyncio.Event | None) -> None:
        self._sender = sender
        self._use_code = use_code
        self._task: asyncio.Task[None] | None = None

    def start(self, on_set: Flow[None]) -> None:
        if self._use_code is None:
            on_set.close()
            return
        self._task = asyncio.create_task(self._watch(self._use_code, on_set))

    async def _watch(self, use_code: asyncio.Event, on_set: Flow[None]) -> None:
        await use_code.wait()
        await self._sender.run(on_set)

    def stop(self) -> bool:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        return self._use_code is not None and self._use_code.is_set()


class SyncLifecycle:
    """What every sync client shares: sending through its `SyncSender`, and closing the
    connection pool at the end of a `with` block."""

    _sender: SyncSender

    def _send(self, call: Call[T]) -> T:
        return self._sender.send(call)

    def _run(self, flow: Flow[T], use_code: threading.Event | None = None) -> T:
        return self._sender.run(flow, use_code)

    def close(self) -> None:
        """Close the connection pool; a `with` block does this for you.

        Example::

            client.close()
        """
        self._sender.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncLifecycle:
    """The async twin of `SyncLifecycle`: `async with` closes the pool."""

    _sender: AsyncSender

    async def _send(self, call: Call[T]) -> T:
        return await self._sender.send(call)

    async def _run(self, flow: Flow[T], use_code: asyncio.Event | None = None) -> T:
        return await self._sender.run(flow, use_code)

    async def aclose(self) -> None:
        """Close the connection pool; an `async with` block does this for you.

        Example::

            await client.aclose()
        """
        await self._sender.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
