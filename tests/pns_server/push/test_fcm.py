"""The FCM sender (real firebase-admin + google-auth) against the fake FCM."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pns_server.push.base import Outcome
from pns_server.push.fcm import FcmSender
from tests.fakes.fcm import FakeFcm, FcmReply
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

    async def test_5xx_is_not_retried_inside_firebase_admin(
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
