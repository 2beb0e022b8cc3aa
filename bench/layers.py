"""`db_layers`: what one database operation costs at each layer the relay goes through.

Runs in this process (no relay): the token lookup every authenticated request makes, timed
in CPU per operation through the driver alone, through the relay's units on the driver
connection (`Database.unit()`, `unit_read()`), through SQLAlchemy Core on a connection,
and through the ORM session the cold routes use (`Database.session()`), plus the cost of
one more statement inside each kind of unit, and on PostgreSQL a delivered push recorded
in a unit of work against a statement alone. It separates what the database round trip
costs from what the layers above it cost."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosqlite
import asyncpg
from sqlalchemy import bindparam, insert, select

from pns_server.config import async_database_url
from pns_server.db import Database, create_engine, publish_after_commit
from pns_server.models import Base, Client
from pns_server.outbox.repository import DeliveryRepository
from pns_server.realtime.factory import create_notifier
from pns_server.security import hash_token, new_id
from pns_server.topics import PUSH_SENT, approval_topic

if TYPE_CHECKING:
    from bench.harness import Databases
    from bench.scenarios import Size

TOKEN = "pnsc_layers-benchmark-token"
LOOKUP_PG = "SELECT * FROM clients WHERE token_hash = $1"
LOOKUP_SQLITE = "SELECT * FROM clients WHERE token_hash = ?"


async def cpu_ms_per_op(operation: Callable[[], Awaitable[Any]], count: int) -> float:
    for _ in range(min(100, count)):  # statement caches warm, connections open
        await operation()
    started = time.process_time()
    for _ in range(count):
        await operation()
    return round(1000 * (time.process_time() - started) / count, 4)


async def seeded(db: Database) -> None:
    async with db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    async with db.session() as session:
        session.add(Client(id="c" * 32, token_hash=hash_token(TOKEN), name="BENCH", edition="pro"))


async def driver_figures(kind: str, url: str, count: int) -> dict[str, float]:
    token_hash = hash_token(TOKEN)
    if kind == "postgres":
        conn = await asyncpg.connect(url)
        try:
            lookup = await conn.prepare(LOOKUP_PG)

            async def in_transaction() -> None:
                async with conn.transaction():
                    await lookup.fetchrow(token_hash)

            return {
                "driver_lookup": await cpu_ms_per_op(lambda: lookup.fetchrow(token_hash), count),
                "driver_begin_lookup_commit": await cpu_ms_per_op(in_transaction, count),
            }
        finally:
            await conn.close()
    lite = await aiosqlite.connect(url.split("///", 1)[1], isolation_level=None)
    try:

        async def lookup_sqlite() -> None:
            async with lite.execute(LOOKUP_SQLITE, (token_hash,)) as cursor:
                await cursor.fetchone()

        async def in_transaction_sqlite() -> None:
            await lite.execute("BEGIN IMMEDIATE")
            await lookup_sqlite()
            await lite.execute("COMMIT")

        return {
            "driver_lookup": await cpu_ms_per_op(lookup_sqlite, count),
            "driver_begin_lookup_commit": await cpu_ms_per_op(in_transaction_sqlite, count),
        }
    finally:
        await lite.close()


async def sqlalchemy_figures(db: Database, count: int) -> dict[str, float]:
    token_hash = hash_token(TOKEN)
    built_once = select(Client).where(Client.token_hash == bindparam("token_hash"))
    columns = select(Client.id, Client.name).where(Client.token_hash == token_hash)

    async def core_on_connection() -> None:
        async with db.engine.begin() as conn:
            (await conn.execute(columns)).first()

    async def orm_unit_of_work(statements: int = 1) -> None:
        async with db.session() as session:
            for _ in range(statements):
                # A new statement object per execution, as most repository methods build them.
                await session.scalar(select(Client).where(Client.token_hash == token_hash))

    async def orm_unit_of_work_built_once(statements: int) -> None:
        async with db.session() as session:
            for _ in range(statements):
                await session.scalar(built_once, {"token_hash": token_hash})

    table = Base.metadata.tables[Client.__tablename__]
    columns_built_once = select(*table.c).where(table.c.token_hash == bindparam("token_hash"))

    async def driver_unit(statements: int = 1) -> None:
        async with db.unit() as unit:
            for _ in range(statements):
                (await unit.execute(columns_built_once, {"token_hash": token_hash})).first()

    async def driver_unit_read() -> None:
        async with db.unit_read() as unit:
            (await unit.execute(columns_built_once, {"token_hash": token_hash})).first()

    async def empty_unit_of_work() -> None:
        async with db.session() as session:
            await session.connection()

    one = await cpu_ms_per_op(orm_unit_of_work, count)
    five = await cpu_ms_per_op(lambda: orm_unit_of_work(5), count)
    one_built = await cpu_ms_per_op(lambda: orm_unit_of_work_built_once(1), count)
    five_built = await cpu_ms_per_op(lambda: orm_unit_of_work_built_once(5), count)
    unit_one = await cpu_ms_per_op(driver_unit, count)
    unit_five = await cpu_ms_per_op(lambda: driver_unit(5), count)
    return {
        "driver_unit_one_lookup": unit_one,
        "driver_unit_read_one_lookup": await cpu_ms_per_op(driver_unit_read, count),
        "driver_unit_each_further_statement": round((unit_five - unit_one) / 4, 4),
        "sqlalchemy_core_transaction": await cpu_ms_per_op(core_on_connection, count),
        "orm_unit_of_work_one_lookup": one,
        "orm_unit_of_work_no_statement": await cpu_ms_per_op(empty_unit_of_work, count),
        "orm_each_further_statement": round((five - one) / 4, 4),
        "orm_each_further_statement_built_once": round((five_built - one_built) / 4, 4),
    }


async def sending_deliveries(db: Database, count: int, lease: datetime) -> list[str]:
    """`count` deliveries out with their provider under `lease`, each of its own approval."""
    now = datetime.now(UTC)
    tables = Base.metadata.tables
    device = {"id": "d" * 32, "client_id": "c" * 32, "kind": "app", "name": "phone"}
    approval_ids = [new_id() for _ in range(count)]
    approvals = [
        {
            "id": approval_id,
            "client_id": "c" * 32,
            "status": "pending",
            "request_hash": "-",
            "username": "u",
            "hostname": "h",
            "action": "x",
            "created_at": now,
            "expires_at": now + timedelta(hours=1),
        }
        for approval_id in approval_ids
    ]
    deliveries = [
        {
            "id": new_id(),
            "approval_id": approval_id,
            "device_id": "d" * 32,
            "service": "apns",
            "status": "sending",
            "attempts": 1,
            "lease_until": lease,
            "next_attempt_at": now,
            "created_at": now,
        }
        for approval_id in approval_ids
    ]
    async with db.engine.begin() as conn:
        await conn.execute(
            insert(tables["devices"]), [device | {"token_hash": "-", "totp_secret": "-"}]
        )
        await conn.execute(insert(tables["approvals"]), approvals)
        await conn.execute(insert(tables["deliveries"]), deliveries)
    return [delivery["id"] for delivery in deliveries]


async def record_figures(db: Database, count: int) -> dict[str, float]:
    """PostgreSQL: one delivered push recorded in a unit of work (BEGIN, the finish, the
    NOTIFY with the COMMIT: SQLite's way, and PostgreSQL's before the seventeenth round)
    against the finish alone, which NOTIFYs by itself (the dispatcher's way now)."""
    lease = datetime.now(UTC) + timedelta(hours=1)
    ids = iter(await sending_deliveries(db, 2 * (count + min(100, count)), lease))

    async def in_unit() -> None:
        async with db.unit() as unit:
            for approval_id in await DeliveryRepository(unit).finish_sent(
                [next(ids)], lease, lease
            ):
                publish_after_commit(unit, approval_topic(approval_id, PUSH_SENT))

    async def alone() -> None:
        async with db.unit_alone() as unit:
            repo = DeliveryRepository(unit)
            for approval_id in await repo.finish_sent_notifying([next(ids)], lease, lease):
                publish_after_commit(unit, approval_topic(approval_id, PUSH_SENT))

    return {
        "record_delivered_push_in_unit": await cpu_ms_per_op(in_unit, count),
        "record_delivered_push_alone": await cpu_ms_per_op(alone, count),
    }


async def db_layers(dbs: Databases, kind: str, tmp: Path, size: Size) -> list[dict[str, Any]]:
    count = 4 * size.route_requests  # 800 quick, 2,000 full
    url = await dbs.fresh(kind)
    notifier = create_notifier(async_database_url(url))  # not started: no LISTEN needed
    db = Database(
        create_engine(async_database_url(url)),
        notifier.publish,
        notifier.before_commit,
        notifier.notify_sql,
    )
    try:
        await seeded(db)
        figures = await sqlalchemy_figures(db, count)
        if kind == "postgres":
            figures |= await record_figures(db, count)
    finally:
        await db.dispose()
    figures = {**await driver_figures(kind, url, count), **figures}
    return [
        {"database": kind, "operations": count, **{k + "_cpu_ms": v for k, v in figures.items()}}
    ]
