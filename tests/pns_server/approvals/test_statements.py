"""What the hot approval requests ask of the database: each round trip to it costs more
than the work it does, so a status read is one statement, the phone's detail one, and a
signed answer reads the approval once and decides it in one UPDATE that also tells it
whether any push is left to drop. Counted are the statements the request itself runs (not
the dispatcher's or the expiry sweep's, which run beside it), less the caller's
authentication and bookkeeping on its own row (`clients`, `devices`)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import event, select, update

from pns_server import driver
from pns_server.models import Delivery
from tests.pns_server.approvals.helpers import (
    answer,
    request_approval,
    runtime_of,
    settle_deliveries,
)
from tests.support.factories import PairedDevice, RegisteredClient

# Set around the requests under count; the tasks they start inherit it, the background
# ones (started with the app) do not.
_COUNTING: ContextVar[list[str] | None] = ContextVar("counting", default=None)


def _on_statement(sql: str) -> None:
    seen = _COUNTING.get()
    if seen is not None:
        seen.append(" ".join(sql.split()))


@contextmanager
def statements_run() -> Iterator[list[str]]:
    """The SQL statements the requests made meanwhile (in this context) run."""
    seen: list[str] = []
    token = _COUNTING.set(seen)
    driver.statement_listeners.append(_on_statement)
    try:
        yield seen
    finally:
        driver.statement_listeners.remove(_on_statement)
        _COUNTING.reset(token)


@contextmanager
def orm_statements(app: FastAPI) -> Iterator[list[str]]:
    """Every statement run meanwhile through SQLAlchemy's own execution (ORM sessions)."""
    engine = runtime_of(app).db.engine.sync_engine
    seen: list[str] = []

    def on_execute(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        seen.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", on_execute)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)


def _callers_own_row(words: list[str]) -> bool:
    """A token lookup, `last_seen_at`, `last_used_at`, the push counter: not the approval's."""
    if words[0] == "SELECT":
        return words[words.index("FROM") + 1] in ("clients", "devices")
    return words[0] == "UPDATE" and words[1] in ("clients", "devices")


def verbs(seen: list[str]) -> list[str]:
    """`SELECT approvals`, `UPDATE approvals`, `INSERT audit_events`... (PostgreSQL's
    NOTIFY, the wake-up sent with the commit, is the notifier's and left out)."""
    found = []
    for statement in seen:
        words = statement.split()
        if "pg_notify" in statement or _callers_own_row(words):
            continue
        if words[0] == "SELECT":
            found.append("SELECT approvals" if " FROM approvals " in statement else "SELECT")
        elif words[0] == "INSERT":
            found.append(f"INSERT {words[2]}")
        else:
            found.append(f"{words[0]} {words[1]}")
    return found


class TestStatements:
    async def test_a_status_read_is_one_statement(
        self, app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        await settle_deliveries(http, client, body["approval_id"])
        url = f"/v1/approvals/{body['approval_id']}"
        with statements_run() as seen:
            state = (await http.get(url, headers=client.headers)).json()
        assert state["delivery"]["queued"] + state["delivery"]["sent"] == 1
        assert verbs(seen) == ["SELECT approvals"]

    async def test_a_status_read_finds_the_deliveries_by_their_approval_alone(
        self,
        app: FastAPI,
        http: httpx.AsyncClient,
        client: RegisteredClient,
        phone: PairedDevice,
        db_kind: str,
        database_url: str,
    ) -> None:
        """Not through the index on status, which SQLite's planner (no statistics) took for
        the counts by status: every status read then went through every delivery ever sent,
        slower with every login."""
        if db_kind != "sqlite":
            pytest.skip("PostgreSQL's planner chooses by its statistics")
        body = await request_approval(http, client)
        with statements_run() as seen:
            await http.get(f"/v1/approvals/{body['approval_id']}", headers=client.headers)
        [read] = [sql for sql in seen if " FROM approvals " in sql]
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as db:
            plan = db.execute(f"EXPLAIN QUERY PLAN {read}", [None] * read.count("?")).fetchall()
        deliveries_read = [step[3] for step in plan if "deliveries" in step[3]]
        assert deliveries_read, plan
        assert all("(approval_id=?)" in step for step in deliveries_read), deliveries_read

    async def test_the_phones_detail_is_one_statement(
        self, app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        """The device's authentication, the approval and its client's name: one read."""
        body = await request_approval(http, client)
        url = f"/v1/device/approvals/{body['approval_id']}"
        with statements_run() as seen:
            detail = (await http.get(url, headers=phone.headers)).json()
        assert detail["client_name"] == "FILESRV01"
        [read] = seen
        assert read.startswith("SELECT devices.") and "devices.token_hash =" in read
        assert " JOIN approvals " in read and " JOIN clients " in read

    async def test_an_answer_after_the_push_went_out_drops_nothing(
        self,
        app: FastAPI,
        http: httpx.AsyncClient,
        client: RegisteredClient,
        phone: PairedDevice,
        db_kind: str,
    ) -> None:
        """The device's token lookup reads the approval too (a join: counted as the
        caller's own row). On PostgreSQL the decision, the device's last use, the
        push-count reset and the audit row are one statement: the whole request is that
        read and that statement, outside a transaction (no COMMIT carrying a NOTIFY: the
        decision's statement notifies the other processes itself)."""
        body = await request_approval(http, client)
        await settle_deliveries(http, client, body["approval_id"])
        with statements_run() as seen:
            decided = await answer(http, phone, body["approval_id"], "approve", body["match_code"])
        assert decided.json()["status"] == "approved"
        [read] = [s for s in seen if s.startswith("SELECT") and "pg_notify" not in s]
        assert "FROM devices LEFT OUTER JOIN approvals" in read
        if db_kind == "sqlite":
            assert verbs(seen) == ["UPDATE approvals", "INSERT audit_events"]
        else:
            assert len(seen) == 2 and seen[0] == read
            assert seen[1].startswith("WITH") and "pg_notify(" in seen[1]

    async def test_an_answer_drops_a_push_still_queued(
        self, app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        await settle_deliveries(http, client, body["approval_id"])
        later = datetime.now(UTC) + timedelta(hours=1)  # queued, but not due: not claimed
        async with runtime_of(app).db.session() as session:
            await session.execute(
                update(Delivery)
                .where(Delivery.approval_id == body["approval_id"])
                .values(status="queued", next_attempt_at=later)
            )
        with statements_run() as seen:
            decided = await answer(http, phone, body["approval_id"], "approve", body["match_code"])
        assert decided.json()["status"] == "approved"
        assert "UPDATE deliveries" in verbs(seen)
        async with runtime_of(app).db.session() as session:
            statuses = list(
                await session.scalars(
                    select(Delivery.status).where(Delivery.approval_id == body["approval_id"])
                )
            )
        assert statuses == ["dropped"]
        state = await http.get(f"/v1/approvals/{body['approval_id']}", headers=client.headers)
        assert state.json()["delivery"] == {"queued": 0, "sent": 0, "failed": 0, "last_error": None}

    async def test_a_cancel_needs_no_read_before_its_update(
        self, app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        await settle_deliveries(http, client, body["approval_id"])
        url = f"/v1/approvals/{body['approval_id']}"
        with statements_run() as seen:
            cancelled = (await http.delete(url, headers=client.headers)).json()
        assert cancelled["status"] == "cancelled" and cancelled["decided_at"] is not None
        assert cancelled["delivery"]["queued"] + cancelled["delivery"]["sent"] == 1
        assert verbs(seen) == ["UPDATE approvals", "INSERT audit_events", "SELECT"]

    async def test_creating_an_approval_authenticates_once(
        self,
        app: FastAPI,
        http: httpx.AsyncClient,
        client: RegisteredClient,
        phone: PairedDevice,
        db_kind: str,
    ) -> None:
        """The rate limit and the route share the request's one authenticated client, in
        the unit the route runs in (no token lookup through an ORM session beside it); the
        client's row is read once, its lock taken by that read; its app devices and pending
        approvals are read together. On PostgreSQL the approval, its deliveries, the push
        count and the audit row are one statement."""
        with statements_run() as seen, orm_statements(app) as orm:
            await request_approval(http, client)
        [read] = [statement for statement in seen if statement.startswith("SELECT clients.")]
        assert "token_hash =" in read
        assert read.endswith("FOR UPDATE") == (db_kind == "postgres")
        assert not [statement for statement in orm if "token_hash =" in statement]
        writes = {
            "sqlite": ["INSERT approvals", "INSERT deliveries", "INSERT audit_events"],
            "postgres": ["WITH new_approval"],
        }
        # The app devices and any pending approval to supersede: one statement.
        [together] = [statement for statement in seen if " UNION ALL " in statement]
        assert " FROM devices " in together and " FROM approvals " in together
        assert verbs(seen) == writes[db_kind]
        reads = [s for s in seen if s.startswith("SELECT") and "pg_notify" not in s]
        assert reads == [read, together]


@contextmanager
def sent_by_the_relay() -> Iterator[set[str]]:
    """Every statement the relay's code ran meanwhile, from any task (the dispatcher's
    too), through the driver path or SQLAlchemy's own execution."""
    seen: set[str] = set()

    def note(sql: str) -> None:
        seen.add(" ".join(sql.split()))

    driver.statement_listeners.append(note)
    try:
        yield seen
    finally:
        driver.statement_listeners.remove(note)


@pytest.mark.postgres_only
async def test_a_login_on_new_connections_sends_only_the_relays_statements(
    app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
) -> None:
    """asyncpg asks the server about any type it cannot decode itself (an array of
    varchar, an enum) once per connection, in three extra round trips around a catalog
    query: tens of milliseconds on the first login of every new connection. Every query a
    login makes on connections opened for it is one the relay wrote, or a transaction's
    BEGIN, COMMIT or ROLLBACK."""
    db = runtime_of(app).db
    engine = db.engine
    await db.dispose()  # the set-up's connections: the login's are opened for it
    on_the_wire: list[str] = []

    def log_queries(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.driver_connection.add_query_logger(
            lambda logged: on_the_wire.append(" ".join(logged.query.split()))
        )

    event.listen(engine.sync_engine, "connect", log_queries)
    try:
        with sent_by_the_relay() as relays, orm_statements(app) as orm:
            body = await request_approval(http, client)
            url = f"/v1/device/approvals/{body['approval_id']}"
            assert (await http.get(url, headers=phone.headers)).status_code == 200
            decided = await answer(http, phone, body["approval_id"], "approve", body["match_code"])
            assert decided.json()["status"] == "approved"
            state = await http.get(f"/v1/approvals/{body['approval_id']}", headers=client.headers)
            assert state.json()["status"] == "approved"
    finally:
        event.remove(engine.sync_engine, "connect", log_queries)
    assert any(query.startswith("WITH new_approval") for query in on_the_wire)
    ours = relays | set(orm) | {"BEGIN", "COMMIT", "ROLLBACK"}

    def sent_by_us(query: str) -> bool:  # the NOTIFY goes out with its COMMIT: "...; COMMIT"
        return all(part.strip() in ours for part in query.rstrip(";").split(";"))

    assert [query for query in on_the_wire if not sent_by_us(query)] == []
