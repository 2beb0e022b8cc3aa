"""SQLite for the driver units: statements run on the event loop, and only a statement
that must wait for a lock goes to a thread.

The units' statements are index lookups and small writes that SQLite runs in about 10 us.
Handing each one to aiosqlite's thread and back cost 80-90 us of CPU more (the thread's
queue, waking the event loop through its self-pipe, the GIL changing hands twice), and a
login runs some thirty of them with its BEGINs and COMMITs. So this connection runs them
right on the event loop, with SQLite's busy timeout at zero: a statement that would wait
for a lock (another process's write transaction: `pns-server admin`, a migration) fails
at once with SQLITE_BUSY, having done nothing, and is run again in the connection's own
thread with the usual busy timeout, where the wait stops no other request. That is what
SQLite's busy handler would have done, without the event loop standing still meanwhile.

Two more things could hold the event loop, and neither runs there:
- checkpoints, which copy the write-ahead log into the database and sync both files:
  SQLite runs one inside the COMMIT that fills the log past its limit. This connection's
  automatic checkpoints are off; once enough rows have changed, a passive one runs on a
  connection and in a thread of its own (`Checkpointer`), so the units go on meanwhile;
- opening the connection (setting WAL mode takes a lock), done in the thread.

What is left on the event loop is the statement itself, which reads pages the operating
system has cached, and appends to the log at COMMIT without syncing it
(`synchronous=NORMAL` in WAL mode). For a database much larger than memory, or on a slow
disk, a read may wait for the disk there: PostgreSQL is the backend for such loads.

The connection is used by one unit at a time (`pns_server.db.SqliteTurns`). A unit
cancelled while its statement waits in the thread leaves that statement running: every
call first waits for it to end, so the loop and the thread never use the connection at
the same time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

log = logging.getLogger("pns.db")

T = TypeVar("T")

# How long a statement sent to the thread waits for another connection's lock.
BUSY_TIMEOUT_MS = 10_000
# Rows changed between passive checkpoints: a few pages each, so the log stays within a
# few megabytes (SQLite's own default checkpoints at 1,000 pages, 4 MB).
CHECKPOINT_EVERY_CHANGES = 256
# Frames in the log past which a checkpoint runs with no unit beside it (see Checkpointer):
# 16 MB of 4 KB pages, a few hundred logins' writes.
RESTART_LOG_AT_FRAMES = 4_096

# The settings of every connection the relay opens on SQLite. The busy timeout comes first:
# setting the journal mode takes a lock too, and without it a connection opened while
# another process holds one fails at once with "database is locked".
CONNECTION_PRAGMAS = (
    f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}",
    "PRAGMA journal_mode=WAL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA synchronous=NORMAL",
)

_SQLITE_BUSY = 5  # the primary result code; extended codes carry it in their low byte


def connect(
    database: str, options: Mapping[str, Any], pragmas: Sequence[str]
) -> sqlite3.Connection:
    """`sqlite3.connect` with `options`, in autocommit mode (BEGIN and COMMIT are the units'
    own), usable from any one thread at a time, then `pragmas`."""
    settings = {**options, "isolation_level": None, "check_same_thread": False}
    connection: sqlite3.Connection = sqlite3.connect(database, **settings)
    try:
        for pragma in pragmas:
            connection.execute(pragma)
    except BaseException:
        connection.close()
        raise
    return connection


def must_wait(error: sqlite3.OperationalError) -> bool:
    """The statement failed because another connection holds a lock it needs."""
    code = getattr(error, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == _SQLITE_BUSY


class LoopSqlite:
    """One SQLite connection for the driver units (see the module's docstring). Also what
    the units hold as their connection: `info` for their marks, `invalidate()`."""

    def __init__(self, connection: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        self._db = connection
        self._executor = executor
        self._waiting: Future[Any] | None = None  # a statement still running in the thread
        self._checkpointed_at = connection.total_changes
        self.info: dict[str, Any] = {}
        self.invalidated = False
        self.waited = 0  # statements sent to the thread to wait for a lock

    @classmethod
    async def open(cls, database: str, **options: Any) -> LoopSqlite:
        """Connect to `database` with `sqlite3.connect` options (`uri`, ...)."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pns-sqlite")

        pragmas = (
            *CONNECTION_PRAGMAS,
            "PRAGMA wal_autocheckpoint=0",  # see Checkpointer
            "PRAGMA busy_timeout=0",
        )
        try:
            connection = await asyncio.wrap_future(
                executor.submit(connect, database, options, pragmas)
            )
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(connection, executor)

    async def execute_fetchall(
        self, sql: str, parameters: Sequence[Any] = ()
    ) -> list[Sequence[Any]]:
        """The rows of a statement that returns rows."""
        return await self._call(lambda db: db.execute(sql, parameters).fetchall())

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> int:
        """Run a statement that returns no rows; the number of rows it changed."""
        return await self._call(lambda db: db.execute(sql, parameters).rowcount)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any] | Mapping[str, Any]]) -> int:
        return await self._call(lambda db: db.executemany(sql, rows).rowcount)

    async def rollback(self) -> None:
        """End a transaction if one is open (none: nothing to do)."""
        await self._call(lambda db: db.rollback())

    def checkpoint_due(self) -> bool:
        """Enough rows changed through this connection since the last checkpoint began."""
        if self.invalidated:
            return False
        return self._db.total_changes - self._checkpointed_at >= CHECKPOINT_EVERY_CHANGES

    def checkpoint_started(self) -> None:
        self._checkpointed_at = self._db.total_changes

    async def invalidate(self) -> None:
        """Drop this connection (its transaction, if any, ends with it)."""
        self.invalidated = True
        await self.close()

    async def close(self) -> None:
        """Close once a statement left running in the thread has ended."""
        await self._settled()
        try:
            self._db.close()
        finally:
            self._executor.shutdown(wait=True)

    async def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work` on the event loop; again in the thread if it must wait for a lock."""
        if self._waiting is not None:  # rare: no coroutine for it on every statement
            await self._settled()
        try:
            return work(self._db)
        except sqlite3.OperationalError as error:
            if not must_wait(error):
                raise
        return await self._in_thread(work)

    async def _in_thread(self, work: Callable[[sqlite3.Connection], T]) -> T:
        self.waited += 1
        return await self._submit(lambda: self._with_busy_timeout(work))

    async def _submit(self, job: Callable[[], T]) -> T:
        """Run `job` in the thread, kept as `_waiting` until a later call has seen it end."""
        waiting = self._executor.submit(job)
        self._waiting = waiting
        return await asyncio.wrap_future(waiting)

    def _with_busy_timeout(self, work: Callable[[sqlite3.Connection], T]) -> T:
        self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        try:
            return work(self._db)
        finally:
            self._db.execute("PRAGMA busy_timeout=0")

    async def _settled(self) -> None:
        """Wait for a statement a cancelled caller left running in the thread."""
        waiting = self._waiting
        if waiting is None:
            return
        if not waiting.done():
            # Shielded: a caller cancelled here must not cancel that statement's future.
            with contextlib.suppress(Exception):
                await asyncio.shield(asyncio.wrap_future(waiting))
        self._waiting = None


class Checkpointer:
    """Passive checkpoints of one database, on a connection and in a thread of their own.

    Run on the units' connection, a checkpoint held the next unit until it was done: it
    copies the log into the database and syncs both files, 5-12 ms every 256 changed rows,
    which was the slowest percent of the decisions (`docs/benchmarks.md`). A passive
    checkpoint takes no lock that a reader or a writer waits for, and copies only committed
    pages, so it runs beside the units, whatever transaction they have open. One at a
    time: one due while the last still runs means the writes outpace it (a slow disk), and
    it is run as a catch-up, below.

    But the log starts over only at a write that begins once a checkpoint has copied all of
    it, and under steady writes one running beside the units never catches up: the log
    grew without end (180 MB after 20,000 small units). So once it passes
    `RESTART_LOG_AT_FRAMES`, the next checkpoint runs inside a turn (`catch_up`), with no
    unit writing meanwhile: it copies the few frames the earlier ones left, and the next
    write starts the log over."""

    def __init__(self, database: str, options: Mapping[str, Any]) -> None:
        self._database = database
        self._options = dict(options)
        self._executor: ThreadPoolExecutor | None = None  # made by the first checkpoint
        self._db: sqlite3.Connection | None = None  # used in the thread only
        # The thread's own future: done as soon as the checkpoint is, even while the event
        # loop has not yet run the callbacks an asyncio future would wait for.
        self._running: Future[None] | None = None
        # The log's length in frames when the last checkpoint began, and whether it copied
        # them all (beside the units, more were written meanwhile).
        self.log_frames = 0
        self._copied_all = False

    @property
    def running(self) -> bool:
        return self._running is not None and not self._running.done()

    @property
    def log_must_start_over(self) -> bool:
        return self.log_frames >= RESTART_LOG_AT_FRAMES

    async def catch_up(self) -> None:
        """A checkpoint with no unit beside it: call during a turn. It copies the whole log
        (unless another process reads an older snapshot), so the next write starts it over.
        A failure is logged, as one beside the units is: the turn's work is done."""
        await self._running_ended()
        self.start()
        await self._running_ended()
        if self._copied_all:
            self.log_frames = 0  # the next write starts the log over

    async def _running_ended(self) -> None:
        if self._running is not None:
            with contextlib.suppress(Exception):  # logged by its callback
                await asyncio.shield(asyncio.wrap_future(self._running))

    def start(self) -> bool:
        """Begin a checkpoint unless one is running; whether one began."""
        if self.running:
            return False
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="pns-checkpoint")
        self._running = self._executor.submit(self._checkpoint)
        self._running.add_done_callback(_report_failed_checkpoint)
        return True

    async def close(self) -> None:
        """Close once a running checkpoint has ended (a later one opens again)."""
        await self._running_ended()
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.wrap_future(executor.submit(self._disconnect))
        finally:
            executor.shutdown(wait=False)

    def _checkpoint(self) -> None:
        if self._db is None:
            # The units' settings, but for the journal mode: the database is in WAL mode
            # already, and setting it would take a lock.
            pragmas = [pragma for pragma in CONNECTION_PRAGMAS if "journal_mode" not in pragma]
            self._db = connect(self._database, self._options, pragmas)
        try:
            _busy, frames, copied = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            self.log_frames, self._copied_all = frames, copied == frames
        except BaseException:
            self._disconnect()  # the next checkpoint starts from a new connection
            raise

    def _disconnect(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()


def _report_failed_checkpoint(done: Future[None]) -> None:
    # Nothing is lost: the log keeps the pages, and the next checkpoint copies them.
    if not done.cancelled() and done.exception() is not None:
        log.warning("SQLite checkpoint failed; tried again later", exc_info=done.exception())
