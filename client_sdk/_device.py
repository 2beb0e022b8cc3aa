"""The phone's side: `DeviceClient` (blocking) and `AsyncDeviceClient` (asyncio).

The reference for mobile apps: pair from the QR code (proving the key with the QR secret),
keep a P-256 key, rotate the push token, fetch pending approvals and answer them with a
signed response (pns-approval-v2 over the client's nonce and the login context shown)."""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Self, TypeVar

import httpx
import pyotp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client_sdk._device_core import (
    device_approval_call,
    device_headers,
    enrol_call,
    pairing_secret_of,
    parse_qr_payload,
    pending_call,
    remove_self_call,
    respond_call,
    update_push_call,
)
from client_sdk._flows import Flow, send
from client_sdk._http import (
    AsyncLifecycle,
    AsyncSender,
    SyncLifecycle,
    SyncSender,
    TimeoutTypes,
)
from client_sdk._keys import context_sha256, key_proof, public_key_b64, sign_approval
from client_sdk._models import DeviceApproval, DeviceDecision, TotpParameters
from client_sdk._wire import DEFAULT_RETRIES, format_time

__all__ = ["AsyncDeviceClient", "DeviceClient"]

T = TypeVar("T")
STATE_VERSION = 1
_DIGESTS: dict[str, Callable[..., Any]] = {
    "SHA1": hashlib.sha1,
    "SHA256": hashlib.sha256,
    "SHA512": hashlib.sha512,
}


def _pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def _load_key(pem: str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem.encode("ascii"), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError("the device state does not hold a P-256 private key")
    return key


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


class _DeviceBase:
    def __init__(
        self,
        server_url: str,
        *,
        device_id: str | None = None,
        device_token: str | None = None,
        private_key: ec.EllipticCurvePrivateKey | None = None,
        totp: TotpParameters | None = None,
    ) -> None:
        self.server_url = server_url.rstrip("/")
        self.device_id = device_id
        self._token = device_token
        self.private_key = private_key if private_key is not None else _new_key()
        self.totp = totp

    def _headers(self) -> dict[str, str]:
        return device_headers(self._token)

    @property
    def public_key(self) -> str:
        """Base64 DER SubjectPublicKeyInfo, as registered with the server."""
        return public_key_b64(self.private_key)

    def to_state(self) -> dict[str, Any]:
        """Everything needed to resume this device later, JSON-serialisable. It holds the
        private key and the TOTP secret: store it like a password (e.g. the OS keychain).

        Example::

            keychain.save(json.dumps(device.to_state()))
            device = DeviceClient.from_state(json.loads(keychain.load()))
        """
        return {
            "version": STATE_VERSION,
            "server_url": self.server_url,
            "device_id": self.device_id,
            "device_token": self._token,
            "private_key_pem": _pem(self.private_key),
            "totp": self.totp.to_dict() if self.totp is not None else None,
        }

    @staticmethod
    def _state_kwargs(state: Mapping[str, Any]) -> dict[str, Any]:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported device state version {state.get('version')!r}")
        totp = state.get("totp")
        return {
            "server_url": state["server_url"],
            "device_id": state.get("device_id"),
            "device_token": state.get("device_token"),
            "private_key": _load_key(state["private_key_pem"]),
            "totp": TotpParameters(**totp) if isinstance(totp, dict) else None,
        }

    def current_otp(self, at: datetime | None = None) -> str:
        """The one-time password this device shows now (or at `at`).

        Example::

            client.verify_otp(device.current_otp())
        """
        if self.totp is None:
            raise RuntimeError("this device is not paired yet")
        digest = _DIGESTS.get(self.totp.algorithm.upper())
        if digest is None:
            raise ValueError(f"unsupported TOTP algorithm {self.totp.algorithm!r}")
        totp = pyotp.TOTP(
            self.totp.secret, digits=self.totp.digits, digest=digest, interval=self.totp.period
        )
        return str(totp.at(at or datetime.now(UTC)))

    def _enrol(
        self,
        qr_payload: str,
        name: str,
        platform: str,
        os_version: str,
        app_version: str,
        push: Mapping[str, str] | None,
    ) -> Flow[None]:
        """Pair from the QR text, proving this device's key with the QR code's secret."""
        _, pairing_token = parse_qr_payload(qr_payload)
        secret = pairing_secret_of(qr_payload)
        public_key = self.public_key
        call = enrol_call(
            pairing_token=pairing_token,
            name=name,
            platform=platform,
            os_version=os_version,
            app_version=app_version,
            push=push,
            public_key=public_key,
            key_proof=key_proof(secret, public_key) if secret is not None else None,
        )
        enrolment = yield from send(call)
        self.device_id = enrolment.device_id
        self._token = enrolment.device_token
        self.totp = enrolment.totp

    def _answer(
        self,
        approval: str | DeviceApproval,
        decision: str,
        match_code: str | None,
        fraud: bool,
        at: datetime | None,
    ) -> Flow[DeviceDecision]:
        """Fetch the approval unless the caller passes the one it showed, then sign v2 (the
        client's nonce and the context as shown) when it carries a nonce, v1 otherwise."""
        if not isinstance(approval, DeviceApproval):
            approval = yield from send(device_approval_call(approval))
        timestamp = format_time(at or datetime.now(UTC))
        nonce = approval.client_nonce
        signature = sign_approval(
            self.private_key,
            approval.approval_id,
            decision,
            match_code,
            timestamp,
            nonce,
            context_sha256(approval.context) if nonce is not None else None,
        )
        call = respond_call(
            approval.approval_id,
            decision=decision,
            match_code=match_code,
            fraud=fraud,
            timestamp=timestamp,
            signature=signature,
        )
        return (yield from send(call))


class DeviceClient(SyncLifecycle, _DeviceBase):
    """A paired phone, blocking.

    device = DeviceClient.pair(qr_text, name="Ann's iPhone", platform="ios",
                               os_version="17.2", app_version="4.3.0")
    for approval in device.pending():
        device.approve(approval.approval_id, input("Code shown on the server: "))
    """

    def __init__(
        self,
        server_url: str,
        *,
        device_id: str | None = None,
        device_token: str | None = None,
        private_key: ec.EllipticCurvePrivateKey | None = None,
        totp: TotpParameters | None = None,
        timeout: TimeoutTypes = None,
        retries: int = DEFAULT_RETRIES,
        transport: httpx.BaseTransport | None = None,
        verify: bool | ssl.SSLContext = True,
    ) -> None:
        super().__init__(
            server_url,
            device_id=device_id,
            device_token=device_token,
            private_key=private_key,
            totp=totp,
        )
        self._sender = SyncSender(
            self.server_url,
            self._headers,
            timeout=timeout,
            retries=retries,
            transport=transport,
            verify=verify,
        )

    @classmethod
    def pair(
        cls,
        qr_payload: str,
        *,
        name: str,
        platform: str,
        os_version: str,
        app_version: str,
        push: Mapping[str, str] | None = None,
        server_url: str | None = None,
        **options: Any,
    ) -> Self:
        """Complete a pairing from the scanned `pns://pair?...#k=...` text with a new P-256
        key, proving the key with the QR code's secret (`key_proof`).

        `push` is `{"service": "apns"|"fcm", "token": ..., "environment": ...}`, or None
        for a phone that only polls. `server_url` overrides the QR code's server.

        Example::

            device = DeviceClient.pair(qr_text, name="Ann's iPhone", platform="ios",
                                       os_version="17.2", app_version="4.3.0")
        """
        qr_server, _ = parse_qr_payload(qr_payload)
        pairing_secret_of(qr_payload)  # a damaged fragment fails before anything is sent
        device = cls(server_url or qr_server, **options)
        try:
            device._run(device._enrol(qr_payload, name, platform, os_version, app_version, push))
        except BaseException:
            device.close()
            raise
        return device

    @classmethod
    def from_state(cls, state: Mapping[str, Any], **options: Any) -> Self:
        """Resume a device saved with `to_state()`.

        Example::

            device = DeviceClient.from_state(json.loads(keychain.load()))
        """
        return cls(**cls._state_kwargs(state), **options)

    def update_push_token(self, service: str, token: str, environment: str | None = None) -> None:
        """Tell the server the OS rotated the push token.

        Example::

            device.update_push_token("fcm", new_fcm_token)
        """
        self._send(update_push_call(service, token, environment))

    def remove(self) -> None:
        """Unpair this phone; its token stops working.

        Example::

            device.remove()
        """
        self._send(remove_self_call())

    def pending(self) -> list[DeviceApproval]:
        """Approvals waiting for this phone (the poll fallback when push is late).

        Example::

            for approval in device.pending():
                print(approval.client_name, approval.context)
        """
        return self._send(pending_call())

    def approval(self, approval_id: str) -> DeviceApproval:
        """One approval's details (never its match code).

        Example::

            context = device.approval(approval_id).context
        """
        return self._send(device_approval_call(approval_id))

    def approve(
        self,
        approval: str | DeviceApproval,
        match_code: str | None,
        *,
        at: datetime | None = None,
    ) -> DeviceDecision:
        """Approve with the code the user typed (None for a plain push), signed over the
        request as shown to the user.

        Pass the `DeviceApproval` that was shown, or its id (then it is fetched first). A
        wrong code rejects the request.

        Example::

            status = device.approve(approval_id, "417").status
        """
        return self._run(self._answer(approval, "approve", match_code, False, at))

    def reject(
        self,
        approval: str | DeviceApproval,
        fraud: bool = False,
        *,
        at: datetime | None = None,
    ) -> DeviceDecision:
        """Reject; `fraud=True` reports an attack and locks push for a while.

        Example::

            device.reject(approval_id, fraud=True)
        """
        return self._run(self._answer(approval, "reject", None, fraud, at))


class AsyncDeviceClient(AsyncLifecycle, _DeviceBase):
    """The asyncio twin of `DeviceClient`.

    device = await AsyncDeviceClient.pair(qr_text, name="Pixel", platform="android",
                                          os_version="14", app_version="4.3.0")
    """

    def __init__(
        self,
        server_url: str,
        *,
        device_id: str | None = None,
        device_token: str | None = None,
        private_key: ec.EllipticCurvePrivateKey | None = None,
        totp: TotpParameters | None = None,
        timeout: TimeoutTypes = None,
        retries: int = DEFAULT_RETRIES,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: bool | ssl.SSLContext = True,
    ) -> None:
        super().__init__(
            server_url,
            device_id=device_id,
            device_token=device_token,
            private_key=private_key,
            totp=totp,
        )
        self._sender = AsyncSender(
            self.server_url,
            self._headers,
            timeout=timeout,
            retries=retries,
            transport=transport,
            verify=verify,
        )

    @classmethod
    async def pair(
        cls,
        qr_payload: str,
        *,
        name: str,
        platform: str,
        os_version: str,
        app_version: str,
        push: Mapping[str, str] | None = None,
        server_url: str | None = None,
        **options: Any,
    ) -> Self:
        """Complete a pairing from the scanned `pns://pair?...#k=...` text with a new P-256
        key, proving the key with the QR code's secret (`key_proof`).

        See `DeviceClient.pair`.

        Example::

            device = await AsyncDeviceClient.pair(qr_text, name="Pixel", platform="android",
                                                  os_version="14", app_version="4.3.0")
        """
        qr_server, _ = parse_qr_payload(qr_payload)
        pairing_secret_of(qr_payload)  # a damaged fragment fails before anything is sent
        device = cls(server_url or qr_server, **options)
        try:
            enrol = device._enrol(qr_payload, name, platform, os_version, app_version, push)
            await device._run(enrol)
        except BaseException:
            await device.aclose()
            raise
        return device

    @classmethod
    def from_state(cls, state: Mapping[str, Any], **options: Any) -> Self:
        """Resume a device saved with `to_state()`.

        Example::

            device = AsyncDeviceClient.from_state(json.loads(keychain.load()))
        """
        return cls(**cls._state_kwargs(state), **options)

    async def update_push_token(
        self, service: str, token: str, environment: str | None = None
    ) -> None:
        """Tell the server the OS rotated the push token.

        Example::

            await device.update_push_token("apns", hex_token, environment="production")
        """
        await self._send(update_push_call(service, token, environment))

    async def remove(self) -> None:
        """Unpair this phone; its token stops working.

        Example::

            await device.remove()
        """
        await self._send(remove_self_call())

    async def pending(self) -> list[DeviceApproval]:
        """Approvals waiting for this phone (the poll fallback when push is late).

        Example::

            approvals = await device.pending()
        """
        return await self._send(pending_call())

    async def approval(self, approval_id: str) -> DeviceApproval:
        """One approval's details (never its match code).

        Example::

            context = (await device.approval(approval_id)).context
        """
        return await self._send(device_approval_call(approval_id))

    async def approve(
        self,
        approval: str | DeviceApproval,
        match_code: str | None,
        *,
        at: datetime | None = None,
    ) -> DeviceDecision:
        """Approve with the code the user typed (None for a plain push), signed over the
        request as shown to the user.

        See `DeviceClient.approve`.

        Example::

            decision = await device.approve(approval_id, "417")
        """
        return await self._run(self._answer(approval, "approve", match_code, False, at))

    async def reject(
        self,
        approval: str | DeviceApproval,
        fraud: bool = False,
        *,
        at: datetime | None = None,
    ) -> DeviceDecision:
        """Reject; `fraud=True` reports an attack and locks push for a while.

        Example::

            await device.reject(approval_id, fraud=True)
        """
        return await self._run(self._answer(approval, "reject", None, fraud, at))
