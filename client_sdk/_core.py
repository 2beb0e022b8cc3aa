"""The no-I/O core: every request is built and every response parsed here.

`PnsClient`, `AsyncPnsClient`, `DeviceClient` and `AsyncDeviceClient` only move the
`ApiRequest`s built here over the network and hand the answers back to `Call.parse`, so
the two twins cannot drift apart and everything here is testable without a server."""

from __future__ import annotations

import json
import logging
import random
import re
import secrets
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import parse_qs, quote, urlparse

import httpx

from client_sdk._exceptions import (
    ApprovalSignatureError,
    ConnectError,
    KeyProofError,
    KeyProofInvalid,
    KeyProofMissing,
    PairingSecretUnknown,
    RequestTimeout,
    TransportError,
    UnexpectedResponse,
    error_class_for,
)
from client_sdk._keys import (
    PAIRING_SECRET_BYTES,
    KeyStore,
    b64url,
    b64url_decode,
    context_sha256,
    same_public_key,
    verify_approval_signature,
    verify_key_proof,
)
from client_sdk._models import (
    Approval,
    ApprovalRequested,
    ApprovalResponse,
    ClientInfo,
    ClientRegistration,
    Delivery,
    Device,
    DeviceApproval,
    DeviceDecision,
    OtpResult,
    Pairing,
    Ping,
    RecoveryCodes,
    RecoveryResult,
    TotpParameters,
)

T = TypeVar("T")
RetryMode = Literal["never", "connect", "always"]

SDK_VERSION = "0.1.0"
USER_AGENT = f"pns-client-sdk/{SDK_VERSION}"
MAX_WAIT = 60
# Long-polls are cut into waits this long: well under the 60 s idle timeout of common proxies.
DEFAULT_LONG_POLL = 25
DEFAULT_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
DEFAULT_RETRIES = 2
_REMEMBERED_APPROVALS = 64
CLIENT_NONCE_BYTES = 32
# How far a phone's signed timestamp may sit outside the login's own window (clock skew).
SIGNED_TIME_SLACK = 120.0

logger = logging.getLogger("client_sdk")


# --- requests and replies -------------------------------------------------------------


@dataclass(frozen=True)
class ApiRequest:
    """One HTTP request, described. `wait` is the long-poll the server may hold it for."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    wait: float = 0.0
    retry: RetryMode = "never"


@dataclass(frozen=True)
class Reply:
    """A response plus the local wall-clock times (epoch seconds) around the exchange."""

    response: httpx.Response
    sent_at: float
    received_at: float


@dataclass(frozen=True)
class Call(Generic[T]):
    request: ApiRequest
    parse: Callable[[Reply], T]


def timeout_for(request: ApiRequest, base: httpx.Timeout) -> httpx.Timeout:
    """The read timeout must outlast the long-poll the server was asked to hold."""
    if request.wait <= 0 or base.read is None:
        return base
    return httpx.Timeout(
        connect=base.connect, read=base.read + request.wait, write=base.write, pool=base.pool
    )


def should_retry(
    request: ApiRequest, error: httpx.TransportError, attempt: int, limit: int
) -> bool:
    """GETs are retried only when nothing reached the server; a request carrying an
    Idempotency-Key may be retried after any transport failure (the server dedupes it)."""
    if attempt >= limit or request.retry == "never":
        return False
    if request.retry == "always":
        return True
    return isinstance(error, httpx.ConnectError | httpx.ConnectTimeout)


MAX_RETRY_AFTER = 5.0  # seconds: a longer wait is the caller's call, not a hidden stall


def retry_after_unavailable(request: ApiRequest, response: httpx.Response) -> float | None:
    """Seconds to wait before the one retry of a call the relay answered `503` with a
    short `Retry-After` (its database was busy or briefly down); None = do not retry.
    Only calls safe to repeat are retried: reads, and writes carrying an Idempotency-Key."""
    if response.status_code != 503 or request.retry == "never":
        return None
    delay = _retry_after(response)
    if delay is None or delay > MAX_RETRY_AFTER:
        return None
    return delay


def backoff(attempt: int) -> float:
    """Seconds to sleep before retry number `attempt` (0-based): 0.2, 0.4, 0.8 ... capped."""
    return min(0.2 * 2.0**attempt, 2.0) * random.uniform(0.5, 1.0)


def transport_error(error: httpx.TransportError) -> TransportError:
    name = type(error).__name__
    if isinstance(error, httpx.TimeoutException):
        return RequestTimeout(f"timed out talking to the PNS server ({name})")
    if isinstance(error, httpx.ConnectError):
        return ConnectError(f"cannot connect to the PNS server: {error}")
    return TransportError(f"network error talking to the PNS server ({name}): {error}")


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def raise_for_problem(response: httpx.Response) -> None:
    """Raise the mapped `ApiError` for a 4xx/5xx answer."""
    status = response.status_code
    if status < 400:
        return
    problem: dict[str, Any] = {}
    try:
        body = response.json()
        if isinstance(body, dict):
            problem = body
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    code = problem.get("code")
    code = code if isinstance(code, str) else ""
    detail = problem.get("detail")
    if not isinstance(detail, str):
        detail = response.reason_phrase or "error"
    cls = error_class_for(code, status)
    raise cls(status, code, detail, problem, retry_after=_retry_after(response))


def json_body(reply: Reply, expect: int | tuple[int, ...] = 200) -> dict[str, Any]:
    response = reply.response
    raise_for_problem(response)
    wanted = (expect,) if isinstance(expect, int) else expect
    if response.status_code not in wanted:
        raise UnexpectedResponse(
            f"expected HTTP {wanted}, got {response.status_code}", status=response.status_code
        )
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UnexpectedResponse(
            "the server's answer is not JSON", status=response.status_code
        ) from exc
    if not isinstance(body, dict):
        raise UnexpectedResponse("the server's answer is not a JSON object", status=200)
    return body


def no_content(reply: Reply) -> None:
    raise_for_problem(reply.response)
    if reply.response.status_code not in (200, 202, 204):
        raise UnexpectedResponse(
            f"unexpected HTTP {reply.response.status_code}", status=reply.response.status_code
        )


# --- field readers ------------------------------------------------------------------


def _bad(name: str) -> UnexpectedResponse:
    return UnexpectedResponse(f"the server's answer has a missing or invalid {name!r}", status=200)


def _str(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str):
        raise _bad(name)
    return value


def _opt_str(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise _bad(name)
    return value


def _int(data: Mapping[str, Any], name: str, default: int | None = None) -> int:
    value = data.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(name)
    return value


def _bool(data: Mapping[str, Any], name: str, default: bool) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise _bad(name)
    return value


def parse_time(value: str) -> datetime:
    """RFC 3339 (with Z or an offset, any fraction) to an aware UTC datetime."""
    parsed = datetime.fromisoformat(value.strip().replace("z", "Z"))
    if parsed.tzinfo is None:
        raise ValueError("timestamp without a timezone")
    return parsed.astimezone(UTC)


def _time(data: Mapping[str, Any], name: str) -> datetime:
    try:
        return parse_time(_str(data, name))
    except ValueError as exc:
        raise _bad(name) from exc


def _opt_time(data: Mapping[str, Any], name: str) -> datetime | None:
    return None if data.get(name) is None else _time(data, name)


def _obj(data: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    value = data.get(name)
    if value is not None and not isinstance(value, dict):
        raise _bad(name)
    return value


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with a Z, whole seconds."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- model parsers ----------------------------------------------------------------


def parse_device(data: Mapping[str, Any]) -> Device:
    return Device(
        device_id=_str(data, "device_id"),
        kind=_str(data, "kind"),
        name=_str(data, "name"),
        platform=_opt_str(data, "platform"),
        os_version=_opt_str(data, "os_version"),
        push=_opt_str(data, "push"),
        push_status=_opt_str(data, "push_status") or "none",
        public_key=_opt_str(data, "public_key"),
        created_at=_time(data, "created_at"),
        last_used_at=_opt_time(data, "last_used_at"),
        key_proof=_opt_str(data, "key_proof"),
    )


def parse_pairing(data: Mapping[str, Any]) -> Pairing:
    device = _obj(data, "device")
    return Pairing(
        pairing_id=_str(data, "pairing_id"),
        kind=_str(data, "kind"),
        status=_str(data, "status"),
        expires_at=_time(data, "expires_at"),
        device=parse_device(device) if device is not None else None,
        qr_payload=_opt_str(data, "qr_payload"),
        otpauth_uri=_opt_str(data, "otpauth_uri"),
        qr_link=_opt_str(data, "qr_link"),
    )


def parse_approval(data: Mapping[str, Any]) -> Approval:
    response = _obj(data, "response")
    delivery = _obj(data, "delivery")
    return Approval(
        approval_id=_str(data, "approval_id"),
        status=_str(data, "status"),
        reason=_opt_str(data, "reason"),
        created_at=_time(data, "created_at"),
        expires_at=_time(data, "expires_at"),
        decided_at=_opt_time(data, "decided_at"),
        device_id=_opt_str(data, "device_id"),
        response=ApprovalResponse(
            decision=_str(response, "decision"),
            match_code=_opt_str(response, "match_code"),
            timestamp=_str(response, "timestamp"),
            signature=_str(response, "signature"),
            public_key=_opt_str(response, "public_key"),
            version=_opt_str(response, "version"),
        )
        if response is not None
        else None,
        delivery=Delivery(
            queued=_int(delivery, "queued", 0),
            sent=_int(delivery, "sent", 0),
            failed=_int(delivery, "failed", 0),
            last_error=_opt_str(delivery, "last_error"),
        )
        if delivery is not None
        else None,
    )


def parse_device_approval(data: Mapping[str, Any]) -> DeviceApproval:
    return DeviceApproval(
        approval_id=_str(data, "approval_id"),
        status=_str(data, "status"),
        created_at=_time(data, "created_at"),
        expires_at=_time(data, "expires_at"),
        client_name=_opt_str(data, "client_name"),
        context=_obj(data, "context") or {},
        number_matching=_bool(data, "number_matching", True),
        client_nonce=_opt_str(data, "client_nonce"),
    )


def _wait_param(wait: float) -> int:
    if wait < 0 or wait > MAX_WAIT:
        raise ValueError(f"wait must be between 0 and {MAX_WAIT} seconds")
    return int(wait)


def _path_id(value: str) -> str:
    if not value:
        raise ValueError("an id must not be empty")
    return quote(value, safe="")


# --- the backup client's calls --------------------------------------------------------


def register_call(
    name: str, edition: str, hostname: str | None, registration_key: str | None
) -> Call[ClientRegistration]:
    body: dict[str, Any] = {"name": name, "edition": edition}
    if hostname is not None:
        body["hostname"] = hostname
    if registration_key is not None:
        body["registration_key"] = registration_key

    def parse(reply: Reply) -> ClientRegistration:
        data = json_body(reply, 201)
        return ClientRegistration(
            client_id=_str(data, "client_id"),
            client_token=_str(data, "client_token"),
            edition=_str(data, "edition"),
        )

    return Call(ApiRequest("POST", "/v1/clients", json=body), parse)


def ping_call() -> Call[Ping]:
    def parse(reply: Reply) -> Ping:
        data = json_body(reply)
        server_time = _time(data, "time")
        midpoint = (reply.sent_at + reply.received_at) / 2
        return Ping(
            server_time=server_time,
            clock_skew=server_time.timestamp() - midpoint,
            round_trip=max(0.0, reply.received_at - reply.sent_at),
            version=_str(data, "version"),
        )

    return Call(ApiRequest("GET", "/v1/ping", retry="connect"), parse)


@dataclass(frozen=True)
class Expected:
    """What this client knows about an approval it created: the phone's signed answer must
    match all of it. Times are this machine's epoch seconds."""

    approval_id: str
    client_nonce: str
    context_hash: str
    match_code: str | None
    not_before: float
    not_after: float


def login_context(
    username: str, hostname: str | None, ip: str | None, action: str, message: str | None
) -> dict[str, str | None]:
    return {
        "username": username,
        "hostname": hostname,
        "ip": ip,
        "action": action,
        "message": message,
    }


class ClientCore:
    """Builds the backup client's calls; pins device keys through key proofs at pairings it
    started, and checks approvals against what it asked for."""

    def __init__(self, token: str | None, key_store: KeyStore | None = None) -> None:
        self.token = token
        self.key_store = key_store if key_store is not None else KeyStore()
        self._expected: OrderedDict[str, Expected] = OrderedDict()
        self._lock = threading.Lock()

    def headers(self) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    # -- clients and devices --

    def me(self) -> Call[ClientInfo]:
        def parse(reply: Reply) -> ClientInfo:
            data = json_body(reply)
            return ClientInfo(
                client_id=_str(data, "client_id"),
                name=_str(data, "name"),
                edition=_str(data, "edition"),
                hostname=_opt_str(data, "hostname"),
                created_at=_time(data, "created_at"),
                devices=_int(data, "devices", 0),
                push_devices=_int(data, "push_devices", 0),
                locked_until=_opt_time(data, "locked_until"),
            )

        return Call(ApiRequest("GET", "/v1/client", retry="connect"), parse)

    def start_pairing(self, kind: str, label: str | None) -> Call[Pairing]:
        if kind not in ("app", "totp"):
            raise ValueError('kind must be "app" or "totp"')
        body: dict[str, Any] = {"kind": kind}
        if label is not None:
            body["label"] = label

        def parse(reply: Reply) -> Pairing:
            pairing = parse_pairing(json_body(reply, 201))
            if kind != "app":
                return pairing
            payload = pairing.qr_payload
            if not payload or "#" in payload:
                raise UnexpectedResponse(
                    "the server's pairing code is missing or already carries a fragment",
                    status=reply.response.status_code,
                )
            # The secret lives in the QR code's fragment: shown on this machine's screen,
            # read by the phone's camera, never sent to the relay.
            secret = secrets.token_bytes(PAIRING_SECRET_BYTES)
            self.key_store.remember_pairing(pairing.pairing_id, secret, pairing.expires_at)
            link = pairing.qr_link
            if link is not None:
                if not same_pairing(link, payload):
                    raise UnexpectedResponse(
                        "the server's pairing link does not match its pairing code",
                        status=reply.response.status_code,
                    )
                link = f"{link}&k={b64url(secret)}"
            return replace(pairing, qr_payload=f"{payload}#k={b64url(secret)}", qr_link=link)

        return Call(ApiRequest("POST", "/v1/pairings", json=body), parse)

    def get_pairing(self, pairing_id: str, wait: float) -> Call[Pairing]:
        def parse(reply: Reply) -> Pairing:
            pairing = parse_pairing(json_body(reply))
            if pairing.pairing_id != pairing_id:
                raise UnexpectedResponse(
                    f"asked for pairing {pairing_id!r}, the server answered about "
                    f"{pairing.pairing_id!r}",
                    status=reply.response.status_code,
                )
            return self.complete_pairing(pairing)

        request = ApiRequest(
            "GET",
            f"/v1/pairings/{_path_id(pairing_id)}",
            params={"wait": _wait_param(wait)},
            wait=_wait_param(wait),
            retry="connect",
        )
        return Call(request, parse)

    def complete_pairing(self, pairing: Pairing) -> Pairing:
        """Pin a completed app pairing's device key if, and only if, its key proof verifies
        with the QR secret this client drew for that pairing."""
        if pairing.status == "expired":
            self.key_store.forget_pairing(pairing.pairing_id)
            return pairing
        device = pairing.device
        if pairing.status != "completed" or device is None or device.kind != "app":
            return pairing
        pinned = self.key_store.get(device.device_id)
        if pinned is not None and device.public_key and same_public_key(pinned, device.public_key):
            self.key_store.forget_pairing(pairing.pairing_id)
            return replace(pairing, pinned=True)
        secret = self.key_store.pairing_secret(pairing.pairing_id)
        problem = self._key_problem(pairing, secret, pinned)
        if problem is not None:
            self.key_store.forget_pairing(pairing.pairing_id)  # completed: it cannot recover
            if isinstance(problem, KeyProofInvalid):
                logger.error("pns: the relay may be compromised: %s", problem)
            else:
                logger.warning("pns: device key not pinned: %s", problem)
            raise problem
        assert device.public_key is not None
        self.key_store.pin(device.device_id, device.public_key)
        self.key_store.forget_pairing(pairing.pairing_id)
        return replace(pairing, pinned=True)

    def _key_problem(
        self, pairing: Pairing, secret: bytes | None, pinned: str | None
    ) -> KeyProofError | None:
        device = pairing.device
        assert device is not None
        ids = {"pairing_id": pairing.pairing_id, "device_id": device.device_id}
        if pinned is not None:
            return KeyProofInvalid(
                f"the relay reports another key for device {device.device_id} than the one "
                "pinned at its pairing",
                **ids,
            )
        if secret is None:
            return PairingSecretUnknown(
                f"pairing {pairing.pairing_id} completed, but this client holds no QR secret "
                "for it (it was started elsewhere, or the KeyStore lost it): start a new "
                "pairing from this client",
                **ids,
            )
        if not device.public_key:
            return KeyProofInvalid(
                f"app device {device.device_id} comes without a public key", **ids
            )
        if not device.key_proof:
            return KeyProofMissing(
                f"device {device.device_id} ({device.name!r}) sent no key proof: its app "
                "predates key proofs, so its key cannot be trusted; update the app, remove "
                "the device and pair again",
                **ids,
            )
        if not verify_key_proof(secret, device.public_key, device.key_proof):
            return KeyProofInvalid(
                f"the key reported for device {device.device_id} does not match the proof "
                "made with this pairing's QR secret: it was substituted on the way",
                **ids,
            )
        return None

    def confirm_totp_pairing(self, pairing_id: str, code: str) -> Call[Device]:
        def parse(reply: Reply) -> Device:
            device = _obj(json_body(reply), "device")
            if device is None:
                raise _bad("device")
            return parse_device(device)

        return Call(
            ApiRequest("POST", f"/v1/pairings/{_path_id(pairing_id)}/confirm", json={"code": code}),
            parse,
        )

    def list_devices(self) -> Call[list[Device]]:
        # Never pins: a device the relay lists is only the relay's word.
        def parse(reply: Reply) -> list[Device]:
            items = json_body(reply).get("devices")
            if not isinstance(items, list):
                raise _bad("devices")
            return [parse_device(item) for item in items if isinstance(item, dict)]

        return Call(ApiRequest("GET", "/v1/devices", retry="connect"), parse)

    def remove_device(self, device_id: str) -> Call[None]:
        def parse(reply: Reply) -> None:
            no_content(reply)
            self.key_store.forget(device_id)

        return Call(ApiRequest("DELETE", f"/v1/devices/{_path_id(device_id)}"), parse)

    # -- codes --

    def verify_otp(self, code: str) -> Call[OtpResult]:
        def parse(reply: Reply) -> OtpResult:
            data = json_body(reply)
            return OtpResult(result=_str(data, "result"), device_id=_opt_str(data, "device_id"))

        return Call(ApiRequest("POST", "/v1/otp/verify", json={"code": code}), parse)

    def create_recovery_codes(self) -> Call[RecoveryCodes]:
        def parse(reply: Reply) -> RecoveryCodes:
            codes = json_body(reply, (200, 201)).get("codes")
            if not isinstance(codes, list) or not all(isinstance(c, str) for c in codes):
                raise _bad("codes")
            return RecoveryCodes(codes=tuple(codes))

        return Call(ApiRequest("POST", "/v1/recovery-codes"), parse)

    def verify_recovery_code(self, code: str) -> Call[RecoveryResult]:
        def parse(reply: Reply) -> RecoveryResult:
            data = json_body(reply)
            return RecoveryResult(result=_str(data, "result"), remaining=_int(data, "remaining"))

        return Call(ApiRequest("POST", "/v1/recovery-codes/verify", json={"code": code}), parse)

    # -- approvals --

    def request_approval(
        self,
        *,
        username: str,
        hostname: str | None,
        ip: str | None,
        action: str,
        message: str | None,
        ttl_seconds: int,
        number_matching: bool,
        idempotency_key: str | None,
    ) -> Call[ApprovalRequested]:
        key = idempotency_key or str(uuid.uuid4())
        # Drawn once per call, so a retry (same Idempotency-Key) sends the same nonce.
        nonce = b64url(secrets.token_bytes(CLIENT_NONCE_BYTES))
        context_hash = context_sha256(login_context(username, hostname, ip, action, message))
        body: dict[str, Any] = {
            "username": username,
            "action": action,
            "ttl_seconds": ttl_seconds,
            "number_matching": number_matching,
            "client_nonce": nonce,
        }
        for name, value in (("hostname", hostname), ("ip", ip), ("message", message)):
            if value is not None:
                body[name] = value

        def parse(reply: Reply) -> ApprovalRequested:
            data = json_body(reply, (200, 201))
            requested = ApprovalRequested(
                approval_id=_str(data, "approval_id"),
                status=_str(data, "status"),
                expires_at=_time(data, "expires_at"),
                match_code=_opt_str(data, "match_code"),
                devices_notified=_int(data, "devices_notified", 0),
                idempotency_key=key,
                client_nonce=nonce,
            )
            # The window a genuine answer is signed in, by this machine's clock: the relay's
            # expiry, never more than the TTL we asked for.
            expires = min(requested.expires_at.timestamp(), reply.received_at + ttl_seconds)
            self._remember(
                Expected(
                    approval_id=requested.approval_id,
                    client_nonce=nonce,
                    context_hash=context_hash,
                    match_code=requested.match_code,
                    not_before=reply.sent_at - SIGNED_TIME_SLACK,
                    not_after=expires + SIGNED_TIME_SLACK,
                )
            )
            return requested

        request = ApiRequest(
            "POST", "/v1/approvals", json=body, headers={"Idempotency-Key": key}, retry="always"
        )
        return Call(request, parse)

    def _remember(self, expected: Expected) -> None:
        with self._lock:
            # A relay handing back an earlier approval's id overwrites what we knew of it:
            # its old answer then carries the wrong nonce.
            self._expected.pop(expected.approval_id, None)
            self._expected[expected.approval_id] = expected
            while len(self._expected) > _REMEMBERED_APPROVALS:
                self._expected.popitem(last=False)

    def expected(self, approval_id: str) -> Expected | None:
        with self._lock:
            return self._expected.get(approval_id)

    def get_approval(self, approval_id: str, wait: float) -> Call[Approval]:
        request = ApiRequest(
            "GET",
            f"/v1/approvals/{_path_id(approval_id)}",
            params={"wait": _wait_param(wait)},
            wait=_wait_param(wait),
            retry="connect",
        )
        return Call(request, lambda reply: parse_approval(json_body(reply)))

    def cancel_approval(self, approval_id: str) -> Call[Approval]:
        def parse(reply: Reply) -> Approval:
            data = json_body(reply)
            if "created_at" in data:
                return parse_approval(data)
            # A server answering only {"approval_id", "status"}: fill what we know.
            now = datetime.now(UTC)
            return Approval(
                approval_id=_str(data, "approval_id"),
                status=_str(data, "status"),
                reason=_opt_str(data, "reason"),
                created_at=now,
                expires_at=now,
                decided_at=_opt_time(data, "decided_at"),
                device_id=None,
                response=None,
                delivery=None,
            )

        return Call(ApiRequest("DELETE", f"/v1/approvals/{_path_id(approval_id)}"), parse)

    # -- checking answers --

    def check_approval(
        self,
        approval: Approval,
        approval_id: str,
        *,
        match_code: str | None = None,
    ) -> Approval:
        """Believe an `approved` only when this client created `approval_id`, and the
        pinned key of the answering device signed pns-approval-v2 over this client's nonce
        and login context, within the login's time window, deciding approve with the code
        that was shown. Anything else raises `ApprovalSignatureError` (and logs that the
        relay may be compromised). A rejection grants nothing: it is marked verified when
        it checks out and returned as it is otherwise."""
        if approval.approval_id != approval_id:
            raise self._forged(
                approval,
                "approval_id",
                f"the relay answered with approval {approval.approval_id!r} when asked about "
                f"{approval_id!r}",
            )
        if approval.status not in ("approved", "rejected"):
            return approval
        expected = self.expected(approval_id)
        try:
            self._check_signed(approval, expected)
        except ApprovalSignatureError:
            if approval.status == "rejected":
                return approval
            raise
        if approval.status == "rejected":
            return replace(approval, verified=True)
        assert expected is not None and approval.response is not None
        self._check_decision(approval, expected, match_code)
        return replace(approval, verified=True)

    def _check_signed(self, approval: Approval, expected: Expected | None) -> None:
        quiet = approval.status != "approved"  # a failed rejection is no attack on the login
        response = approval.response

        def forged(check: str, why: str) -> ApprovalSignatureError:
            return self._forged(approval, check, why, log=not quiet)

        if expected is None:
            raise forged(
                "unknown_approval",
                "this client did not request it (or not in this process): only an approval "
                "requested here can be checked",
            )
        if response is None:
            raise forged("response", "it carries no signed device response")
        if not approval.device_id:
            raise forged("device", "it names no device")
        pinned = self.key_store.get(approval.device_id)
        if pinned is None:
            raise forged(
                "device",
                f"device {approval.device_id} has no key pinned through a key proof at a "
                "pairing this client started",
            )
        if response.public_key and not same_public_key(pinned, response.public_key):
            raise forged("key", "the relay reports another key than the one pinned at pairing")
        signed = (
            pinned,
            response.signature,
            approval.approval_id,
            response.decision,
            response.match_code,
            response.timestamp,
        )
        if not verify_approval_signature(*signed, expected.client_nonce, expected.context_hash):
            why = (
                "it is a pns-approval-v1 signature where pns-approval-v2 (with this login's "
                "nonce and context) is due"
                if verify_approval_signature(*signed)
                else "its signature by the pinned key does not cover this login's nonce and "
                "context (pns-approval-v2)"
            )
            raise forged("signature", why)

    def _check_decision(
        self,
        approval: Approval,
        expected: Expected,
        match_code: str | None,
    ) -> None:
        response = approval.response
        assert response is not None
        if response.decision != "approve":
            raise self._forged(approval, "decision", f"the device answered {response.decision!r}")
        try:
            signed_at = parse_time(response.timestamp).timestamp()
        except ValueError:
            signed_at = None
        if signed_at is None or not expected.not_before <= signed_at <= expected.not_after:
            raise self._forged(
                approval,
                "timestamp",
                f"it was signed at {response.timestamp!r}, outside this login's window",
            )
        typed = response.match_code or ""
        if typed != (expected.match_code or "") or (match_code is not None and typed != match_code):
            raise self._forged(
                approval, "match_code", "the device typed a different match code than the one shown"
            )

    def _forged(
        self, approval: Approval, check: str, why: str, *, log: bool = True
    ) -> ApprovalSignatureError:
        message = (
            f"approval {approval.approval_id} is {approval.status} but {why}; the relay or "
            "its database may be compromised"
        )
        if log:
            logger.error("pns: the relay may be compromised (%s check failed): %s", check, message)
        return ApprovalSignatureError(
            message, approval_id=approval.approval_id, device_id=approval.device_id, check=check
        )


# --- login helper rules ---------------------------------------------------------------


def fallback_reason(approval: Approval) -> str | None:
    """Why a push login cannot succeed any more, or None while it still can."""
    if approval.status == "approved":
        return None
    if approval.status == "rejected":
        return "rejected"
    if approval.status == "expired":
        return "expired"
    if approval.status == "cancelled":
        return "cancelled"
    if approval.delivery is not None and approval.delivery.all_failed:
        return "delivery_failed"
    return None


_OTP_SHAPE = re.compile(r"^\d{6,8}$")


def is_otp_shaped(code: str) -> bool:
    """OTPs are 6-8 digits; anything else a user types at the prompt is a recovery code."""
    return bool(_OTP_SHAPE.match(code.replace(" ", "")))


def normalise_otp(code: str) -> str:
    return code.replace(" ", "")


# --- the device's calls ---------------------------------------------------------------


def pairing_params(code: str) -> tuple[dict[str, list[str]], bool]:
    """The parameters of either pairing form, and whether it is the https link:
    `pns://pair?server=..&token=..#k=..` or `https://<relay>/app/pair#server=..&token=..&k=..`
    (one parser for both; the names are the same)."""
    parsed = urlparse(code.strip())
    if parsed.scheme == "pns" and parsed.netloc == "pair":
        return parse_qs(parsed.query), False
    if parsed.scheme in ("http", "https") and parsed.path.endswith("/app/pair"):
        if parsed.query:
            raise ValueError("a pairing link carries its parameters in the fragment only")
        return parse_qs(parsed.fragment, keep_blank_values=True), True
    raise ValueError("not a PNS pairing code (expected pns://pair?... or https://.../app/pair#...)")


def parse_qr_payload(qr_payload: str) -> tuple[str, str]:
    """A pairing code or link -> (server URL, pairing token). `pairing_secret_of` reads the
    secret."""
    query, _ = pairing_params(qr_payload)
    servers, tokens = query.get("server", []), query.get("token", [])
    if len(servers) != 1 or len(tokens) != 1 or not tokens[0]:
        raise ValueError("the pairing code must carry exactly one server and one token")
    server = servers[0]
    if urlparse(server).scheme not in ("http", "https"):
        raise ValueError("the pairing code's server is not an http(s) URL")
    return server.rstrip("/"), tokens[0]


def same_pairing(link: str, qr_payload: str) -> bool:
    """The relay's link carries the server and token of its pairing code, and no secret."""
    try:
        params, is_link = pairing_params(link)
        return (
            is_link and "k" not in params and parse_qr_payload(link) == parse_qr_payload(qr_payload)
        )
    except ValueError:
        return False


def pairing_secret_of(qr_payload: str) -> bytes | None:
    """The 32-byte secret in a pairing code's `#k=` fragment (or the link's `k` parameter);
    None when it has none (a client that predates key proofs). A malformed fragment is a
    ValueError: the code was damaged or tampered with, and guessing would only make the
    proof fail later."""
    params, is_link = pairing_params(qr_payload)
    if is_link:
        values = params.get("k", [])
        if not values:
            return None
        if len(values) != 1 or set(params) != {"server", "token", "k"}:
            raise ValueError("the pairing link must carry server, token and k exactly once")
    else:
        fragment = urlparse(qr_payload.strip()).fragment
        if not fragment:
            return None
        values = parse_qs(fragment, keep_blank_values=True).get("k", [])
        if len(values) != 1 or fragment != f"k={values[0]}":
            raise ValueError("the pairing code's fragment must be exactly #k=<secret>")
    secret = b64url_decode(values[0])
    if len(secret) != PAIRING_SECRET_BYTES:
        raise ValueError(f"the pairing code's secret must be {PAIRING_SECRET_BYTES} bytes")
    return secret


@dataclass(frozen=True)
class Enrolment:
    device_id: str
    device_token: str
    totp: TotpParameters


def enrol_call(
    *,
    pairing_token: str,
    name: str,
    platform: str,
    os_version: str,
    app_version: str,
    push: Mapping[str, str] | None,
    public_key: str,
    key_proof: str | None = None,
) -> Call[Enrolment]:
    body: dict[str, Any] = {
        "pairing_token": pairing_token,
        "name": name,
        "platform": platform,
        "os_version": os_version,
        "app_version": app_version,
        "public_key": public_key,
    }
    if push is not None:
        body["push"] = dict(push)
    if key_proof is not None:
        body["key_proof"] = key_proof

    def parse(reply: Reply) -> Enrolment:
        data = json_body(reply, 201)
        totp = _obj(data, "totp")
        if totp is None:
            raise _bad("totp")
        return Enrolment(
            device_id=_str(data, "device_id"),
            device_token=_str(data, "device_token"),
            totp=TotpParameters(
                secret=_str(totp, "secret"),
                algorithm=_opt_str(totp, "algorithm") or "SHA1",
                digits=_int(totp, "digits", 6),
                period=_int(totp, "period", 30),
            ),
        )

    return Call(ApiRequest("POST", "/v1/devices", json=body), parse)


def device_headers(token: str | None) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def update_push_call(service: str, token: str, environment: str | None) -> Call[None]:
    body = {"service": service, "token": token}
    if environment is not None:
        body["environment"] = environment
    return Call(ApiRequest("PUT", "/v1/device/push", json=body), no_content)


def remove_self_call() -> Call[None]:
    return Call(ApiRequest("DELETE", "/v1/device"), no_content)


def pending_call() -> Call[list[DeviceApproval]]:
    def parse(reply: Reply) -> list[DeviceApproval]:
        items = json_body(reply).get("approvals")
        if not isinstance(items, list):
            raise _bad("approvals")
        return [parse_device_approval(item) for item in items if isinstance(item, dict)]

    return Call(ApiRequest("GET", "/v1/device/approvals", retry="connect"), parse)


def device_approval_call(approval_id: str) -> Call[DeviceApproval]:
    return Call(
        ApiRequest("GET", f"/v1/device/approvals/{_path_id(approval_id)}", retry="connect"),
        lambda reply: parse_device_approval(json_body(reply)),
    )


def respond_call(
    approval_id: str,
    *,
    decision: str,
    match_code: str | None,
    fraud: bool,
    timestamp: str,
    signature: str,
) -> Call[DeviceDecision]:
    body = {
        "decision": decision,
        "match_code": match_code,
        "fraud": fraud,
        "timestamp": timestamp,
        "signature": signature,
    }

    def parse(reply: Reply) -> DeviceDecision:
        data = json_body(reply)
        return DeviceDecision(approval_id=_str(data, "approval_id"), status=_str(data, "status"))

    return Call(
        ApiRequest("POST", f"/v1/device/approvals/{_path_id(approval_id)}/response", json=body),
        parse,
    )
