"""The backup client's API: `PnsClient` (blocking) and `AsyncPnsClient` (asyncio).

Both are thin: requests are built and answers parsed by `client_sdk._core`, and every
multi-step operation (waits, `finish_pairings`, `login`) is one flow in `client_sdk._flows`
that each twin hands to its driver. A method here only names its call or flow, so the two
offer exactly the same methods with the same behaviour. Their docstrings follow one rule
(tests/client_sdk/test_public_api.py holds them to it): the blocking one is complete; the
asyncio one repeats its first paragraph and, where there is more, points to it.

Why this module is long: it states the public API twice, as httpx's `_client.py` does;
each method keeps its typed signature and a docstring with an example (a test wants one
for every public method), while its body is a single line."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from client_sdk._core import ClientCore, ping_call, register_call
from client_sdk._flows import ClientFlows
from client_sdk._http import (
    AsyncLifecycle,
    AsyncSender,
    SyncLifecycle,
    SyncSender,
    TimeoutTypes,
)
from client_sdk._keys import KeyStore
from client_sdk._models import (
    Approval,
    ApprovalRequested,
    ClientInfo,
    ClientRegistration,
    CodePrompt,
    Device,
    LoginResult,
    OtpResult,
    Pairing,
    Ping,
    RecoveryCodes,
    RecoveryResult,
    WaitUntil,
)
from client_sdk._wire import DEFAULT_LONG_POLL, DEFAULT_RETRIES, MAX_WAIT, Call

__all__ = ["AsyncPnsClient", "PnsClient"]


class _Base:
    def __init__(
        self,
        base_url: str,
        token: str | None,
        key_store: KeyStore | None,
        long_poll_seconds: int,
    ) -> None:
        if not 1 <= long_poll_seconds <= MAX_WAIT:
            raise ValueError(f"long_poll_seconds must be 1..{MAX_WAIT}")
        self.base_url = base_url.rstrip("/")
        self._core = ClientCore(token, key_store)
        self._flows = ClientFlows(self._core, long_poll_seconds)

    @property
    def key_store(self) -> KeyStore:
        """The device public keys pinned so far (see `KeyStore`)."""
        return self._core.key_store

    @property
    def long_poll_seconds(self) -> int:
        """How long each long-poll asks the server to hold the answer (1..60 s)."""
        return self._flows.long_poll_seconds

    @long_poll_seconds.setter
    def long_poll_seconds(self, value: int) -> None:
        self._flows.long_poll_seconds = value

    def _approval_call(
        self,
        username: str,
        hostname: str | None,
        ip: str | None,
        action: str,
        message: str | None,
        ttl_seconds: int,
        number_matching: bool,
        idempotency_key: str | None,
    ) -> Call[ApprovalRequested]:
        return self._core.request_approval(
            username=username,
            hostname=hostname,
            ip=ip,
            action=action,
            message=message,
            ttl_seconds=ttl_seconds,
            number_matching=number_matching,
            idempotency_key=idempotency_key,
        )


class PnsClient(SyncLifecycle, _Base):
    """A blocking client for a backup-client installation.

        registration = PnsClient.register("https://pns.example.com", name="FILESRV01",
                                          edition="pro")
        with PnsClient("https://pns.example.com", token=registration.client_token,
                       key_store=KeyStore("pns-keys.json")) as client:
            pairing = client.start_pairing("app")
            show_qr(pairing.qr)
            pairing = client.wait_for_pairing(pairing.pairing_id)

    `timeout` is per request (long-polls get their `wait` on top of the read timeout);
    `retries` is how often idempotent requests are retried on connection failures.
    The client is safe to share between threads."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        key_store: KeyStore | None = None,
        timeout: TimeoutTypes = None,
        retries: int = DEFAULT_RETRIES,
        long_poll_seconds: int = DEFAULT_LONG_POLL,
        transport: httpx.BaseTransport | None = None,
        verify: bool | ssl.SSLContext = True,
    ) -> None:
        super().__init__(base_url, token, key_store, long_poll_seconds)
        self._sender = SyncSender(
            self.base_url,
            self._core.headers,
            timeout=timeout,
            retries=retries,
            transport=transport,
            verify=verify,
        )

    # -- service and registration --

    @classmethod
    def register(
        cls,
        base_url: str,
        *,
        name: str,
        edition: str,
        hostname: str | None = None,
        registration_key: str | None = None,
        timeout: TimeoutTypes = None,
        transport: httpx.BaseTransport | None = None,
        verify: bool | ssl.SSLContext = True,
    ) -> ClientRegistration:
        """Register this installation; keep `client_token` secret and reuse it.

        Example::

            reg = PnsClient.register(url, name="FILESRV01", edition="pro")
            client = PnsClient(url, token=reg.client_token)
        """
        with cls(base_url, timeout=timeout, transport=transport, verify=verify) as client:
            return client._send(register_call(name, edition, hostname, registration_key))

    def ping(self) -> Ping:
        """Reach the server and measure clock skew (TOTP and signatures need a fair clock).

        Example::

            if abs(client.ping().clock_skew) > 30:
                warn("fix this machine's clock")
        """
        return self._send(ping_call())

    def me(self) -> ClientInfo:
        """This installation's record (name, edition, device counts, push lock).

        Example::

            print(client.me().devices, "devices paired")
        """
        return self._send(self._core.me())

    # -- pairing and devices --

    def start_pairing(self, kind: str = "app", label: str | None = None) -> Pairing:
        """Start pairing a device (`kind` "app" or "totp"); show `qr_payload` as a QR code.

        For "app", `qr_payload` ends with `#k=<secret>`: a secret drawn here and kept in the
        `KeyStore` until the pairing completes; show it only on this machine's screen.

        Example::

            pairing = client.start_pairing("totp", label="Google Authenticator")
            show_qr(pairing.qr)
        """
        return self._send(self._core.start_pairing(kind, label))

    def get_pairing(self, pairing_id: str, wait: float = 0) -> Pairing:
        """A pairing's status; with `wait` (0..60 s) the server holds the answer until it
        changes.

        Example::

            status = client.get_pairing(pairing.pairing_id, wait=20).status
        """
        return self._send(self._core.get_pairing(pairing_id, wait))

    def wait_for_pairing(self, pairing_id: str, timeout: float | None = None) -> Pairing:
        """Long-poll until the pairing is completed or expired, or `timeout` seconds have
        passed (then the latest, still pending, state is returned).

        A completed app pairing's key is pinned when its key proof verifies with this
        pairing's QR secret (kept in the `KeyStore`); otherwise `KeyProofInvalid` (the relay
        substituted the key), `KeyProofMissing` (an app without key proofs) or
        `PairingSecretUnknown`.

        Example::

            device = client.wait_for_pairing(pairing.pairing_id, timeout=300).device
        """
        return self._run(self._flows.wait_for_pairing(pairing_id, timeout))

    def finish_pairings(self) -> list[Pairing]:
        """Pin the keys of the app pairings started with this `KeyStore` that completed
        since, and drop the expired ones.

        It checks every app pairing of the `KeyStore` that is still open (e.g. one started
        in another run with `pns-client pair --no-wait`): a completed one's device key is
        pinned once its key proof verifies. A `KeyProofError` is raised for the first
        pairing that cannot be pinned (it is not retried).

        Example::

            for pairing in client.finish_pairings():
                print(pairing.pairing_id, pairing.status, pairing.pinned)
        """
        return self._run(self._flows.finish_pairings())

    def confirm_totp_pairing(self, pairing_id: str, code: str) -> Device:
        """Activate a TOTP pairing with the first code the app shows.

        Example::

            device = client.confirm_totp_pairing(pairing.pairing_id, "123456")
        """
        return self._send(self._core.confirm_totp_pairing(pairing_id, code))

    def list_devices(self) -> list[Device]:
        """Every device of this installation, as the relay reports them (never pinned:
        only a pairing this client started pins a key).

        Example::

            for device in client.list_devices():
                print(device.name, device.push_status)
        """
        return self._send(self._core.list_devices())

    def remove_device(self, device_id: str) -> None:
        """Remove a device (its pending pushes are dropped).

        Example::

            client.remove_device(device.device_id)
        """
        self._send(self._core.remove_device(device_id))

    # -- codes --

    def verify_otp(self, code: str) -> OtpResult:
        """Check a one-time password against every active device.

        Example::

            try:
                client.verify_otp("123456")
            except OtpInvalid as exc:
                print(exc.attempts_left)
        """
        return self._send(self._core.verify_otp(code))

    def create_recovery_codes(self) -> RecoveryCodes:
        """Ten new single-use codes (the old ones stop working); show them once.

        Example::

            print("\n".join(client.create_recovery_codes().codes))
        """
        return self._send(self._core.create_recovery_codes())

    def verify_recovery_code(self, code: str) -> RecoveryResult:
        """Use a recovery code; each works once.

        Example::

            left = client.verify_recovery_code("abcd-efgh-ij").remaining
        """
        return self._send(self._core.verify_recovery_code(code))

    # -- approvals --

    def request_approval(
        self,
        *,
        username: str,
        hostname: str | None = None,
        ip: str | None = None,
        action: str = "login",
        message: str | None = None,
        ttl_seconds: int = 60,
        number_matching: bool = True,
        idempotency_key: str | None = None,
    ) -> ApprovalRequested:
        """Ask the user's phone to approve a login; show `match_code` on screen.

        Retries after network failures reuse the same Idempotency-Key (random unless
        given), so they never create a second approval.

        Example::

            req = client.request_approval(username="admin", hostname="FILESRV01")
            print("Type", req.match_code, "on your phone")
        """
        call = self._approval_call(
            username, hostname, ip, action, message, ttl_seconds, number_matching, idempotency_key
        )
        return self._send(call)

    def get_approval(
        self,
        approval_id: str,
        wait: float = 0,
        *,
        match_code: str | None = None,
        until: WaitUntil | None = None,
    ) -> Approval:
        """An approval's state; with `wait` (0..60 s) a long-poll.

        A long-poll on a pending approval returns on its decision, and also when its
        delivery counts change; with `until="final_or_failed"` only when every push failed,
        with `until="final"` on the decision alone.

        An `approved` answer is believed only if this client requested the approval and the
        device key it pinned at pairing signed this login's nonce and context, in time, with
        the match code shown (`match_code`, if given, must match too); otherwise
        `ApprovalSignatureError`.

        Example::

            if client.get_approval(req.approval_id, wait=20).approved:
                grant_access()
        """
        return self._run(self._flows.get_approval(approval_id, wait, match_code, until))

    def wait_for_approval(
        self,
        approval_id: str,
        timeout: float | None = None,
        on_progress: Callable[[Approval], Any] | None = None,
        *,
        match_code: str | None = None,
    ) -> Approval:
        """Long-poll until the approval is approved, rejected, expired or cancelled (or
        `timeout` seconds passed: then the latest pending state is returned).

        `on_progress` receives every new state, delivery counts included, so a UI can
        offer the one-time password as soon as `approval.delivery.all_failed`. Without
        it, each long-poll asks the relay to answer only with the decision (`until=final`):
        no request is spent on "push sent".

        Example::

            result = client.wait_for_approval(req.approval_id, timeout=60, on_progress=print)
            if result.approved:
                grant_access()
        """
        return self._run(
            self._flows.wait_for_approval(approval_id, timeout, on_progress, match_code)
        )

    def cancel_approval(self, approval_id: str) -> Approval:
        """Withdraw a pending approval (e.g. the user chose to type a code instead);
        `AlreadyDecided` if it was already answered.

        Example::

            approval = client.cancel_approval(req.approval_id)  # status "cancelled"
        """
        return self._send(self._core.cancel_approval(approval_id))

    def login(
        self,
        *,
        username: str,
        ask_code: Callable[[CodePrompt], str | None],
        show_match_code: Callable[[ApprovalRequested], Any] | None = None,
        on_progress: Callable[[Approval], Any] | None = None,
        use_code: threading.Event | None = None,
        hostname: str | None = None,
        ip: str | None = None,
        action: str = "login",
        message: str | None = None,
        ttl_seconds: int = 60,
        number_matching: bool = True,
        max_code_attempts: int = 3,
    ) -> LoginResult:
        """The whole second factor of a login: push first, one-time password as fallback.

        Sends a push approval and hands it to `show_match_code` (display its `match_code`),
        waits for the phone, and returns on a verified approval. On rejection, expiry,
        failed delivery, push being unavailable, or the user setting `use_code` (or any
        thread calling `cancel_approval`), it asks `ask_code` for a one-time password or a
        recovery code (up to `max_code_attempts` times) and verifies it. `ask_code`
        returning None or "" means the user gave up. `OtpLocked` propagates.

        Example::

            result = client.login(
                username="admin",
                show_match_code=lambda req: print("Type", req.match_code, "on your phone"),
                ask_code=lambda prompt: input(f"Code ({prompt.reason}): "),
            )
            if result.success: grant_access()
        """
        request = self._approval_call(
            username, hostname, ip, action, message, ttl_seconds, number_matching, None
        )
        login = self._flows.login(
            request,
            ask_code=ask_code,
            show_match_code=show_match_code,
            on_progress=on_progress,
            max_code_attempts=max_code_attempts,
        )
        return self._run(login, use_code)


class AsyncPnsClient(AsyncLifecycle, _Base):
    """The asyncio twin of `PnsClient`: the same methods, awaited.

        async with AsyncPnsClient(url, token=token) as client:
            pairing = await client.start_pairing("app")
            pairing = await client.wait_for_pairing(pairing.pairing_id)

    Callbacks given to `login` and `wait_for_approval` may be plain functions or
    coroutines."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        key_store: KeyStore | None = None,
        timeout: TimeoutTypes = None,
        retries: int = DEFAULT_RETRIES,
        long_poll_seconds: int = DEFAULT_LONG_POLL,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: bool | ssl.SSLContext = True,
    ) -> None:
        super().__init__(base_url, token, key_store, long_poll_seconds)
        self._sender = AsyncSender(
            self.base_url,
            self._core.headers,
            timeout=timeout,
            retries=retries,
            transport=transport,
            verify=verify,
        )

    @classmethod
    async def register(
        cls,
        base_url: str,
        *,
        name: str,
        edition: str,
        hostname: str | None = None,
        registration_key: str | None = None,
        timeout: TimeoutTypes = None,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: bool | ssl.SSLContext = True,
    ) -> ClientRegistration:
        """Register this installation; keep `client_token` secret and reuse it.

        Example::

            reg = await AsyncPnsClient.register(url, name="FILESRV01", edition="pro")
            client = AsyncPnsClient(url, token=reg.client_token)
        """
        async with cls(base_url, timeout=timeout, transport=transport, verify=verify) as client:
            return await client._send(register_call(name, edition, hostname, registration_key))

    async def ping(self) -> Ping:
        """Reach the server and measure clock skew (TOTP and signatures need a fair clock).

        Example::

            skew = (await client.ping()).clock_skew
        """
        return await self._send(ping_call())

    async def me(self) -> ClientInfo:
        """This installation's record (name, edition, device counts, push lock).

        Example::

            print((await client.me()).devices, "devices paired")
        """
        return await self._send(self._core.me())

    async def start_pairing(self, kind: str = "app", label: str | None = None) -> Pairing:
        """Start pairing a device (`kind` "app" or "totp"); show `qr_payload` as a QR code.

        See `PnsClient.start_pairing`.

        Example::

            pairing = await client.start_pairing("app")
            show_qr(pairing.qr)
        """
        return await self._send(self._core.start_pairing(kind, label))

    async def get_pairing(self, pairing_id: str, wait: float = 0) -> Pairing:
        """A pairing's status; with `wait` (0..60 s) the server holds the answer until it
        changes.

        Example::

            status = (await client.get_pairing(pairing.pairing_id, wait=20)).status
        """
        return await self._send(self._core.get_pairing(pairing_id, wait))

    async def wait_for_pairing(self, pairing_id: str, timeout: float | None = None) -> Pairing:
        """Long-poll until the pairing is completed or expired, or `timeout` seconds have
        passed (then the latest, still pending, state is returned).

        See `PnsClient.wait_for_pairing`.

        Example::

            device = (await client.wait_for_pairing(pairing.pairing_id, timeout=300)).device
        """
        return await self._run(self._flows.wait_for_pairing(pairing_id, timeout))

    async def finish_pairings(self) -> list[Pairing]:
        """Pin the keys of the app pairings started with this `KeyStore` that completed
        since, and drop the expired ones.

        See `PnsClient.finish_pairings`.

        Example::

            pairings = await client.finish_pairings()
        """
        return await self._run(self._flows.finish_pairings())

    async def confirm_totp_pairing(self, pairing_id: str, code: str) -> Device:
        """Activate a TOTP pairing with the first code the app shows.

        Example::

            device = await client.confirm_totp_pairing(pairing.pairing_id, "123456")
        """
        return await self._send(self._core.confirm_totp_pairing(pairing_id, code))

    async def list_devices(self) -> list[Device]:
        """Every device of this installation, as the relay reports them (never pinned:
        only a pairing this client started pins a key).

        Example::

            for device in await client.list_devices():
                print(device.name, device.push_status)
        """
        return await self._send(self._core.list_devices())

    async def remove_device(self, device_id: str) -> None:
        """Remove a device (its pending pushes are dropped).

        Example::

            await client.remove_device(device.device_id)
        """
        await self._send(self._core.remove_device(device_id))

    async def verify_otp(self, code: str) -> OtpResult:
        """Check a one-time password against every active device.

        Example::

            result = await client.verify_otp("123456")
        """
        return await self._send(self._core.verify_otp(code))

    async def create_recovery_codes(self) -> RecoveryCodes:
        """Ten new single-use codes (the old ones stop working); show them once.

        Example::

            codes = (await client.create_recovery_codes()).codes
        """
        return await self._send(self._core.create_recovery_codes())

    async def verify_recovery_code(self, code: str) -> RecoveryResult:
        """Use a recovery code; each works once.

        Example::

            left = (await client.verify_recovery_code("abcd-efgh-ij")).remaining
        """
        return await self._send(self._core.verify_recovery_code(code))

    async def request_approval(
        self,
        *,
        username: str,
        hostname: str | None = None,
        ip: str | None = None,
        action: str = "login",
        message: str | None = None,
        ttl_seconds: int = 60,
        number_matching: bool = True,
        idempotency_key: str | None = None,
    ) -> ApprovalRequested:
        """Ask the user's phone to approve a login; show `match_code` on screen.

        See `PnsClient.request_approval`.

        Example::

            req = await client.request_approval(username="admin", hostname="FILESRV01")
            print("Type", req.match_code, "on your phone")
        """
        call = self._approval_call(
            username, hostname, ip, action, message, ttl_seconds, number_matching, idempotency_key
        )
        return await self._send(call)

    async def get_approval(
        self,
        approval_id: str,
        wait: float = 0,
        *,
        match_code: str | None = None,
        until: WaitUntil | None = None,
    ) -> Approval:
        """An approval's state; with `wait` (0..60 s) a long-poll.

        See `PnsClient.get_approval`.

        Example::

            approval = await client.get_approval(req.approval_id, wait=20)
        """
        return await self._run(self._flows.get_approval(approval_id, wait, match_code, until))

    async def wait_for_approval(
        self,
        approval_id: str,
        timeout: float | None = None,
        on_progress: Callable[[Approval], Any] | None = None,
        *,
        match_code: str | None = None,
    ) -> Approval:
        """Long-poll until the approval is approved, rejected, expired or cancelled (or
        `timeout` seconds passed: then the latest pending state is returned).

        See `PnsClient.wait_for_approval`; `on_progress` may be a coroutine function.

        Example::

            result = await client.wait_for_approval(req.approval_id, on_progress=print)
        """
        return await self._run(
            self._flows.wait_for_approval(approval_id, timeout, on_progress, match_code)
        )

    async def cancel_approval(self, approval_id: str) -> Approval:
        """Withdraw a pending approval (e.g. the user chose to type a code instead);
        `AlreadyDecided` if it was already answered.

        Example::

            approval = await client.cancel_approval(req.approval_id)
        """
        return await self._send(self._core.cancel_approval(approval_id))

    async def login(
        self,
        *,
        username: str,
        ask_code: Callable[[CodePrompt], str | Awaitable[str | None] | None],
        show_match_code: Callable[[ApprovalRequested], Any] | None = None,
        on_progress: Callable[[Approval], Any] | None = None,
        use_code: asyncio.Event | None = None,
        hostname: str | None = None,
        ip: str | None = None,
        action: str = "login",
        message: str | None = None,
        ttl_seconds: int = 60,
        number_matching: bool = True,
        max_code_attempts: int = 3,
    ) -> LoginResult:
        """The whole second factor of a login: push first, one-time password as fallback.

        See `PnsClient.login`; here `use_code` is an `asyncio.Event`, and the callbacks may
        be coroutine functions.

        Example::

            result = await client.login(
                username="admin", show_match_code=show, ask_code=prompt_for_code
            )
        """
        request = self._approval_call(
            username, hostname, ip, action, message, ttl_seconds, number_matching, None
        )
        login = self._flows.login(
            request,
            ask_code=ask_code,
            show_match_code=show_match_code,
            on_progress=on_progress,
            max_code_attempts=max_code_attempts,
        )
        return await self._run(login, use_code)
