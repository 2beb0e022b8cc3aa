"""Units of work on the driver connection: the same rows, types, transactions and errors as
SQLAlchemy's own path, on SQLite and PostgreSQL, and refusals where they could differ."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import bindparam, exc, func, insert, select, text, update

from pns_server import driver
from pns_server.config import async_database_url
from pns_server.db import Database, create_engine
from pns_server.driver import UnsupportedStatement
from pns_server.errors import OtpInvalid
from pns_server.models import AuditEvent, Base, Client
from pns_server.security import new_id

clients = Base.metadata.tables["clients"]
audit_events = Base.metadata.tables["audit_events"]

CLIENT = select(*clients.c).where(clients.c.id == bindparam("client"))
NAME = select(clients.c.name).where(clients.c.id == bindparam("client"))
RENAME = update(clients).where(clients.c.id == bindparam("client")).values(name=bindparam("name"))
COUNT_FAILURE = (
    update(clients)
    .where(clients.c.id == bindparam("client"))
    .values(otp_consecutive_failures=clients.c.otp_consecutive_failures + 1)
    .returning(clients.c.otp_consecutive_failures, clients.c.locked_until)
)
INSERT_CLIENT = insert(clients)
INSERT_AUDIT = insert(audit_events)
AUDIT_OF = select(audit_events.c.event, audit_events.c.at, audit_events.c.detail).where(
    audit_events.c.client_id == bindparam("client")
)
EDITIONS = select(func.count()).where(
    clients.c.edition == "pro", clients.c.id == bindparam("client")
)


class Published:
    def __init__(self) -> None:
        self.topics: list[str] = []

    async def __call__(self, topics: Iterable[str]) -> None:
        self.topics.extend(topics)


@pytest.fixture
async def published() -> Published:
    return Published()


@pytest.fixture
async def db(database_url: str, published: Published) -> AsyncIterator[Database]:
    database = Database(create_engine(async_database_url(database_url)), published)
    try:
        yield database
    finally:
        await database.dispose()


def client_row(client_id: str, **values: object) -> dict[str, object]:
    now = datetime.now(UTC)
    row: dict[str, object] = {
        "id": client_id,
        "token_hash": new_id() + new_id(),
        "name": "Backup",
        "edition": "pro",
        "hostname": None,
        "created_at": now,
        "last_seen_at": None,
        "locked_until": now + timedelta(minutes=5),
        "pushes_since_success": 0,
        "otp_consecutive_failures": 0,
        "otp_failures_since_success": 0,
        "otp_lock_count": 0,
        "otp_locked_until": None,
    }
    row.update(values)
    return row


async def test_rows_written_by_the_orm_read_the_same_on_the_driver(db: Database) -> None:
    locked = datetime(2026, 11, 30, 9, 12, 18, 123456, tzinfo=UTC)
    async with db.session() as session:
        session.add(Client(id="c1", token_hash="h" * 64, name="Büro", edition="pro"))
        session.add(Client(id="c2", token_hash="i" * 64, name="x", edition="home"))
    async with db.session() as session:
        orm = await session.get(Client, "c1")
        assert orm is not None
        orm.locked_until = locked
    async with db.unit_read() as unit:
        row = (await unit.execute(CLIENT, {"client": "c1"})).one()
        missing = (await unit.execute(CLIENT, {"client": "nope"})).first()
        counted = await unit.scalar(EDITIONS, {"client": "c2"})
    assert missing is None
    assert counted == 0  # the literal 'pro' was bound, not dropped
    assert row.id == "c1" and row.name == "Büro" and row.pushes_since_success == 0
    assert row.locked_until == locked and row.locked_until.tzinfo is not None
    assert row.last_seen_at is None and row.hostname is None
    assert row.created_at.tzinfo is not None


async def test_rows_written_on_the_driver_read_the_same_through_the_orm(db: Database) -> None:
    at = datetime(2026, 11, 30, 9, 0, 0, 1, tzinfo=UTC)
    async with db.unit() as unit:
        await unit.execute(INSERT_CLIENT, client_row("c1", last_seen_at=at))
        await unit.execute(
            INSERT_AUDIT,
            [
                {"at": at, "client_id": "c1", "actor": "client", "actor_id": None,
                 "event": f"e{n}", "subject_id": None, "detail": {"n": n, "ok": True}}
                for n in range(3)
            ],
        )  # fmt: skip
    async with db.session() as session:
        orm = await session.get(Client, "c1")
        events = (await session.scalars(select(AuditEvent).order_by(AuditEvent.event))).all()
    assert orm is not None and orm.last_seen_at == at
    assert [(e.event, e.detail, e.at) for e in events] == [
        (f"e{n}", {"n": n, "ok": True}, at) for n in range(3)
    ]
    async with db.unit_read() as unit:
        read = (await unit.execute(AUDIT_OF, {"client": "c1"})).all()
    assert sorted((r.event, r.detail, r.at) for r in read) == [
        (f"e{n}", {"n": n, "ok": True}, at) for n in range(3)
    ]


async def test_updates_report_rowcount_and_returning_rows(db: Database) -> None:
    async with db.unit() as unit:
        await unit.execute(INSERT_CLIENT, client_row("c1"))
        assert (await unit.execute(RENAME, {"client": "c1", "name": "new"})).rowcount == 1
        assert (await unit.execute(RENAME, {"client": "zz", "name": "new"})).rowcount == 0
        first = (await unit.execute(COUNT_FAILURE, {"client": "c1"})).one()
        second = (await unit.execute(COUNT_FAILURE, {"client": "c1"})).one()
        assert (await unit.execute(COUNT_FAILURE, {"client": "zz"})).all() == []
    assert first.otp_consecutive_failures == 1 and second.otp_consecutive_failures == 2
    assert second.locked_until is not None and second.locked_until.tzinfo is not None
    async with db.unit_read() as unit:
        assert await unit.scalar(NAME, {"client": "c1"}) == "new"


async def test_a_unit_commits_only_when_its_block_succeeds(
    db: Database, published: Published
) -> None:
    async with db.unit() as unit:
        await unit.execute(INSERT_CLIENT, client_row("c1"))
    with pytest.raises(RuntimeError):
        async with db.unit() as unit:
            await unit.execute(RENAME, {"client": "c1", "name": "lost"})
            unit.info.setdefault("pns_topics", set()).add("never")
            raise RuntimeError("boom")
    with pytest.raises(OtpInvalid):  # commit=True: the work before the error persists
        async with db.unit() as unit:
            await unit.execute(COUNT_FAILURE, {"client": "c1"})
            unit.info.setdefault("pns_topics", set()).add("counted")
            raise OtpInvalid("wrong", commit=True)
    with pytest.raises(exc.IntegrityError):  # a duplicate key, as SQLAlchemy reports it
        async with db.unit() as unit:
            await unit.execute(RENAME, {"client": "c1", "name": "lost too"})
            await unit.execute(INSERT_CLIENT, client_row("c1"))
    async with db.unit_read() as unit:
        row = (await unit.execute(CLIENT, {"client": "c1"})).one()
    assert row.name == "Backup" and row.otp_consecutive_failures == 1
    assert published.topics == ["counted"]


async def test_statements_that_could_differ_from_sqlalchemy_are_refused(db: Database) -> None:
    async with db.unit() as unit:
        with pytest.raises(UnsupportedStatement, match="entity"):
            await unit.execute(select(Client).where(Client.id == "c1"))
        with pytest.raises(UnsupportedStatement, match="expanding IN"):
            await unit.execute(select(clients.c.id).where(clients.c.id.in_(["a", "b"])))
        with pytest.raises(UnsupportedStatement, match="default"):
            # created_at has a Python-side default that this path would not compute.
            row = client_row("c1")
            del row["created_at"]
            await unit.execute(INSERT_CLIENT, row)
        with pytest.raises(UnsupportedStatement, match="'client'"):
            await unit.execute(CLIENT, {})
        with pytest.raises(UnsupportedStatement, match="named columns"):
            await unit.execute(select(text("1")))


async def test_statements_built_per_call_still_run_once_the_cache_is_full(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(driver, "_CACHE", {})
    monkeypatch.setattr(driver, "CACHE_LIMIT", 3)
    async with db.unit() as unit:
        await unit.execute(INSERT_CLIENT, client_row("c1"))
        for n in range(10):
            statement = select(clients.c.name).where(clients.c.id == "c1", text(f"{n} = {n}"))
            assert await unit.scalar(statement) == "Backup"
    assert len(driver._CACHE) == 3


@pytest.mark.postgres_only
async def test_a_connection_killed_under_a_unit_is_reported_unavailable_and_dropped(
    db: Database,
) -> None:
    async with db.unit() as unit:
        await unit.execute(INSERT_CLIENT, client_row("c1"))
    with pytest.raises(exc.OperationalError) as raised:
        async with db.unit() as unit:
            pid = await unit.driver.fetchval("SELECT pg_backend_pid()")
            async with db.unit_read() as other:
                await other.driver.execute("SELECT pg_terminate_backend($1)", pid)
            await unit.execute(RENAME, {"client": "c1", "name": "lost"})
    assert raised.value.connection_invalidated
    for _ in range(3):  # the dead connection is not handed out again
        async with db.unit_read() as unit:
            assert await unit.scalar(NAME, {"client": "c1"}) == "Backup"


async def test_statement_listeners_see_each_statement_but_not_transaction_control(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    monkeypatch.setattr(driver, "statement_listeners", [seen.append])
    async with db.unit() as unit:
        await unit.execute(INSERT_CLIENT, client_row("c1"))
        await unit.execute(RENAME, {"client": "c1", "name": "n"})
    assert [sql.split(None, 1)[0] for sql in seen] == ["INSERT", "UPDATE"]


@pytest.mark.postgres_only
async def test_a_busy_database_is_reported_unavailable_not_as_a_bug(db: Database) -> None:
    """A statement cancelled by statement_timeout (or a deadlock, a lock timeout): the
    database is busy, so the request is answered 503 with Retry-After, like an outage."""
    async with db.unit() as unit:
        await unit.execute(INSERT_CLIENT, client_row("c1"))
    with pytest.raises(exc.OperationalError) as raised:
        async with db.unit() as unit:
            await unit.execute(text("SET LOCAL statement_timeout = 1"))
            await unit.execute(select(func.pg_sleep(0.5).label("slept")))
    assert not raised.value.connection_invalidated  # the connection itself is fine
    async with db.unit_read() as unit:
        assert await unit.scalar(NAME, {"client": "c1"}) == "Backup"


async def test_one_says_what_it_found(db: Database) -> None:
    async with db.unit() as unit:
        await unit.execute(INSERT_CLIENT, client_row("c1"))
        await unit.execute(INSERT_CLIENT, client_row("c2"))
        with pytest.raises(exc.NoResultFound):
            (await unit.execute(CLIENT, {"client": "none"})).one()
        every = select(clients.c.id).order_by(clients.c.id)
        with pytest.raises(exc.MultipleResultsFound):
            (await unit.execute(every)).one()
