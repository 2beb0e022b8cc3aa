from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from pns_server.audit import record
from pns_server.clients.repository import ClientRepository, device_counts
from pns_server.clients.schemas import ClientCreate, ClientCreated, ClientInfo
from pns_server.config import Settings
from pns_server.db import Executor
from pns_server.errors import EditionUnsupported, RegistrationKeyInvalid
from pns_server.models import Client
from pns_server.rows import ClientRow
from pns_server.runtime import Runtime
from pns_server.security import CLIENT_TOKEN_PREFIX, constant_time_equals, hash_token, new_id
from pns_server.security import new_token as make_token


def check_registration_key(settings: Settings, given: str | None) -> None:
    if settings.registration_key is None:
        return
    expected = settings.registration_key.get_secret_value()
    if given is None or not constant_time_equals(given, expected):
        raise RegistrationKeyInvalid(
            "This relay requires a registration key; ask its operator for PNS_REGISTRATION_KEY."
        )


def check_edition(settings: Settings, edition: str) -> str:
    edition = edition.strip().lower()
    if edition not in settings.allowed_editions:
        raise EditionUnsupported(
            f"Two-factor login is not offered for the '{edition}' edition; allowed: "
            f"{', '.join(settings.allowed_editions)}.",
            edition=edition,
        )
    return edition


async def register(session: AsyncSession, runtime: Runtime, data: ClientCreate) -> ClientCreated:
    settings = runtime.settings
    check_registration_key(settings, data.registration_key)
    edition = check_edition(settings, data.edition)
    token = make_token(CLIENT_TOKEN_PREFIX)
    client = Client(
        id=new_id(),
        token_hash=hash_token(token),
        name=data.name,
        edition=edition,
        hostname=data.hostname,
        created_at=datetime.now(UTC),
    )
    ClientRepository(session).add(client)
    await session.flush()
    record(session, "client.registered", client_id=client.id, actor="client", actor_id=client.id)
    return ClientCreated(client_id=client.id, client_token=token, edition=edition)


async def describe(unit: Executor, client: ClientRow) -> ClientInfo:
    devices, push_devices = await device_counts(unit, client.id)
    locked = client.locked_until
    if locked is not None and locked <= datetime.now(UTC):
        locked = None
    return ClientInfo(
        client_id=client.id,
        name=client.name,
        edition=client.edition,
        hostname=client.hostname,
        created_at=client.created_at,
        devices=devices,
        push_devices=push_devices,
        locked_until=locked,
    )
