"""Web Push (RFC 8030) with VAPID (RFC 8292) and aes128gcm payloads (RFC 8291).

The cryptography comes from kept libraries (py-vapid signs the JWT, http-ece encrypts);
the send is the relay's own async httpx client, so timeouts and outcomes follow the same
rules as APNs and FCM. A browser's push subscription names the URL we POST to, so every
endpoint is checked against an allow-list of push-service hosts, at registration and again
before each send."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from ipaddress import ip_address
from pathlib import Path
from urllib.parse import urlsplit

import http_ece
import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid02, VapidException

__all__ = ["VapidException", "WebPushConfig", "WebPushSender", "endpoint_problem"]

from pns_server.push.base import Outcome, PushMessage, PushResult

log = logging.getLogger("pns.push.webpush")

# A VAPID JWT may live 24 h; we sign one per push-service origin and renew it well before.
JWT_LIFETIME_SECONDS = 12 * 3600
JWT_RENEW_BEFORE_SECONDS = 3600


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(value: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc


# --- endpoint allow-list ---------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def _host_matches(pattern: str, host: str, port: int) -> bool:
    """`host` or `*.domain` alone allows the https port only; `host:port` that port."""
    name, _, wanted_port = pattern.partition(":")
    if int(wanted_port or 443) != port:
        return False
    if name.startswith("*."):
        return host.endswith(name[1:]) and len(host) > len(name) - 1
    return host == name


def endpoint_problem(endpoint: str, allowed_hosts: Sequence[str]) -> str | None:
    """Why the relay must not POST to this endpoint, or None when it may."""
    try:
        parts = urlsplit(endpoint)
        explicit_port = parts.port
    except ValueError:
        return "the endpoint is not a valid URL"
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("https", "http") or not host:
        return "the endpoint must be an https:// URL"
    if parts.username is not None or parts.password is not None:
        return "the endpoint must not carry user information"
    port = explicit_port or (443 if parts.scheme == "https" else 80)
    if not any(_host_matches(p, host, port) for p in allowed_hosts):
        return f"{host}:{port} is not a known Web Push service (PNS_WEBPUSH_ENDPOINT_HOSTS)"
    if parts.scheme == "http" and not _is_loopback(host):
        return "the endpoint must be an https:// URL (plain http only for a loopback test host)"
    return None


# --- VAPID keys ------------------------------------------------------------------------


def load_or_create_vapid_key(path: Path, *, create: bool) -> ec.EllipticCurvePrivateKey:
    """A PEM P-256 key; generated once (mode 0600) when `create` and the file is absent."""
    if create and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        log.info("web push: generated a VAPID key in %s (subscriptions depend on it)", path)
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey) or not isinstance(
        loaded.curve, ec.SECP256R1
    ):
        raise ValueError("not an ECDSA P-256 private key")
    return loaded


def public_key_b64url(key: ec.EllipticCurvePrivateKey) -> str:
    """The applicationServerKey a browser subscribes with: the uncompressed point."""
    raw = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return b64url(raw)


# --- the sender ------------------------------------------------------------------------


@dataclass(frozen=True)
class WebPushConfig:
    subject: str  # mailto: or https:
    allowed_hosts: tuple[str, ...]
    timeout: float
    ca_file: Path | None = None


def subscription_keys(message: PushMessage) -> tuple[bytes, bytes]:
    """(p256dh, auth) from the message; ValueError when the registration lost them."""
    p256dh_text, auth_text = message.webpush_keys or ("", "")
    p256dh, auth = b64url_decode(p256dh_text), b64url_decode(auth_text)
    if len(p256dh) != 65 or len(auth) < 16:
        raise ValueError("the subscription's keys are missing or malformed")
    return p256dh, auth


def encrypt_payload(payload: bytes, p256dh: bytes, auth: bytes) -> bytes:
    """RFC 8291 aes128gcm with a fresh sender key and salt per message."""
    sender = ec.generate_private_key(ec.SECP256R1())
    encrypted: bytes = http_ece.encrypt(
        payload,
        salt=os.urandom(16),
        private_key=sender,
        dh=p256dh,
        auth_secret=auth,
        version="aes128gcm",
    )
    return encrypted


def push_body(message: PushMessage) -> bytes:
    """What the service worker reads: the approval id and a short text, no secret."""
    return json.dumps(
        {
            "type": message.data.get("type", "approval"),
            "approval_id": message.approval_id,
            "title": message.title,
            "body": message.body,
        },
        separators=(",", ":"),
    ).encode()


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def classify(response: httpx.Response) -> PushResult:
    status = response.status_code
    reason = response.text[:200].strip() or response.reason_phrase
    if status in (200, 201, 202):
        return PushResult(Outcome.DELIVERED, status_code=status)
    if status in (404, 410):
        # The subscription is gone: the browser must subscribe again.
        return PushResult(Outcome.INVALID_TOKEN, reason=reason, status_code=status)
    if status == 429 or status >= 500:
        retry_after = retry_after_seconds(response.headers.get("retry-after"))
        return PushResult(Outcome.RETRY, reason=reason, status_code=status, retry_after=retry_after)
    # 400 bad request / 401-403 VAPID refused / 413 payload too large: our side is wrong.
    return PushResult(Outcome.CONFIG_ERROR, reason=reason, status_code=status)


class WebPushSender:
    service = "webpush"

    def __init__(self, key: ec.EllipticCurvePrivateKey, config: WebPushConfig) -> None:
        self.config = config
        self.public_key = public_key_b64url(key)
        self._vapid = Vapid02.from_pem(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self._tokens: dict[str, tuple[str, float]] = {}
        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(config.ca_file)) if config.ca_file else True
        )
        self._http = httpx.AsyncClient(
            timeout=config.timeout, verify=verify, follow_redirects=False
        )

    def authorization(self, endpoint: str) -> str:
        """`vapid t=<JWT>,k=<public key>` for the endpoint's origin, reused until near expiry."""
        parts = urlsplit(endpoint)
        audience = f"{parts.scheme}://{parts.netloc}"
        now = time.time()
        cached = self._tokens.get(audience)
        if cached is not None and cached[1] - now > JWT_RENEW_BEFORE_SECONDS:
            return cached[0]
        expires = now + JWT_LIFETIME_SECONDS
        claims = {"aud": audience, "exp": int(expires), "sub": self.config.subject}
        header = str(self._vapid.sign(claims)["Authorization"])
        self._tokens[audience] = (header, expires)
        return header

    async def send(self, message: PushMessage) -> PushResult:
        endpoint = message.token
        problem = endpoint_problem(endpoint, self.config.allowed_hosts)
        if problem is not None:
            # Registered under an older allow-list: never connect, ask for a new subscription.
            return PushResult(Outcome.INVALID_TOKEN, reason=problem)
        try:
            p256dh, auth = subscription_keys(message)
        except ValueError as exc:
            return PushResult(Outcome.INVALID_TOKEN, reason=str(exc))
        ttl = max(0, int((message.expires_at - datetime.now(UTC)).total_seconds()))
        try:
            authorization = self.authorization(endpoint)
        except VapidException as exc:
            return PushResult(Outcome.CONFIG_ERROR, reason=f"VAPID: {exc}")
        headers = {
            "Authorization": authorization,
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "TTL": str(ttl),
            "Urgency": "high",
            # A newer message for the same approval replaces an undelivered one.
            "Topic": message.approval_id[:32],
        }
        body = encrypt_payload(push_body(message), p256dh, auth)
        try:
            response = await self._http.post(endpoint, content=body, headers=headers)
        except httpx.TimeoutException:
            return PushResult(Outcome.RETRY, reason="timed out")
        except httpx.HTTPError as exc:
            return PushResult(Outcome.RETRY, reason=f"connection error: {type(exc).__name__}")
        return classify(response)

    async def close(self) -> None:
        await self._http.aclose()
