"""A fake FCM: Google's OAuth token endpoint and the v1 `messages:send` API, over TLS.

It speaks HTTP/2 (and HTTP/1.1) through hypercorn, as fcm.googleapis.com does, in a
background thread with its own event loop, so a client that wrongly blocks the test's event
loop on the OAuth refresh still gets an answer (and the test can see the loop was stalled)
instead of deadlocking. The token endpoint checks the service-account JWT assertion as
Google does (RS256 signature by the key, key id, issuer, audience, lifetime, scope); the send
endpoint checks the access token, its scope, the project and the message's shape, and its
error replies are the bodies Google sends, with the `google.firebase.fcm.v1.FcmError` detail
senders key on."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.fakes.tls import CertificateAuthority
from tests.support.postgres import free_port

FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
# What Google's token endpoint wants in `aud`, whatever token_uri the key file names.
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
SEND_SCOPES = frozenset(
    {
        "https://www.googleapis.com/auth/firebase.messaging",
        "https://www.googleapis.com/auth/cloud-platform",
    }
)
MAX_ASSERTION_LIFETIME = 3600
CLOCK_SKEW = 300
_DURATION = re.compile(r"^\d{1,12}(\.\d{1,9})?s$")
_ANDROID_FIELDS = frozenset(
    {
        "collapse_key",
        "priority",
        "ttl",
        "restricted_package_name",
        "data",
        "notification",
        "fcm_options",
        "direct_boot_ok",
    }
)
_MESSAGE_FIELDS = frozenset(
    {"name", "data", "notification", "android", "webpush", "apns", "fcm_options"}
    | {"token", "topic", "condition"}
)
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


def _google_error(
    status: int, canonical: str, message: str, details: list[dict[str, Any]] | None = None
) -> JSONResponse:
    error: dict[str, Any] = {"code": status, "message": message, "status": canonical}
    if details:
        error["details"] = details
    return JSONResponse({"error": error}, status_code=status)


def _bad_field(field_path: str, description: str) -> JSONResponse:
    return _google_error(
        400,
        "INVALID_ARGUMENT",
        f"Invalid value at '{field_path}': {description}",
        [
            {
                "@type": BAD_REQUEST_TYPE,
                "fieldViolations": [{"field": field_path, "description": description}],
            }
        ],
    )


def _unknown(name: str, where: str) -> str:
    return (
        f"Invalid JSON payload received. Unknown name \"{name}\" at '{where}': Cannot find field."
    )


def message_problem(body: Any) -> JSONResponse | None:
    """FCM's own validation of a `messages:send` body: unknown names, types, formats."""
    if not isinstance(body, dict):
        return _bad_field("", "Invalid JSON payload received. Expected an object.")
    for name in body:
        if name not in ("message", "validate_only", "validateOnly"):
            return _bad_field(
                "", f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.'
            )
    message = body.get("message")
    if not isinstance(message, dict):
        return _bad_field("message", "The message is missing.")
    for name in message:
        if name not in _MESSAGE_FIELDS:
            return _bad_field(
                "message",
                _unknown(name, "message"),
            )
    targets = [name for name in ("token", "topic", "condition") if message.get(name)]
    if len(targets) != 1:
        return _bad_field("message", "Exactly one of token, topic or condition must be set.")
    data = message.get("data", {})
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        return _bad_field(
            "message.data", "Invalid JSON payload received. data values must be strings."
        )
    android = message.get("android", {})
    if not isinstance(android, dict):
        return _bad_field("message.android", "Expected an object.")
    for name in android:
        if name not in _ANDROID_FIELDS:
            return _bad_field(
                "message.android",
                _unknown(name, "message.android"),
            )
    if "priority" in android and str(android["priority"]).upper() not in ("NORMAL", "HIGH"):
        return _bad_field("message.android.priority", f"Invalid value: {android['priority']!r}")
    if "ttl" in android and not (
        isinstance(android["ttl"], str) and _DURATION.match(android["ttl"])
    ):
        return _bad_field(
            "message.android.ttl", "Illegal duration format; duration must end with 's'"
        )
    return None


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
    http_version: str = ""
    client_port: int = 0  # tells the client's connections apart

    @property
    def message(self) -> dict[str, Any]:
        result: dict[str, Any] = self.body["message"]
        return result


@dataclass
class _State:
    replies: dict[str, FcmReply] = field(default_factory=dict)
    received: list[FcmReceived] = field(default_factory=list)
    issued_tokens: list[str] = field(default_factory=list)
    token_scopes: dict[str, set[str]] = field(default_factory=dict)
    token_delay: float = 0.0
    token_requests: int = 0
    # Why each refused assertion was refused, in Google's words.
    refused_assertions: list[str] = field(default_factory=list)
    reject_token_requests: bool = False


def _b64url_decode(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def _token_error(error: str, description: str) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description}, status_code=400)


class FakeFcm:
    """Use as `with FakeFcm() as fcm:`; `fcm.write_credentials(path)` makes the service account."""

    def __init__(
        self,
        *,
        project_id: str = "pns-test-project",
        ca: CertificateAuthority | None = None,
        alpn: tuple[str, ...] = ("h2", "http/1.1"),
    ) -> None:
        # ("http/1.1",): what a TLS-inspecting proxy without HTTP/2 offers in Google's place.
        self.alpn = alpn
        self.project_id = project_id
        self.ca = ca or CertificateAuthority()
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private_key_id = secrets.token_hex(20)
        self.client_email = f"pns-sender@{project_id}.iam.gserviceaccount.com"
        self.state = _State()
        self.port = free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="fake-fcm-")
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
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
            "private_key_id": self.private_key_id,
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
        config = Config()
        config.bind = [f"127.0.0.1:{self.port}"]
        config.certfile = str(server_pem)
        config.keyfile = str(server_pem)
        config.alpn_protocols = list(self.alpn)
        config.accesslog = None
        config.errorlog = None
        config.graceful_timeout = 0
        config.h2_max_concurrent_streams = 1000  # what Google announces, roughly
        ready = threading.Event()

        async def run() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            ready.set()
            await serve(self._app(), config, shutdown_trigger=self._stop.wait)  # type: ignore[arg-type]

        self._thread = threading.Thread(target=asyncio.run, args=(run(),), name="fake-fcm")
        self._thread.daemon = True
        self._thread.start()
        ready.wait(10)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or not self._thread.is_alive():
                    raise RuntimeError("fake FCM did not start") from None
                time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
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
        if form.get("grant_type", [""])[0] != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return _token_error("unsupported_grant_type", "Invalid grant_type: ")
        claims, problem = self._check_assertion(form.get("assertion", [""])[0])
        if problem is None and self.state.reject_token_requests:
            problem = ("invalid_grant", "Invalid grant: account not found")
        if problem is not None:
            self.state.refused_assertions.append(problem[1])
            return _token_error(*problem)
        token = "ya29.fake-" + secrets.token_urlsafe(24)
        self.state.issued_tokens.append(token)
        self.state.token_scopes[token] = set(str(claims.get("scope", "")).split())
        return JSONResponse({"access_token": token, "expires_in": 3599, "token_type": "Bearer"})

    def _check_assertion(self, assertion: str) -> tuple[dict[str, Any], tuple[str, str] | None]:
        """Google's checks of a service-account JWT, done here with `cryptography` alone."""
        bad_signature = ("invalid_grant", "Invalid JWT Signature.")
        try:
            header_b64, claims_b64, signature_b64 = assertion.split(".")
            header = json.loads(_b64url_decode(header_b64))
            claims = json.loads(_b64url_decode(claims_b64))
            signature = _b64url_decode(signature_b64)
        except (ValueError, json.JSONDecodeError):
            return {}, ("invalid_grant", "Invalid JWT: malformed.")
        if not isinstance(header, dict) or not isinstance(claims, dict):
            return {}, ("invalid_grant", "Invalid JWT: malformed.")
        if header.get("alg") != "RS256" or header.get("kid") != self.private_key_id:
            return claims, bad_signature
        try:
            self.key.public_key().verify(
                signature,
                f"{header_b64}.{claims_b64}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except InvalidSignature:
            return claims, bad_signature
        if claims.get("iss") != self.client_email:
            return claims, ("invalid_grant", "Invalid grant: account not found")
        if claims.get("aud") not in (GOOGLE_TOKEN_AUDIENCE, self.token_uri):
            return claims, ("invalid_grant", "Invalid JWT: Failed audience check.")
        now = time.time()
        iat, exp = claims.get("iat"), claims.get("exp")
        if (
            not isinstance(iat, int | float)
            or not isinstance(exp, int | float)
            or iat > now + CLOCK_SKEW
            or exp < now - CLOCK_SKEW
            or exp - iat > MAX_ASSERTION_LIFETIME
        ):
            return claims, (
                "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
                "reasonable timeframe. Check your iat and exp values in the JWT claim.",
            )
        if not str(claims.get("scope", "")).split():
            return claims, ("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
        return claims, None

    def _reply(self, request: Request, project: str, access_token: str, body: Any) -> JSONResponse:
        if access_token not in self.state.issued_tokens:
            return _google_error(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials. Expected OAuth 2 access token, "
                "login cookie or other valid authentication credential.",
            )
        if not self.state.token_scopes.get(access_token, set()) & SEND_SCOPES:
            return _google_error(
                403, "PERMISSION_DENIED", "Request had insufficient authentication scopes."
            )
        if project != self.project_id:
            return _google_error(
                403,
                "PERMISSION_DENIED",
                f"Permission 'cloudmessaging.messages.create' denied on resource "
                f"'//cloudresourcemanager.googleapis.com/projects/{project}' "
                "(or it may not exist).",
            )
        if not request.headers.get("content-type", "").startswith("application/json"):
            return _google_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        problem = message_problem(body)
        if problem is not None:
            return problem
        return JSONResponse({})  # replaced by the configured reply

    async def _send(self, request: Request) -> JSONResponse:
        project = request.path_params["project"]
        auth = request.headers.get("authorization", "")
        access_token = auth.removeprefix("Bearer ").strip()
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            body = None
        response = self._reply(request, project, access_token, body)
        if response.status_code == 200:
            token = body.get("message", {}).get("token", "")
            reply = self.state.replies.get(token, FcmReply())
            if reply.delay:
                await asyncio.sleep(reply.delay)
            if reply.error_code is None:
                message_id = f"0:{int(time.time() * 1000)}%{secrets.token_hex(8)}"
                response = JSONResponse({"name": f"projects/{project}/messages/{message_id}"})
            else:
                status, error = fcm_error_body(reply.error_code)
                headers = (
                    {"Retry-After": str(reply.retry_after)}
                    if reply.retry_after is not None
                    else None
                )
                response = JSONResponse(error, status_code=status, headers=headers)
        version = str(request.scope.get("http_version", ""))
        client = request.scope.get("client") or ("", 0)
        with self._lock:
            self.state.received.append(
                FcmReceived(
                    project,
                    body if isinstance(body, dict) else {},
                    access_token,
                    response.status_code,
                    version,
                    int(client[1]),
                )
            )
            self._lock.notify_all()
        return response
