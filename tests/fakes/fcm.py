"""A fake FCM: Google's OAuth token endpoint and the v1 `messages:send` API, over TLS.

It runs uvicorn in a background thread with its own event loop, so a client that wrongly
blocks the test's event loop on the OAuth refresh still gets an answer (and the test can see
the loop was stalled) instead of deadlocking. Error replies are the bodies Google sends,
with the `google.firebase.fcm.v1.FcmError` detail firebase-admin keys on."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import uvicorn
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.fakes.tls import CertificateAuthority
from tests.support.postgres import free_port

FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"

# errorCode -> (HTTP status, canonical status, message), as FCM sends them.
FCM_ERRORS: dict[str, tuple[int, str, str]] = {
    "UNREGISTERED": (404, "NOT_FOUND", "Requested entity was not found."),
    "SENDER_ID_MISMATCH": (403, "PERMISSION_DENIED", "SenderId mismatch"),
    "INVALID_ARGUMENT": (
        400,
        "INVALID_ARGUMENT",
        "The registration token is not a valid FCM registration token",
    ),
    "QUOTA_EXCEEDED": (
        429,
        "RESOURCE_EXHAUSTED",
        "Resource has been exhausted (e.g. check quota).",
    ),
    "UNAVAILABLE": (503, "UNAVAILABLE", "The service is currently unavailable."),
    "INTERNAL": (500, "INTERNAL", "Internal error encountered."),
    "THIRD_PARTY_AUTH_ERROR": (401, "UNAUTHENTICATED", "Auth error from APNS or Web Push Service"),
}


def fcm_error_body(error_code: str) -> tuple[int, dict[str, Any]]:
    status, canonical, message = FCM_ERRORS[error_code]
    return status, {
        "error": {
            "code": status,
            "message": message,
            "status": canonical,
            "details": [{"@type": FCM_ERROR_TYPE, "errorCode": error_code}],
        }
    }


def _google_error(status: int, canonical: str, message: str) -> JSONResponse:
    body = {"error": {"code": status, "message": message, "status": canonical}}
    return JSONResponse(body, status_code=status)


@dataclass(frozen=True)
class FcmReply:
    error_code: str | None = None  # None: delivered
    retry_after: int | None = None
    delay: float = 0.0


@dataclass
class FcmReceived:
    project: str
    body: dict[str, Any]
    access_token: str
    status: int

    @property
    def message(self) -> dict[str, Any]:
        result: dict[str, Any] = self.body["message"]
        return result


@dataclass
class _State:
    replies: dict[str, FcmReply] = field(default_factory=dict)
    received: list[FcmReceived] = field(default_factory=list)
    issued_tokens: list[str] = field(default_factory=list)
    token_delay: float = 0.0
    token_requests: int = 0
    reject_token_requests: bool = False


def _b64url_decode(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


class FakeFcm:
    """Use as `with FakeFcm() as fcm:`; `fcm.write_credentials(path)` makes the service account."""

    def __init__(
        self, *, project_id: str = "pns-test-project", ca: CertificateAuthority | None = None
    ) -> None:
        self.project_id = project_id
        self.ca = ca or CertificateAuthority()
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.client_email = f"pns-sender@{project_id}.iam.gserviceaccount.com"
        self.state = _State()
        self.port = free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="fake-fcm-")
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Condition()

    # -- what tests configure -------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    def answer(self, token: str, reply: FcmReply) -> None:
        self.state.replies[token] = reply

    @property
    def received(self) -> list[FcmReceived]:
        return list(self.state.received)

    def set_token_delay(self, seconds: float) -> None:
        self.state.token_delay = seconds

    def revoke_access_tokens(self) -> None:
        """Every access token issued so far is now refused with 401 UNAUTHENTICATED."""
        self.state.issued_tokens.clear()

    def service_account(self) -> dict[str, str]:
        pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return {
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": secrets.token_hex(20),
            "private_key": pem,
            "client_email": self.client_email,
            "client_id": "100000000000000000001",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "universe_domain": "googleapis.com",
        }

    def write_credentials(self, path: Path) -> Path:
        path.write_text(json.dumps(self.service_account()))
        return path

    def write_ca(self, path: Path) -> Path:
        return self.ca.write_ca(path)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[FcmReceived]:
        """Block until `count` sends arrived (call from a thread or via asyncio.to_thread)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.state.received) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"fake FCM got {len(self.state.received)} of {count}")
                self._lock.wait(remaining)
        return self.received

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> FakeFcm:
        server_pem = self.ca.issue_server().write(Path(self._tmp.name) / "server.pem")
        config = uvicorn.Config(
            self._app(),
            host="127.0.0.1",
            port=self.port,
            ssl_certfile=str(server_pem),
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=0,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fake-fcm", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake FCM did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = True  # don't wait for clients' keep-alive connections
        if self._thread is not None:
            self._thread.join(10)
        self._tmp.cleanup()

    # -- the HTTP endpoints -----------------------------------------------------------------
    def _app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/token", self._token, methods=["POST"]),
                Route("/v1/projects/{project}/messages:send", self._send, methods=["POST"]),
            ]
        )

    async def _token(self, request: Request) -> JSONResponse:
        self.state.token_requests += 1
        if self.state.token_delay:
            await asyncio.sleep(self.state.token_delay)
        form = parse_qs((await request.body()).decode())
        assertion = form.get("assertion", [""])[0]
        if form.get("grant_type", [""])[0] != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
        if self.state.reject_token_requests or not self._valid_assertion(assertion):
            return JSONResponse(
                {"error": "invalid_grant", "error_description": "Invalid JWT Signature."},
                status_code=400,
            )
        token = "ya29.fake-" + secrets.token_urlsafe(24)
        self.state.issued_tokens.append(token)
        return JSONResponse({"access_token": token, "expires_in": 3599, "token_type": "Bearer"})

    def _valid_assertion(self, assertion: str) -> bool:
        try:
            header_b64, claims_b64, signature_b64 = assertion.split(".")
            claims = json.loads(_b64url_decode(claims_b64))
            self.key.public_key().verify(
                _b64url_decode(signature_b64),
                f"{header_b64}.{claims_b64}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except (ValueError, InvalidSignature, json.JSONDecodeError):
            return False
        # google-auth puts Google's own token endpoint in `aud` whatever token_uri says.
        return bool(claims.get("iss") == self.client_email and claims.get("aud"))

    async def _send(self, request: Request) -> JSONResponse:
        project = request.path_params["project"]
        auth = request.headers.get("authorization", "")
        access_token = auth.removeprefix("Bearer ").strip()
        body = json.loads(await request.body())
        if access_token not in self.state.issued_tokens:
            response = _google_error(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials. Expected OAuth 2 access token, "
                "login cookie or other valid authentication credential.",
            )
        elif project != self.project_id:
            response = _google_error(
                403,
                "PERMISSION_DENIED",
                f"Permission 'cloudmessaging.messages.create' denied on resource "
                f"'//cloudresourcemanager.googleapis.com/projects/{project}' "
                "(or it may not exist).",
            )
        else:
            token = body.get("message", {}).get("token", "")
            reply = self.state.replies.get(token, FcmReply())
            if reply.delay:
                await asyncio.sleep(reply.delay)
            if reply.error_code is None:
                message_id = f"0:{int(time.time() * 1000)}%{secrets.token_hex(8)}"
                name = f"projects/{project}/messages/{message_id}"
                response = JSONResponse({"name": name})
            else:
                status, error = fcm_error_body(reply.error_code)
                headers = (
                    {"Retry-After": str(reply.retry_after)}
                    if reply.retry_after is not None
                    else None
                )
                response = JSONResponse(error, status_code=status, headers=headers)
        with self._lock:
            self.state.received.append(
                FcmReceived(project, body, access_token, response.status_code)
            )
            self._lock.notify_all()
        return response
