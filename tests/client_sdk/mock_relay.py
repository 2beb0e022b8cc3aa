"""Helpers for SDK tests against a scripted relay (httpx.MockTransport)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from client_sdk import (
    PnsClient,
)

URL = "http://pns.test"
Handler = Callable[[httpx.Request], httpx.Response]


def problem(status: int, code: str, **extra: Any) -> httpx.Response:
    body = {"type": "x", "title": "t", "status": status, "detail": "do this", "code": code}
    body.update(extra)
    headers = {"content-type": "application/problem+json"}
    if status == 429:
        headers["retry-after"] = "7"
    return httpx.Response(status, json=body, headers=headers)


def client_for(handler: Handler, **kwargs: Any) -> PnsClient:
    return PnsClient(URL, token="tok", transport=httpx.MockTransport(handler), **kwargs)
