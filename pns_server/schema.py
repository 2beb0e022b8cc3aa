"""The schema revision this build runs on, known without loading alembic.

A relay that starts checks its database's revision with one query, and migrates only when
the database is behind, in a child process: alembic, its templates and the migration
scripts (several megabytes) never load in the process that serves requests."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from pns_server.config import Settings

log = logging.getLogger("pns")

# The newest revision in migrations/versions; a test holds it equal to alembic's head.
SCHEMA_HEAD = "0004"


async def current_revision(engine: AsyncEngine) -> str | None:
    """The database's revision; a plain query, cheap enough for every /readyz probe."""
    async with engine.connect() as conn:
        try:
            version = await conn.scalar(text("SELECT version_num FROM alembic_version"))
        except DBAPIError:
            return None  # never migrated
    return None if version is None else str(version)


async def migrate_if_behind(engine: AsyncEngine, settings: Settings, keys: Sequence[str]) -> bool:
    """Upgrade the schema to `SCHEMA_HEAD` unless it is there already; True if it ran.

    A database ahead of this build (a newer relay migrated it) fails here as `pns-server
    migrate` would: alembic does not know its revision."""
    current = await current_revision(engine)
    if current == SCHEMA_HEAD:
        return False
    log.info("schema at %s, this build needs %s: migrating", current or "nothing", SCHEMA_HEAD)
    await asyncio.to_thread(upgrade_in_child, settings, list(keys))
    return True


def upgrade_in_child(settings: Settings, keys: list[str]) -> None:
    """Run the migrations in a fresh interpreter and wait for it; its error is raised here.
    Spawned, not forked: the child imports alembic, this process never does."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as child:
        child.submit(_upgrade, settings, keys).result()


def _upgrade(settings: Settings, keys: list[str]) -> None:
    """In the child: the relay's log format and level, then alembic's upgrade to head."""
    from pns_server.migrate import upgrade_to_head
    from pns_server.observability import configure_logging

    configure_logging(settings)
    upgrade_to_head(settings.sqlalchemy_url, keys)
