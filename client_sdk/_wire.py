"""The wire, without I/O: how a request is described (`ApiRequest`, `Call`), how an answer
is read (problem+json to exceptions, field readers, model parsers), the rules for
retrying one, and the pairing code in both its forms (`pns://pair?...#k=` and the relay's
https link), which the client writes and the device reads. Shared by the backup client's
core (`_core`) and the device's (`_device_core`)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import parse_qs, quote, urlparse

import httpx

from client_sdk._exceptions import (
    ConnectError,
    RequestTimeout,
    TransportError,
    UnexpectedResponse,
    error_class_for,
)
from client_sdk._keys import PAIRING_SECRET_BYTES, b64url_decode
from client_sdk._models import Approval, ApprovalResponse, Delivery, Device, DeviceApproval, Pairing

T = TypeVar("T")
RetryMode = Literal["never", "connect", "always"]

SDK_VERSION = "0.1.0"
USER_AGENT = f"pns-client-sdk/{SDK_VERSION}"
MAX_WAIT = 60
# Long-polls are cut into waits this long: well under the 60 s idle timeout of common proxies.
DEFAULT_LONG_POLL = 25
DEFAULT_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
DEFAULT_RETRIES = 2

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


def bad_field(name: str) -> UnexpectedResponse:
    return UnexpectedResponse(f"the server's answer has a missing or invalid {name!r}", status=200)


def str_field(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str):
        raise bad_field(name)
    return value


def opt_str_field(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise bad_field(name)
    return value


def int_field(data: Mapping[str, Any], name: str, default: int | None = None) -> int:
    value = data.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad_field(name)
    return value


def bool_field(data: Mapping[str, Any], name: str, default: bool) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise bad_field(name)
    return value


def parse_time(value: str) -> datetime:
    """RFC 3339 (with Z or an offset, any fraction) to an aware UTC datetime."""
    parsed = datetime.fromisoformat(value.strip().replace("z", "Z"))
    if parsed.tzinfo is None:
        raise ValueError("timestamp without a timezone")
    return parsed.astimezone(UTC)


def time_field(data: Mapping[str, Any], name: str) -> datetime:
    try:
        return parse_time(str_field(data, name))
    except ValueError as exc:
        raise bad_field(name) from exc


def opt_time_field(data: Mapping[str, Any], name: str) -> datetime | None:
    return None if data.get(name) is None else time_field(data, name)


def obj_field(data: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    value = data.get(name)
    if value is not None and not isinstance(value, dict):
        raise bad_field(name)
    return value


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with a Z, whole seconds."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- model parsers ----------------------------------------------------------------


def parse_device(data: Mapping[str, Any]) -> Device:
    return Device(
        device_id=str_field(data, "device_id"),
        kind=str_field(data, "kind"),
        name=str_field(data, "name"),
        platform=opt_str_field(data, "platform"),
        os_version=opt_str_field(data, "os_version"),
        push=opt_str_field(data, "push"),
        push_status=opt_str_field(data, "push_status") or "none",
        public_key=opt_str_field(data, "public_key"),
        created_at=time_field(data, "created_at"),
        last_used_at=opt_time_field(data, "last_used_at"),
        key_proof=opt_str_field(data, "key_proof"),
    )


def parse_pairing(data: Mapping[str, Any]) -> Pairing:
    device = obj_field(data, "device")
    return Pairing(
        pairing_id=str_field(data, "pairing_id"),
        kind=str_field(data, "kind"),
        status=str_field(data, "status"),
        expires_at=time_field(data, "expires_at"),
        device=parse_device(device) if device is not None else None,
        qr_payload=opt_str_field(data, "qr_payload"),
        otpauth_uri=opt_str_field(data, "otpauth_uri"),
        qr_link=opt_str_field(data, "qr_link"),
    )


def parse_approval(data: Mapping[str, Any]) -> Approval:
    response = obj_field(data, "response")
    delivery = obj_field(data, "delivery")
    return Approval(
        approval_id=str_field(data, "approval_id"),
        status=str_field(data, "status"),
        reason=opt_str_field(data, "reason"),
        created_at=time_field(data, "created_at"),
        expires_at=time_field(data, "expires_at"),
        decided_at=opt_time_field(data, "decided_at"),
        device_id=opt_str_field(data, "device_id"),
        response=ApprovalResponse(
            decision=str_field(response, "decision"),
            match_code=opt_str_field(response, "match_code"),
            timestamp=str_field(response, "timestamp"),
            signature=str_field(response, "signature"),
            public_key=opt_str_field(response, "public_key"),
            version=opt_str_field(response, "version"),
        )
        if response is not None
        else None,
        delivery=Delivery(
            queued=int_field(delivery, "queued", 0),
            sent=int_field(delivery, "sent", 0),
            failed=int_field(delivery, "failed", 0),
            last_error=opt_str_field(delivery, "last_error"),
        )
        if delivery is not None
        else None,
    )


def parse_device_approval(data: Mapping[str, Any]) -> DeviceApproval:
    return DeviceApproval(
        approval_id=str_field(data, "approval_id"),
        status=str_field(data, "status"),
        created_at=time_field(data, "created_at"),
        expires_at=time_field(data, "expires_at"),
        client_name=opt_str_field(data, "client_name"),
        context=obj_field(data, "context") or {},
        number_matching=bool_field(data, "number_matching", True),
        client_nonce=opt_str_field(data, "client_nonce"),
    )


def wait_param(wait: float) -> int:
    if wait < 0 or wait > MAX_WAIT:
        raise ValueError(f"wait must be between 0 and {MAX_WAIT} seconds")
    return int(wait)


def path_id(value: str) -> str:
    if not value:
        raise ValueError("an id must not be empty")
    return quote(value, safe="")


# --- the pairing code ---------------------------------------------------------------


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
