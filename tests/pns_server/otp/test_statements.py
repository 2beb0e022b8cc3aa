"""How much database work one OTP check is, counted (never timed): an accepted code is one
locking read of the client row with its devices, the step claim and the audit row; a replay
is the read alone; a wrong code adds the counter update. Every statement is a round trip to
PostgreSQL and a hop to SQLite's thread, so a new one here costs every login."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import bindparam, select

from pns_server import driver
from pns_server.db import Database
from pns_server.driver import DriverUnit
from pns_server.errors import PnsError
from pns_server.models import Base, Client
from pns_server.otp import service
from pns_server.runtime import Runtime
from tests.pns_server.otp.conftest import wrong_code
from tests.support.factories import PairedDevice, RegisteredClient, pair_app_device

Verify = Callable[[DriverUnit, Runtime, Any, str], Awaitable[object]]

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
    app: FastAPI, db: Database, client_id: str, code: str, verify: Verify = service.verify_otp
) -> tuple[list[str], str | None]:
    """The statements one check sends (the caller's own authentication aside), and the
    `code` of the error it answers, if any."""
    seen: list[str] = []
    try:
        async with db.unit() as unit:
            client: Any = (await unit.execute(CLIENT_ROW, {"id": client_id})).one()
            with statements() as seen:
                await verify(unit, app.state.runtime, client, code)
    except PnsError as error:
        return seen, error.code
    return seen, None


@pytest.fixture
async def device(http: httpx.AsyncClient, client: RegisteredClient) -> PairedDevice:
    return await pair_app_device(http, client)


# On PostgreSQL the step claim and its audit row are one statement (a data-modifying CTE).
ACCEPTED = {"sqlite": ["SELECT", "UPDATE", "INSERT"], "postgres": ["SELECT", "WITH"]}


async def test_accepted_code(
    app: FastAPI, db: Database, client: RegisteredClient, device: PairedDevice, db_kind: str
) -> None:
    assert await check(app, db, client.client_id, device.otp()) == (ACCEPTED[db_kind], None)


async def test_accepted_code_with_counters_to_reset(
    app: FastAPI, db: Database, client: RegisteredClient, device: PairedDevice, db_kind: str
) -> None:
    wrong = await check(app, db, client.client_id, wrong_code(device.totp_secret))
    assert wrong == (["SELECT", "UPDATE"], "otp_invalid")
    assert await check(app, db, client.client_id, device.otp()) == (
        [*ACCEPTED[db_kind], "UPDATE"],
        None,
    )


async def test_replayed_code(
    app: FastAPI, db: Database, client: RegisteredClient, device: PairedDevice
) -> None:
    otp = device.otp()
    await check(app, db, client.client_id, otp)
    assert await check(app, db, client.client_id, otp) == (["SELECT"], "otp_replayed")


async def test_recovery_code(app: FastAPI, db: Database, client: RegisteredClient) -> None:
    """The lock, the use (one statement for every configured key's hash), the counter reset,
    the count of codes left and the audit row; a used code: the lock, the use that finds
    nothing and the failure count; what cannot be a code: no use tried."""
    async with db.unit() as unit:
        row: Any = (await unit.execute(CLIENT_ROW, {"id": client.client_id})).one()
        codes = (await service.create_recovery_codes(unit, app.state.runtime, row)).codes
    verify = service.verify_recovery_code
    assert await check(app, db, client.client_id, codes[0], verify) == (
        ["SELECT", "UPDATE", "UPDATE", "SELECT", "INSERT"],
        None,
    )
    assert await check(app, db, client.client_id, codes[0], verify) == (
        ["SELECT", "UPDATE", "UPDATE"],
        "recovery_code_invalid",
    )
    assert await check(app, db, client.client_id, "not a code", verify) == (
        ["SELECT", "UPDATE"],
        "recovery_code_invalid",
    )
