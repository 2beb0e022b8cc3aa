"""Web Push: the sender against a fake push service that checks VAPID and decrypts like a
browser vendor's; the endpoint allow-list; the VAPID key kept across restarts."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from pns_server.config import Settings
from pns_server.push.base import Outcome, PushMessage
from pns_server.push.factory import PushConfigError, build_senders, build_webpush
from pns_server.push.webpush import (
    WebPushConfig,
    WebPushSender,
    endpoint_problem,
    public_key_b64url,
)
from tests.fakes.webpush import FakeWebPush, Reply, Subscription, decrypt_aes128gcm
from tests.pns_server.push.conftest import push_message

DEFAULT_HOSTS = Settings.model_fields["webpush_endpoint_hosts"].default


@pytest.fixture
def fake_push() -> Iterator[FakeWebPush]:
    with FakeWebPush() as fake:
        yield fake


def make_sender(fake: FakeWebPush, key: ec.EllipticCurvePrivateKey | None = None) -> WebPushSender:
    key = key or ec.generate_private_key(ec.SECP256R1())
    config = WebPushConfig(subject="mailto:ops@example.com", allowed_hosts=(fake.host,), timeout=5)
    return WebPushSender(key, config)


def message_for(subscription: Subscription, **kwargs: object) -> PushMessage:
    keys = subscription.to_json()["keys"]
    base = push_message(subscription.endpoint, service="webpush", **kwargs)  # type: ignore[arg-type]
    return PushMessage(
        approval_id=base.approval_id,
        device_id=base.device_id,
        service="webpush",
        token=subscription.endpoint,
        environment="production",
        title=base.title,
        body=base.body,
        expires_at=base.expires_at,
        data={"approval_id": base.approval_id, "type": "approval"},
        webpush_keys=(keys["p256dh"], keys["auth"]),
    )


class TestSend:
    async def test_delivered_with_a_valid_vapid_jwt_and_a_payload_only_the_browser_reads(
        self, fake_push: FakeWebPush
    ) -> None:
        sender = make_sender(fake_push)
        subscription = fake_push.subscribe(application_server_key=sender.public_key)
        try:
            result = await sender.send(message_for(subscription))
        finally:
            await sender.close()
        assert result.outcome is Outcome.DELIVERED, (result, fake_push.refused)
        [got] = fake_push.received
        assert got.payload == {
            "type": "approval",
            "approval_id": "appr_0123456789abcdef",
            "title": "Approve login?",
            "body": "FILESRV01 asks to approve a login as admin",
        }
        assert got.claims["aud"] == fake_push.url
        assert got.claims["sub"] == "mailto:ops@example.com"
        assert got.headers["urgency"] == "high"
        assert 100 <= int(got.headers["ttl"]) <= 120

    async def test_another_vapid_key_is_refused_as_a_configuration_error(
        self, fake_push: FakeWebPush
    ) -> None:
        subscribed_with = public_key_b64url(ec.generate_private_key(ec.SECP256R1()))
        subscription = fake_push.subscribe(application_server_key=subscribed_with)
        sender = make_sender(fake_push)
        try:
            result = await sender.send(message_for(subscription))
        finally:
            await sender.close()
        assert result.outcome is Outcome.CONFIG_ERROR
        assert result.status_code == 403
        assert fake_push.received == []

    async def test_the_jwt_is_reused_per_push_service(self, fake_push: FakeWebPush) -> None:
        sender = make_sender(fake_push)
        first, second = fake_push.subscribe(), fake_push.subscribe()
        try:
            assert (await sender.send(message_for(first))).ok
            assert (await sender.send(message_for(second))).ok
        finally:
            await sender.close()
        auth = {r.headers["authorization"] for r in fake_push.received}
        assert len(auth) == 1

    def test_each_message_has_its_own_sender_key_and_salt(self) -> None:
        from pns_server.push.webpush import encrypt_payload

        browser = ec.generate_private_key(ec.SECP256R1())
        auth = os.urandom(16)
        from tests.fakes.webpush import raw_public

        one = encrypt_payload(b"hello", raw_public(browser), auth)
        two = encrypt_payload(b"hello", raw_public(browser), auth)
        assert one[:16] != two[:16] and one[21:86] != two[21:86]
        assert decrypt_aes128gcm(one, browser, auth) == b"hello"
        # Another subscription's auth secret cannot read it.
        with pytest.raises(Exception, match="decrypt"):
            decrypt_aes128gcm(one, browser, os.urandom(16))

    @pytest.mark.parametrize(
        ("reply", "outcome"),
        [
            (Reply(410, "gone"), Outcome.INVALID_TOKEN),
            (Reply(404, "not found"), Outcome.INVALID_TOKEN),
            (Reply(429, "slow down", {"Retry-After": "7"}), Outcome.RETRY),
            (Reply(503, "maintenance", {"Retry-After": "3"}), Outcome.RETRY),
            (Reply(500, "oops"), Outcome.RETRY),
            (Reply(413, "too large"), Outcome.CONFIG_ERROR),
            (Reply(400, "bad"), Outcome.CONFIG_ERROR),
            (Reply(403, "forbidden"), Outcome.CONFIG_ERROR),
        ],
    )
    async def test_outcomes_are_classified(
        self, fake_push: FakeWebPush, reply: Reply, outcome: Outcome
    ) -> None:
        sender = make_sender(fake_push)
        subscription = fake_push.subscribe()
        fake_push.answer(subscription, reply)
        try:
            result = await sender.send(message_for(subscription))
        finally:
            await sender.close()
        assert result.outcome is outcome
        assert result.status_code == reply.status
        if "Retry-After" in reply.headers:
            assert result.retry_after == float(reply.headers["Retry-After"])

    async def test_a_dead_service_is_retried(self, fake_push: FakeWebPush) -> None:
        sender = make_sender(fake_push)
        subscription = fake_push.subscribe()
        fake_push.__exit__()
        await asyncio.sleep(0.1)
        try:
            result = await sender.send(message_for(subscription))
        finally:
            await sender.close()
        assert result.outcome is Outcome.RETRY

    async def test_an_endpoint_outside_the_allow_list_is_never_contacted(
        self, fake_push: FakeWebPush
    ) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        sender = WebPushSender(
            key, WebPushConfig("mailto:ops@example.com", ("fcm.googleapis.com",), 5)
        )
        subscription = fake_push.subscribe()
        try:
            result = await sender.send(message_for(subscription))
        finally:
            await sender.close()
        assert result.outcome is Outcome.INVALID_TOKEN
        assert fake_push.received == [] and fake_push.refused == []


class TestAllowList:
    @pytest.mark.parametrize(
        "endpoint",
        [
            "https://fcm.googleapis.com/fcm/send/abc",
            "https://updates.push.services.mozilla.com/wpush/v2/abc",
            "https://web.push.apple.com/QGx",
            "https://wns2-par02p.notify.windows.com/w/?token=abc",
            "https://FCM.googleapis.com/fcm/send/abc",
        ],
    )
    def test_the_known_push_services_are_allowed(self, endpoint: str) -> None:
        assert endpoint_problem(endpoint, DEFAULT_HOSTS) is None

    @pytest.mark.parametrize(
        "endpoint",
        [
            "http://fcm.googleapis.com/fcm/send/abc",  # plain http
            "https://fcm.googleapis.com.evil.example/x",  # suffix trick
            "https://evilfcm.googleapis.com/x",
            "https://notify.windows.com/x",  # the wildcard needs a sub-domain
            "https://169.254.169.254/latest/meta-data",  # cloud metadata
            "https://127.0.0.1/x",
            "https://localhost:8080/x",
            "https://user:pw@fcm.googleapis.com/x",
            "https://fcm.googleapis.com:8443/x",  # another port of an allowed host
            "ftp://fcm.googleapis.com/x",
            "not a url",
            "https://[::1/x",
        ],
    )
    def test_anything_else_is_refused(self, endpoint: str) -> None:
        assert endpoint_problem(endpoint, DEFAULT_HOSTS) is not None

    def test_plain_http_only_for_a_listed_loopback_host_and_port(self) -> None:
        hosts = ["127.0.0.1:8999", "push.example.com:8443"]
        assert endpoint_problem("http://127.0.0.1:8999/push/x", hosts) is None
        assert endpoint_problem("http://127.0.0.1:9000/push/x", hosts) is not None
        assert endpoint_problem("https://push.example.com:8443/x", hosts) is None
        assert endpoint_problem("http://push.example.com:8443/x", hosts) is not None


class TestVapidKey:
    def settings(self, tmp_path: Path, **values: object) -> Settings:
        return Settings(
            database_url=f"sqlite:///{tmp_path / 'pns.db'}",
            data_dir=tmp_path,
            **values,  # type: ignore[arg-type]
        )

    async def test_generated_once_private_and_kept_across_restarts(self, tmp_path: Path) -> None:
        first = build_webpush(self.settings(tmp_path), None)
        second = build_webpush(self.settings(tmp_path), None)
        await first.close()
        await second.close()
        assert first.public_key == second.public_key
        mode = stat.S_IMODE((tmp_path / "vapid.pem").stat().st_mode)
        assert mode == 0o600
        assert len(first.public_key) == 87  # 65 bytes, base64url without padding

    def test_a_configured_key_file_that_is_not_a_key_refuses_to_start(self, tmp_path: Path) -> None:
        bad = tmp_path / "vapid.pem"
        bad.write_text("not a key")
        with pytest.raises(PushConfigError, match="PNS_WEBPUSH_VAPID_KEY_FILE"):
            build_senders(self.settings(tmp_path, webpush_vapid_key_file=bad))
        with pytest.raises(PushConfigError, match="PNS_WEBPUSH_VAPID_KEY_FILE"):
            build_senders(self.settings(tmp_path, webpush_vapid_key_file=tmp_path / "none.pem"))

    def test_the_subject_defaults_from_the_public_url(self, tmp_path: Path) -> None:
        from pns_server.push.factory import webpush_subject

        assert webpush_subject(self.settings(tmp_path, public_url="https://pns.example.com")) == (
            "https://pns.example.com"
        )
        with_port = self.settings(tmp_path, public_url="https://pns.example.com:8443/relay")
        assert webpush_subject(with_port) == "https://pns.example.com"
        # ...and the key signs with it (push services refuse a JWT without a valid contact).
        build_senders(with_port)
        assert webpush_subject(self.settings(tmp_path, public_url="http://10.0.0.5:8080")) == (
            "mailto:admin@10.0.0.5"
        )
        with pytest.raises(ValueError, match="mailto"):
            self.settings(tmp_path, webpush_subject="ops@example.com")
        with pytest.raises(PushConfigError, match="PNS_WEBPUSH_SUBJECT"):
            build_senders(self.settings(tmp_path, webpush_subject="mailto:nobody"))
