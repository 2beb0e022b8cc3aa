"""Run alembic from code: `pns-server migrate`, and the start-up upgrade's child process
(`pns_server.schema`); the serving process never imports this module."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory


def migrations_dir() -> Path:
    packaged = Path(__file__).parent / "migrations"  # inside a built wheel
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "migrations"  # a source checkout


def alembic_config(sqlalchemy_url: str, secret_keys: Sequence[str] | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["sqlalchemy_url"] = sqlalchemy_url
    if secret_keys is not None:
        # Data migrations that re-seal secrets read the keys here (else from PNS_* settings).
        cfg.attributes["secret_keys"] = list(secret_keys)
    return cfg


def upgrade_to_head(sqlalchemy_url: str, secret_keys: Sequence[str] | None = None) -> None:
    """Blocking (alembic runs its own event loop): call it from a thread inside async code."""
    command.upgrade(alembic_config(sqlalchemy_url, secret_keys), "head")


@functools.cache
def head_revision() -> str | None:
    """The newest revision shipped with this build (read once: it cannot change at run time)."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return script.get_current_head()
