"""The only code that touches the network: send a core `Call`, retry per its policy."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self, TypeVar

import httpx

from client_sdk._core import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    ApiRequest,
    Call,
    Reply,
    backoff,
    retry_after_unavailable,
    should_retry,
    timeout_for,
    transport_error,
)

T = TypeVar("T")
TimeoutTypes = float | httpx.Timeout | None


def as_timeout(value: TimeoutTypes) -> httpx.Timeout:
    if value is None:
        return DEFAULT_TIMEOUT
    return value if isinstance(value, httpx.Timeout) else httpx.Timeout(value)


def _merge(request: ApiRequest, headers: dict[str, str]) -> dict[str, str]:
    return {**headers, **request.headers}


class SyncSender:
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
        self.timeout = as_timeout(timeout)
        self.retries = retries
        self._headers = headers
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"), timeout=self.timeout, transport=transport, verify=verify
        )

    def send(self, call: Call[T]) -> T:
        request = call.request
        attempt = 0
        retried_unavailable = False
        while True:
            sent_at = time.time()
            try:
                response = self.http.request(
                    request.method,
                    request.path,
                    params=request.params,
                    json=request.json,
                    headers=_merge(request, self._headers()),
                    timeout=timeout_for(request, self.timeout),
                )
            except httpx.TransportError as exc:
                if should_retry(request, exc, attempt, self.retries):
                    time.sleep(backoff(attempt))
                    attempt += 1
                    continue
                raise transport_error(exc) from exc
            delay = None if retried_unavailable else retry_after_unavailable(request, response)
            if delay is not None:
                retried_unavailable = True
                response.close()
                time.sleep(delay)
                continue
            return call.parse(Reply(response, sent_at, time.time()))

    def close(self) -> None:
        self.http.close()


class AsyncSender:
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
        self.timeout = as_timeout(timeout)
        self.retries = retries
        self._headers = headers
        self.http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), timeout=self.timeout, transport=transport, verify=verify
        )

    async def send(self, call: Call[T]) -> T:
        request = call.request
        attempt = 0
        retried_unavailable = False
        while True:
            sent_at = time.time()
            try:
                response = await self.http.request(
                    request.method,
                    request.path,
                    params=request.params,
                    json=request.json,
                    headers=_merge(request, self._headers()),
                    timeout=timeout_for(request, self.timeout),
                )
            except httpx.TransportError as exc:
                if should_retry(request, exc, attempt, self.retries):
                    await asyncio.sleep(backoff(attempt))
                    attempt += 1
                    continue
                raise transport_error(exc) from exc
            delay = None if retried_unavailable else retry_after_unavailable(request, response)
            if delay is not None:
                retried_unavailable = True
                await response.aclose()
                await asyncio.sleep(delay)
                continue
            return call.parse(Reply(response, sent_at, time.time()))

    async def aclose(self) -> None:
        await self.http.aclose()


class SyncLifecycle:
    """What every sync client shares: sending through its `SyncSender`, and closing the
    connection pool at the end of a `with` block."""

    _sender: SyncSender

    def _send(self, call: Call[T]) -> T:
        return self._sender.send(call)

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
