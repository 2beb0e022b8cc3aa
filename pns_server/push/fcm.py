"""Firebase Cloud Messaging through firebase-admin's async API (HTTP v1, httpx).

Two things firebase-admin does not do the way a relay needs, handled here:
- its OAuth refresh is blocking (requests) and would run on the event loop inside httpx's
  auth flow; we refresh in a worker thread before sending and only attach the token;
- its built-in retry sleeps through four 5xx retries per send; the dispatcher owns retries,
  so the HTTP client here never retries."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import ssl
import warnings
from collections.abc import Generator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import firebase_admin
import httpx
import requests
import requests.adapters
from firebase_admin import credentials, exceptions, messaging
from google.auth import exceptions as auth_exceptions
from google.auth.transport.requests import Request as GoogleAuthRequest

from pns_server.push.apns import parse_retry_after, ssl_context
from pns_server.push.base import Outcome, PushMessage, PushResult

log = logging.getLogger("pns.push.fcm")

FCM_HOST = "https://fcm.googleapis.com"
INVALID_TOKEN_CODES = frozenset({"UNREGISTERED", "SENDER_ID_MISMATCH"})
RETRY_CODES = frozenset({"QUOTA_EXCEEDED", "UNAVAILABLE", "INTERNAL"})
_app_names = itertools.count(1)


class _SslContextAdapter(requests.adapters.HTTPAdapter):
    """Makes the OAuth token request trust PNS_PUSH_CA_FILE as well as the system CAs."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)


class _TimedAuthRequest(GoogleAuthRequest):
    """google-auth's transport with our timeout instead of its 120 s default."""

    def __init__(self, session: requests.Session, timeout: float) -> None:
        super().__init__(session)
        self._timeout = timeout

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["timeout"] = self._timeout
        return super().__call__(*args, **kwargs)  # type: ignore[no-untyped-call]


class _AttachToken(httpx.Auth):
    """Attaches the already-refreshed access token; never refreshes (that would block)."""

    def __init__(self, credential: Any) -> None:
        self._credential = credential

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._credential.token}"
        yield request


class _NoRetryHttpClient:
    """The slice of firebase-admin's HttpxAsyncClient that send_each_async uses, minus retries."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        response = await self._client.request(method, url, **kwargs)
        return response.raise_for_status()

    async def aclose(self) -> None:
        await self._client.aclose()


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
        certificate = credentials.Certificate(str(credentials_file))
        self.project_id: str = certificate.project_id
        self._timeout = timeout
        self._app = firebase_admin.initialize_app(
            certificate,
            {"projectId": self.project_id, "httpTimeout": timeout},
            name=f"pns-fcm-{next(_app_names)}",
        )
        self._credential = certificate.get_credential()
        context = ssl_context(ca_file)
        self._session = requests.Session()
        self._session.mount("https://", _SslContextAdapter(context))
        self._auth_request = _TimedAuthRequest(self._session, timeout)
        self._refresh_lock = asyncio.Lock()
        self._http = _NoRetryHttpClient(
            httpx.AsyncClient(
                http2=True,
                verify=context,
                timeout=httpx.Timeout(timeout),
                auth=_AttachToken(self._credential),
            )
        )
        # firebase-admin has no public setting for the endpoint or the HTTP client; both are
        # attributes of its messaging service (checked by the tests against the fake FCM).
        service = messaging._get_messaging_service(self._app)
        base = (fcm_url or FCM_HOST).rstrip("/")
        service._fcm_url = f"{base}/v1/projects/{self.project_id}/messages:send"
        service._async_client = self._http

    async def _ensure_access_token(self) -> None:
        if self._credential.valid:
            return
        async with self._refresh_lock:
            if not self._credential.valid:
                async with asyncio.timeout(self._timeout + 1):
                    await asyncio.to_thread(self._credential.refresh, self._auth_request)

    def _message(self, message: PushMessage) -> messaging.Message:
        left = message.expires_at - datetime.now(UTC)
        ttl = max(left, timedelta(seconds=1))
        data = {
            **message.data,
            "approval_id": message.approval_id,
            "title": message.title,
            "body": message.body,
        }
        with warnings.catch_warnings():
            # firebase-admin 7 nudges towards installation IDs; phones still send
            # registration tokens, which FCM v1 takes in `token`.
            warnings.simplefilter("ignore", DeprecationWarning)
            return messaging.Message(
                token=message.token,
                data=data,
                android=messaging.AndroidConfig(priority="high", ttl=ttl),
            )

    async def send(self, message: PushMessage) -> PushResult:
        try:
            await self._ensure_access_token()
        except auth_exceptions.TransportError as exc:
            result = PushResult(Outcome.RETRY, f"OAuth token endpoint: {exc}"[:200])
            return self._log(message, result)
        except auth_exceptions.RefreshError as exc:
            retryable = getattr(exc, "retryable", False)
            outcome = Outcome.RETRY if retryable else Outcome.CONFIG_ERROR
            return self._log(message, PushResult(outcome, f"OAuth: {exc}"[:200]))
        except TimeoutError:
            return self._log(message, PushResult(Outcome.RETRY, "OAuth token timeout"))
        try:
            async with asyncio.timeout(self._timeout + 1):
                batch = await messaging.send_each_async([self._message(message)], app=self._app)
        except TimeoutError:
            return self._log(message, PushResult(Outcome.RETRY, "Timeout"))
        except exceptions.FirebaseError as exc:
            return self._log(message, PushResult(Outcome.RETRY, f"{type(exc).__name__}"))
        response = batch.responses[0]
        if response.success:
            return self._log(message, PushResult(Outcome.DELIVERED, status_code=200))
        return self._log(message, self.classify(response.exception))

    def classify(self, error: exceptions.FirebaseError) -> PushResult:
        http_response = getattr(error, "http_response", None)
        if not isinstance(http_response, httpx.Response):
            # No answer at all: connection refused, reset, timed out.
            return PushResult(Outcome.RETRY, f"{type(error).__name__}: {error}"[:200])
        status = http_response.status_code
        code, message = _fcm_error(http_response)
        reason = code or _canonical_status(http_response) or str(status)
        retry_after = parse_retry_after(http_response.headers.get("retry-after"))
        if code in INVALID_TOKEN_CODES:
            return PushResult(Outcome.INVALID_TOKEN, reason, status)
        if code == "INVALID_ARGUMENT" and "registration token" in message.lower():
            return PushResult(Outcome.INVALID_TOKEN, reason, status)
        if code in RETRY_CODES or status == 429 or status >= 500:
            return PushResult(Outcome.RETRY, reason, status, retry_after)
        if status == 401 and code is None:
            # Google refused our access token itself: get a new one before the next try.
            self._credential.token = None
            return PushResult(Outcome.RETRY, reason, status)
        return PushResult(Outcome.CONFIG_ERROR, reason, status)

    def _log(self, message: PushMessage, result: PushResult) -> PushResult:
        where = (message.approval_id, message.device_id, "…" + message.token[-6:])
        if result.outcome is Outcome.CONFIG_ERROR:
            log.error(
                "FCM refused our configuration (%s %s) for approval %s device %s token %s: "
                "check PNS_FCM_CREDENTIALS_FILE and the Firebase project's settings",
                result.status_code,
                result.reason,
                *where,
            )
        elif result.outcome is Outcome.RETRY:
            log.warning(
                "FCM send will be retried (%s %s): approval %s device %s token %s",
                result.status_code,
                result.reason,
                *where,
            )
        elif result.outcome is Outcome.INVALID_TOKEN:
            log.info(
                "FCM says the token is dead (%s): approval %s device %s token %s",
                result.reason,
                *where,
            )
        return result

    async def close(self) -> None:
        await self._http.aclose()
        # delete_app closes the messaging service with asyncio.run(), which cannot run
        # inside our loop: do it in a thread, with the client already closed above.
        await asyncio.to_thread(firebase_admin.delete_app, self._app)
        self._session.close()


def _error_body(response: httpx.Response) -> dict[str, Any]:
    try:
        body = json.loads(response.content or b"{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def _fcm_error(response: httpx.Response) -> tuple[str | None, str]:
    error = _error_body(response)
    for detail in error.get("details") or []:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("fcm.v1.FcmError"):
            return str(detail.get("errorCode")), str(error.get("message", ""))
    return None, str(error.get("message", ""))


def _canonical_status(response: httpx.Response) -> str | None:
    status = _error_body(response).get("status")
    return str(status) if status else None
