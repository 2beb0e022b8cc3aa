"""SQLite's driver connection: statements on the event loop, a statement that must wait
for another process's lock in the connection's thread (the loop keeps serving), and
checkpoints off the loop."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from pns_server.db import Database, create_engine
from pns_server.sqlite_loop import (
    CHECKPOINT_EVERY_CHANGES,
    RESTART_LOG_AT_FRAMES,
    LoopSqlite,
    must_wait,
)


def sqlite_database(path: Path) -> Database:
    return Database(create_engine(f"sqlite+aiosqlite:///{path}"))


async def held_connection(db: Database) -> LoopSqlite:
    async with db.unit_read() as unit:
        assert isinstance(unit.driver, LoopSqlite)
        return unit.driver


async def test_a_units_statements_run_on_the_event_loop(tmp_path: Path) -> None:
    """No statement leaves the event loop when nothing holds a lock: the unit does not
    even yield to another task between its statements (a hand-off to a thread would)."""
    db = sqlite_database(tmp_path / "loop.db")
    try:
        async with db.unit() as unit:
            await unit.run_sql("CREATE TABLE t (n INTEGER)")
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        async with db.unit() as unit:
            before = ticks
            for n in range(20):
                await unit.run_sql(f"INSERT INTO t VALUES ({n})")
            assert await unit.scalar(select(func.count()).select_from(text("t"))) == 20
            assert ticks == before
        stop.set()
        await ticking
        assert (await held_connection(db)).waited == 0
    finally:
        await db.dispose()


async def test_a_statement_that_must_wait_for_a_lock_waits_off_the_event_loop(
    tmp_path: Path,
) -> None:
    """Another process holds the write lock for 0.4 s: the unit's BEGIN IMMEDIATE waits for
    it in the connection's thread and then commits, while the event loop keeps running
    other requests (run on the loop, the wait would stop them all, or fail at once with
    the busy timeout at zero)."""
    path = tmp_path / "busy.db"
    db = sqlite_database(path)
    try:
        async with db.unit() as unit:
            await unit.run_sql("CREATE TABLE t (n INTEGER)")
        other_process = sqlite3.connect(path, isolation_level=None)
        other_process.execute("BEGIN IMMEDIATE")
        ticks = 0

        async def write() -> None:
            async with db.unit() as unit:
                await unit.run_sql("INSERT INTO t VALUES (1)")

        writing = asyncio.create_task(write())
        for _ in range(40):
            await asyncio.sleep(0.01)
            ticks += 1
        assert not writing.done()
        other_process.execute("ROLLBACK")
        other_process.close()
        async with asyncio.timeout(10):
            await writing
        assert ticks == 40
        assert (await held_connection(db)).waited == 1
        async with db.unit_read() as unit:
            assert await unit.scalar(select(func.count()).select_from(text("t"))) == 1
    finally:
        await db.dispose()


async def test_errors_other_than_a_lock_are_raised_on_the_event_loop(tmp_path: Path) -> None:
    """Only SQLITE_BUSY goes to the thread: a wrong statement fails at once, as itself."""
    db = sqlite_database(tmp_path / "wrong.db")
    try:
        with pytest.raises(Exception, match="no such table"):
            async with db.unit_read() as unit:
                await unit.execute(text("SELECT n FROM missing"))
        assert (await held_connection(db)).waited == 0
    finally:
        await db.dispose()


def test_only_a_busy_database_must_wait() -> None:
    busy = sqlite3.OperationalError("database is locked")
    busy.sqlite_errorcode = 5  # type: ignore[attr-defined]
    busy_snapshot = sqlite3.OperationalError("database is locked")
    busy_snapshot.sqlite_errorcode = 5 | (2 << 8)  # type: ignore[attr-defined]
    locked_table = sqlite3.OperationalError("database table is locked")
    locked_table.sqlite_errorcode = 6  # type: ignore[attr-defined]
    assert must_wait(busy) and must_wait(busy_snapshot)
    assert not must_wait(locked_table)
    assert not must_wait(sqlite3.OperationalError("no such table: t"))


async def checkpoint_ended(db: Database) -> None:
    async with asyncio.timeout(10):
        while db.checkpoint_running:
            await asyncio.sleep(0.005)


async def test_the_log_is_checkpointed_off_the_loop_after_enough_changes(tmp_path: Path) -> None:
    """The connection's own automatic checkpoints are off (one would sync files inside a
    COMMIT on the event loop); enough changed rows start one in a thread after the turn.
    The database file alone (copied without its log) then holds the rows."""
    path = tmp_path / "log.db"
    db = sqlite_database(path)

    copies = iter(range(10))

    def rows_in_the_database_file_alone() -> int:
        copy = tmp_path / f"copy-{next(copies)}.db"
        shutil.copyfile(path, copy)
        connection = sqlite3.connect(copy)
        try:
            return int(connection.execute("SELECT count(*) FROM t").fetchone()[0])
        except sqlite3.OperationalError:
            return 0  # the table itself is still only in the log
        finally:
            connection.close()

    try:
        async with db.unit() as unit:
            await unit.run_sql("CREATE TABLE t (n INTEGER)")
        few = CHECKPOINT_EVERY_CHANGES // 2
        for n in range(few):
            async with db.unit() as unit:
                await unit.run_sql(f"INSERT INTO t VALUES ({n})")
        await checkpoint_ended(db)
        assert rows_in_the_database_file_alone() == 0
        for n in range(few, CHECKPOINT_EVERY_CHANGES + 1):
            async with db.unit() as unit:
                await unit.run_sql(f"INSERT INTO t VALUES ({n})")
        await checkpoint_ended(db)
        assert rows_in_the_database_file_alone() >= CHECKPOINT_EVERY_CHANGES
        assert (await held_connection(db)).waited == 0
    finally:
        await db.dispose()


async def write_16_mb(db: Database) -> None:
    """One unit of 256 rows of 16 pages each: enough changes to start a checkpoint, and a
    log long enough (past the limit) that copying it takes many milliseconds."""
    async with db.unit() as unit:
        for _ in range(CHECKPOINT_EVERY_CHANGES):
            await unit.run_sql("INSERT INTO t VALUES (randomblob(65536))")


async def test_the_next_unit_runs_while_a_checkpoint_copies_the_log(tmp_path: Path) -> None:
    """A checkpoint copies the log into the database and syncs both files (5-12 ms for a
    few hundred rows): the unit after the one that started it does not wait for it, and
    its rows are in the database once a later checkpoint has run."""
    path = tmp_path / "beside.db"
    db = sqlite_database(path)
    try:
        async with db.unit() as unit:
            await unit.run_sql("CREATE TABLE t (b BLOB)")
        await write_16_mb(db)  # a checkpoint of many milliseconds
        async with db.unit() as unit:
            assert db.checkpoint_running
            await unit.run_sql("INSERT INTO t VALUES (x'00')")
        await checkpoint_ended(db)
        connection = sqlite3.connect(path)
        try:
            assert connection.execute("SELECT count(*) FROM t").fetchone()[0] == (
                CHECKPOINT_EVERY_CHANGES + 1
            )
        finally:
            connection.close()
        assert (await held_connection(db)).waited == 0
    finally:
        await db.dispose()


async def test_the_log_starts_over_under_steady_writes(tmp_path: Path) -> None:
    """The log starts over only at a write that begins once a checkpoint has copied all of
    it, which one beside steady writes never does: past `RESTART_LOG_AT_FRAMES` a
    checkpoint runs between two units. Four times that many one-page rows, written one
    unit after another, leave the log within a small multiple of that length (the rule
    acts on the length the last checkpoint saw, and a busy machine slows checkpoints
    down); without it the log holds every row."""
    path = tmp_path / "steady.db"
    wal = tmp_path / "steady.db-wal"
    db = sqlite_database(path)
    try:
        async with db.unit() as unit:
            await unit.run_sql("CREATE TABLE t (b BLOB)")
        longest = 0
        for _ in range(4 * RESTART_LOG_AT_FRAMES):
            async with db.unit() as unit:
                await unit.run_sql("INSERT INTO t VALUES (randomblob(3000))")
            longest = max(longest, wal.stat().st_size)
        await checkpoint_ended(db)
        connection = sqlite3.connect(path)
        try:
            page_size = connection.execute("PRAGMA page_size").fetchone()[0]
            assert longest < 2.5 * RESTART_LOG_AT_FRAMES * page_size
            assert connection.execute("SELECT count(*) FROM t").fetchone()[0] == (
                4 * RESTART_LOG_AT_FRAMES
            )
        finally:
            connection.close()
    finally:
        await db.dispose()


def frames_in_the_log(path: Path) -> int:
    """The log's length in frames, as a passive checkpoint reports it."""
    connection = sqlite3.connect(path)
    try:
        _busy, frames, _copied = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(frames)
    finally:
        connection.close()


async def test_a_unit_cancelled_during_the_catch_up_leaves_it_to_the_next_turn(
    tmp_path: Path,
) -> None:
    """A request that goes away while its turn begins with the checkpoint that lets the log
    start over (`catch_up`): it ends without having begun its unit, the turn is free for
    the next unit, and that one runs the catch-up instead, so the log still starts over."""
    path = tmp_path / "cancelled.db"
    db = sqlite_database(path)

    async def write_marker() -> None:
        async with db.unit() as unit:
            await unit.run_sql("INSERT INTO t VALUES (x'01')")

    try:
        async with db.unit() as unit:
            await unit.run_sql("CREATE TABLE t (b BLOB)")
        await write_16_mb(db)  # its checkpoint runs beside and sees the long log
        await checkpoint_ended(db)
        await write_16_mb(db)  # so the next turn begins with the catch-up
        assert not db.checkpoint_running

        cancelled = asyncio.create_task(write_marker())
        async with asyncio.timeout(10):
            while not db.checkpoint_running:
                await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled

        async with asyncio.timeout(10):  # the turn was given back
            async with db.unit() as unit:
                await unit.run_sql("INSERT INTO t VALUES (x'00')")
        await checkpoint_ended(db)
        assert frames_in_the_log(path) < 100  # a few pages: the log started over
        connection = sqlite3.connect(path)
        try:
            assert connection.execute("SELECT count(*) FROM t WHERE b = x'01'").fetchone()[0] == 0
            assert connection.execute("SELECT count(*) FROM t").fetchone()[0] == (
                2 * CHECKPOINT_EVERY_CHANGES + 1
            )
        finally:
            connection.close()
    finally:
        await db.dispose()


async def test_changes_that_outpace_a_running_checkpoint_make_the_next_turn_wait_for_it(
    tmp_path: Path,
) -> None:
    """A checkpoint due while the last one still runs (the writes outpace it: a slow
    disk, a busy machine) is not skipped: the next turn waits for the running one and runs
    one alone, so the log starts over. Skipped, the log grew with every write made during
    slow checkpoints (93 MB once in the steady-writes test above, on a busy machine)."""
    path = tmp_path / "outpaced.db"
    db = sqlite_database(path)
    try:
        async with db.unit() as unit:
            await unit.run_sql("CREATE TABLE t (b BLOB)")
        await write_16_mb(db)  # a checkpoint of many milliseconds
        async with db.unit() as unit:  # the next checkpoint's changes, in a moment
            for _ in range(CHECKPOINT_EVERY_CHANGES):
                await unit.run_sql("INSERT INTO t VALUES (x'00')")
            assert db.checkpoint_running
        async with db.unit() as unit:
            await unit.run_sql("INSERT INTO t VALUES (x'01')")
        await checkpoint_ended(db)
        assert frames_in_the_log(path) < 100  # a few pages: the log started over
    finally:
        await db.dispose()
