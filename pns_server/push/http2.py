"""One HTTP/2 client connection on `h2`, for the APNs and FCM senders: many requests in
flight on one TLS connection, each with an outcome of its own.

httpcore (under httpx) did this on the same `h2`, but its machinery around each request
(the pool's bookkeeping, anyio's locks, events and cancel scopes, a timer per read and
write) cost the relay about twice what `h2`'s own framing does, and a push little else
(docs/benchmarks.md, the thirteenth round). What it guaranteed is kept, and tested against
the fake APNs (tests/pns_server/push/test_http2.py and test_apns.py):
- one stream's failure stays that stream's: a reset (RST_STREAM) fails its request only,
  and a request its caller gives up on (its deadline) resets its stream, so that neither
  the server nor the stream limit below count it any longer;
- flow control: every DATA frame is acknowledged as it arrives, whatever became of its
  request, so error bodies can never shrink the receive windows to nothing; request
  bodies are sent within the server's windows, waiting for its WINDOW_UPDATE;
- the server's SETTINGS_MAX_CONCURRENT_STREAMS is honoured (APNs starts a connection low
  and raises it): requests over it wait for a stream to end, first come, first served;
- a lost connection fails every request on it at once; GOAWAY fails those the server says
  it never processed, lets the others finish, and the connection takes no new ones;
- a request refused by GOAWAY, or lost with a connection that had been answering, is sent
  again once, at once, on a new connection (`Origin.request`).

The caller owns deadlines: an `asyncio.timeout` around `request`. A forward proxy (an
`HTTPS_PROXY`) is reached with CONNECT, and TLS to the server runs inside its tunnel."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack

from pns_server.push.transport import Proxy

log = logging.getLogger("pns.push.http2")

READ_SIZE = 65536
# Room the server may fill before our acknowledgements arrive, as httpcore gives it.
CONNECTION_WINDOW_INCREMENT = 2**24
CLOSE_TIMEOUT = 1.0

# What `hpack.Encoder.encode` takes.
HpackHeaders = (
    Iterable[
        hpack.HeaderTuple
        | tuple[bytes | str, bytes | str]
        | tuple[bytes | str, bytes | str, bool | None]
    ]
    | dict[bytes | str, bytes | str]
)


class PlainEncoder(hpack.Encoder):
    """HPACK without Huffman coding, as netty's and .NET's HTTP/2 clients send it.

    `h2` has no setting for it, so the connection's encoder is replaced by this one. In
    pure Python, Huffman coding a value costs about 0.2 µs a byte, and a push has some 400
    bytes that are new on every request (the provider token, never indexed; the device's
    path): 60-90 µs of the relay's CPU per push. It saves about a quarter of
    those bytes on the wire."""

    def encode(self, headers: HpackHeaders, huffman: bool = False) -> bytes:
        return super().encode(headers, huffman=False)


class Http2Error(Exception):
    """The request failed on this connection; on a new connection it may succeed."""


class StreamReset(Http2Error):
    """The server reset the request's stream."""


class ConnectionLost(Http2Error):
    """The connection ended (closed, broken, or the server broke the protocol)."""


class Refused(Http2Error):
    """The server said it never processed the request (a GOAWAY naming an earlier stream
    as its last): it can be sent again at once, on a new connection."""


class ProxyRefused(Http2Error):
    """The forward proxy did not open a tunnel."""


class NoHttp2(ConnectionLost):
    """The server (or a TLS-inspecting proxy in its place) did not offer HTTP/2."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    content: bytes


@dataclass
class _Stream:
    done: asyncio.Future[Response]
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)


class Http2Connection:
    """One connection to one origin; `request` from many tasks at once."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authority: str
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._authority = authority.encode()
        self._h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self._h2.encoder = PlainEncoder()
        self._streams: dict[int, _Stream] = {}
        self._waiting_for_stream: deque[asyncio.Future[None]] = deque()
        self._waiting_for_window: list[asyncio.Future[None]] = []
        self._admitted = 0  # let through `_stream_available`, not yet in `_streams`
        self._settings_seen = False
        self._lost: ConnectionLost | None = None
        self._refusing: str | None = None  # why the connection takes no new requests
        self._closing: asyncio.Task[None] | None = None
        self._flush_due = False
        self.answered = 0  # requests answered whole on this connection
        self._start()
        self._reading = asyncio.create_task(self._read_forever(), name="pns-http2-reader")

    @classmethod
    async def open(
        cls,
        url: str,
        context: ssl.SSLContext,
        proxy: Proxy | None = None,
        proxy_context: ssl.SSLContext | None = None,
    ) -> Http2Connection:
        """Connect to the origin of `url` (https), through `proxy` when there is one;
        `context` is for the origin (its ALPN is set to h2 here), `proxy_context` for an
        https proxy."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or 443
        context.set_alpn_protocols(["h2"])
        if proxy is None:
            reader, writer = await asyncio.open_connection(
                host, port, ssl=context, server_hostname=host
            )
        else:
            reader, writer = await _tunnel(proxy, proxy_context, host, port)
            try:
                await writer.start_tls(context, server_hostname=host)
            except BaseException:
                writer.close()
                raise
        ssl_object = writer.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
            writer.close()
            raise NoHttp2(f"{host}:{port} does not offer HTTP/2 (ALPN h2)")
        return cls(reader, writer, f"{host}:{port}" if parts.port else host)

    @property
    def usable(self) -> bool:
        """Takes new requests: not lost, and not refusing them (GOAWAY, stream ids used up)."""
        return self._lost is None and self._refusing is None

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    async def request(
        self, method: bytes, path: bytes, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> Response:
        """Send one request and read its whole response. Raises `Http2Error`."""
        await self._stream_available()
        try:
            stream_id = self._h2.get_next_available_stream_id()
        except h2.exceptions.NoAvailableStreamIDError:
            # Over a billion requests on one connection: the next connection starts again.
            self._refuse("this connection has used all its stream ids")
            raise Http2Error("this connection has used all its stream ids") from None
        stream = self._streams[stream_id] = _Stream(asyncio.get_running_loop().create_future())
        try:
            request_headers = [
                (b":method", method),
                (b":scheme", b"https"),
                (b":authority", self._authority),
                # Apple asks for the path (the device's token) never to enter its header
                # table; FCM's is one short path.
                hpack.NeverIndexedHeaderTuple(b":path", path),
                *headers,
            ]
            self._h2.send_headers(stream_id, request_headers, end_stream=not body)
            if body:
                await self._send_body(stream_id, stream, body)
            else:
                self._flush()
            return await stream.done
        except h2.exceptions.ProtocolError as exc:
            if self._lost is not None:
                raise ConnectionLost(str(self._lost)) from exc
            raise Http2Error(f"HTTP/2: {type(exc).__name__}: {exc}") from exc
        finally:
            del self._streams[stream_id]
            if not stream.done.done() or stream.done.cancelled():
                self._reset(stream_id)  # given up on: the server and our count forget it
            else:
                stream.done.exception()  # seen, even when another error was raised first
            self._admit()
            self._close_if_drained()

    async def close(self) -> None:
        """Say GOAWAY and close; requests still in flight fail with `ConnectionLost`."""
        if self._lost is None:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.close_connection()
                self._flush_now()
        self._reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reading
        await self._close_transport()

    # --- sending -------------------------------------------------------------------------

    def _start(self) -> None:
        self._h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,  # we never use a pushed response
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 65536,
            },
        )
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(CONNECTION_WINDOW_INCREMENT)
        self._flush()

    def _room(self) -> int:
        """Streams the server's limit has left for requests not yet waiting their turn;
        one until its first SETTINGS say how many (APNs starts low)."""
        limit = self._h2.remote_settings.max_concurrent_streams if self._settings_seen else 1
        return limit - len(self._streams) - self._admitted

    async def _stream_available(self) -> None:
        """Wait, in turn, until the server's stream limit has room for one more."""
        self._raise_if_closing()
        if self._room() > 0 and not self._waiting_for_stream:
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiting_for_stream.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._admitted -= 1  # admitted as we were cancelled: the next one goes
                self._admit()
            else:
                self._waiting_for_stream.remove(turn)
            raise
        self._admitted -= 1
        self._raise_if_closing()

    def _raise_if_closing(self) -> None:
        if self._lost is not None:
            raise ConnectionLost(str(self._lost))  # a new one: a raise extends a traceback
        if self._refusing is not None:
            raise Http2Error(self._refusing)

    def _admit(self) -> None:
        """The first requests waiting for a stream go, as many as there is room for (all
        of them, to fail, once the connection takes no more)."""
        closing = self._lost is not None or self._refusing is not None
        while self._waiting_for_stream and (closing or self._room() > 0):
            turn = self._waiting_for_stream.popleft()
            turn.set_result(None)
            self._admitted += 1

    async def _send_body(self, stream_id: int, stream: _Stream, body: bytes) -> None:
        """`body` within the server's flow-control windows, waiting for them to open; stops
        when the stream ends first (reset: `stream.done` says why)."""
        while not stream.done.done():
            window = min(
                self._h2.local_flow_control_window(stream_id), self._h2.max_outbound_frame_size
            )
            if window >= len(body):
                self._h2.send_data(stream_id, body, end_stream=True)
                self._flush()
                return
            if window > 0:
                self._h2.send_data(stream_id, body[:window])
                body = body[window:]
                self._flush()
            opened = asyncio.get_running_loop().create_future()
            self._waiting_for_window.append(opened)
            await opened

    def _windows_opened(self) -> None:
        waiting, self._waiting_for_window = self._waiting_for_window, []
        for opened in waiting:
            if not opened.done():
                opened.set_result(None)

    def _reset(self, stream_id: int) -> None:
        if self._lost is not None:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            self._flush()

    def _refuse(self, why: str) -> None:
        """No new requests from now on: those waiting for a stream fail, the others finish."""
        if self._refusing is None:
            self._refusing = why
        self._admit()
        self._close_if_drained()

    def _close_if_drained(self) -> None:
        """A connection refusing new requests closes once its last one has its answer."""
        if (
            self._refusing is not None
            and not self._streams
            and self._lost is None
            and self._closing is None
        ):
            self._closing = asyncio.get_running_loop().create_task(self.close())

    def _flush(self) -> None:
        """Write what `h2` has queued at the end of this turn of the event loop, so that
        the requests a dispatcher's batch starts together leave in one write (one TLS
        record, one system call), not one each."""
        if not self._flush_due and self._lost is None:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_due = False
        data = self._h2.data_to_send()
        if data and self._lost is None and not self._writer.is_closing():
            self._writer.write(data)

    # --- receiving -----------------------------------------------------------------------

    async def _read_forever(self) -> None:
        lost = ConnectionLost("the connection was closed")
        try:
            while data := await self._reader.read(READ_SIZE):
                for event in self._h2.receive_data(data):
                    self._handle(event)
                self._flush()
            lost = ConnectionLost("the server closed the connection")
        except OSError as exc:
            lost = ConnectionLost(f"{type(exc).__name__}: {exc}")
        except h2.exceptions.ProtocolError as exc:
            self._flush_now()  # h2's GOAWAY saying why
            lost = ConnectionLost(f"the server broke HTTP/2: {type(exc).__name__}: {exc}")
        finally:
            self._fail_everything(lost)
            await self._close_transport()

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            # Always, even for a request given up on: the windows must reopen.
            self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            stream = self._streams.get(event.stream_id)
            if stream is not None and event.data:
                stream.body += event.data
        elif isinstance(event, h2.events.ResponseReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                self._take_headers(stream, event.headers or [])
        elif isinstance(event, h2.events.StreamEnded):
            stream = self._streams.get(event.stream_id)
            if stream is not None and not stream.done.done():
                response = Response(stream.status, stream.headers, bytes(stream.body))
                stream.done.set_result(response)
                self.answered += 1
        elif isinstance(event, h2.events.StreamReset):
            stream = self._streams.get(event.stream_id)
            if stream is not None and not stream.done.done():
                code = _error_name(event.error_code)
                stream.done.set_exception(StreamReset(f"the server reset the stream ({code})"))
                self._windows_opened()  # a body waiting for its window stops
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._server_said_goaway(event)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._settings_seen = True
            self._windows_opened()
            self._admit()
        elif isinstance(event, h2.events.WindowUpdated):
            self._windows_opened()

    @staticmethod
    def _take_headers(stream: _Stream, headers: Sequence[tuple[bytes, bytes]]) -> None:
        for name, value in headers:
            if name == b":status":
                stream.status = int(value)
            elif not name.startswith(b":"):
                stream.headers.append((name, value))

    def _server_said_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        """Requests above the last stream the server processed can be sent again; the rest
        may still be answered."""
        last = event.last_stream_id if event.last_stream_id is not None else 0
        code = _error_name(event.error_code)
        for stream_id, stream in self._streams.items():
            if stream_id > last and not stream.done.done():
                stream.done.set_exception(
                    Refused(f"the server closed the connection first (GOAWAY {code})")
                )
        self._windows_opened()
        self._refuse(f"the server is closing this connection (GOAWAY {code})")

    def _fail_everything(self, lost: ConnectionLost) -> None:
        if self._lost is None:
            self._lost = lost
        for stream in self._streams.values():
            if not stream.done.done():
                stream.done.set_exception(ConnectionLost(str(self._lost)))
        waiting, self._waiting_for_window = self._waiting_for_window, []
        for opened in waiting:
            if not opened.done():
                opened.set_exception(ConnectionLost(str(self._lost)))
        self._admit()

    async def _close_transport(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._writer.wait_closed()


class Origin:
    """The connection to one origin, opened when a request first needs it and again when
    it takes no more (lost, or the server said GOAWAY); requests arriving while it
    connects wait for it, so there is one connection at a time."""

    def __init__(
        self,
        url: str,
        context: ssl.SSLContext,
        proxy: Proxy | None = None,
        proxy_context: ssl.SSLContext | None = None,
    ) -> None:
        self.url = url
        self._context = context
        self._proxy = proxy
        self._proxy_context = proxy_context
        self._connecting = asyncio.Lock()
        self._connection: Http2Connection | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._answered_at = 0.0

    async def request(
        self,
        method: bytes,
        path: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        timeout: float,
    ) -> Response:
        """`Http2Connection.request` with a deadline, connecting first when needed. Raises
        `Http2Error`, `OSError` (connecting) or `TimeoutError`; after a timeout, a
        connection that answered nothing since the request began is dropped (a black hole:
        the next request connects again). A request its connection failed in a way a new
        connection may not (`worth_sending_again`) is sent again once, at once, within the
        same deadline."""
        started = time.monotonic()
        connection: Http2Connection | None = None
        try:
            async with asyncio.timeout(timeout):
                connection = await self.connection()
                try:
                    response = await connection.request(method, path, headers, body)
                except Http2Error as exc:
                    if not worth_sending_again(exc, connection):
                        raise
                    connection = await self.connection()
                    response = await connection.request(method, path, headers, body)
        except TimeoutError:
            if connection is not None and self._answered_at < started and self.drop(connection):
                log.warning("the connection to %s answered nothing: reconnecting", self.url)
            raise
        self._answered_at = time.monotonic()
        return response

    async def connection(self) -> Http2Connection:
        connection = self._connection
        if connection is not None and connection.usable:
            return connection
        async with self._connecting:
            connection = self._connection
            if connection is None or not connection.usable:
                connection = self._connection = await Http2Connection.open(
                    self.url, self._context, self._proxy, self._proxy_context
                )
        return connection

    def drop(self, connection: Http2Connection) -> bool:
        """Close `connection` (its requests fail) so the next request connects again;
        False when it is no longer this origin's connection."""
        if self._connection is not connection:
            return False
        self._connection = None
        closing = asyncio.get_running_loop().create_task(connection.close())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        return True

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()
        for task in list(self._closing):
            await task


def worth_sending_again(error: Http2Error, connection: Http2Connection) -> bool:
    """A request the server refused unprocessed (GOAWAY), or one in flight when a
    connection that had been answering was lost (a server that restarts, or closes its
    connections after so many requests): on a new connection it will most likely go
    through, and the outbox's backoff (a second or more) would hold the push up for
    nothing. The server may have taken a lost request before it went: sent again, the
    push may arrive twice, as it may when the outbox sends it again (APNs collapses them
    by `apns-collapse-id`). Not when the lost connection never answered: the server may
    be failing, and the outbox's backoff is the better pace."""
    if isinstance(error, Refused):
        return True
    return (
        isinstance(error, ConnectionLost)
        and not isinstance(error, NoHttp2)
        and connection.answered > 0
    )


def _error_name(code: int | None) -> str:
    try:
        return h2.errors.ErrorCodes(code).name if code is not None else "no error code"
    except ValueError:
        return f"error code {code}"


async def _tunnel(
    proxy: Proxy, context: ssl.SSLContext | None, host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A CONNECT tunnel to host:port through `proxy`, with its credentials."""
    parts = urlsplit(proxy.url)
    secure = parts.scheme == "https"
    reader, writer = await asyncio.open_connection(
        parts.hostname,
        parts.port or (443 if secure else 80),
        ssl=(context or ssl.create_default_context()) if secure else None,
    )
    try:
        target = f"{host}:{port}"
        head = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        if proxy.auth is not None:
            credentials = base64.b64encode(":".join(proxy.auth).encode()).decode()
            head.append(f"Proxy-Authorization: Basic {credentials}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        try:
            answer = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            raise ProxyRefused(f"the proxy gave no answer to CONNECT {target}") from exc
        status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
        fields = status_line.split(" ", 2)
        if len(fields) < 2 or not fields[1].isdigit() or not fields[1].startswith("2"):
            raise ProxyRefused(f"the proxy answered CONNECT {target} with {status_line!r}")
    except BaseException:
        writer.close()
        raise
    return reader, writer
