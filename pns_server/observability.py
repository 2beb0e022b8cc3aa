"""Logs: JSON lines for machines, a short text format on a terminal, secrets redacted.

One access line per request (method, route template, status, duration, request id), and the
request id on every line logged while the request runs. Redaction is defence in depth: code
should never log a secret, but if it does, anything shaped like one is masked here."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pns_server.config import Settings
from pns_server.metrics import Metrics
from pns_server.problems import problem_for, problem_response

access_log = logging.getLogger("pns.access")
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "pns_request_id", default=None
)

REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
UNMATCHED_ROUTE = "<unmatched>"

QUIET_LIBRARIES = (
    "aiosqlite",
    "asyncpg",
    "sqlalchemy",
    "httpx",
    "httpcore",
    "hpack",
    "h2",
    "urllib3",
    "google",
    "alembic.runtime.plugins",
)
REDACTED = "[redacted]"
_SECRET_FIELDS = (
    r"client_token|device_token|pairing_token|registration_key|admin_token|secret_key"
    r"|secret|token|password|code|codes|match_code|signature|otp|authorization"
)
Rule = tuple[re.Pattern[str], str]  # a pattern and what replaces its matches
# Applied in this order.
_PATTERNS: tuple[Rule, Rule, Rule] = (
    # Our bearer tokens, wherever they appear.
    (re.compile(r"\b(pns[cdp]_)[A-Za-z0-9_\-]{8,}"), r"\1" + REDACTED),
    (re.compile(r"(?i)\b(bearer)\s+[^\s\"',;]+"), r"\1 " + REDACTED),
    # key=value, "key": "value", key: value for fields that carry secrets.
    (
        re.compile(rf"(?i)([\"']?\b(?:{_SECRET_FIELDS})[\"']?\s*[:=]\s*[\"']?)([^\"'\s,&;}}\]]+)"),
        r"\1" + REDACTED,
    ),
)
_OUR_TOKENS, _BEARER, _SECRET_FIELD = _PATTERNS

# The case-insensitive patterns cost ~30 us on an access line, on every request, and almost
# never match. So a line is first folded to lower case (with the non-ASCII letters that `re`
# also takes for i, k and s), and a pattern runs only where its words appear in the folded
# line: a case-sensitive test that finds every line the pattern could change.
_FOLD_LIKE_RE = str.maketrans({"\u0130": "i", "\u0131": "i", "\u212a": "k", "\u017f": "s"})
_MAY_NAME_SECRET = re.compile(rf"(?:{_SECRET_FIELDS})[\"']?\s*[:=]")


def redact(text: str) -> str:
    if "pns" in text:
        text = _apply(_OUR_TOKENS, text)
    if "bearer" in _folded(text):
        text = _apply(_BEARER, text)
    if _MAY_NAME_SECRET.search(_folded(text)):
        text = _apply(_SECRET_FIELD, text)
    return text


def _folded(text: str) -> str:
    return (text if text.isascii() else text.translate(_FOLD_LIKE_RE)).lower()


def _apply(rule: Rule, text: str) -> str:
    pattern, replacement = rule
    return pattern.sub(replacement, text)


class RedactingFilter(logging.Filter):
    """Rewrites the message before any handler formats it (attach to every handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        return True


_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    # uvicorn's copy of the message with ANSI colour escapes, for its own formatter only.
    "color_message",
}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id is not None:
            entry["request_id"] = request_id
        entry.update(_extras(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, default=str, ensure_ascii=False))


# Line breaks (CR, LF, NEL, U+2028/9) and other control characters in a text line: escaped,
# so a value someone typed (a username, a device name) cannot start a forged log line.
_UNSAFE_IN_LINE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_line(text: str) -> str:
    return _UNSAFE_IN_LINE.sub(lambda m: _ESCAPES.get(m.group(), f"\\u{ord(m.group()):04x}"), text)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s %(message)s", "%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        # Only the line itself: a traceback appended after it keeps its own lines.
        return escape_line(super().formatMessage(record))

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        request_id = request_id_var.get()
        if request_id is not None and "request_id" not in extras:
            extras["request_id"] = request_id
        if extras:
            line += " " + escape_line(" ".join(f"{k}={v}" for k, v in extras.items()))
        return redact(line)


def wants_json(settings: Settings, stream: TextIO) -> bool:
    if settings.log_format != "auto":
        return settings.log_format == "json"
    return not stream.isatty()


def configure_logging(settings: Settings, stream: TextIO | None = None) -> None:
    """Root handler only; uvicorn's loggers propagate to it (serve passes log_config=None)."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if wants_json(settings, stream) else TextFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    # Drivers and HTTP libraries log statement parameters and headers at debug level: push
    # tokens, sealed secrets, provider credentials. PNS_LOG_LEVEL=debug is for our code only.
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Our own access line replaces uvicorn's, which logs raw paths (with ids) and no timing.
    logging.getLogger("uvicorn.access").disabled = True


def incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            return candidate if _VALID_REQUEST_ID.match(candidate) else None
    return None


def route_template(scope: Scope) -> str:
    route: BaseRoute | None = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED_ROUTE


class RequestObserver:
    """Pure ASGI (no BaseHTTPMiddleware: it breaks long-polls): request id in and out, one
    access line and the HTTP metrics per request, labelled by route template.

    It runs outside the framework (see `app.RelayApp`), around the long-poll parking: a
    parked wait holds its frame, so it keeps no closure. An exception the app did not
    answer (`AnswerUnexpected` answers those inside) is answered here if nothing was sent."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = incoming_request_id(scope) or secrets.token_hex(8)
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        answer = SendWithId(send, request_id)
        try:
            await self.app(scope, receive, answer)
        except Exception as exc:
            if answer.status is not None:
                raise  # mid-body: nothing left to answer with
            await problem_response(problem_for(exc))(scope, receive, answer)
        finally:
            status = 500 if answer.status is None else answer.status
            self._observe(scope, status, time.perf_counter() - started, request_id)
            request_id_var.reset(token)

    def _observe(self, scope: Scope, status: int, seconds: float, request_id: str) -> None:
        method = str(scope.get("method", ""))
        route = route_template(scope)
        self.metrics.http_requests.labels(method, route, str(status)).inc()
        self.metrics.http_seconds.labels(method, route).observe(seconds)
        client = scope.get("client")
        access_log.info(
            "%s %s %s %.1fms",
            method,
            route,
            status,
            seconds * 1000,
            extra={
                "method": method,
                "route": route,
                "status": status,
                "duration_ms": round(seconds * 1000, 1),
                "request_id": request_id,
                "client_ip": client[0] if client else None,
            },
        )


class SendWithId:
    """The observer's `send`: adds the request id to the answer and notes its status."""

    __slots__ = ("request_id", "send", "status")

    def __init__(self, send: Send, request_id: str) -> None:
        self.send = send
        self.request_id = request_id
        self.status: int | None = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            given = message.get("headers", [])
            headers = [(k, v) for k, v in given if k.lower() != b"x-request-id"]
            headers.append((b"x-request-id", self.request_id.encode()))
            message = {**message, "headers": headers}
        await self.send(message)


class AnswerUnexpected:
    """Pure ASGI, the outermost layer inside the framework: an exception our code did not
    turn into a problem is logged (one line, without a statement's values) and answered
    here with the problem the app's handlers give (`problem_for`: a 500 for a bug). Past
    this the framework's outermost middleware would answer it and then re-raise it to the
    server, which logs the whole exception text, values included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def noting_start(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, noting_start)
        except Exception as exc:
            if started:
                raise  # mid-body: nothing left to answer with
            await problem_response(problem_for(exc))(scope, receive, send)
