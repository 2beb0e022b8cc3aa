"""Units of work on the driver connection, for the routes every login runs.

SQLAlchemy builds and compiles each statement (once per statement and dialect: the SQL,
the order of its parameters and the type conversions it would apply), and this module runs
it straight on asyncpg, or on SQLite's own module on the event loop
(`pns_server.sqlite_loop`). What it skips is SQLAlchemy's per-execution machinery, which
costs several times the database round trip itself (`bench.run --only db_layers`):
execution contexts, result metadata, the cursor adapters' greenlet hops, and on SQLite the
three or four hand-offs to aiosqlite's thread per statement (here: none, unless the
statement must wait for a lock).

Only Core statements on tables, built once with `bindparam`s, go through here: an ORM
entity select, an expanding IN, or an INSERT that would need a Python-side column default
is refused when compiled, so nothing silently differs from what SQLAlchemy would do. Driver
errors come out as SQLAlchemy's exception classes (integrity, operational with the
connection invalidated), so the HTTP error mapping is the same for both paths."""

from __future__ import annotations

import sqlite3
from collections import namedtuple
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
from sqlalchemy import ColumnElement, String, bindparam
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import Insert, UpdateBase
from sqlalchemy.sql.selectable import Select, SelectBase

from pns_server.sqlite_loop import LoopSqlite

Processor = Callable[[Any], Any] | None
Params = Mapping[str, Any]

# asyncpg errors that mean the connection (or the server) is gone or not accepting work:
# the request is retried by its caller, the connection is not handed out again.
_PG_UNAVAILABLE: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    # The protocol is in a state it cannot leave (e.g. the server's FATAL arrived between
    # statements): the connection is unusable, whatever the statement.
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    ConnectionError,
    OSError,
)


# Called with each statement's SQL before it runs (not BEGIN/COMMIT/ROLLBACK), like
# SQLAlchemy's `before_cursor_execute`: tests count a route's statements with it.
statement_listeners: list[Callable[[str], None]] = []


def _observe(sql: str) -> None:
    for listener in statement_listeners:
        listener(sql)


# SQLSTATEs of a database that is busy, not of a wrong statement: answered `503` with
# Retry-After like an outage, not `500`. Class 40 (serialization failure, deadlock), class
# 53 (insufficient resources), a cancelled statement (statement_timeout), a lock not
# available (lock_timeout), an operator's or the server's shutdown.
_TRANSIENT_CLASSES = ("40", "53")
_TRANSIENT_STATES = frozenset({"57014", "55P03", "57P01", "57P02", "57P03"})


def _is_transient(sqlstate: str | None) -> bool:
    return sqlstate is not None and (
        sqlstate.startswith(_TRANSIENT_CLASSES) or sqlstate in _TRANSIENT_STATES
    )


class UnsupportedStatement(TypeError):
    """A statement this path cannot run exactly as SQLAlchemy would (a programming error)."""


@dataclass(frozen=True, slots=True)
class Compiled:
    """A statement compiled for one dialect: positional SQL and how to fill and read it."""

    sql: str
    names: tuple[str, ...]
    defaults: tuple[Any, ...]  # a bound literal's value, or _REQUIRED
    binders: tuple[Processor, ...]
    readers: tuple[Processor, ...]
    row: Any  # a namedtuple class, or None when the statement returns no rows

    def arguments(self, params: Params) -> tuple[Any, ...]:
        values = []
        for name, default, binder in zip(self.names, self.defaults, self.binders, strict=True):
            value = params.get(name, default)
            if value is _REQUIRED:
                raise UnsupportedStatement(f"no value for parameter {name!r} of: {self.sql}")
            values.append(value if binder is None or value is None else binder(value))
        return tuple(values)

    def make_row(self, values: Sequence[Any]) -> Any:
        return self.row._make(
            value if reader is None or value is None else reader(value)
            for value, reader in zip(values, self.readers, strict=True)
        )


class _Required:
    def __repr__(self) -> str:
        return "<required>"


_REQUIRED: Any = _Required()


def compile_statement(
    statement: ClauseElement, dialect: Dialect, keys: tuple[str, ...] = ()
) -> Compiled:
    """Compile `statement` as SQLAlchemy would for `dialect`; `keys`: an INSERT's columns."""
    _refuse_entities(statement)
    compiled = statement.compile(dialect=dialect, column_keys=list(keys) or None)
    if not isinstance(compiled, SQLCompiler):
        raise UnsupportedStatement(f"not a SQL statement: {statement!r}")
    sql = str(compiled)
    if "POSTCOMPILE" in sql:
        raise UnsupportedStatement(f"expanding IN (use one bindparam per value): {sql}")
    if compiled.insert_prefetch or compiled.update_prefetch:
        raise UnsupportedStatement(f"a column default would be computed in Python: {sql}")
    names = tuple(compiled.positiontup or ())
    binds = compiled.binds
    defaults = tuple(
        _REQUIRED if binds[name].required else binds[name].effective_value for name in names
    )
    binders = tuple(
        binds[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names
    )
    columns = _result_columns(statement)
    readers = tuple(c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns)
    row = (
        namedtuple("Row", [_key(c, i) for i, c in enumerate(columns)], rename=True)
        if columns
        else None
    )
    return Compiled(sql, names, defaults, binders, readers, row)


def _refuse_entities(statement: ClauseElement) -> None:
    if isinstance(statement, Select):
        for description in statement.column_descriptions:
            if description.get("entity") is not None and description.get("expr") is description.get(
                "entity"
            ):
                raise UnsupportedStatement("an ORM entity select: select the table's columns")


def _result_columns(statement: ClauseElement) -> list[Any]:
    """The columns a statement returns. A `text()` statement runs for its effect (its rows,
    if any, are not read; `text(...).columns(...)` names them)."""
    if isinstance(statement, SelectBase | UpdateBase):
        columns = list(statement.exported_columns)
        if not columns and isinstance(statement, SelectBase):
            raise UnsupportedStatement("a select without named columns (a text() fragment)")
        return columns
    return []


def _key(column: Any, position: int) -> str:
    key = getattr(column, "key", None)
    return key if isinstance(key, str) and key.isidentifier() else f"col{position}"


class Rows:
    """What a statement returned: the subset of SQLAlchemy's `Result` the services use."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)

    def all(self) -> list[Any]:
        return self._rows

    def first(self) -> Any:
        return self._rows[0] if self._rows else None

    def one(self) -> Any:
        if not self._rows:
            raise sa_exc.NoResultFound("No row was found when one was required")
        if len(self._rows) > 1:
            raise sa_exc.MultipleResultsFound("Multiple rows were found when one was required")
        return self._rows[0]

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None

    def scalars(self) -> list[Any]:
        return [row[0] for row in self._rows]


class DriverUnit:
    """Runs compiled statements on one checked-out connection (see `Database.unit`)."""

    def __init__(
        self, connection: AsyncConnection | LoopSqlite, driver: Any, dialect: Dialect
    ) -> None:
        self.connection = connection
        self.driver = driver
        self.dialect = dialect
        self.postgres = dialect.name == "postgresql"
        self.info: dict[str, Any] = {}
        self.broken = False
        # Set on a read whose connection was not probed at checkout: how to get a probed
        # one if the first statement finds this one dead (then it is sent again, once).
        self.reconnect: (
            Callable[[AsyncConnection], Awaitable[tuple[AsyncConnection, Any]]] | None
        ) = None

    async def execute(
        self,
        statement: ClauseElement,
        params: Params | Sequence[Params] | None = None,
        **_options: Any,
    ) -> Rows:
        """Run `statement` with `params` (a list of mappings: an INSERT of many rows).
        Options SQLAlchemy would take (`execution_options`) have no meaning here."""
        if isinstance(params, Sequence):
            return await self._execute_many(statement, params)
        given = params or {}
        compiled = self._compiled(statement, given)
        arguments = compiled.arguments(given)
        _observe(compiled.sql)
        reconnect, self.reconnect = self.reconnect, None  # the first statement only
        try:
            return await self._rows(compiled, arguments)
        except sa_exc.OperationalError as error:
            if reconnect is None or not error.connection_invalidated:
                raise
            assert not isinstance(self.connection, LoopSqlite), "reconnects are PostgreSQL's"
            self.connection, self.driver = await reconnect(self.connection)
            self.broken = False
            return await self._rows(compiled, arguments)

    async def _rows(self, compiled: Compiled, arguments: tuple[Any, ...]) -> Rows:
        try:
            if compiled.row is not None:
                records = await self._fetch(compiled.sql, arguments)
                return Rows([compiled.make_row(r) for r in records], len(records))
            return Rows([], await self._run(compiled.sql, arguments))
        except Exception as error:
            raise await self._translated(error, compiled.sql) from error

    async def scalar(self, statement: ClauseElement, params: Params | None = None) -> Any:
        return (await self.execute(statement, params)).scalar()

    async def scalars(self, statement: ClauseElement, params: Params | None = None) -> list[Any]:
        return (await self.execute(statement, params)).scalars()

    async def commit_after(self, sql: str) -> None:
        """Run `sql` (a statement without parameters or rows) and COMMIT, in one round trip."""
        _observe(sql)
        await self.run_sql(f"{sql}; COMMIT")

    async def run_sql(self, sql: str) -> None:
        """A statement with no parameters and no rows: BEGIN, COMMIT, ROLLBACK."""
        try:
            await self.driver.execute(sql)
        except Exception as error:
            raise await self._translated(error, sql) from error

    def _compiled(self, statement: ClauseElement, params: Params) -> Compiled:
        keys = tuple(sorted(params)) if isinstance(statement, Insert) else ()
        return compiled_for(statement, self.dialect, keys)

    async def _execute_many(self, statement: ClauseElement, rows: Sequence[Params]) -> Rows:
        if not rows:
            return Rows([], 0)
        compiled = self._compiled(statement, rows[0])
        if compiled.row is not None:
            raise UnsupportedStatement("RETURNING with many rows of parameters")
        arguments = [compiled.arguments(row) for row in rows]
        _observe(compiled.sql)
        try:
            await self.driver.executemany(compiled.sql, arguments)
        except Exception as error:
            raise await self._translated(error, compiled.sql) from error
        return Rows([], len(rows))

    async def _fetch(self, sql: str, arguments: tuple[Any, ...]) -> Sequence[Sequence[Any]]:
        if self.postgres:
            records: Sequence[Sequence[Any]] = await self.driver.fetch(sql, *arguments)
            return records
        # On the event loop (`pns_server.sqlite_loop`).
        rows: list[Sequence[Any]] = await self.driver.execute_fetchall(sql, arguments)
        return rows

    async def _run(self, sql: str, arguments: tuple[Any, ...]) -> int:
        if self.postgres:
            status: str = await self.driver.execute(sql, *arguments)
            last = status.rsplit(" ", 1)[-1]
            return int(last) if last.isdigit() else -1
        changed: int = await self.driver.execute(sql, arguments)
        return changed

    async def _translated(self, error: Exception, sql: str) -> Exception:
        """The driver's error as the SQLAlchemy exception the rest of the relay handles."""
        if isinstance(error, UnsupportedStatement):
            return error
        if self.postgres:
            if isinstance(error, asyncpg.exceptions.IntegrityConstraintViolationError):
                return sa_exc.IntegrityError(sql, None, error, hide_parameters=True)
            if isinstance(error, _PG_UNAVAILABLE):
                await self.invalidate()
                return sa_exc.OperationalError(
                    sql, None, error, hide_parameters=True, connection_invalidated=True
                )
            if _is_transient(getattr(error, "sqlstate", None)):
                return sa_exc.OperationalError(sql, None, error, hide_parameters=True)
        else:
            if isinstance(error, sqlite3.IntegrityError):
                return sa_exc.IntegrityError(sql, None, error, hide_parameters=True)
            if isinstance(error, sqlite3.OperationalError):
                return sa_exc.OperationalError(sql, None, error, hide_parameters=True)
        return sa_exc.DBAPIError(sql, None, error, hide_parameters=True)

    async def invalidate(self) -> None:
        """Drop this connection: the pool opens a new one for the next unit."""
        if not self.broken:
            self.broken = True
            await self.connection.invalidate()


S = TypeVar("S", bound=ClauseElement)


class ValueList:
    """A list of values in an `IN`, the way this path allows one (an expanding IN is
    refused): a few statements compiled once, one per size class, with the binds past the
    list's end left NULL (`x IN ('a', 'b', NULL, NULL)` matches 'a' and 'b' only). A list
    longer than the largest class runs in chunks."""

    def __init__(self, prefix: str, sizes: tuple[int, ...]) -> None:
        self.prefix = prefix
        self.sizes = sizes
        self._binds = tuple(bindparam(f"{prefix}{i}", None, type_=String) for i in range(sizes[-1]))

    def statements(
        self, build: Callable[[ColumnElement[bool]], S], column: ColumnElement[Any]
    ) -> dict[int, S]:
        """`build(column IN (:<prefix>0 .. :<prefix>N-1))` for each size class N."""
        return {size: build(column.in_(self._binds[:size])) for size in self.sizes}

    def chunks(self, values: Sequence[Any]) -> Iterator[tuple[int, dict[str, Any]]]:
        """(size class, params naming each value) per chunk of at most the largest class."""
        largest = self.sizes[-1]
        for start in range(0, len(values), largest):
            chunk = values[start : start + largest]
            size = next(slot for slot in self.sizes if slot >= len(chunk))
            yield size, {f"{self.prefix}{i}": value for i, value in enumerate(chunk)}


_CACHE: dict[tuple[int, str, tuple[str, ...]], tuple[ClauseElement, Compiled]] = {}
# The statements of this path are module constants, built once: a few dozen. One built per
# call (a programming error) would fill the cache, so past this size nothing more is kept.
CACHE_LIMIT = 2_000


def compiled_for(statement: ClauseElement, dialect: Dialect, keys: tuple[str, ...]) -> Compiled:
    """`compile_statement`, cached per statement object, dialect and INSERT columns."""
    cache_key = (id(statement), dialect.name, keys)
    cached = _CACHE.get(cache_key)
    if cached is not None and cached[0] is statement:
        return cached[1]
    compiled = compile_statement(statement, dialect, keys)
    if len(_CACHE) < CACHE_LIMIT:
        # The statement is kept with its compiled form, so its id cannot be reused meanwhile.
        _CACHE[cache_key] = (statement, compiled)
    return compiled
