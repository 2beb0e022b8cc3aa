"""The FCM sender (HTTP/2 on h2, HTTP/1.1 on httpcore where HTTP/2 is not offered; google-auth
service-account OAuth) against the fake FCM."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpcore
import pytest

from pns_server.push.base import Outcome
from pns_server.push.fcm import FCM_SCOPE, FcmSender
from pns_server.push.transport import ssl_context
from tests.fakes.fcm import FakeFcm, FcmReply, message_problem
from tests.pns_server.push.conftest import push_message

FCM_TOKEN = "fcm-token-" + "x" * 140


def fcm_message(token: str = FCM_TOKEN, **kwargs: object):
    return push_message(token, service="fcm", **kwargs)  # type: ignore[arg-type]


def make_sender(fake: FakeFcm, tmp_path: Path, timeout: float = 5.0) -> FcmSender:
    return FcmSender(
        fake.write_credentials(tmp_path / "service-account.json"),
        timeout=timeout,
        fcm_url=fake.url,
        ca_file=fake.write_ca(tmp_path / "ca.pem"),
    )


@pytest.fixture
async def sender(fake_fcm: FakeFcm, tmp_path: Path) -> AsyncIterator[FcmSender]:
    fcm = make_sender(fake_fcm, tmp_path)
    yield fcm
    await fcm.close()


class TestDelivered:
    async def test_a_high_priority_data_message_with_the_time_left_as_ttl(
        self, sender: FcmSender, fake_fcm: FakeFcm
    ) -> None:
        message = fcm_message(expires_in=120)
        result = await sender.send(message)
        assert result.outcome is Outcome.DELIVERED
        [got] = fake_fcm.received
        assert got.project == fake_fcm.project_id
        assert got.message["token"] == FCM_TOKEN
        assert got.message["data"] == {
            "approval_id": message.approval_id,
            "title": message.title,
            "body": message.body,
        }
        assert "notification" not in got.message
        assert got.message["android"]["priority"] == "high"
        ttl = float(got.message["android"]["ttl"].removesuffix("s"))
        assert 110 <= ttl <= 120

    async def test_over_http2_with_an_oauth_token_scoped_to_messaging(
        self, sender: FcmSender, fake_fcm: FakeFcm
    ) -> None:
        assert (await sender.send(fcm_message())).ok
        [got] = fake_fcm.received
        assert got.http_version == "2"
        assert fake_fcm.state.refused_assertions == []
        assert fake_fcm.state.token_scopes[got.access_token] == {FCM_SCOPE}

    async def test_all_on_one_connection(self, sender: FcmSender, fake_fcm: FakeFcm) -> None:
        results = await asyncio.gather(*(sender.send(fcm_message()) for _ in range(50)))
        assert all(r.ok for r in results)
        assert len({r.client_port for r in fake_fcm.received}) == 1

    async def test_over_http1_where_http2_is_not_offered(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A TLS-inspecting proxy without HTTP/2 in Google's place: the sends still go out."""
        caplog.set_level(logging.WARNING, "pns")
        with FakeFcm(alpn=("http/1.1",)) as fake:
            sender = make_sender(fake, tmp_path)
            try:
                results = await asyncio.gather(*(sender.send(fcm_message()) for _ in range(5)))
                results.append(await sender.send(fcm_message()))
            finally:
                await sender.close()
        assert [r.outcome for r in results] == [Outcome.DELIVERED] * 6
        assert {got.http_version for got in fake.received} == {"1.1"}
        warnings = [r.getMessage() for r in caplog.records if r.name == "pns.push.fcm"]
        assert len(warnings) == 1 and "does not offer HTTP/2" in warnings[0]

    async def test_the_access_token_is_fetched_once_and_reused(
        self, sender: FcmSender, fake_fcm: FakeFcm
    ) -> None:
        results = await asyncio.gather(*(sender.send(fcm_message()) for _ in range(20)))
        assert all(r.ok for r in results)
        assert fake_fcm.state.token_requests == 1
        assert {r.access_token for r in fake_fcm.received} == set(fake_fcm.state.issued_tokens)


class TestErrors:
    @pytest.mark.parametrize(
        ("code", "outcome", "status"),
        [
            ("UNREGISTERED", Outcome.INVALID_TOKEN, 404),
            ("SENDER_ID_MISMATCH", Outcome.INVALID_TOKEN, 403),
            ("INVALID_ARGUMENT", Outcome.INVALID_TOKEN, 400),
            ("QUOTA_EXCEEDED", Outcome.RETRY, 429),
            ("UNAVAILABLE", Outcome.RETRY, 503),
            ("INTERNAL", Outcome.RETRY, 500),
            ("THIRD_PARTY_AUTH_ERROR", Outcome.CONFIG_ERROR, 401),
        ],
    )
    async def test_each_error_code(
        self, sender: FcmSender, fake_fcm: FakeFcm, code: str, outcome: Outcome, status: int
    ) -> None:
        fake_fcm.answer(FCM_TOKEN, FcmReply(code))
        result = await sender.send(fcm_message())
        assert (result.outcome, result.reason, result.status_code) == (outcome, code, status)

    async def test_5xx_is_not_retried_by_the_sender(
        self, sender: FcmSender, fake_fcm: FakeFcm
    ) -> None:
        fake_fcm.answer(FCM_TOKEN, FcmReply("UNAVAILABLE"))
        assert (await sender.send(fcm_message())).outcome is Outcome.RETRY
        assert len(fake_fcm.received) == 1

    async def test_retry_after_is_passed_on(self, sender: FcmSender, fake_fcm: FakeFcm) -> None:
        fake_fcm.answer(FCM_TOKEN, FcmReply("QUOTA_EXCEEDED", retry_after=30))
        result = await sender.send(fcm_message())
        assert result.outcome is Outcome.RETRY and result.retry_after == 30.0

    async def test_a_slow_reply_times_out_as_retry(self, fake_fcm: FakeFcm, tmp_path: Path) -> None:
        fcm = make_sender(fake_fcm, tmp_path, timeout=0.5)
        fake_fcm.answer(FCM_TOKEN, FcmReply(delay=3))
        try:
            result = await fcm.send(fcm_message())
        finally:
            await fcm.close()
        assert result.outcome is Outcome.RETRY

    async def test_a_refused_access_token_is_replaced_on_the_next_send(
        self, sender: FcmSender, fake_fcm: FakeFcm
    ) -> None:
        assert (await sender.send(fcm_message())).ok
        fake_fcm.revoke_access_tokens()
        result = await sender.send(fcm_message())
        assert (result.outcome, result.status_code) == (Outcome.RETRY, 401)
        assert (await sender.send(fcm_message())).ok
        assert fake_fcm.state.token_requests == 2

    async def test_a_rejected_service_account_is_a_config_error(
        self, sender: FcmSender, fake_fcm: FakeFcm
    ) -> None:
        fake_fcm.state.reject_token_requests = True
        result = await sender.send(fcm_message())
        assert result.outcome is Outcome.CONFIG_ERROR
        assert fake_fcm.received == []

    async def test_a_key_file_signed_by_another_key_is_refused_as_config_error(
        self, fake_fcm: FakeFcm, tmp_path: Path
    ) -> None:
        """An attacker's (or a stale) key with the right account name gets no access token."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        account = fake_fcm.service_account()
        account["private_key"] = other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        path = tmp_path / "forged.json"
        path.write_text(json.dumps(account))
        fcm = FcmSender(
            path, timeout=5, fcm_url=fake_fcm.url, ca_file=fake_fcm.write_ca(tmp_path / "ca.pem")
        )
        try:
            result = await fcm.send(fcm_message())
        finally:
            await fcm.close()
        assert result.outcome is Outcome.CONFIG_ERROR
        assert fake_fcm.state.refused_assertions == ["Invalid JWT Signature."]
        assert fake_fcm.received == []

    async def test_a_token_without_the_messaging_scope_is_refused(
        self, sender: FcmSender, fake_fcm: FakeFcm
    ) -> None:
        assert (await sender.send(fcm_message())).ok
        fake_fcm.state.token_scopes[fake_fcm.received[0].access_token] = {"openid"}
        result = await sender.send(fcm_message())
        assert (result.outcome, result.status_code) == (Outcome.CONFIG_ERROR, 403)

    async def test_an_unreachable_fcm_is_retry(self, fake_fcm: FakeFcm, tmp_path: Path) -> None:
        from tests.support.postgres import free_port

        fcm = FcmSender(
            fake_fcm.write_credentials(tmp_path / "sa.json"),
            timeout=2,
            fcm_url=f"https://127.0.0.1:{free_port()}",
            ca_file=fake_fcm.write_ca(tmp_path / "ca.pem"),
        )
        try:
            result = await fcm.send(fcm_message())
        finally:
            await fcm.close()
        assert result.outcome is Outcome.RETRY


class TestOAuthRefreshOffTheEventLoop:
    async def test_a_slow_token_endpoint_does_not_stall_the_loop(
        self, sender: FcmSender, fake_fcm: FakeFcm
    ) -> None:
        fake_fcm.set_token_delay(1.0)
        ticks: list[float] = []

        async def heartbeat() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.02)

        beating = asyncio.create_task(heartbeat())
        try:
            result = await sender.send(fcm_message())
        finally:
            beating.cancel()
        assert result.ok
        assert fake_fcm.state.token_requests == 1
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        # The refresh took a second; a blocked loop would show one gap of about that size.
        assert len(ticks) > 20
        assert max(gaps) < 0.5


class TestTheFakeValidatesMessagesLikeFcm:
    """The sender builds the JSON itself now: the fake must refuse what FCM would refuse."""

    def test_the_senders_body_is_valid(self) -> None:
        assert message_problem(FcmSender.body(fcm_message())) is None

    @pytest.mark.parametrize(
        ("change", "field"),
        [
            (lambda m: m["android"].update(ttl="120"), "message.android.ttl"),
            (lambda m: m["android"].update(ttl=120), "message.android.ttl"),
            (lambda m: m["android"].update(priority="urgent"), "message.android.priority"),
            (lambda m: m["android"].update(time_to_live=3), "message.android"),
            (lambda m: m.update(topic="news"), "message"),
            (lambda m: m.update(ttl="1s"), "message"),
            (lambda m: m["data"].update(count=1), "message.data"),
        ],
    )
    def test_what_fcm_refuses(self, change, field: str) -> None:
        body = FcmSender.body(fcm_message())
        change(body["message"])
        problem = message_problem(body)
        assert problem is not None and problem.status_code == 400
        error = json.loads(bytes(problem.body))["error"]
        assert error["status"] == "INVALID_ARGUMENT"
        assert error["details"][0]["fieldViolations"][0]["field"] == field

    async def test_a_refused_message_is_a_config_error_not_a_dead_token(
        self, sender: FcmSender, fake_fcm: FakeFcm, tmp_path: Path
    ) -> None:
        assert (await sender.send(fcm_message())).ok
        ca = fake_fcm.write_ca(tmp_path / "ca.pem")
        body = {"message": {"token": FCM_TOKEN, "android": {"ttl": "soon"}}}
        async with httpcore.AsyncConnectionPool(ssl_context=ssl_context(ca), http2=True) as http:
            response = await http.request(
                "POST",
                f"{fake_fcm.url}/v1/projects/{fake_fcm.project_id}/messages:send",
                headers=[
                    (b"authorization", f"Bearer {fake_fcm.received[0].access_token}".encode()),
                    (b"content-type", b"application/json"),
                ],
                content=json.dumps(body).encode(),
            )
        result = FcmSender.classify(response)
        assert (result.outcome, result.reason, result.status_code) == (
            Outcome.CONFIG_ERROR,
            "INVALID_ARGUMENT",
            400,
        )


class TestThroughAForwardProxy:
    @pytest.fixture(autouse=True)
    def _no_proxy_settings(self, no_proxy_settings: None) -> None:
        pass

    async def test_sends_go_through_the_proxy_https_proxy_names(
        self,
        fake_fcm: FakeFcm,
        tmp_path: Path,
        connect_proxy: tuple[int, list[bytes]],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        port, heads = connect_proxy
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
        fcm = make_sender(fake_fcm, tmp_path)
        try:
            results = [await fcm.send(fcm_message()) for _ in range(2)]
        finally:
            await fcm.close()
        assert [r.outcome for r in results] == [Outcome.DELIVERED] * 2
        assert len(fake_fcm.received) == 2
        connect = f"CONNECT {urlsplit(fake_fcm.url).netloc} HTTP/1.1".encode()
        assert any(head.startswith(connect) for head in heads)

    def test_a_proxy_fcm_cannot_use_stops_the_relay_at_start_up_and_says_so(
        self, fake_fcm: FakeFcm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from pns_server.push.factory import PushConfigError, build_fcm
        from tests.conftest import make_settings

        monkeypatch.setenv("HTTPS_PROXY", "socks5h://127.0.0.1:1080")
        settings = make_settings(
            f"sqlite:///{tmp_path / 'pns.db'}",
            tmp_path,
            fcm_credentials_file=fake_fcm.write_credentials(tmp_path / "sa.json"),
        )
        with pytest.raises(PushConfigError, match="names a socks5h proxy") as refused:
            build_fcm(settings, None)
        assert "service-account" not in str(refused.value)
