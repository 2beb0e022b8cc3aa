"""The APNs sender's HTTP/2 connection (`push/http2.py`) against the fake APNs, in the ways
Apple's servers behave: a stream limit raised after the first answer, GOAWAY, a dropped
connection, requests given up on; and a server that does not speak HTTP/2."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest

from pns_server.push.apns import ApnsSender
from pns_server.push.base import Outcome
from pns_server.push.http2 import Http2Connection, Http2Error
from pns_server.push.transport import ssl_context
from tests.fakes.apns import HANG, FakeApns, Reply
from tests.fakes.tls import CertificateAuthority
from tests.pns_server.push.conftest import push_message
from tests.pns_server.push.test_apns import apns_config, provider_token


async def eventually(condition: object, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.01)


def tokens(count: int) -> list[str]:
    return [f"{i:064x}" for i in range(1, count + 1)]


async def test_the_servers_stream_limit_is_honoured_from_its_first_settings(
    tmp_path: Path,
) -> None:
    """APNs announces one stream on a new connection and raises the limit after the first
    answer; a client that sends more is refused (here, the fake's h2 breaks the
    connection)."""
    async with FakeApns(first_max_concurrent_streams=1, max_concurrent_streams=4) as fake:
        fake.default_reply = Reply(delay=0.05)
        sender = ApnsSender(apns_config(fake, tmp_path, timeout=10), provider_token(fake, tmp_path))
        try:
            results = await asyncio.gather(*(sender.send(push_message(t)) for t in tokens(24)))
        finally:
            await sender.close()
    assert [r.outcome for r in results] == [Outcome.DELIVERED] * 24
    assert fake.most_streams_open == 4  # as many as allowed, never more
    assert fake.connections == 1


async def test_requests_sent_before_the_servers_settings_arrive_wait_for_them(
    tmp_path: Path,
) -> None:
    """Until its first SETTINGS, a server's limit is unknown: one stream at a time."""
    async with FakeApns(first_max_concurrent_streams=1, max_concurrent_streams=3) as fake:
        fake.default_reply = Reply(delay=0.05)
        headers = apns_headers(fake, tmp_path)
        connection = await Http2Connection.open(
            fake.url, ssl_context(fake.write_ca(tmp_path / "ca.pem"))
        )
        try:
            async with asyncio.timeout(10):
                responses = await asyncio.gather(
                    *(
                        connection.request(b"POST", f"/3/device/{t}".encode(), headers, b"{}")
                        for t in tokens(9)
                    )
                )
        finally:
            await connection.close()
    assert [r.status for r in responses] == [200] * 9
    assert fake.most_streams_open == 3


def apns_headers(fake: FakeApns, tmp_path: Path) -> list[tuple[bytes, bytes]]:
    token = provider_token(fake, tmp_path).current()
    return [(b"apns-topic", fake.topic.encode()), (b"authorization", f"bearer {token}".encode())]


async def test_a_request_given_up_on_resets_its_stream_and_frees_its_place(
    tmp_path: Path,
) -> None:
    """With room for one stream, a hung request abandoned at its deadline must give its
    place back, or the connection would take nothing more."""
    async with FakeApns(max_concurrent_streams=1) as fake:
        headers = apns_headers(fake, tmp_path)
        context = ssl_context(fake.write_ca(tmp_path / "ca.pem"))
        hung, answered = tokens(2)
        fake.answer(hung, HANG)
        connection = await Http2Connection.open(fake.url, context)
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await connection.request(b"POST", f"/3/device/{hung}".encode(), headers, b"{}")
            async with asyncio.timeout(5):
                response = await connection.request(
                    b"POST", f"/3/device/{answered}".encode(), headers, b"{}"
                )
            await eventually(lambda: fake.resets_received == 1)
        finally:
            await connection.close()
    assert response.status == 200
    assert fake.connections == 1
    assert connection.in_flight == 0


async def test_a_connection_out_of_stream_ids_takes_no_more_and_closes_when_drained(
    tmp_path: Path,
) -> None:
    async with FakeApns() as fake:
        headers = apns_headers(fake, tmp_path)
        context = ssl_context(fake.write_ca(tmp_path / "ca.pem"))
        connection = await Http2Connection.open(fake.url, context)
        try:
            first = await connection.request(b"POST", b"/3/device/" + b"a" * 64, headers, b"{}")
            # h2's own count of the streams opened: as after a billion requests.
            connection._h2.highest_outbound_stream_id = 2**31 - 1
            with pytest.raises(Http2Error, match="used all its stream ids"):
                await connection.request(b"POST", b"/3/device/" + b"b" * 64, headers, b"{}")
            assert not connection.usable
            await eventually(lambda: fake.connections_closed == 1)
        finally:
            await connection.close()
    assert first.status == 200


async def test_a_request_goaway_refuses_is_sent_again_at_once_on_a_new_connection(
    tmp_path: Path, fake_apns: FakeApns
) -> None:
    """A server that says GOAWAY naming an earlier stream as its last never processed the
    requests after it: each is sent again at once, on a new connection (RFC 9113, 6.8),
    not left for the outbox's backoff. Here the fake refuses this token on every
    connection: sent twice, then a retry for the outbox; the next send connects again."""
    sender = ApnsSender(apns_config(fake_apns, tmp_path), provider_token(fake_apns, tmp_path))
    first, refused, after = tokens(3)
    fake_apns.answer(refused, Reply(goaway=True))
    try:
        assert (await sender.send(push_message(first))).ok
        result = await sender.send(push_message(refused))
        assert (await sender.send(push_message(after))).ok
    finally:
        await sender.close()
    assert result.outcome is Outcome.RETRY
    assert result.reason is not None and "GOAWAY" in result.reason
    assert [r.connection for r in fake_apns.for_token(refused)] == [1, 2]
    assert fake_apns.connections == 3


async def test_a_request_in_flight_behind_a_goaway_goes_through_on_the_next_connection(
    tmp_path: Path, fake_apns: FakeApns
) -> None:
    """The push that ran into another's GOAWAY is delivered, on the next connection, without
    waiting for the outbox (before, it came back as a retry, sent a second or more later)."""
    sender = ApnsSender(apns_config(fake_apns, tmp_path), provider_token(fake_apns, tmp_path))
    first, refusing, behind = tokens(3)
    fake_apns.answer(refusing, Reply(goaway=True, delay=0.2))
    fake_apns.answer(behind, Reply(delay=0.4))
    try:
        assert (await sender.send(push_message(first))).ok
        async with asyncio.timeout(5):
            sends = asyncio.gather(
                sender.send(push_message(refusing)), sender.send(push_message(behind))
            )
            await fake_apns.wait_for(lambda got: any(r.token == refusing for r in got))
            fake_apns.answer(refusing, Reply())  # a server that refuses once, then takes it
            results = await sends
    finally:
        await sender.close()
    assert [r.outcome for r in results] == [Outcome.DELIVERED] * 2
    assert [r.connection for r in fake_apns.for_token(behind)] == [1, 2]
    assert [r.connection for r in fake_apns.for_token(refusing)] == [1, 2]


async def test_requests_lost_with_a_connection_that_was_answering_are_sent_again_at_once(
    tmp_path: Path,
) -> None:
    """A server that ends its connections after so many requests (hypercorn's HTTP/2, in
    front of the fake FCM, after 1,000) drops the requests in flight with it: on a
    connection that had been answering, each is sent again at once on a new one. The
    guard stays: a connection that never answered (the dropped-connection test above)
    sends nothing again."""
    async with FakeApns(requests_per_connection=3) as fake:
        sender = ApnsSender(apns_config(fake, tmp_path), provider_token(fake, tmp_path))
        answered, *lost = tokens(4)
        try:
            assert (await sender.send(push_message(answered))).ok
            fake.default_reply = Reply(delay=0.2)
            async with asyncio.timeout(5):
                results = await asyncio.gather(*(sender.send(push_message(t)) for t in lost))
        finally:
            await sender.close()
    assert [r.outcome for r in results] == [Outcome.DELIVERED] * 3
    assert fake.connections == 2
    assert [fake.for_token(t)[-1].connection for t in lost] == [2, 2, 2]


async def test_a_dropped_connection_fails_every_request_on_it_at_once(
    tmp_path: Path, fake_apns: FakeApns
) -> None:
    """Not after the send timeout (30 s here): the moment the connection is gone."""
    sender = ApnsSender(
        apns_config(fake_apns, tmp_path, timeout=30), provider_token(fake_apns, tmp_path)
    )
    *hung, dropping, after = tokens(5)
    for token in hung:
        fake_apns.answer(token, HANG)
    fake_apns.answer(dropping, Reply(drop=True))
    try:
        waiting = [asyncio.create_task(sender.send(push_message(t))) for t in hung]
        await fake_apns.wait_for(lambda got: len(got) == len(hung))
        async with asyncio.timeout(5):
            results = [await sender.send(push_message(dropping)), *await asyncio.gather(*waiting)]
        assert (await sender.send(push_message(after))).ok
    finally:
        await sender.close()
    assert [r.outcome for r in results] == [Outcome.RETRY] * 4
    assert all(r.reason is not None and "ConnectionLost" in r.reason for r in results)
    assert fake_apns.connections == 2


async def test_a_server_that_does_not_offer_http2_is_named(tmp_path: Path) -> None:
    ca = CertificateAuthority()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    with tempfile.TemporaryDirectory() as directory:
        context = ca.server_context(Path(directory), alpn=["http/1.1"])
        server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    async with server, FakeApns(ca=ca) as fake:
        config = apns_config(fake, tmp_path, production_url=f"https://127.0.0.1:{port}")
        sender = ApnsSender(config, provider_token(fake, tmp_path))
        try:
            result = await sender.send(push_message())
        finally:
            await sender.close()
    assert result.outcome is Outcome.RETRY
    assert result.reason is not None and "does not offer HTTP/2" in result.reason


async def test_header_values_go_out_as_they_are_not_huffman_coded() -> None:
    """Huffman coding every push's token and path costs the relay more CPU than the bytes
    it saves are worth (`PlainEncoder`): the header block carries the values as they are.
    A server over plain TCP that reads the bytes and answers nothing is enough."""
    received = bytearray()
    value = b"bearer " + b"a1B2c3D4" * 32

    async def read_everything(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            received.extend(data)

    server = await asyncio.start_server(read_everything, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        connection = Http2Connection(reader, writer, f"127.0.0.1:{port}")
        path = f"/3/device/{tokens(1)[0]}".encode()
        request = asyncio.create_task(
            connection.request(b"POST", path, [(b"authorization", value)], b"")
        )
        try:
            await eventually(lambda: path in received and value in received)
        finally:
            request.cancel()
            await connection.close()


class CountingWriter:
    """The connection's `StreamWriter`, counting the writes made through it."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.writer.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self.writer, name)


async def test_requests_started_together_leave_in_one_write() -> None:
    """A dispatcher's batch goes out in one write (one TLS record, one system call), not
    one per request. The server here says only its (empty) SETTINGS, then reads."""
    received = bytearray()
    empty_settings = bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # RFC 9113 §6.5: length 0, type 4

    async def settings_then_read(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(empty_settings)
        while data := await reader.read(65536):
            received.extend(data)

    server = await asyncio.start_server(settings_then_read, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        counting = CountingWriter(writer)
        connection = Http2Connection(
            reader,
            counting,  # type: ignore[arg-type]
            f"127.0.0.1:{port}",
        )
        await eventually(lambda: counting.writes == 2)  # our preface, then the SETTINGS ack
        paths = [f"/3/device/{t}".encode() for t in tokens(20)]
        requests = [
            asyncio.create_task(connection.request(b"POST", path, [], b"{}")) for path in paths
        ]
        try:
            await eventually(lambda: all(path in received for path in paths))
            assert counting.writes == 3
        finally:
            for request in requests:
                request.cancel()
            await connection.close()
