"""A fake Web Push service (RFC 8030) that checks what a browser vendor's service checks.

Each subscription is what a browser would make: a P-256 key pair and a 16-byte auth secret,
and an endpoint URL on this service. A POST to the endpoint is refused unless its VAPID JWT
(RFC 8292) verifies with the key in the `Authorization: vapid t=...,k=...` header, names this
origin as `aud`, expires within 24 hours and carries a contact `sub`; when the subscription
was made with an applicationServerKey, `k` must be that key. The body must be aes128gcm
(RFC 8188) and is decrypted with the subscription's private key (RFC 8291), implemented
here independently of the relay's library, with `cryptography` alone.

It runs uvicorn over plain HTTP on 127.0.0.1 (the relay allows plain http only for a
loopback host listed in PNS_WEBPUSH_ENDPOINT_HOSTS)."""

from __future__ import annotations

import base64
import json
import secrets
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import uvicorn
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def raw_public(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bytes:
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


@dataclass
class Subscription:
    id: str
    endpoint: str
    private_key: ec.EllipticCurvePrivateKey
    auth: bytes
    application_server_key: str | None

    def to_json(self) -> dict[str, Any]:
        """What `PushSubscription.toJSON()` gives a page."""
        return {
            "endpoint": self.endpoint,
            "expirationTime": None,
            "keys": {"p256dh": b64url(raw_public(self.private_key)), "auth": b64url(self.auth)},
        }


@dataclass
class Received:
    subscription_id: str
    headers: dict[str, str]
    claims: dict[str, Any]
    payload: dict[str, Any]


@dataclass
class Reply:
    status: int
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)


class PushRefused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def decrypt_aes128gcm(body: bytes, ua_private: ec.EllipticCurvePrivateKey, auth: bytes) -> bytes:
    """RFC 8291 section 3.4 / RFC 8188, one record."""
    if len(body) < 21:
        raise PushRefused(400, "body too short for an aes128gcm header")
    salt, record_size, id_length = body[:16], struct.unpack("!L", body[16:20])[0], body[20]
    as_public_raw = body[21 : 21 + id_length]
    ciphertext = body[21 + id_length :]
    if id_length != 65 or record_size < 18:
        raise PushRefused(400, "the keyid must be the sender's 65-byte public key")
    if len(ciphertext) > record_size:
        raise PushRefused(400, "only single-record messages are expected")
    as_public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), as_public_raw)
    shared = ua_private.exchange(ec.ECDH(), as_public)
    key_info = b"WebPush: info\x00" + raw_public(ua_private) + as_public_raw
    ikm = HKDF(hashes.SHA256(), 32, salt=auth, info=key_info).derive(shared)
    cek = HKDF(hashes.SHA256(), 16, salt=salt, info=b"Content-Encoding: aes128gcm\x00").derive(ikm)
    nonce = HKDF(hashes.SHA256(), 12, salt=salt, info=b"Content-Encoding: nonce\x00").derive(ikm)
    try:
        padded = AESGCM(cek).decrypt(nonce, ciphertext, None)
    except InvalidTag:
        raise PushRefused(
            400, "the payload does not decrypt with the subscription's keys"
        ) from None
    stripped = padded.rstrip(b"\x00")
    if not stripped.endswith(b"\x02"):
        raise PushRefused(400, "the last record must end with the 0x02 delimiter")
    return stripped[:-1]


def verify_vapid(header: str, origin: str, expected_key: str | None) -> dict[str, Any]:
    """RFC 8292: `vapid t=<JWT>, k=<key>`; returns the claims or raises PushRefused."""
    scheme, _, params = header.partition(" ")
    if scheme.lower() != "vapid":
        raise PushRefused(401, "Authorization must use the vapid scheme")
    parts = dict(p.strip().split("=", 1) for p in params.split(",") if "=" in p)
    token, key_text = parts.get("t", ""), parts.get("k", "")
    if expected_key is not None and key_text != expected_key:
        raise PushRefused(403, "the VAPID key is not the subscription's applicationServerKey")
    try:
        public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64url(key_text))
        head_b64, claims_b64, signature_b64 = token.split(".")
        head = json.loads(unb64url(head_b64))
        claims = json.loads(unb64url(claims_b64))
        signature = unb64url(signature_b64)
    except ValueError:
        raise PushRefused(401, "malformed VAPID token") from None
    if head.get("alg") != "ES256" or len(signature) != 64:
        raise PushRefused(401, "the VAPID JWT must be ES256")
    der = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    try:
        public.verify(der, f"{head_b64}.{claims_b64}".encode(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise PushRefused(401, "the VAPID signature does not verify") from None
    if claims.get("aud") != origin:
        raise PushRefused(401, f"aud {claims.get('aud')!r} is not {origin!r}")
    now = time.time()
    if not now < float(claims.get("exp", 0)) <= now + 24 * 3600:
        raise PushRefused(401, "exp must lie within the next 24 hours")
    if not str(claims.get("sub", "")).startswith(("mailto:", "https://")):
        raise PushRefused(401, "sub must be a mailto: or https: contact")
    return dict(claims)


class FakeWebPush:
    """Use as `with FakeWebPush() as push:`; `push.subscribe(vapid_key)` makes a subscription."""

    def __init__(self) -> None:
        self.port = 0  # known once entered: its socket is bound then, so no one can take it
        self.subscriptions: dict[str, Subscription] = {}
        self.replies: dict[str, list[Reply]] = {}
        self.received: list[Received] = []
        self.refused: list[tuple[str, int, str]] = []
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._arrived = threading.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        """For PNS_WEBPUSH_ENDPOINT_HOSTS."""
        return f"127.0.0.1:{self.port}"

    def subscribe(self, application_server_key: str | None = None) -> Subscription:
        sub_id = secrets.token_urlsafe(16)
        subscription = Subscription(
            id=sub_id,
            endpoint=f"{self.url}/push/{sub_id}",
            private_key=ec.generate_private_key(ec.SECP256R1()),
            auth=secrets.token_bytes(16),
            application_server_key=application_server_key,
        )
        self.subscriptions[sub_id] = subscription
        return subscription

    def answer(self, subscription: Subscription, *replies: Reply) -> None:
        """The next replies for this subscription, in order (then 201 again)."""
        self.replies.setdefault(subscription.id, []).extend(replies)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self.received) + len(self.refused) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._arrived.wait(left)
        return list(self.received)

    async def _push(self, request: Request) -> Response:
        sub_id = request.path_params["sub_id"]
        try:
            received = await self._check(request, sub_id)
        except PushRefused as refused:
            with self._arrived:
                self.refused.append((sub_id, refused.status, refused.reason))
                self._arrived.notify_all()
            return JSONResponse({"reason": refused.reason}, status_code=refused.status)
        queued = self.replies.get(sub_id)
        reply = queued.pop(0) if queued else Reply(201)
        with self._arrived:
            if reply.status == 201:
                self.received.append(received)
            else:
                self.refused.append((sub_id, reply.status, reply.body))
            self._arrived.notify_all()
        headers = dict(reply.headers)
        if reply.status == 201:
            headers["Location"] = f"{self.url}/message/{secrets.token_urlsafe(8)}"
        return Response(reply.body, status_code=reply.status, headers=headers)

    async def _check(self, request: Request, sub_id: str) -> Received:
        subscription = self.subscriptions.get(sub_id)
        if subscription is None:
            raise PushRefused(410, "no such subscription")
        if request.headers.get("content-encoding") != "aes128gcm":
            raise PushRefused(400, "Content-Encoding must be aes128gcm")
        if not request.headers.get("ttl", "").isdigit():
            raise PushRefused(400, "a TTL header is required")
        parts = urlsplit(subscription.endpoint)
        claims = verify_vapid(
            request.headers.get("authorization", ""),
            f"{parts.scheme}://{parts.netloc}",
            subscription.application_server_key,
        )
        body = await request.body()
        if len(body) > 4096:
            raise PushRefused(413, "payload too large")
        plaintext = decrypt_aes128gcm(body, subscription.private_key, subscription.auth)
        return Received(sub_id, dict(request.headers), claims, json.loads(plaintext))

    def _app(self) -> Starlette:
        return Starlette(routes=[Route("/push/{sub_id}", self._push, methods=["POST"])])

    def __enter__(self) -> FakeWebPush:
        # Bound here and handed to uvicorn: a port picked earlier and bound later (this fake
        # is built when its test module is collected) could be taken by then.
        listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listening.bind(("127.0.0.1", 0))
        self.port = listening.getsockname()[1]
        config = uvicorn.Config(
            self._app(),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=0,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [listening]},
            name="fake-webpush",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake Web Push service did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = True
        if self._thread is not None:
            self._thread.join(10)
