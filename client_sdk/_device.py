"""The phone's side: `DeviceClient` (blocking) and `AsyncDeviceClient` (asyncio).

The reference for mobile apps: pair from the QR code (proving the key with the QR secret),
keep a P-256 key, rotate the push token, fetch pending approvals and answer them with a
signed response (pns-approval-v2 over the client's nonce and the login context shown)."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Self

import httpx
from cryptography.hazmat.primitives.asymmetric import ec

from client_sdk._device_core import (
    DeviceBase,
    device_approval_call,
    pending_call,
    remove_self_call,
    update_push_call,
)
from client_sdk._http import (
    AsyncLifecycle,
    AsyncSender,
    SyncLifecycle,
    SyncSender,
    TimeoutTypes,
)
from client_sdk._models import DeviceApproval, DeviceDecision, TotpParameters
from client_sdk._wire import DEFAULT_RETRIES, pairing_secret_of, parse_qr_payload

__all__ = ["AsyncDeviceClient", "DeviceClient"]


class DeviceClient(SyncLifecycle, DeviceBase):
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


class AsyncDeviceClient(AsyncLifecycle, DeviceBase):
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
