"""The transport's retry rules on a `503 unavailable` with `Retry-After`: calls safe to
repeat are retried once after the (short) wait, like a dropped connection; nothing else is."""

from __future__ import annotations

import httpx
import pytest

from client_sdk import AsyncPnsClient, PnsClient, Unavailable
from client_sdk._wire import MAX_RETRY_AFTER

URL = "http://pns.test"
DEVICES = {"devices": []}
CREATED = {
    "approval_id": "a" * 22,
    "status": "pending",
    "expires_at": "2026-11-30T09:13:18Z",
    "match_code": "417",
    "devices_notified": 1,
}


def unavailable(retry_after: str | None) -> httpx.Response:
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    body = {"type": "x", "title": "t", "status": 503, "detail": "busy", "code": "unavailable"}
    return httpx.Response(503, json=body, headers=headers)


class Script:
    """Answers each request with the next scripted response; records what was sent."""

    def __init__(self, *responses: httpx.Response) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.responses.pop(0)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []

    async def async_sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr("client_sdk._http.time.sleep", slept.append)
    monkeypatch.setattr("client_sdk._http.asyncio.sleep", async_sleep)
    return slept


def client(script: Script) -> PnsClient:
    return PnsClient(URL, token="tok", transport=httpx.MockTransport(script))


def test_a_read_is_retried_once_after_retry_after(sleeps: list[float]) -> None:
    script = Script(unavailable("2"), httpx.Response(200, json=DEVICES))
    with client(script) as pns:
        assert pns.list_devices() == []
    assert len(script.requests) == 2 and sleeps == [2.0]


def test_an_idempotent_create_is_retried_with_the_same_key(sleeps: list[float]) -> None:
    script = Script(unavailable("1"), httpx.Response(201, json=CREATED))
    with client(script) as pns:
        requested = pns.request_approval(username="admin")
    assert requested.approval_id == CREATED["approval_id"]
    keys = {r.headers["idempotency-key"] for r in script.requests}
    assert len(script.requests) == 2 and len(keys) == 1 and sleeps == [1.0]


def test_only_once(sleeps: list[float]) -> None:
    script = Script(unavailable("1"), unavailable("1"), httpx.Response(200, json=DEVICES))
    with client(script) as pns, pytest.raises(Unavailable) as info:
        pns.list_devices()
    assert len(script.requests) == 2 and sleeps == [1.0]
    assert info.value.retry_after == 1.0


@pytest.mark.parametrize("retry_after", [None, str(int(MAX_RETRY_AFTER) + 1), "soon"])
def test_no_retry_without_a_short_retry_after(sleeps: list[float], retry_after: str | None) -> None:
    script = Script(unavailable(retry_after), httpx.Response(200, json=DEVICES))
    with client(script) as pns, pytest.raises(Unavailable):
        pns.list_devices()
    assert len(script.requests) == 1 and sleeps == []


def test_a_code_check_is_never_repeated(sleeps: list[float]) -> None:
    # The relay may have counted the attempt before failing: a replay could burn a try.
    script = Script(unavailable("1"), httpx.Response(200, json={"result": "accepted"}))
    with client(script) as pns, pytest.raises(Unavailable):
        pns.verify_otp("123456")
    assert len(script.requests) == 1 and sleeps == []


def test_other_errors_are_not_retried(sleeps: list[float]) -> None:
    script = Script(httpx.Response(500, json={"code": "internal_error", "status": 500}))
    with client(script) as pns, pytest.raises(Exception) as info:
        pns.list_devices()
    assert getattr(info.value, "status", None) == 500
    assert len(script.requests) == 1 and sleeps == []


async def test_the_async_client_retries_the_same_way(sleeps: list[float]) -> None:
    script = Script(unavailable("0.5"), httpx.Response(200, json=DEVICES))
    transport = httpx.MockTransport(script)
    async with AsyncPnsClient(URL, token="tok", transport=transport) as pns:
        assert await pns.list_devices() == []
    assert len(script.requests) == 2 and sleeps == [0.5]
