"""How much database work one OTP check is, counted (never timed): an accepted code is one
locking read of the client row with its devices, the step claim and the audit row; a replay
is the read alone; a wrong code adds the counter update. Every statement is a round trip to
PostgreSQL and a hop to SQLite's thread, so a new one here costs every login."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import bindparam, select

from pns_server import driver
from pns_server.db import Database
from pns_server.errors import PnsError
from pns_server.models import Base, Client
from pns_server.otp import service
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
    app: FastAPI, db: Database, client_id: str, code: str
) -> tuple[list[str], str | None]:
    """The statements one check sends (the caller's own authentication aside), and the
    `code` of the error it answers, if any."""
    seen: list[str] = []
    try:
        async with db.unit() as unit:
            client: Any = (await unit.execute(CLIENT_ROW, {"id": client_id})).one()
            with statements() as seen:
                await service.verify_otp(unit, app.state.runtime, client, code)
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
