"""A fake APNs: HTTP/2 over TLS on 127.0.0.1, built on `h2` for full control of each stream.

It checks what Apple checks (provider token signature and age, or a client certificate; the
topic; the 4096-byte payload limit) and answers each device token the way a test chooses:
any status and reason, a hung stream that never answers, or a reset stream (RST_STREAM).
Everything it receives is recorded. The provider token is checked with `cryptography` alone,
never with the JWT library the relay signs with, so the two cannot share a mistake."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hpack import HeaderTuple

from tests.fakes.tls import CertificateAuthority

MAX_PAYLOAD = 4096
TOKEN_LIFETIME = 3600
CLOCK_SKEW = 60


@dataclass(frozen=True)
class Reply:
    """How the fake answers one device token."""

    status: int = 200
    reason: str | None = None
    retry_after: int | None = None
    hang: bool = False
    reset: bool = False
    delay: float = 0.0  # seconds before answering
    goaway: bool = False  # GOAWAY naming the stream before this one as the last processed
    drop: bool = False  # close the TCP connection without a word

    @classmethod
    def unregistered(cls) -> Reply:
        return cls(410, "Unregistered")


HANG = Reply(hang=True)
RESET = Reply(reset=True)


@dataclass
class Received:
    token: str
    headers: dict[str, str]
    body: bytes
    status: int
    connection: int
    jwt: str | None = None
    client_cert: bool = False
    # The fields the client sent as HPACK never-indexed literals (RFC 7541 §6.2.3).
    never_indexed: frozenset[str] = frozenset()

    @property
    def payload(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.body)
        return result


@dataclass
class _Stream:
    headers: dict[str, str]
    never_indexed: frozenset[str] = frozenset()
    body: bytearray = field(default_factory=bytearray)


def _b64url_decode(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


class FakeApns:
    """Use as `async with FakeApns(...) as apns:`; runs on the test's event loop."""

    def __init__(
        self,
        *,
        team_id: str = "TEAM123456",
        key_id: str = "KEY1234567",
        topic: str = "com.example.pns",
        ca: CertificateAuthority | None = None,
        max_concurrent_streams: int = 1000,
        first_max_concurrent_streams: int | None = None,
        requests_per_connection: int | None = None,
    ) -> None:
        self.team_id = team_id
        self.key_id = key_id
        self.topic = topic
        self.signing_key = ec.generate_private_key(ec.SECP256R1())
        self.ca = ca or CertificateAuthority()
        self.max_concurrent_streams = max_concurrent_streams
        # APNs announces a low stream limit on a new connection and raises it once a
        # request has been answered: this many until then (None: the full limit at once).
        self.first_max_concurrent_streams = first_max_concurrent_streams
        # A server that ends a connection after so many requests, as hypercorn's HTTP/2 does
        # (`keep_alive_max_requests`): at the one after, GOAWAY naming the last received and
        # the connection closed, the requests in flight unanswered (None: never).
        self.requests_per_connection = requests_per_connection
        self.most_streams_open = 0  # the most requests in flight at once on one connection
        self.resets_received = 0  # streams the client reset (requests it gave up on)
        self.replies: dict[str, Reply] = {}
        self.default_reply = Reply()
        self.received: list[Received] = []
        self.revoked_jwts: set[str] = set()
        self.connections = 0
        self.connections_closed = 0
        self.resets_sent = 0
        self._arrived = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="fake-apns-")
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    # -- what tests configure -------------------------------------------------------------
    def key_pem(self) -> bytes:
        """The team's .p8 signing key, as Apple's developer portal hands it out."""
        return self.signing_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write_key(self, path: Path) -> Path:
        path.write_bytes(self.key_pem())
        return path

    def write_ca(self, path: Path) -> Path:
        return self.ca.write_ca(path)

    def answer(self, token: str, reply: Reply) -> None:
        self.replies[token] = reply

    def expire_seen_tokens(self) -> None:
        """Make every provider token seen so far answer 403 ExpiredProviderToken."""
        self.revoked_jwts.update(r.jwt for r in self.received if r.jwt)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def distinct_jwts(self) -> set[str]:
        return {r.jwt for r in self.received if r.jwt}

    def for_token(self, token: str) -> list[Received]:
        return [r for r in self.received if r.token == token]

    async def wait_for(
        self, predicate: Callable[[list[Received]], bool], timeout: float = 10.0
    ) -> list[Received]:
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: predicate(self.received))
        return self.received

    # -- lifecycle --------------------------------------------------------------------------
    async def __aenter__(self) -> FakeApns:
        context = self.ca.server_context(Path(self._tmp.name), alpn=["h2"])
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        self._tmp.cleanup()

    # -- the HTTP/2 server ------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        connection = _Connection(self, self.connections, reader, writer)
        try:
            await connection.run()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._tasks.discard(task)
            self.connections_closed += 1
            connection.cancel()
            writer.close()

    async def _record(self, item: Received) -> None:
        self.received.append(item)
        async with self._arrived:
            self._arrived.notify_all()

    def check(self, stream: _Stream, client_cert: bool) -> tuple[Reply, str | None]:
        """Apple's checks, in Apple's order; returns the reply and the JWT presented."""
        headers = stream.headers
        path = headers.get(":path", "")
        token = path.removeprefix("/3/device/")
        jwt = None
        if headers.get(":method") != "POST":
            return Reply(405, "MethodNotAllowed"), jwt
        if not path.startswith("/3/device/") or not token:
            return Reply(404, "BadPath"), jwt
        auth = headers.get("authorization", "")
        if auth:
            jwt = auth.removeprefix("bearer ").strip()
            problem = self._check_jwt(jwt)
            if problem is not None:
                return Reply(403, problem), jwt
        elif not client_cert:
            return Reply(403, "MissingProviderToken"), jwt
        if headers.get("apns-topic") != self.topic:
            return Reply(400, "TopicDisallowed" if auth else "BadTopic"), jwt
        if len(stream.body) > MAX_PAYLOAD:
            return Reply(413, "PayloadTooLarge"), jwt
        if not stream.body:
            return Reply(400, "PayloadEmpty"), jwt
        return self.replies.get(token, self.default_reply), jwt

    def _check_jwt(self, jwt: str) -> str | None:
        try:
            header_b64, claims_b64, signature_b64 = jwt.split(".")
            header = json.loads(_b64url_decode(header_b64))
            claims = json.loads(_b64url_decode(claims_b64))
            raw = _b64url_decode(signature_b64)
        except (ValueError, json.JSONDecodeError):
            return "InvalidProviderToken"
        if not isinstance(header, dict) or not isinstance(claims, dict) or "=" in jwt:
            return "InvalidProviderToken"
        # Apple's header is {"alg": "ES256", "kid": ...}; a "typ" of "JWT" is tolerated.
        if set(header) - {"typ"} != {"alg", "kid"} or header.get("typ", "JWT") != "JWT":
            return "InvalidProviderToken"
        # ES256 in JWS is the raw 32-byte r and s, not the DER encoding signers return.
        if header["alg"] != "ES256" or len(raw) != 64:
            return "InvalidProviderToken"
        if header["kid"] != self.key_id or claims.get("iss") != self.team_id:
            return "InvalidProviderToken"
        iat = claims.get("iat")
        if not isinstance(iat, int) or isinstance(iat, bool) or iat > time.time() + CLOCK_SKEW:
            return "InvalidProviderToken"
        signature = encode_dss_signature(
            int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
        )
        try:
            self.signing_key.public_key().verify(
                signature, f"{header_b64}.{claims_b64}".encode(), ec.ECDSA(hashes.SHA256())
            )
        except InvalidSignature:
            return "InvalidProviderToken"
        if jwt in self.revoked_jwts or time.time() - iat > TOKEN_LIFETIME:
            return "ExpiredProviderToken"
        return None


class _Connection:
    def __init__(
        self,
        fake: FakeApns,
        number: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.fake = fake
        self.number = number
        self.reader = reader
        self.writer = writer
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self.streams: dict[int, _Stream] = {}
        self.window_opened = asyncio.Event()
        self.responders: set[asyncio.Task[None]] = set()
        self.client_cert = writer.get_extra_info("peercert") is not None
        self.requests = 0

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)

    def cancel(self) -> None:
        for task in self.responders:
            task.cancel()

    async def run(self) -> None:
        self.h2.initiate_connection()
        first = self.fake.first_max_concurrent_streams
        self.limit_raised = first is None
        self.h2.update_settings(
            {
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: first
                or self.fake.max_concurrent_streams
            }
        )
        self.flush()
        while data := await self.reader.read(65536):
            for event in self.h2.receive_data(data):
                self.handle(event)
            self.flush()
            await self.writer.drain()

    def handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self.requests += 1
            limit = self.fake.requests_per_connection
            if limit is not None and self.requests > limit:
                self.h2.close_connection()
                self.flush()
                self.cancel()
                self.writer.close()
                return
            headers = event.headers or []
            self.streams[event.stream_id] = _Stream(
                dict(headers),
                frozenset(h[0] for h in headers if isinstance(h, HeaderTuple) and not h.indexable),
            )
            self.fake.most_streams_open = max(
                self.fake.most_streams_open, self.h2.open_inbound_streams
            )
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.body.extend(event.data or b"")
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                task = asyncio.create_task(self.respond_safely(event.stream_id, stream))
                self.responders.add(task)
                task.add_done_callback(self.responders.discard)
        elif isinstance(event, h2.events.StreamReset):
            self.streams.pop(event.stream_id, None)
            self.fake.resets_received += 1
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self.window_opened.set()

    async def respond_safely(self, stream_id: int, stream: _Stream) -> None:
        # The client may give up on (reset) a stream before we answer it.
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            await self.respond(stream_id, stream)

    async def respond(self, stream_id: int, stream: _Stream) -> None:
        reply, jwt = self.fake.check(stream, self.client_cert)
        token = stream.headers.get(":path", "").removeprefix("/3/device/")
        status = 0 if reply.hang or reply.reset else reply.status
        await self.fake._record(
            Received(
                token=token,
                headers={k: v for k, v in stream.headers.items() if not k.startswith(":")},
                body=bytes(stream.body),
                status=status,
                connection=self.number,
                jwt=jwt,
                client_cert=self.client_cert,
                never_indexed=stream.never_indexed,
            )
        )
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.hang:
            return
        if reply.drop:
            self.writer.transport.abort()
            return
        if reply.goaway:
            self.h2.close_connection(
                additional_data=b'{"reason":"Shutdown"}', last_stream_id=max(0, stream_id - 2)
            )
            self.flush()
            return
        if reply.reset:
            self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
            self.fake.resets_sent += 1
            self.flush()
            return
        headers = [(":status", str(reply.status)), ("apns-id", str(uuid.uuid4()).upper())]
        if reply.status == 200:
            self.h2.send_headers(stream_id, headers, end_stream=True)
            self.raise_stream_limit()
            self.flush()
            return
        body: dict[str, Any] = {"reason": reply.reason or "InternalServerError"}
        if reply.status == 410:
            body["timestamp"] = int(time.time() * 1000)
        if reply.retry_after is not None:
            headers.append(("retry-after", str(reply.retry_after)))
        data = json.dumps(body).encode()
        headers += [("content-type", "application/json"), ("content-length", str(len(data)))]
        self.h2.send_headers(stream_id, headers)
        await self.send_body(stream_id, data)

    def raise_stream_limit(self) -> None:
        if not self.limit_raised:
            self.limit_raised = True
            limit = self.fake.max_concurrent_streams
            self.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limit})

    async def send_body(self, stream_id: int, data: bytes) -> None:
        """Send respecting the client's flow-control window, as a real server must."""
        while data:
            window = min(
                self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size
            )
            if window <= 0:
                self.window_opened.clear()
                await self.window_opened.wait()
                continue
            chunk, data = data[:window], data[window:]
            self.h2.send_data(stream_id, chunk, end_stream=not data)
            self.flush()
