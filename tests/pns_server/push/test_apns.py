"""The APNs sender (its HTTP/2 connection on h2, `push/http2.py`) against the fake APNs."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from pns_server.push.apns import (
    MAX_PAYLOAD_BYTES,
    ApnsConfig,
    ApnsSender,
    ProviderToken,
    build_payload,
    load_signing_key,
)
from pns_server.push.base import Outcome, PushResult
from pns_server.push.factory import PushConfigError, build_apns
from tests.fakes.apns import HANG, RESET, FakeApns, Reply
from tests.pns_server.push.conftest import connect_proxy_server, push_message


def apns_config(fake: FakeApns, tmp_path: Path, **overrides: object) -> ApnsConfig:
    values: dict[str, object] = {
        "topic": fake.topic,
        "production_url": fake.url,
        "sandbox_url": fake.url,
        "timeout": 2.0,
        "ca_file": fake.write_ca(tmp_path / "ca.pem"),
    }
    values.update(overrides)
    return ApnsConfig(**values)  # type: ignore[arg-type]


def provider_token(fake: FakeApns, tmp_path: Path) -> ProviderToken:
    key = load_signing_key(fake.write_key(tmp_path / "AuthKey.p8"))
    return ProviderToken(key, fake.key_id, fake.team_id)


@pytest.fixture
async def sender(fake_apns: FakeApns, tmp_path: Path) -> AsyncIterator[ApnsSender]:
    apns = ApnsSender(apns_config(fake_apns, tmp_path), provider_token(fake_apns, tmp_path))
    yield apns
    await apns.close()


class TestDelivered:
    async def test_headers_and_payload_are_what_apple_expects(
        self, sender: ApnsSender, fake_apns: FakeApns
    ) -> None:
        message = push_message()
        result = await sender.send(message)
        assert result.outcome is Outcome.DELIVERED and result.status_code == 200
        [got] = fake_apns.received
        assert got.token == message.token
        assert got.headers["apns-topic"] == fake_apns.topic
        assert got.headers["apns-push-type"] == "alert"
        assert got.headers["apns-priority"] == "10"
        assert got.headers["apns-expiration"] == str(int(message.expires_at.timestamp()))
        assert got.headers["apns-collapse-id"] == message.approval_id
        assert got.payload == {
            "aps": {
                "alert": {"title": message.title, "body": message.body},
                "sound": "default",
                "category": "PNS_APPROVAL",
            },
            "approval_id": message.approval_id,
        }

    async def test_what_changes_from_push_to_push_stays_out_of_the_header_tables(
        self, sender: ApnsSender, fake_apns: FakeApns
    ) -> None:
        """Apple asks that the path, the provider token, the expiry and the collapse id
        not fill its small HPACK table; the headers every push shares may."""
        for token in (f"{1:064x}", f"{2:064x}"):
            assert (await sender.send(push_message(token=token))).ok
        for got in fake_apns.received:
            assert got.never_indexed == {
                ":path",
                "authorization",
                "apns-expiration",
                "apns-collapse-id",
            }

    async def test_environment_picks_the_host(self, fake_apns: FakeApns, tmp_path: Path) -> None:
        async with FakeApns(
            team_id=fake_apns.team_id, key_id=fake_apns.key_id, ca=fake_apns.ca
        ) as sandbox:
            sandbox.signing_key = fake_apns.signing_key
            apns = ApnsSender(
                apns_config(fake_apns, tmp_path, sandbox_url=sandbox.url),
                provider_token(fake_apns, tmp_path),
            )
            try:
                assert (await apns.send(push_message(environment="sandbox"))).ok
                assert (await apns.send(push_message(environment="production"))).ok
            finally:
                await apns.close()
            assert len(sandbox.received) == 1 and len(fake_apns.received) == 1

    async def test_one_jwt_is_reused_across_many_concurrent_sends_on_one_connection(
        self, sender: ApnsSender, fake_apns: FakeApns
    ) -> None:
        results = await asyncio.gather(
            *(sender.send(push_message(token=f"{i:064x}")) for i in range(200))
        )
        assert all(r.ok for r in results)
        assert len(fake_apns.distinct_jwts()) == 1
        assert fake_apns.connections == 1

    async def test_certificate_auth_presents_the_client_certificate(
        self, fake_apns: FakeApns, tmp_path: Path
    ) -> None:
        cert_file = fake_apns.ca.issue_client(fake_apns.topic).write(tmp_path / "apns.pem")
        apns = ApnsSender(apns_config(fake_apns, tmp_path, cert_file=cert_file))
        try:
            result = await apns.send(push_message())
        finally:
            await apns.close()
        assert result.ok
        [got] = fake_apns.received
        assert got.client_cert and got.jwt is None


class TestPayloadSize:
    async def test_a_long_body_is_shortened_to_fit(
        self, sender: ApnsSender, fake_apns: FakeApns
    ) -> None:
        result = await sender.send(push_message(body="é" * 5000))
        assert result.ok
        [got] = fake_apns.received
        assert len(got.body) <= MAX_PAYLOAD_BYTES
        assert got.payload["aps"]["alert"]["body"].endswith("…")

    async def test_a_payload_that_cannot_fit_is_never_sent(
        self, sender: ApnsSender, fake_apns: FakeApns
    ) -> None:
        message = push_message()
        huge = type(message)(
            **{
                **{f: getattr(message, f) for f in message.__dataclass_fields__},
                "title": "x" * 5000,
            }
        )
        assert build_payload(huge) is None
        result = await sender.send(huge)
        assert result.outcome is Outcome.CONFIG_ERROR and result.reason == "PayloadTooLarge"
        assert fake_apns.received == []

    async def test_the_fake_refuses_oversize_payloads_like_apple(
        self, fake_apns: FakeApns, tmp_path: Path
    ) -> None:
        import httpx

        context = ssl.create_default_context(cafile=fake_apns.write_ca(tmp_path / "ca.pem"))
        async with httpx.AsyncClient(http2=True, http1=False, verify=context) as client:
            token = provider_token(fake_apns, tmp_path).current()
            response = await client.post(
                f"{fake_apns.url}/3/device/{'ab' * 32}",
                content=json.dumps({"aps": {}, "pad": "x" * 5000}),
                headers={"authorization": f"bearer {token}", "apns-topic": fake_apns.topic},
            )
        assert response.status_code == 413
        assert response.json() == {"reason": "PayloadTooLarge"}


class TestErrors:
    @pytest.mark.parametrize(
        ("reply", "outcome"),
        [
            (Reply(410, "Unregistered"), Outcome.INVALID_TOKEN),
            (Reply(400, "BadDeviceToken"), Outcome.INVALID_TOKEN),
            (Reply(400, "DeviceTokenNotForTopic"), Outcome.INVALID_TOKEN),
            (Reply(500, "InternalServerError"), Outcome.RETRY),
            (Reply(503, "ServiceUnavailable"), Outcome.RETRY),
            (Reply(403, "InvalidProviderToken"), Outcome.CONFIG_ERROR),
            (Reply(400, "BadCollapseId"), Outcome.CONFIG_ERROR),
        ],
    )
    async def test_classification(
        self,
        sender: ApnsSender,
        fake_apns: FakeApns,
        reply: Reply,
        outcome: Outcome,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        message = push_message()
        fake_apns.answer(message.token, reply)
        caplog.set_level(logging.DEBUG, "pns")
        result = await sender.send(message)
        assert result.outcome is outcome
        assert (result.status_code, result.reason) == (reply.status, reply.reason)
        # The sender classifies; the dispatcher writes the one line an outcome gets.
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == []

    async def test_429_carries_retry_after(self, sender: ApnsSender, fake_apns: FakeApns) -> None:
        message = push_message()
        fake_apns.answer(message.token, Reply(429, "TooManyRequests", retry_after=7))
        result = await sender.send(message)
        assert result.outcome is Outcome.RETRY and result.retry_after == 7.0

    async def test_a_wrong_signing_key_is_a_config_error(
        self, fake_apns: FakeApns, tmp_path: Path
    ) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec

        wrong = ProviderToken(
            ec.generate_private_key(ec.SECP256R1()), fake_apns.key_id, fake_apns.team_id
        )
        apns = ApnsSender(apns_config(fake_apns, tmp_path), wrong)
        try:
            result = await apns.send(push_message())
        finally:
            await apns.close()
        assert result.outcome is Outcome.CONFIG_ERROR
        assert (result.status_code, result.reason) == (403, "InvalidProviderToken")

    async def test_a_wrong_topic_is_a_config_error(
        self, fake_apns: FakeApns, tmp_path: Path
    ) -> None:
        apns = ApnsSender(
            apns_config(fake_apns, tmp_path, topic="com.example.other"),
            provider_token(fake_apns, tmp_path),
        )
        try:
            result = await apns.send(push_message())
        finally:
            await apns.close()
        assert result.outcome is Outcome.CONFIG_ERROR and result.status_code == 400

    async def test_expired_provider_token_is_refreshed_once_then_sent(
        self, sender: ApnsSender, fake_apns: FakeApns
    ) -> None:
        assert (await sender.send(push_message())).ok
        fake_apns.expire_seen_tokens()
        result = await sender.send(push_message())
        assert result.ok
        statuses = [r.status for r in fake_apns.received]
        assert statuses == [200, 403, 200]
        assert len(fake_apns.distinct_jwts()) == 2

    async def test_a_token_apple_keeps_calling_expired_is_not_re_signed_in_a_loop(
        self, sender: ApnsSender, fake_apns: FakeApns
    ) -> None:
        assert (await sender.send(push_message())).ok
        fake_apns.expire_seen_tokens()
        assert (await sender.send(push_message())).ok
        fake_apns.expire_seen_tokens()
        result = await sender.send(push_message())
        assert result.outcome is Outcome.CONFIG_ERROR
        assert result.reason == "ExpiredProviderToken"
        assert len(fake_apns.distinct_jwts()) == 2

    async def test_connection_refused_is_retry(self, tmp_path: Path, fake_apns: FakeApns) -> None:
        from tests.support.postgres import free_port

        dead = f"https://127.0.0.1:{free_port()}"
        apns = ApnsSender(
            apns_config(fake_apns, tmp_path, production_url=dead),
            provider_token(fake_apns, tmp_path),
        )
        try:
            result = await apns.send(push_message())
        finally:
            await apns.close()
        assert result.outcome is Outcome.RETRY


class TestOneConnectionCannotStall:
    """The failure modes that make aioapns hang; each followed by a normal send."""

    @pytest.fixture
    async def sender(self, fake_apns: FakeApns, tmp_path: Path) -> AsyncIterator[ApnsSender]:
        apns = ApnsSender(
            apns_config(fake_apns, tmp_path, timeout=0.5), provider_token(fake_apns, tmp_path)
        )
        yield apns
        await apns.close()

    async def test_a_hung_stream_times_out_while_others_are_delivered(
        self, sender: ApnsSender, fake_apns: FakeApns
    ) -> None:
        hung = push_message(token="aa" * 32)
        fake_apns.answer(hung.token, HANG)
        hung_send = asyncio.create_task(sender.send(hung))
        await fake_apns.wait_for(lambda got: any(r.token == hung.token for r in got))
        assert (await sender.send(push_message())).ok
        assert not hung_send.done()
        async with asyncio.timeout(10):
            result = await hung_send
        assert result.outcome is Outcome.RETRY and result.reason == "Timeout"
        assert (await sender.send(push_message())).ok
        assert fake_apns.connections == 1

    async def test_a_connection_that_answers_nothing_is_replaced(
        self, sender: ApnsSender, fake_apns: FakeApns
    ) -> None:
        fake_apns.default_reply = HANG
        assert (await sender.send(push_message())).reason == "Timeout"
        fake_apns.default_reply = Reply()
        async with asyncio.timeout(5):
            assert (await sender.send(push_message())).ok
        assert fake_apns.connections == 2

    async def test_a_reset_stream_is_retry_and_the_connection_keeps_working(
        self, sender: ApnsSender, fake_apns: FakeApns
    ) -> None:
        reset = push_message(token="bb" * 32)
        fake_apns.answer(reset.token, RESET)
        async with asyncio.timeout(10):
            result = await sender.send(reset)
        assert result.outcome is Outcome.RETRY
        assert fake_apns.resets_sent == 1
        assert (await sender.send(push_message())).ok
        assert fake_apns.connections == 1

    async def test_a_flood_of_error_bodies_cannot_exhaust_flow_control(
        self, fake_apns: FakeApns, tmp_path: Path
    ) -> None:
        sender = ApnsSender(
            apns_config(fake_apns, tmp_path, timeout=30), provider_token(fake_apns, tmp_path)
        )
        fake_apns.default_reply = Reply(400, "BadDeviceToken")
        try:
            async with asyncio.timeout(60):
                results = await asyncio.gather(
                    *(sender.send(push_message(token=f"{i:064x}")) for i in range(2400))
                )
            self.check_flood(results, fake_apns)
            fake_apns.default_reply = Reply()
            async with asyncio.timeout(5):
                assert (await sender.send(push_message())).ok
        finally:
            await sender.close()

    @staticmethod
    def check_flood(results: list[PushResult], fake_apns: FakeApns) -> None:
        assert all(r.outcome is Outcome.INVALID_TOKEN for r in results)
        # > 64 KiB of response bodies, the default HTTP/2 window, all on one connection.
        assert len(results) * len(b'{"reason": "BadDeviceToken"}') > 65536
        assert fake_apns.connections == 1


class TestProviderTokenLifetime:
    def test_reused_for_50_minutes_then_re_signed(
        self, fake_apns: FakeApns, tmp_path: Path
    ) -> None:
        now = [1_700_000_000.0]
        key = load_signing_key(fake_apns.write_key(tmp_path / "k.p8"))
        token = ProviderToken(key, "K", "T", clock=lambda: now[0])
        first = token.current()
        now[0] += 49 * 60
        assert token.current() == first
        now[0] += 2 * 60
        assert token.current() != first

    def test_forced_refreshes_are_at_most_one_per_20_minutes(
        self, fake_apns: FakeApns, tmp_path: Path
    ) -> None:
        now = [1_700_000_000.0]
        key = load_signing_key(fake_apns.write_key(tmp_path / "k.p8"))
        token = ProviderToken(key, "K", "T", clock=lambda: now[0])
        first = token.current()
        assert token.refresh_after_rejection(first)
        second = token.current()
        assert second != first
        assert not token.refresh_after_rejection(second)
        now[0] += 20 * 60
        assert token.refresh_after_rejection(second)
        assert token.current() != second


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made_jwt(
    key: ec.EllipticCurvePrivateKey,
    header: dict[str, object],
    claims: dict[str, object],
    *,
    der: bool = False,
) -> str:
    """A provider token built without any JWT library, to feed the fake what a buggy signer
    would send."""
    signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
    signature = key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    if not der:
        r, s = decode_dss_signature(signature)
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{signing_input}.{_b64url(signature)}"


class TestProviderTokenFormat:
    def test_the_relays_token_is_exactly_what_apple_documents(
        self, fake_apns: FakeApns, tmp_path: Path
    ) -> None:
        token = provider_token(fake_apns, tmp_path).current()
        header_b64, claims_b64, _signature = token.split(".")
        header = json.loads(base64.urlsafe_b64decode(header_b64 + "=="))
        claims = json.loads(base64.urlsafe_b64decode(claims_b64 + "=="))
        assert header == {"alg": "ES256", "kid": fake_apns.key_id}
        assert set(claims) == {"iss", "iat"} and claims["iss"] == fake_apns.team_id
        assert abs(claims["iat"] - time.time()) < 5
        assert fake_apns._check_jwt(token) is None

    def test_the_fake_accepts_a_correct_token_made_without_pyjwt(self, fake_apns: FakeApns) -> None:
        good = hand_made_jwt(
            fake_apns.signing_key,
            {"alg": "ES256", "kid": fake_apns.key_id},
            {"iss": fake_apns.team_id, "iat": int(time.time())},
        )
        assert fake_apns._check_jwt(good) is None

    @pytest.mark.parametrize(
        "mistake",
        [
            "der_signature",
            "other_key",
            "wrong_kid",
            "wrong_team",
            "future_iat",
            "alg_none",
            "alg_hs256",
            "extra_header",
            "float_iat",
            "padded",
        ],
    )
    def test_the_fake_refuses_what_apple_refuses(self, fake_apns: FakeApns, mistake: str) -> None:
        now = int(time.time())
        key = fake_apns.signing_key
        header: dict[str, object] = {"alg": "ES256", "kid": fake_apns.key_id}
        claims: dict[str, object] = {"iss": fake_apns.team_id, "iat": now}
        der = False
        if mistake == "der_signature":
            der = True
        elif mistake == "other_key":
            key = ec.generate_private_key(ec.SECP256R1())
        elif mistake == "wrong_kid":
            header["kid"] = "OTHERKEY12"
        elif mistake == "wrong_team":
            claims["iss"] = "OTHERTEAM1"
        elif mistake == "future_iat":
            claims["iat"] = now + 3600
        elif mistake == "extra_header":
            header["x5u"] = "https://attacker.example/key"
        elif mistake == "float_iat":
            claims["iat"] = now + 0.5
        token = hand_made_jwt(key, header, claims, der=der)
        if mistake == "alg_none":
            header["alg"] = "none"
            token = f"{_b64url(json.dumps(header).encode())}.{token.split('.')[1]}."
        elif mistake == "alg_hs256":
            # The classic confusion: an HMAC "signed" with the public key as the secret.
            header["alg"] = "HS256"
            public = key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            signing_input = f"{_b64url(json.dumps(header).encode())}.{token.split('.')[1]}"
            mac = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
            token = f"{signing_input}.{_b64url(mac)}"
        elif mistake == "padded":
            token = token + "=="
        assert fake_apns._check_jwt(token) == "InvalidProviderToken"


class TestThroughAForwardProxy:
    """Apple is reached through the proxy `HTTPS_PROXY` names, as the httpx clients do."""

    @pytest.fixture(autouse=True)
    def _no_proxy_settings(self, no_proxy_settings: None) -> None:
        pass

    @pytest.mark.parametrize("scheme", ["http", "https"])
    async def test_sends_go_through_one_tunnel_with_the_proxys_credentials(
        self, fake_apns: FakeApns, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scheme: str
    ) -> None:
        """An https proxy carries the TLS to Apple inside its own."""
        proxy_tls = fake_apns.ca.server_context(tmp_path, alpn=["http/1.1"])
        async with connect_proxy_server(proxy_tls if scheme == "https" else None) as proxy:
            port, heads = proxy
            url = f"{scheme}://relay%40corp:s%3Acret@127.0.0.1:{port}"
            monkeypatch.setenv("HTTPS_PROXY", url)
            apns = ApnsSender(apns_config(fake_apns, tmp_path), provider_token(fake_apns, tmp_path))
            try:
                results = await asyncio.gather(*(apns.send(push_message()) for _ in range(3)))
            finally:
                await apns.close()
        assert [r.outcome for r in results] == [Outcome.DELIVERED] * 3
        assert len(fake_apns.received) == 3
        [head] = heads
        assert head.startswith(f"CONNECT {urlsplit(fake_apns.url).netloc} HTTP/1.1".encode())
        credentials = base64.b64encode(b"relay@corp:s:cret")
        assert b"proxy-authorization: basic " + credentials.lower() in head.lower()

    async def test_a_proxy_refusing_the_tunnel_makes_the_push_a_retry_naming_why(
        self, fake_apns: FakeApns, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()

        proxy = await asyncio.start_server(refuse, "127.0.0.1", 0)
        port = proxy.sockets[0].getsockname()[1]
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
        apns = ApnsSender(apns_config(fake_apns, tmp_path), provider_token(fake_apns, tmp_path))
        try:
            async with proxy:
                result = await apns.send(push_message())
        finally:
            await apns.close()
        assert result.outcome is Outcome.RETRY
        assert result.reason is not None and "407" in result.reason
        assert fake_apns.received == []

    async def test_no_proxy_exempts_the_host(
        self, fake_apns: FakeApns, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from tests.support.postgres import free_port

        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{free_port()}")
        monkeypatch.setenv("NO_PROXY", "example.org,127.0.0.1")
        apns = ApnsSender(apns_config(fake_apns, tmp_path), provider_token(fake_apns, tmp_path))
        try:
            result = await apns.send(push_message())
        finally:
            await apns.close()
        assert result.outcome is Outcome.DELIVERED

    def test_a_proxy_apns_cannot_use_stops_the_relay_at_start_up(
        self, fake_apns: FakeApns, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from tests.conftest import make_settings

        monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:1080")
        settings = make_settings(
            f"sqlite:///{tmp_path / 'pns.db'}",
            tmp_path,
            apns_key_file=fake_apns.write_key(tmp_path / "AuthKey.p8"),
            apns_key_id=fake_apns.key_id,
            apns_team_id=fake_apns.team_id,
            apns_topic=fake_apns.topic,
        )
        with pytest.raises(PushConfigError, match="names a socks5 proxy"):
            build_apns(settings, None)
