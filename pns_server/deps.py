"""Dependency aliases, in one short file: `SessionDep`, `CurrentClient`, `CurrentDevice`...

`CurrentClient`/`CurrentDevice` authenticate inside the request's ORM unit of work;
`UnitClient`/`UnitDevice` inside a unit on the driver connection (`UnitDep`, the routes
every login runs); `CurrentClientDetached`/`CurrentDeviceDetached` (for long-polls) in a
short read of their own, so the wait that follows holds no connection. The last four give
the caller's row (`ClientRow`, `DeviceRow`), not an ORM entity."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from pns_server.config import Settings
from pns_server.db import Database
from pns_server.driver import DriverUnit
from pns_server.errors import Unauthenticated
from pns_server.models import Base, Client, Device
from pns_server.ratelimit import count_caller
from pns_server.rows import ClientRow, DeviceRow
from pns_server.runtime import AppContext, Runtime
from pns_server.security import constant_time_equals, hash_token

# How stale `Client.last_seen_at` may be: the price of not writing it on every request.
SEEN_RESOLUTION = timedelta(minutes=1)


# Every dependency is `async def`, even those that never await: FastAPI runs a plain `def`
# dependency in a worker thread, and that hand-off (a queue, a thread wake-up, a call back
# into the event loop) cost more CPU than the whole of some requests' own work.


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def get_runtime(request: Request) -> Runtime:
    return runtime_of(request)


async def get_settings(request: Request) -> Settings:
    context: AppContext = request.app.state.context
    return context.settings


async def get_database(request: Request) -> Database:
    return runtime_of(request).db


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    # scope="function" below: commit happens before the response is sent, never after.
    async with runtime_of(request).db.session() as session:
        yield session


async def get_unit(request: Request) -> AsyncIterator[DriverUnit]:
    """The unit of work of the routes every login runs (`Database.unit`)."""
    async with runtime_of(request).db.unit() as unit:
        yield unit


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
DatabaseDep = Annotated[Database, Depends(get_database)]
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]
UnitDep = Annotated[DriverUnit, Depends(get_unit, scope="function")]


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated(
            "Send 'Authorization: Bearer <token>'.", headers={"WWW-Authenticate": "Bearer"}
        )
    return token.strip()


def invalid_token() -> Unauthenticated:
    return Unauthenticated(
        "The bearer token is unknown or revoked.", headers={"WWW-Authenticate": "Bearer"}
    )


# Built once: SQLAlchemy computes a statement's cache key on every execution of a new
# statement object (~0.1 ms of CPU), and these run on every authenticated request.
CLIENT_BY_TOKEN = select(Client).where(Client.token_hash == bindparam("token_hash"))
DEVICE_BY_TOKEN = select(Device).where(Device.token_hash == bindparam("token_hash"))
# The same as rows with the tables' columns, for units on the driver connection.
_clients = Base.metadata.tables[Client.__tablename__]
_devices = Base.metadata.tables[Device.__tablename__]
CLIENT_ROW_BY_TOKEN = select(*_clients.c).where(_clients.c.token_hash == bindparam("token_hash"))
# The same, holding the row until the unit ends (FOR UPDATE on PostgreSQL; SQLite's units
# are serial already).
CLIENT_ROW_BY_TOKEN_LOCKED = CLIENT_ROW_BY_TOKEN.with_for_update()
DEVICE_ROW_BY_TOKEN = select(*_devices.c).where(_devices.c.token_hash == bindparam("token_hash"))
_NOTE_SEEN = (
    update(_clients)
    .where(_clients.c.id == bindparam("client"))
    .values(last_seen_at=bindparam("at"))
)


async def client_by_token(session: AsyncSession, token: str) -> Client:
    client = await session.scalar(CLIENT_BY_TOKEN, {"token_hash": hash_token(token)})
    if client is None:
        raise invalid_token()
    return client


async def _device_by_token(session: AsyncSession, token: str) -> Device:
    device = await session.scalar(DEVICE_BY_TOKEN, {"token_hash": hash_token(token)})
    if device is None:
        raise invalid_token()
    return device


async def current_client(request: Request, session: SessionDep) -> Client:
    client = await client_by_token(session, bearer_token(request))
    count_caller(request, "client:" + client.id)
    note_seen(client)
    return client


def note_seen(client: Client) -> None:
    """`last_seen_at` for the admin API, written at most once a minute per client: a busy
    client costs one small UPDATE a minute, not one per request. Only requests that hold a
    unit of work note it (a long-poll's detached read writes nothing)."""
    now = datetime.now(UTC)
    if seen_is_stale(client.last_seen_at, now):
        client.last_seen_at = now


def seen_is_stale(last_seen_at: datetime | None, now: datetime) -> bool:
    return last_seen_at is None or now - last_seen_at >= SEEN_RESOLUTION


async def current_client_detached(request: Request, db: DatabaseDep) -> ClientRow:
    """For long-polls: authenticate with a short read so the wait holds no connection."""
    token = bearer_token(request)
    async with db.unit_read() as unit:
        client: ClientRow = await _row_by_token(unit, CLIENT_ROW_BY_TOKEN, token)
    count_caller(request, "client:" + client.id)
    return client


async def _row_by_token(unit: DriverUnit, statement: Any, token: str) -> Any:
    row = (await unit.execute(statement, {"token_hash": hash_token(token)})).first()
    if row is None:
        raise invalid_token()
    return row


async def unit_client(request: Request, unit: UnitDep) -> ClientRow:
    """`current_client` in a unit on the driver connection: the client's row."""
    return await _admitted_client(request, unit, CLIENT_ROW_BY_TOKEN)


async def unit_client_locked(request: Request, unit: UnitDep) -> ClientRow:
    """`unit_client` for routes whose rules read the caller's own counters under its row's
    lock (creating an approval): the authenticating read takes the lock, so the rules see
    what every other process last committed, in one round trip instead of two."""
    return await _admitted_client(request, unit, CLIENT_ROW_BY_TOKEN_LOCKED)


async def _admitted_client(request: Request, unit: DriverUnit, statement: Any) -> ClientRow:
    client: ClientRow = await _row_by_token(unit, statement, bearer_token(request))
    await admit_client(request, unit, client)
    return client


async def admit_client(request: Request, unit: DriverUnit, client: ClientRow) -> None:
    """What a client's request does once its token is known to be valid: count toward the
    client's rate limit, and note it seen (`note_seen`). For routes that read the caller's
    row with more in the same statement than `UnitClient` reads."""
    count_caller(request, "client:" + client.id)
    await note_seen_in_unit(unit, client)


async def note_seen_in_unit(unit: DriverUnit, client: ClientRow) -> None:
    """`note_seen` for a caller read on the driver connection: one UPDATE when due."""
    now = datetime.now(UTC)
    if seen_is_stale(client.last_seen_at, now):
        await unit.execute(_NOTE_SEEN, {"client": client.id, "at": now})


def admit_client_alone(request: Request, client: ClientRow) -> datetime | None:
    """`admit_client` for a caller read outside a unit, whose next statement notes it seen
    along with its own work: counts the caller toward its rate limit, and returns the time
    to write as its `last_seen_at` when that is due (None when not)."""
    count_caller(request, "client:" + client.id)
    now = datetime.now(UTC)
    return now if seen_is_stale(client.last_seen_at, now) else None


async def unit_device(request: Request, unit: UnitDep) -> DeviceRow:
    """`current_device` in a unit on the driver connection: the device's row."""
    device: DeviceRow = await _row_by_token(unit, DEVICE_ROW_BY_TOKEN, bearer_token(request))
    admit_device(request, device)
    return device


def admit_device(request: Request, device: DeviceRow) -> None:
    """`admit_client` for a device: count toward its rate limit. For routes that read the
    device's row with more in the same statement than `UnitDevice` reads."""
    count_caller(request, "device:" + device.id)


async def current_device(request: Request, session: SessionDep) -> Device:
    device = await _device_by_token(session, bearer_token(request))
    count_caller(request, "device:" + device.id)
    return device


async def current_device_detached(request: Request, db: DatabaseDep) -> DeviceRow:
    """For long-polls: authenticate with a short read so the wait holds no connection."""
    token = bearer_token(request)
    async with db.unit_read() as unit:
        device: DeviceRow = await _row_by_token(unit, DEVICE_ROW_BY_TOKEN, token)
    count_caller(request, "device:" + device.id)
    return device


async def require_admin(request: Request, settings: SettingsDep) -> None:
    token = bearer_token(request)
    expected = settings.admin_token
    if expected is None or not constant_time_equals(token, expected.get_secret_value()):
        raise Unauthenticated(
            "An admin token is required (PNS_ADMIN_TOKEN).", headers={"WWW-Authenticate": "Bearer"}
        )


CurrentClient = Annotated[Client, Depends(current_client)]
CurrentClientDetached = Annotated[ClientRow, Depends(current_client_detached)]
CurrentDevice = Annotated[Device, Depends(current_device)]
CurrentDeviceDetached = Annotated[DeviceRow, Depends(current_device_detached)]
# For routes whose work runs in `UnitDep` (the hot routes): the caller's row, in that unit.
UnitClient = Annotated[ClientRow, Depends(unit_client)]
UnitClientLocked = Annotated[ClientRow, Depends(unit_client_locked)]
UnitDevice = Annotated[DeviceRow, Depends(unit_device)]
AdminDep = Annotated[None, Depends(require_admin)]
