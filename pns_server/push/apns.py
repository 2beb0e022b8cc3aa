"""Apple Push Notification service over HTTP/2, with provider-token or certificate auth.

One connection per APNs host (`push/http2.py`, on `h2`) rather than aioapns: every request
here has a timeout, a reset stream fails only that stream, and response bodies are read so
HTTP/2 flow-control windows are always replenished (aioapns hangs on RST_STREAM and stalls
after ~64 KiB of error bodies on one connection)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hpack import NeverIndexedHeaderTuple

from pns_server.push.base import Outcome, PushMessage, PushResult
from pns_server.push.http2 import Http2Error, Origin, Response, StreamReset
from pns_server.push.transport import (
    environment_proxy,
    header,
    parse_retry_after,
    proxy_ssl_context,
    ssl_context,
)

log = logging.getLogger("pns.push.apns")

MAX_PAYLOAD_BYTES = 4096
CATEGORY = "PNS_APPROVAL"
# Apple refuses provider tokens older than an hour and answers TooManyProviderTokenUpdates
# when they change more often than every 20 minutes.
TOKEN_REFRESH_AFTER = 50 * 60
TOKEN_MIN_AGE = 20 * 60

INVALID_TOKEN_REASONS = frozenset({"BadDeviceToken", "DeviceTokenNotForTopic", "Unregistered"})


def load_signing_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The .p8 file from Apple's developer portal: a PKCS#8 PEM P-256 key."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError("not an APNs auth key (expected a P-256 .p8 key)")
    return key


class ProviderToken:
    """The ES256 JWT Apple wants: signed once, reused, refreshed after ~50 minutes."""

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        key_id: str,
        team_id: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = key
        self._key_id = key_id
        self._team_id = team_id
        self._clock = clock
        self._token = ""
        self._issued_at = 0.0
        self._forced_refreshes = 0

    def current(self) -> str:
        if not self._token or self._clock() - self._issued_at >= TOKEN_REFRESH_AFTER:
            self._sign()
        return self._token

    def refresh_after_rejection(self, rejected: str) -> bool:
        """Apple said `rejected` expired: re-sign once, unless someone already did.

        A second forced refresh inside 20 minutes would earn TooManyProviderTokenUpdates
        (and means our clock is wrong, which a new signature cannot fix)."""
        if rejected != self._token:
            return True  # another send already refreshed it
        if self._forced_refreshes and self._clock() - self._issued_at < TOKEN_MIN_AGE:
            return False
        self._forced_refreshes += 1
        self._sign()
        return True

    def _sign(self) -> None:
        now = self._clock()
        # Exactly Apple's documented header {"alg": "ES256", "kid": ...}: typ=None drops the
        # "typ" PyJWT would add. PyJWT writes the raw 64-byte r||s signature JWS wants.
        self._token = jwt.encode(
            {"iss": self._team_id, "iat": int(now)},
            self._key,
            algorithm="ES256",
            headers={"kid": self._key_id, "typ": None},
        )
        self._issued_at = now


def build_payload(message: PushMessage) -> bytes | None:
    """The aps payload, its body text shortened to fit 4096 bytes; None if it cannot fit."""

    def encode(body: str) -> bytes:
        payload: dict[str, Any] = {key: value for key, value in message.data.items()}
        payload.update(
            aps={
                "alert": {"title": message.title, "body": body},
                "sound": "default",
                "category": CATEGORY,
            },
            approval_id=message.approval_id,
        )
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()

    encoded = encode(message.body)
    if len(encoded) <= MAX_PAYLOAD_BYTES:
        return encoded
    body = message.body
    while body:
        overflow = len(encode(body + "…")) - MAX_PAYLOAD_BYTES
        if overflow <= 0:
            return encode(body + "…")
        # Cut at least one character; JSON escaping makes bytes-per-char uneven.
        body = body[: max(0, len(body) - max(1, overflow // 4))]
    encoded = encode("")
    return encoded if len(encoded) <= MAX_PAYLOAD_BYTES else None


@dataclass(frozen=True)
class ApnsConfig:
    topic: str
    production_url: str
    sandbox_url: str
    timeout: float
    ca_file: Path | None = None
    cert_file: Path | None = None
    max_in_flight: int = 500


class ApnsSender:
    """One HTTP/2 connection per APNs host, many sends in flight on it at once."""

    service = "apns"

    def __init__(self, config: ApnsConfig, token: ProviderToken | None = None) -> None:
        if (token is None) == (config.cert_file is None):
            raise ValueError("APNs needs exactly one of a provider token or a certificate")
        self.config = config
        self._token = token
        self._context = ssl_context(config.ca_file, config.cert_file)
        # One connection per host (production, sandbox), as Apple asks: sends multiplex.
        self._hosts: dict[str, Origin] = {}
        self._in_flight = asyncio.Semaphore(config.max_in_flight)
        # Read once, so that a proxy we cannot use stops the relay at start-up.
        self._proxies = {
            url.rstrip("/"): environment_proxy(url)
            for url in (config.production_url, config.sandbox_url)
        }
        # What every push carries, built once; `_headers` adds the push's own.
        self._common_headers = [
            (b"apns-topic", config.topic.encode()),
            (b"apns-push-type", b"alert"),
            (b"apns-priority", b"10"),
            (b"content-type", b"application/json"),
        ]

    def _host(self, environment: str) -> Origin:
        base_url = (
            self.config.sandbox_url if environment == "sandbox" else self.config.production_url
        ).rstrip("/")
        host = self._hosts.get(base_url)
        if host is None:
            proxy = self._proxies.get(base_url)
            host = self._hosts[base_url] = Origin(
                base_url, self._context, proxy, proxy_ssl_context(proxy, self.config.ca_file)
            )
        return host

    def _headers(self, message: PushMessage, jwt: str | None) -> list[tuple[bytes, bytes]]:
        # Apple asks that what changes from push to push stay out of its header table
        # ("Sending notification requests to APNs"); h2 never indexes `authorization`.
        headers = [
            *self._common_headers,
            NeverIndexedHeaderTuple(
                b"apns-expiration", b"%d" % int(message.expires_at.timestamp())
            ),
            NeverIndexedHeaderTuple(b"apns-collapse-id", message.approval_id.encode()),
        ]
        if jwt is not None:
            headers.append((b"authorization", f"bearer {jwt}".encode()))
        return headers

    async def send(self, message: PushMessage) -> PushResult:
        payload = build_payload(message)
        if payload is None:  # the dispatcher logs it, as every outcome
            return PushResult(Outcome.CONFIG_ERROR, "PayloadTooLarge")
        async with self._in_flight:
            result, jwt = await self._post(message, payload)
            if (
                result.reason == "ExpiredProviderToken"
                and self._token is not None
                and jwt is not None
                and self._token.refresh_after_rejection(jwt)
            ):
                log.info("APNs provider token expired: signed a new one, sending again")
                result, _jwt = await self._post(message, payload)
        return result

    async def _post(self, message: PushMessage, payload: bytes) -> tuple[PushResult, str | None]:
        jwt = self._token.current() if self._token is not None else None
        try:
            # `request` reads the whole body before it returns (flow control).
            response = await self._host(message.environment).request(
                b"POST",
                f"/3/device/{message.token}".encode(),
                self._headers(message, jwt),
                payload,
                self.config.timeout,
            )
        except TimeoutError:
            return PushResult(Outcome.RETRY, "Timeout"), jwt
        except StreamReset as exc:
            return PushResult(Outcome.RETRY, f"StreamReset: {exc}"[:200]), jwt
        except (Http2Error, OSError) as exc:
            return PushResult(Outcome.RETRY, f"{type(exc).__name__}: {exc}"[:200]), jwt
        return self.classify(response), jwt

    @staticmethod
    def classify(response: Response) -> PushResult:
        status = response.status
        if status == 200:
            return PushResult(Outcome.DELIVERED, status_code=status)
        reason = _reason(response.content)
        retry_after = parse_retry_after(header(response, b"retry-after"))
        if status == 410 or (status == 400 and reason in INVALID_TOKEN_REASONS):
            return PushResult(Outcome.INVALID_TOKEN, reason, status)
        if status == 429 or status >= 500:
            return PushResult(Outcome.RETRY, reason, status, retry_after)
        # 403 (credentials), 400 BadTopic and friends, 413: retrying cannot help.
        return PushResult(Outcome.CONFIG_ERROR, reason, status)

    async def close(self) -> None:
        hosts, self._hosts = list(self._hosts.values()), {}
        for host in hosts:
            await host.close()


def _reason(content: bytes) -> str | None:
    try:
        body = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return None
    reason = body.get("reason") if isinstance(body, dict) else None
    return str(reason) if reason is not None else None
