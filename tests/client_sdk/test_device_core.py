"""The device core: reading the pairing code (server, token and the `#k=` secret)."""

from __future__ import annotations

import base64

import pytest

from client_sdk import (
    DeviceClient,
    parse_qr_payload,
)
from client_sdk._device_core import pairing_secret_of


class TestQrPayload:
    def test_parses_server_and_token(self) -> None:
        payload = "pns://pair?server=https%3A%2F%2Fpns.example.com%2F&token=pnsp_abc"
        assert parse_qr_payload(payload) == ("https://pns.example.com", "pnsp_abc")

    def test_reads_the_pairing_secret_from_the_fragment(self) -> None:
        base = "pns://pair?server=https%3A%2F%2Fpns.example.com&token=pnsp_abc"
        secret = bytes(range(32))
        with_secret = f"{base}#k={base64.urlsafe_b64encode(secret).rstrip(b'=').decode()}"
        assert parse_qr_payload(with_secret) == ("https://pns.example.com", "pnsp_abc")
        assert pairing_secret_of(with_secret) == secret
        assert pairing_secret_of(base) is None

    @pytest.mark.parametrize(
        "fragment",
        [
            "k=" + "A" * 42,  # 31.5 bytes
            "k=" + "A" * 44,
            "k=" + "A" * 42 + "B",  # spare bits set: not canonical
            "k=" + "A" * 42 + "A=",
            "k=" + "+" * 43,
            "k=" + "A" * 43 + "&k=" + "A" * 43,
            "x=" + "A" * 43,
            "k=" + "A" * 43 + "&v=2",
        ],
    )
    def test_refuses_a_damaged_secret(self, fragment: str) -> None:
        payload = f"pns://pair?server=https%3A%2F%2Fa&token=t#{fragment}"
        with pytest.raises(ValueError):
            pairing_secret_of(payload)
        with pytest.raises(ValueError):
            DeviceClient.pair(payload, name="x", platform="ios", os_version="17", app_version="1")

    @pytest.mark.parametrize(
        "payload",
        [
            "https://pair?server=https%3A%2F%2Fa&token=t",
            "pns://pair?token=t",
            "pns://pair?server=https%3A%2F%2Fa",
            "pns://pair?server=ftp%3A%2F%2Fa&token=t",
            "otpauth://totp/x?secret=AAAA",
        ],
    )
    def test_refuses_other_text(self, payload: str) -> None:
        with pytest.raises(ValueError):
            parse_qr_payload(payload)
