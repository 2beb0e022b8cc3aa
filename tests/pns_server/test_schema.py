"""The start-up migration: checked with one query, run in a child process when needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from pns_server.config import Settings
from pns_server.db import create_engine
from pns_server.migrate import head_revision
from pns_server.schema import SCHEMA_HEAD, current_revision, migrate_if_behind
from tests.conftest import SECRET_KEY, make_settings


def test_the_build_knows_alembic_s_head() -> None:
    """Adding a migration without moving `SCHEMA_HEAD` would leave relays unmigrated."""
    assert head_revision() == SCHEMA_HEAD


# A relay started as `pns-server serve` starts one: its lifespan, on a database never
# migrated, then what it has loaded and what the database says.
START_ON_AN_EMPTY_DATABASE = """
import asyncio, json, sys
from pns_server.app import create_app
from pns_server.config import Settings
from pns_server.db import create_engine
from pns_server.schema import current_revision

async def main():
    app = create_app(Settings())
    async with app.router.lifespan_context(app):
        revision = await current_revision(app.state.runtime.db.engine)
    print(json.dumps({"revision": revision, "loaded": sorted(
        m for m in ("alembic", "mako") if m in sys.modules)}))

asyncio.run(main())
"""


def test_a_relay_migrates_an_empty_database_without_loading_alembic(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "PNS_DATABASE_URL": f"sqlite:///{tmp_path / 'pns.db'}",
        "PNS_DATA_DIR": str(tmp_path),
        "PNS_SECRET_KEY": SECRET_KEY,
    }
    done = subprocess.run(
        [sys.executable, "-c", START_ON_AN_EMPTY_DATABASE],
        env=env,
        cwd=Path(__file__).parents[2],  # this checkout's code
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"revision": SCHEMA_HEAD, "loaded": []}
    assert "Running upgrade" in done.stderr  # the child's log is the relay's log


async def test_a_database_at_head_is_not_migrated_again(database_url: str, tmp_path: Path) -> None:
    settings = make_settings(database_url, tmp_path)
    engine = create_engine(settings.sqlalchemy_url)
    try:
        assert await current_revision(engine) == SCHEMA_HEAD
        assert await migrate_if_behind(engine, settings, [SECRET_KEY]) is False
    finally:
        await engine.dispose()


async def test_a_database_ahead_of_the_build_fails_the_start(
    database_url: str, tmp_path: Path
) -> None:
    """A newer relay migrated it: this one must not serve on a schema it does not know."""
    settings: Settings = make_settings(database_url, tmp_path)
    engine = create_engine(settings.sqlalchemy_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        with pytest.raises(Exception, match="9999"):
            await migrate_if_behind(engine, settings, [SECRET_KEY])
        assert await current_revision(engine) == "9999"  # left as it was
    finally:
        await engine.dispose()
