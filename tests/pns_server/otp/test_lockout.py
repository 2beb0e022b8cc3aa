"""OTP throttling: attempts_left, doubling locks with Retry-After, the 100-failure cap."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import FastAPI

from pns_server.models import AuditEvent, Client
from tests.conftest import ADMIN_TOKEN
from tests.pns_server.otp.conftest import ClientEditor, metric, wrong_code
from tests.support.factories import PairedDevice, RegisteredClient, bearer, pair_app_device

VERIFY = "/v1/otp/verify"


@pytest.fixture
async def device(http: httpx.AsyncClient, client: RegisteredClient) -> PairedDevice:
    return await pair_app_device(http, client)


async def submit(http: httpx.AsyncClient, client: RegisteredClient, otp: str) -> httpx.Response:
    return await http.post(VERIFY, json={"code": otp}, headers=client.headers)


async def fail_until_locked(
    http: httpx.AsyncClient, client: RegisteredClient, device: PairedDevice
) -> httpx.Response:
    """Five wrong codes (the default limit); returns the last answer."""
    bad = wrong_code(device.totp_secret)
    answers = [await submit(http, client, bad) for _ in range(5)]
    assert [a.json()["attempts_left"] for a in answers] == [4, 3, 2, 1, 0]
    assert {a.json()["code"] for a in answers} == {"otp_invalid"}
    assert {a.status_code for a in answers} == {401}
    return answers[-1]


def seconds_until(stamp: str) -> float:
    return (
        datetime.fromisoformat(stamp.replace("Z", "+00:00")) - datetime.now(UTC)
    ).total_seconds()


class TestLock:
    async def test_attempts_count_down_then_429_with_retry_after(
        self,
        http: httpx.AsyncClient,
        client: RegisteredClient,
        device: PairedDevice,
        app: FastAPI,
    ) -> None:
        last = await fail_until_locked(http, client, device)
        assert 28 <= seconds_until(last.json()["locked_until"]) <= 30
        locked = await submit(http, client, wrong_code(device.totp_secret))
        assert locked.status_code == 429
        assert locked.headers["content-type"] == "application/problem+json"
        body = locked.json()
        assert body["code"] == "otp_locked"
        assert 28 <= int(locked.headers["Retry-After"]) <= 30
        assert body["retry_after"] == int(locked.headers["Retry-After"])
        assert 28 <= seconds_until(body["locked_until"]) <= 30
        assert metric(app, "invalid") == 5 and metric(app, "locked") == 1

    async def test_locked_client_refused_even_with_the_right_code(
        self,
        http: httpx.AsyncClient,
        client: RegisteredClient,
        device: PairedDevice,
        load_client: Callable[[str], Awaitable[Client]],
    ) -> None:
        await fail_until_locked(http, client, device)
        response = await submit(http, client, device.otp())
        assert response.status_code == 429
        assert response.json()["code"] == "otp_locked"
        # Refusals while locked neither count nor extend the lock.
        row = await load_client(client.client_id)
        assert (row.otp_failures_since_success, row.otp_lock_count) == (5, 1)

    async def test_second_lock_doubles(
        self,
        http: httpx.AsyncClient,
        client: RegisteredClient,
        device: PairedDevice,
        edit_client: ClientEditor,
    ) -> None:
        await fail_until_locked(http, client, device)
        await edit_client(client.client_id, otp_locked_until=datetime.now(UTC) - timedelta(1))
        second = await fail_until_locked(http, client, device)
        assert 58 <= seconds_until(second.json()["locked_until"]) <= 60
        locked = await submit(http, client, device.otp())
        assert 58 <= int(locked.headers["Retry-After"]) <= 60

    async def test_expired_lock_lets_the_right_code_in_and_resets(
        self,
        http: httpx.AsyncClient,
        client: RegisteredClient,
        device: PairedDevice,
        edit_client: ClientEditor,
        load_client: Callable[[str], Awaitable[Client]],
    ) -> None:
        await fail_until_locked(http, client, device)
        await edit_client(client.client_id, otp_locked_until=datetime.now(UTC) - timedelta(1))
        assert (await submit(http, client, device.otp())).status_code == 200
        row = await load_client(client.client_id)
        assert row.otp_lock_count == 0 and row.otp_failures_since_success == 0
        again = await submit(http, client, wrong_code(device.totp_secret))
        assert again.json()["attempts_left"] == 4

    async def test_success_resets_the_consecutive_count(
        self, http: httpx.AsyncClient, client: RegisteredClient, device: PairedDevice
    ) -> None:
        bad = wrong_code(device.totp_secret)
        for expected in (4, 3, 2):
            assert (await submit(http, client, bad)).json()["attempts_left"] == expected
        assert (await submit(http, client, device.otp())).status_code == 200
        assert (await submit(http, client, bad)).json()["attempts_left"] == 4

    @pytest.mark.parametrize(
        "leftover",
        [
            {"otp_consecutive_failures": 3},
            {"otp_failures_since_success": 40},
            {"otp_lock_count": 2},
            {"otp_locked_until": datetime(2020, 1, 1, tzinfo=UTC)},
            {"pushes_since_success": 7},
        ],
        ids=lambda leftover: next(iter(leftover)),
    )
    async def test_success_clears_any_single_leftover(
        self,
        http: httpx.AsyncClient,
        client: RegisteredClient,
        device: PairedDevice,
        edit_client: ClientEditor,
        load_client: Callable[[str], Awaitable[Client]],
        leftover: dict[str, object],
    ) -> None:
        # A success writes the reset only when there is something to reset: each counter
        # on its own must be enough to trigger it.
        await edit_client(client.client_id, **leftover)
        assert (await submit(http, client, device.otp())).status_code == 200
        row = await load_client(client.client_id)
        assert (row.otp_consecutive_failures, row.otp_failures_since_success) == (0, 0)
        assert (row.otp_lock_count, row.otp_locked_until, row.pushes_since_success) == (
            0,
            None,
            0,
        )

    async def test_lock_is_audited_without_codes(
        self,
        http: httpx.AsyncClient,
        client: RegisteredClient,
        device: PairedDevice,
        audit_events: Callable[[str], Awaitable[list[AuditEvent]]],
    ) -> None:
        await fail_until_locked(http, client, device)
        locks = [e for e in await audit_events(client.client_id) if e.event == "otp.locked"]
        assert len(locks) == 1
        assert locks[0].detail is not None and locks[0].detail["failures_since_success"] == 5
        assert wrong_code(device.totp_secret) not in str(locks[0].detail)


@pytest.mark.parametrize("settings_overrides", [{"otp_max_failures": 2, "otp_lock_seconds": 5}])
async def test_limits_come_from_settings(
    http: httpx.AsyncClient, client: RegisteredClient, device: PairedDevice
) -> None:
    bad = wrong_code(device.totp_secret)
    assert (await submit(http, client, bad)).json()["attempts_left"] == 1
    assert (await submit(http, client, bad)).json()["attempts_left"] == 0
    locked = await submit(http, client, bad)
    assert locked.status_code == 429 and int(locked.headers["Retry-After"]) <= 5


class TestFailureCap:
    async def test_hundred_failures_lock_until_an_admin_unlocks(
        self,
        http: httpx.AsyncClient,
        client: RegisteredClient,
        device: PairedDevice,
        edit_client: ClientEditor,
    ) -> None:
        await edit_client(client.client_id, otp_failures_since_success=98, otp_lock_count=19)
        bad = wrong_code(device.totp_secret)
        assert (await submit(http, client, bad)).json()["attempts_left"] == 1
        last = await submit(http, client, bad)
        assert last.status_code == 401
        assert last.json()["attempts_left"] == 0
        assert last.json()["admin_unlock_required"] is True
        # Waiting does not help: no timed lock to expire.
        await edit_client(client.client_id, otp_locked_until=None)
        refused = await submit(http, client, device.otp())
        assert refused.status_code == 429
        assert refused.json()["code"] == "otp_locked"
        assert refused.json()["admin_unlock_required"] is True
        assert "administrator" in refused.json()["detail"]
        assert "Retry-After" not in refused.headers

        unlocked = await http.post(
            f"/v1/admin/clients/{client.client_id}/unlock", headers=bearer(ADMIN_TOKEN)
        )
        assert unlocked.status_code == 200, unlocked.text
        assert (await submit(http, client, device.otp())).status_code == 200

    async def test_cap_holds_even_below_the_consecutive_limit(
        self,
        http: httpx.AsyncClient,
        client: RegisteredClient,
        device: PairedDevice,
        edit_client: ClientEditor,
    ) -> None:
        await edit_client(client.client_id, otp_failures_since_success=100)
        response = await submit(http, client, device.otp())
        assert response.status_code == 429
        assert response.json()["locked_until"] is None
