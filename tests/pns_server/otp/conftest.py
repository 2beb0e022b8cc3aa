"""Helpers for the otp tests: a registered client, direct row access, codes off the clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pyotp
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from pns_server.db import Database
from pns_server.models import AuditEvent, Client
from tests.support.factories import RegisteredClient, register_client

PERIOD = 30


def code(secret: str, steps: int = 0) -> str:
    """The code of `secret` `steps` time steps away from now."""
    return pyotp.TOTP(secret).at(datetime.now(UTC) + timedelta(seconds=steps * PERIOD))


def wrong_code(*secrets: str) -> str:
    """Six digits that match none of the secrets' codes in the ±2-step neighbourhood."""
    taken = {code(s, k) for s in secrets for k in range(-2, 3)}
    return next(c for c in (f"{n:06d}" for n in range(100000, 1000000, 7919)) if c not in taken)


async def away_from_step_edge(margin: float = 3.0) -> None:
    """Tests that submit a neighbouring step's code must not straddle a step boundary (the
    server's "now" would then be a step later than the test's); wait it out if close."""
    left = PERIOD - time.time() % PERIOD
    if left < margin:
        await asyncio.sleep(left + 0.05)


@pytest.fixture
def db(app: FastAPI) -> Database:
    database: Database = app.state.runtime.db
    return database


@pytest.fixture
async def client(http: httpx.AsyncClient) -> RegisteredClient:
    return await register_client(http)


ClientEditor = Callable[..., Awaitable[None]]


@pytest.fixture
def edit_client(db: Database) -> ClientEditor:
    """Set columns of a client row directly (e.g. move a lock into the past)."""

    async def edit(client_id: str, **values: Any) -> None:
        async with db.session() as session:
            row = await session.get(Client, client_id)
            assert row is not None
            for name, value in values.items():
                setattr(row, name, value)

    return edit


@pytest.fixture
def load_client(db: Database) -> Callable[[str], Awaitable[Client]]:
    async def load(client_id: str) -> Client:
        async with db.session() as session:
            row = await session.get(Client, client_id)
            assert row is not None
            return row

    return load


@pytest.fixture
def audit_events(db: Database) -> Callable[[str], Awaitable[list[AuditEvent]]]:
    async def events(client_id: str) -> list[AuditEvent]:
        async with db.session() as session:
            rows = await session.scalars(
                select(AuditEvent).where(AuditEvent.client_id == client_id).order_by(AuditEvent.id)
            )
            return list(rows)

    return events


def metric(app: FastAPI, result: str) -> float:
    value = app.state.runtime.metrics.registry.get_sample_value(
        "pns_otp_verifications_total", {"result": result}
    )
    return float(value or 0.0)
