"""Firebase Cloud Messaging: the FCM HTTP v1 API over HTTP/2, OAuth from google-auth.

One `messages:send` POST per push, on one HTTP/2 connection as APNs's (`push/http2.py`):
every send has a deadline, the dispatcher owns retries (nothing retries here), and FCM's
error detail decides between "token dead", "try again" and "our configuration is wrong".
Where something in between (a TLS-inspecting proxy) does not offer HTTP/2, the sends go
over HTTP/1.1 on httpcore's pool (the transport under httpx, `push/transport.py`).

The access token comes from google-auth's service-account credentials. Their refresh is a
blocking call (sign a JWT, POST it to the key file's `token_uri`), so it runs in a worker
thread through a small google-auth transport built on a plain httpx client that trusts the
same CA bundle and keeps the same timeout as the sends; the event loop only attaches the
token it got. firebase-admin is not used: reaching a local endpoint or trusting an extra CA
with it needs its private attributes, and it installs firestore, storage and grpcio for one
HTTP call."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx
from google.auth import exceptions as auth_exceptions
from google.auth import transport as auth_transport
from google.oauth2 import service_account

from pns_server.push.base import Outcome, PushMessage, PushResult
from pns_server.push.http2 import Http2Error, NoHttp2, Origin, Response
from pns_server.push.transport import (
    TRANSPORT_ERRORS,
    connection_pool,
    environment_proxy,
    header,
    parse_retry_after,
    proxy_ssl_context,
    send_timeouts,
    ssl_context,
)

log = logging.getLogger("pns.push.fcm")

FCM_HOST = "https://fcm.googleapis.com"
# The narrowest scope that may send: the key cannot be used for anything else with it.
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
INVALID_TOKEN_CODES = frozenset({"UNREGISTERED", "SENDER_ID_MISMATCH"})
RETRY_CODES = frozenset({"QUOTA_EXCEEDED", "UNAVAILABLE", "INTERNAL"})
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"


class _Response(auth_transport.Response):
    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    @property
    def status(self) -> int:
        return self._response.status_code

    @property
    def headers(self) -> Mapping[str, str]:
        return self._response.headers

    @property
    def data(self) -> bytes:
        return self._response.content


class HttpxAuthTransport(auth_transport.Request):
    """google-auth's transport interface on a blocking httpx client (used from a thread)."""

    def __init__(self, context: ssl.SSLContext, timeout: float) -> None:
        self._client = httpx.Client(verify=context, timeout=timeout)

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> _Response:
        try:
            # Our deadline, not google-auth's 120 s default.
            response = self._client.request(method, url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}"
            raise auth_exceptions.TransportError(problem) from exc  # type: ignore[no-untyped-call]
        return _Response(response)

    def close(self) -> None:
        self._client.close()


class FcmSender:
    service = "fcm"

    def __init__(
        self,
        credentials_file: Path,
        *,
        timeout: float,
        fcm_url: str | None = None,
        ca_file: Path | None = None,
    ) -> None:
        info = json.loads(credentials_file.read_text())
        if not isinstance(info, dict) or info.get("type") != "service_account":
            raise ValueError('not a service-account key (no "type": "service_account")')
        project_id = info.get("project_id")
        if not project_id:
            raise ValueError("the key names no project_id")
        self.project_id: str = str(project_id)
        # ValueError/KeyError on a missing field or an unreadable private key.
        self._credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
            info, scopes=[FCM_SCOPE]
        )
        self._timeout = timeout
        self._send_url = (
            f"{(fcm_url or FCM_HOST).rstrip('/')}/v1/projects/{self.project_id}/messages:send"
        )
        context = ssl_context(ca_file)
        # Before the token endpoint's httpx client, which fails on a SOCKS proxy with an
        # ImportError instead of saying what is wrong.
        proxy = environment_proxy(self._send_url)
        self._auth_transport = HttpxAuthTransport(context, timeout)
        self._refresh_lock = asyncio.Lock()
        self._refused_token: str | None = None
        parts = urlsplit(self._send_url)
        self._send_path = parts.path.encode()
        origin = f"{parts.scheme}://{parts.netloc}"
        # Its own TLS context: httpcore sets the ALPN protocols of the context it connects
        # with, and the token endpoint's client (in a thread) would offer only HTTP/1.1.
        self._origin = Origin(
            origin, ssl_context(ca_file), proxy, proxy_ssl_context(proxy, ca_file)
        )
        # HTTP/1.1, only once the way to FCM turned out not to offer HTTP/2 (`_http1_pool`).
        self._http1: httpcore.AsyncConnectionPool | None = None
        self._ca_file = ca_file
        self._proxy = proxy
        self._timeouts = send_timeouts(timeout)

    async def _access_token(self) -> str:
        """A valid token, refreshed in a thread when missing, expiring or refused by FCM."""
        credentials = self._credentials
        if credentials.valid and credentials.token != self._refused_token:
            return str(credentials.token)
        async with self._refresh_lock:
            if not credentials.valid or credentials.token == self._refused_token:
                async with asyncio.timeout(self._timeout + 1):
                    await asyncio.to_thread(credentials.refresh, self._auth_transport)
                self._refused_token = None
        return str(credentials.token)

    @staticmethod
    def body(message: PushMessage) -> dict[str, Any]:
        """The v1 `Message`: data only (the app fetches details itself), high priority, and
        a TTL of the approval's time left, so a phone offline past expiry gets nothing."""
        left = (message.expires_at - datetime.now(UTC)).total_seconds()
        data = {
            **message.data,
            "approval_id": message.approval_id,
            "title": message.title,
            "body": message.body,
        }
        return {
            "message": {
                "token": message.token,
                "data": data,
                "android": {"priority": "high", "ttl": f"{max(1, math.ceil(left))}s"},
            }
        }

    async def send(self, message: PushMessage) -> PushResult:
        try:
            token = await self._access_token()
        except auth_exceptions.TransportError as exc:
            result = PushResult(Outcome.RETRY, f"OAuth token endpoint: {exc}"[:200])
            return result
        except auth_exceptions.RefreshError as exc:
            retryable = getattr(exc, "retryable", False)
            outcome = Outcome.RETRY if retryable else Outcome.CONFIG_ERROR
            return PushResult(outcome, f"OAuth: {exc}"[:200])
        except TimeoutError:
            return PushResult(Outcome.RETRY, "OAuth token timeout")
        headers = [
            (b"authorization", f"Bearer {token}".encode()),
            (b"content-type", b"application/json"),
        ]
        body = json.dumps(self.body(message), separators=(",", ":")).encode()
        try:
            response = await self._post(headers, body)
        except (httpcore.TimeoutException, TimeoutError):
            return PushResult(Outcome.RETRY, "Timeout")
        except (Http2Error, OSError, *TRANSPORT_ERRORS) as exc:
            result = PushResult(Outcome.RETRY, f"{type(exc).__name__}: {exc}"[:200])
            return result
        result = self.classify(response)
        if result.outcome is Outcome.RETRY and result.status_code == 401:
            # Google refused our access token itself: get a new one before the next try.
            self._refused_token = token
        return result

    async def _post(
        self, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Response | httpcore.Response:
        """The whole response (its body read: flow control), over HTTP/2 unless the way to
        FCM does not offer it."""
        if self._http1 is None:
            try:
                return await self._origin.request(
                    b"POST", self._send_path, headers, body, self._timeout
                )
            except NoHttp2 as exc:
                if self._http1 is None:  # sends that failed together switch once
                    log.warning("FCM: %s; sending over HTTP/1.1 from now on", exc)
                    self._http1 = self._http1_pool()
        async with asyncio.timeout(self._timeout):
            return await self._http1.request(
                "POST", self._send_url, headers=headers, content=body, extensions=self._timeouts
            )

    def _http1_pool(self) -> httpcore.AsyncConnectionPool:
        """httpx's client's pool, as it was: up to 100 connections, 20 kept for 5 s idle."""
        return connection_pool(
            self._proxy,
            ssl_context=ssl_context(self._ca_file),
            http1=True,
            http2=False,
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
        )

    @staticmethod
    def classify(response: Response | httpcore.Response) -> PushResult:
        status = response.status
        if status == 200:
            return PushResult(Outcome.DELIVERED, status_code=status)
        code, text = _fcm_error(response)
        reason = code or _canonical_status(response) or str(status)
        retry_after = parse_retry_after(header(response, b"retry-after"))
        if code in INVALID_TOKEN_CODES:
            return PushResult(Outcome.INVALID_TOKEN, reason, status)
        if code == "INVALID_ARGUMENT" and "registration token" in text.lower():
            return PushResult(Outcome.INVALID_TOKEN, reason, status)
        if code in RETRY_CODES or status == 429 or status >= 500:
            return PushResult(Outcome.RETRY, reason, status, retry_after)
        if status == 401 and code is None:
            return PushResult(Outcome.RETRY, reason, status)
        return PushResult(Outcome.CONFIG_ERROR, reason, status)

    async def close(self) -> None:
        await self._origin.close()
        if self._http1 is not None:
            await self._http1.aclose()
        self._auth_transport.close()


def _error_body(response: Response | httpcore.Response) -> dict[str, Any]:
    try:
        body = json.loads(response.content or b"{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def _fcm_error(response: Response | httpcore.Response) -> tuple[str | None, str]:
    error = _error_body(response)
    for detail in error.get("details") or []:
        if isinstance(detail, dict) and detail.get("@type") == FCM_ERROR_TYPE:
            return str(detail.get("errorCode")), str(error.get("message", ""))
    return None, str(error.get("message", ""))


def _canonical_status(response: Response | httpcore.Response) -> str | None:
    status = _error_body(response).get("status")
    return str(status) if status else None
