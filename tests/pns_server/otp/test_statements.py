"""How much database work one OTP check is, counted (never timed): an accepted code is one
locking read of the client row with its devices, which also authenticates the caller, the
step claim and the audit row; a replay is the read alone; a wrong code adds the counter
update. Every statement is a round trip to PostgreSQL and a hop to SQLite's thread, so a
new one here costs every login. Over HTTP on PostgreSQL an accepted code is first tried
outside a transaction (the read unlocked, the claim guarded by the row as read), and
anything else is then decided under the lock."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import bindparam, select, update

from pns_server import driver
from pns_server.db import Database
from pns_server.errors import PnsError
from pns_server.models import Base, Client
from pns_server.otp import service
from pns_server.security import hash_token
from tests.pns_server.otp.conftest import wrong_code
from tests.support.factories import PairedDevice, RegisteredClient, pair_app_device

_clients = Base.metadata.tables[Client.__tablename__]
CLIENT_ROW = select(*_clients.c).where(_clients.c.id == bindparam("id"))


@contextmanager
def statements() -> Iterator[list[str]]:
    """The first word of every statement sent on the driver connection while the block runs
    (not BEGIN/COMMIT, which every unit sends)."""
    seen: list[str] = []

    def note(sql: str) -> None:
        seen.append(sql.split(None, 1)[0].upper())

    driver.statement_listeners.append(note)
    try:
        yield seen
    finally:
        driver.statement_listeners.remove(note)


async def check(
    app: FastAPI, db: Database, client: RegisteredClient, code: str
) -> tuple[list[str], str | None]:
    """The statements one OTP check sends, the caller's authentication included, and the
    `code` of the error it answers, if any."""
    seen: list[str] = []
    try:
        async with db.unit() as unit:
            with statements() as seen:
                caller = await service.caller_for_verify(unit, hash_token(client.token))
                assert caller is not None
                await service.verify_otp(unit, app.state.runtime, caller, code)
    except PnsError as error:
        return seen, error.code
    return seen, None


async def check_recovery_code(
    app: FastAPI, db: Database, client_id: str, code: str
) -> tuple[list[str], str | None]:
    """The statements one recovery-code check sends (the caller's own authentication aside),
    and the `code` of the error it answers, if any."""
    seen: list[str] = []
    try:
        async with db.unit() as unit:
            client: Any = (await unit.execute(CLIENT_ROW, {"id": client_id})).one()
            with statements() as seen:
                await service.verify_recovery_code(unit, app.state.runtime, client, code)
    except PnsError as error:
        return seen, error.code
    return seen, None


@pytest.fixture
async def device(http: httpx.AsyncClient, client: RegisteredClient) -> PairedDevice:
    return await pair_app_device(http, client)


# On PostgreSQL the step claim and its audit row are one statement (a data-modifying CTE),
# and so is the counter reset beside them when there is one.
ACCEPTED = {"sqlite": ["SELECT", "UPDATE", "INSERT"], "postgres": ["SELECT", "WITH"]}
RESET = {"sqlite": [*ACCEPTED["sqlite"], "UPDATE"], "postgres": ACCEPTED["postgres"]}


async def test_accepted_code(
    app: FastAPI, db: Database, client: RegisteredClient, device: PairedDevice, db_kind: str
) -> None:
    assert await check(app, db, client, device.otp()) == (ACCEPTED[db_kind], None)


async def test_the_route_sends_nothing_more(
    http: httpx.AsyncClient, client: RegisteredClient, device: PairedDevice, db_kind: str
) -> None:
    """Over HTTP the request authenticates its caller in the check's own read: the whole
    request sends what the check sends (the caller was just seen: no `last_seen_at`)."""
    assert (await http.get("/v1/client", headers=client.headers)).status_code == 200
    with statements() as seen:
        response = await http.post(
            "/v1/otp/verify", json={"code": device.otp()}, headers=client.headers
        )
    assert response.status_code == 200
    assert seen == ACCEPTED[db_kind]


async def test_accepted_code_with_counters_to_reset(
    app: FastAPI, db: Database, client: RegisteredClient, device: PairedDevice, db_kind: str
) -> None:
    wrong = await check(app, db, client, wrong_code(device.totp_secret))
    assert wrong == (["SELECT", "UPDATE"], "otp_invalid")
    assert await check(app, db, client, device.otp()) == (RESET[db_kind], None)


async def test_replayed_code(
    app: FastAPI, db: Database, client: RegisteredClient, device: PairedDevice
) -> None:
    otp = device.otp()
    await check(app, db, client, otp)
    assert await check(app, db, client, otp) == (["SELECT"], "otp_replayed")


async def test_recovery_code(app: FastAPI, db: Database, client: RegisteredClient) -> None:
    """The lock, the use (one statement for every configured key's hash), the counter reset,
    the count of codes left and the audit row; a used code: the lock, the use that finds
    nothing and the failure count; what cannot be a code: no use tried."""
    async with db.unit() as unit:
        row: Any = (await unit.execute(CLIENT_ROW, {"id": client.client_id})).one()
        codes = (await service.create_recovery_codes(unit, app.state.runtime, row)).codes
    assert await check_recovery_code(app, db, client.client_id, codes[0]) == (
        ["SELECT", "UPDATE", "UPDATE", "SELECT", "INSERT"],
        None,
    )
    assert await check_recovery_code(app, db, client.client_id, codes[0]) == (
        ["SELECT", "UPDATE", "UPDATE"],
        "recovery_code_invalid",
    )
    assert await check_recovery_code(app, db, client.client_id, "not a code") == (
        ["SELECT", "UPDATE"],
        "recovery_code_invalid",
    )


@contextmanager
def full_statements() -> Iterator[list[str]]:
    seen: list[str] = []
    driver.statement_listeners.append(lambda sql: seen.append(" ".join(sql.split())))
    try:
        yield seen
    finally:
        driver.statement_listeners.pop()


@pytest.mark.postgres_only
async def test_on_postgresql_an_accepted_code_takes_no_lock_of_its_own_and_a_wrong_one_does(
    http: httpx.AsyncClient, client: RegisteredClient, device: PairedDevice
) -> None:
    """An accepted code: the caller read without a lock, then the claim that locks the row
    only inside its own statement, and only while the row is as read (no BEGIN, no COMMIT:
    two round trips). A wrong code: that read, then the check again under the lock, where
    its failure is counted."""
    assert (await http.get("/v1/client", headers=client.headers)).status_code == 200
    with full_statements() as seen:
        response = await http.post(
            "/v1/otp/verify", json={"code": device.otp()}, headers=client.headers
        )
    assert response.status_code == 200
    read, claim = seen
    assert read.startswith("SELECT") and "FOR UPDATE" not in read
    assert claim.startswith("WITH unchanged AS (SELECT clients.id AS id FROM clients WHERE")
    assert "FOR UPDATE" in claim
    with full_statements() as seen:
        response = await http.post(
            "/v1/otp/verify", json={"code": wrong_code(device.totp_secret)}, headers=client.headers
        )
    assert response.json()["code"] == "otp_invalid"
    assert [s.split()[0] for s in seen] == ["SELECT", "SELECT", "UPDATE"]
    assert "FOR UPDATE" not in seen[0] and seen[1].endswith("FOR UPDATE OF clients")


@pytest.mark.postgres_only
async def test_on_postgresql_a_caller_due_a_seen_write_is_noted_in_the_claim(
    http: httpx.AsyncClient, db: Database, client: RegisteredClient, device: PairedDevice
) -> None:
    """The usual caller of a code logs in now and then, so its `last_seen_at` is due a
    write: the claim's statement writes it, still two round trips. A wrong code from such a
    caller is noted seen by the check under the lock."""
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    await set_last_seen(db, client, long_ago)
    with full_statements() as seen:
        response = await http.post(
            "/v1/otp/verify", json={"code": device.otp()}, headers=client.headers
        )
    assert response.status_code == 200
    assert len(seen) == 2 and "last_seen_at" in seen[1]
    assert await last_seen(db, client) > long_ago
    await set_last_seen(db, client, long_ago)
    with full_statements() as seen:
        response = await http.post(
            "/v1/otp/verify", json={"code": wrong_code(device.totp_secret)}, headers=client.headers
        )
    assert response.json()["code"] == "otp_invalid"
    assert await last_seen(db, client) > long_ago


async def set_last_seen(db: Database, client: RegisteredClient, at: datetime) -> None:
    async with db.unit() as unit:
        await unit.execute(
            update(_clients).where(_clients.c.id == bindparam("id")).values(last_seen_at=at),
            {"id": client.client_id},
        )


async def last_seen(db: Database, client: RegisteredClient) -> datetime:
    async with db.unit() as unit:
        row = (await unit.execute(CLIENT_ROW, {"id": client.client_id})).one()
    assert row.last_seen_at is not None
    return row.last_seen_at  # type: ignore[no-any-return]
