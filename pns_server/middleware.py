"""Pure ASGI middleware (no BaseHTTPMiddleware: it buffers streaming and breaks long-polls)."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pns_server.errors import InvalidRequest, PayloadTooLarge, PnsError
from pns_server.schemas import has_control_character


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with 413 before the app reads them."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._too_large(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        problem = PayloadTooLarge(
            f"The request body is larger than {self.max_bytes} bytes."
        ).to_problem()
        payload = json.dumps(problem).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/problem+json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _content_length(scope: Scope) -> int | None:
    headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class RefuseControlCharacters:
    """422 for a path or query string carrying control characters once percent-decoded
    (`/v1/approvals/%00`): caught here, before any handler hands them to the database,
    which on PostgreSQL fails on NUL instead of answering "not found"."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            field = _field_with_control_character(scope)
            if field is not None:
                await _send_problem(
                    send,
                    InvalidRequest(
                        f"Fix these fields and retry: {field}.",
                        errors=[
                            {
                                "field": field,
                                "message": "must not contain control characters",
                                "type": "control_character",
                            }
                        ],
                    ),
                )
                return
        await self.app(scope, receive, send)


def _field_with_control_character(scope: Scope) -> str | None:
    if has_control_character(str(scope.get("path", ""))):
        return "path"
    query = bytes(scope.get("query_string", b"")).decode("latin-1")
    for name, value in parse_qsl(query, keep_blank_values=True):
        if has_control_character(name) or has_control_character(value):
            return "query." + ("<name>" if has_control_character(name) else name)
    return None


async def _send_problem(send: Send, error: PnsError) -> None:
    payload = json.dumps(error.to_problem()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
