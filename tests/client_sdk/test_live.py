"""The SDK against a real `pns-server serve` process (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlparse

import pyotp
import pytest

from client_sdk import (
    AsyncDeviceClient,
    AsyncPnsClient,
    DeviceClient,
    EditionUnsupported,
    InvalidRequest,
    KeyStore,
    NotFound,
    OtpInvalid,
    OtpReplayed,
    PairingInvalid,
    PlatformUnsupported,
    PnsClient,
    RecoveryCodeInvalid,
    RegistrationRefused,
    Unauthenticated,
)
from tests.support.server import LiveServer

pytestmark = pytest.mark.slow

IPHONE = {"name": "Ann's iPhone", "platform": "ios", "os_version": "17.2", "app_version": "4.3"}
APNS = {"service": "apns", "token": "ab" * 32, "environment": "production"}


def wrong_code(secret: str) -> str:
    """A six-digit code outside the ±1 step window, so it is surely refused."""
    totp, now = pyotp.TOTP(secret), datetime.now(UTC)
    window = {totp.at(now + timedelta(seconds=s)) for s in (-60, -30, 0, 30, 60)}
    return next(c for c in ("000000", "111111", "222222", "333333") if c not in window)


def secret_of(otpauth_uri: str) -> str:
    return parse_qs(urlparse(otpauth_uri).query)["secret"][0]


class TestSyncClient:
    def test_enrolment_codes_and_devices(self, live_server: LiveServer, tmp_path) -> None:
        registration = PnsClient.register(
            live_server.url, name="FILESRV01", edition="pro", hostname="filesrv01.corp"
        )
        keys = KeyStore(tmp_path / "keys.json")
        with PnsClient(live_server.url, registration.client_token, key_store=keys) as client:
            ping = client.ping()
            assert abs(ping.clock_skew) < 5
            assert ping.version
            info = client.me()
            assert (info.client_id, info.name, info.devices) == (
                registration.client_id,
                "FILESRV01",
                0,
            )

            # An app pairing, completed by the phone while another thread long-polls.
            pairing = client.start_pairing("app")
            assert pairing.status == "pending" and pairing.qr_payload is not None
            waited: list[object] = []
            waiter = threading.Thread(
                target=lambda: waited.append(client.wait_for_pairing(pairing.pairing_id, 30))
            )
            waiter.start()
            device = DeviceClient.pair(pairing.qr_payload, push=APNS, **IPHONE)
            waiter.join(35)
            completed = waited[0]
            assert completed.status == "completed"  # type: ignore[attr-defined]
            assert completed.device.device_id == device.device_id  # type: ignore[attr-defined]
            # The key the phone generated is pinned, and persisted.
            assert keys.get(device.device_id) == device.public_key
            assert KeyStore(tmp_path / "keys.json").get(device.device_id) == device.public_key

            # One-time passwords from the phone: accepted once, then replayed.
            code = device.current_otp()
            accepted = client.verify_otp(code)
            assert (accepted.result, accepted.device_id) == ("accepted", device.device_id)
            with pytest.raises(OtpReplayed):
                client.verify_otp(code)
            with pytest.raises(OtpInvalid) as invalid:
                client.verify_otp(wrong_code(device.totp.secret))  # type: ignore[union-attr]
            assert isinstance(invalid.value.attempts_left, int)

            # A third-party TOTP app: a wrong first code is refused, the right one activates.
            totp_pairing = client.start_pairing("totp", label="Google Authenticator")
            assert totp_pairing.otpauth_uri == totp_pairing.qr_payload
            secret = secret_of(totp_pairing.otpauth_uri or "")
            with pytest.raises(OtpInvalid):
                client.confirm_totp_pairing(totp_pairing.pairing_id, wrong_code(secret))
            totp_device = client.confirm_totp_pairing(
                totp_pairing.pairing_id, pyotp.TOTP(secret).now()
            )
            assert totp_device.kind == "totp" and totp_device.public_key is None
            assert client.get_pairing(totp_pairing.pairing_id).status == "completed"

            devices = {d.device_id: d for d in client.list_devices()}
            assert set(devices) == {device.device_id, totp_device.device_id}
            assert devices[device.device_id].push == "apns"

            # Recovery codes: ten, each single-use.
            codes = client.create_recovery_codes().codes
            assert len(codes) == 10 and len(set(codes)) == 10
            assert client.verify_recovery_code(codes[0]).remaining == 9
            with pytest.raises(RecoveryCodeInvalid):
                client.verify_recovery_code(codes[0])

            # The phone rotates its push token, then the client removes it.
            device.update_push_token("apns", "cd" * 32)
            client.remove_device(device.device_id)
            assert [d.device_id for d in client.list_devices()] == [totp_device.device_id]
            assert device.device_id not in keys
            with pytest.raises(NotFound):
                client.remove_device(device.device_id)
            with pytest.raises(Unauthenticated):
                device.pending()
            device.close()

    def test_refusals_and_device_state(self, live_server: LiveServer) -> None:
        with pytest.raises(EditionUnsupported) as refused:
            PnsClient.register(live_server.url, name="PC", edition="home")
        assert isinstance(refused.value, RegistrationRefused)
        assert refused.value.status == 403

        with (
            PnsClient(live_server.url, token="pnsc_not-a-real-token") as stranger,
            pytest.raises(Unauthenticated),
        ):
            stranger.me()

        registration = PnsClient.register(live_server.url, name="FILESRV02", edition="lite")
        with (
            PnsClient(live_server.url, registration.client_token) as client,
            pytest.raises(InvalidRequest) as invalid,
        ):
            client.verify_otp("")
            assert any(e.get("field") == "code" for e in invalid.value.errors)

            bogus = f"pns://pair?server={live_server.url}&token=pnsp_unknown"
            with pytest.raises(PairingInvalid):
                DeviceClient.pair(bogus, **IPHONE)

            pairing = client.start_pairing("app")
            old_ios = {**IPHONE, "os_version": "11.4"}
            with pytest.raises(PlatformUnsupported):
                DeviceClient.pair(pairing.qr_payload or "", **old_ios)

            # The phone app saves its state and resumes after a restart.
            pairing = client.start_pairing("app")
            first = DeviceClient.pair(pairing.qr_payload or "", **IPHONE)
            state = first.to_state()
            first.close()
            with DeviceClient.from_state(state) as resumed:
                assert resumed.public_key == first.public_key
                assert resumed.pending() == []
                assert client.verify_otp(resumed.current_otp()).device_id == resumed.device_id


class TestAsyncClient:
    async def test_pairing_codes_and_errors(self, live_server: LiveServer) -> None:
        registration = await AsyncPnsClient.register(live_server.url, name="NAS", edition="pro")
        async with AsyncPnsClient(live_server.url, registration.client_token) as client:
            assert abs((await client.ping()).clock_skew) < 5
            pairing = await client.start_pairing("app", label=None)
            waiter = asyncio.create_task(client.wait_for_pairing(pairing.pairing_id, 30))
            android = {
                "name": "Pixel",
                "platform": "android",
                "os_version": "14",
                "app_version": "4.3",
            }
            async with await AsyncDeviceClient.pair(pairing.qr_payload or "", **android) as device:
                completed = await asyncio.wait_for(waiter, 35)
                assert completed.status == "completed"
                assert completed.device is not None
                assert completed.device.platform == "android"
                assert client.key_store.get(device.device_id or "") == device.public_key

                accepted = await client.verify_otp(device.current_otp())
                assert accepted.device_id == device.device_id
                with pytest.raises(OtpInvalid) as invalid:
                    await client.verify_otp(wrong_code(device.totp.secret))  # type: ignore[union-attr]
                assert isinstance(invalid.value.attempts_left, int)

                codes = (await client.create_recovery_codes()).codes
                assert (await client.verify_recovery_code(codes[3])).remaining == 9
                assert (await client.me()).devices == 1
                await device.remove()
            assert await client.list_devices() == []
            with pytest.raises(EditionUnsupported):
                await AsyncPnsClient.register(live_server.url, name="PC", edition="home")
