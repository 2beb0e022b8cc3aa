from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import FastAPI

from pns_server.ratelimit import Limit, LocalWindows, hit
from tests.pns_server.approvals.helpers import answer, request_approval
from tests.support.factories import pair_app_device, register_client


class TestFixedWindow:
    async def test_counts_within_a_window_and_restarts_in_the_next(self, app: FastAPI) -> None:
        db = app.state.runtime.db
        limit = Limit("test", 2, 60)
        now = datetime(2026, 11, 30, 9, 0, 10, tzinfo=UTC)
        counts = [(await hit(db, limit, "1.2.3.4", now)).count for _ in range(3)]
        assert counts == [1, 2, 3]
        third = await hit(db, limit, "1.2.3.4", now)
        assert not third.allowed
        assert third.retry_after == 50
        later = await hit(db, limit, "1.2.3.4", now + timedelta(seconds=60))
        assert later.count == 1 and later.allowed

    async def test_subjects_are_counted_apart(self, app: FastAPI) -> None:
        db = app.state.runtime.db
        limit = Limit("test", 1, 60)
        assert (await hit(db, limit, "a")).allowed
        assert (await hit(db, limit, "b")).allowed
        assert not (await hit(db, limit, "a")).allowed

    async def test_concurrent_hits_are_all_counted(self, app: FastAPI) -> None:
        db = app.state.runtime.db
        limit = Limit("test", 1000, 3600)
        now = datetime.now(UTC)
        results = await asyncio.gather(*(hit(db, limit, "x", now) for _ in range(20)))
        assert sorted(r.count for r in results) == list(range(1, 21))


@pytest.mark.parametrize("settings_overrides", [{"rate_register_per_hour": 2}])
async def test_registration_is_limited_per_ip(http: httpx.AsyncClient) -> None:
    for _ in range(2):
        await register_client(http)
    response = await http.post("/v1/clients", json={"name": "x", "edition": "pro"})
    assert response.status_code == 429
    assert response.json()["code"] == "rate_limited"
    assert 1 <= int(response.headers["retry-after"]) <= 3600


@pytest.mark.parametrize("settings_overrides", [{"rate_client_per_minute": 3}])
async def test_api_calls_are_limited_per_caller(http: httpx.AsyncClient) -> None:
    client = await register_client(http)
    other = await register_client(http)
    statuses = [
        (await http.get("/v1/client", headers=client.headers)).status_code for _ in range(4)
    ]
    assert statuses == [200, 200, 200, 429]
    assert (await http.get("/v1/client", headers=other.headers)).status_code == 200


@pytest.mark.parametrize("settings_overrides", [{"rate_client_per_minute": 3}])
async def test_otp_checks_count_toward_the_callers_limit(http: httpx.AsyncClient) -> None:
    """The OTP route authenticates in its own statements (`accepted_at_once`, then
    `verifying_client`), and counts the caller once, like every other authenticated route."""
    client = await register_client(http)
    for _ in range(2):
        assert (await http.get("/v1/client", headers=client.headers)).status_code == 200
    check = await http.post("/v1/otp/verify", json={"code": "000000"}, headers=client.headers)
    assert check.json()["code"] == "otp_invalid"
    limited = await http.post("/v1/otp/verify", json={"code": "000000"}, headers=client.headers)
    assert limited.status_code == 429 and limited.json()["code"] == "rate_limited"


@pytest.mark.parametrize("settings_overrides", [{"rate_client_per_minute": 3}])
async def test_a_phones_answer_counts_once_toward_its_limit(http: httpx.AsyncClient) -> None:
    """On PostgreSQL an answer is tried outside a transaction first, and one that loses
    there is answered in a unit: the device is counted once all the same."""
    client = await register_client(http)
    phone = await pair_app_device(http, client)
    body = await request_approval(http, client)
    won = await answer(http, phone, body["approval_id"], "reject")
    lost = await answer(http, phone, body["approval_id"], "reject")
    assert (won.status_code, lost.status_code) == (200, 409)
    assert (await http.get("/v1/device/approvals", headers=phone.headers)).status_code == 200
    limited = await answer(http, phone, body["approval_id"], "reject")
    assert limited.status_code == 429 and limited.json()["code"] == "rate_limited"


@pytest.mark.parametrize("settings_overrides", [{"rate_client_per_minute": 3}])
async def test_a_phones_detail_counts_toward_its_limit_found_or_not(
    http: httpx.AsyncClient,
) -> None:
    """The detail authenticates in the statement that reads the approval: the device is
    counted once per request, for an approval that is not its client's too."""
    client = await register_client(http)
    phone = await pair_app_device(http, client)
    body = await request_approval(http, client)
    url = f"/v1/device/approvals/{body['approval_id']}"
    statuses = [
        (await http.get(url, headers=phone.headers)).status_code,
        (
            await http.get("/v1/device/approvals/no-such-approval", headers=phone.headers)
        ).status_code,
        (await http.get(url, headers=phone.headers)).status_code,
    ]
    assert statuses == [200, 404, 200]
    limited = await http.get(url, headers=phone.headers)
    assert limited.status_code == 429 and limited.json()["code"] == "rate_limited"


class TestLocalWindows:
    def test_counts_within_a_window_and_restarts_in_the_next(self) -> None:
        windows = LocalWindows()
        limit = Limit("caller", 2, 60)
        hits = [windows.hit(limit, "a", 120.0 + i) for i in range(3)]
        assert [h.allowed for h in hits] == [True, True, False]
        assert hits[-1].retry_after == 58
        assert windows.hit(limit, "a", 180.0).count == 1
        assert windows.hit(limit, "b", 122.0).count == 1

    def test_memory_stays_bounded(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(LocalWindows, "MAX_KEYS", 10)
        windows = LocalWindows()
        limit = Limit("caller", 5, 60)
        for i in range(10):
            windows.hit(limit, f"old{i}", 0.0)
        windows.hit(limit, "new", 60.0)  # the old window's keys are pruned
        assert len(windows._counts) == 1
