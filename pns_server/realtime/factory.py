from __future__ import annotations

from pns_server.realtime.base import LocalFanout
from pns_server.realtime.memory import MemoryNotifier
from pns_server.realtime.postgres import PostgresNotifier


def create_notifier(sqlalchemy_url: str) -> MemoryNotifier | PostgresNotifier:
    """The backend follows the database: PostgreSQL fans out across replicas."""
    if sqlalchemy_url.startswith("postgresql"):
        return PostgresNotifier(sqlalchemy_url)
    return MemoryNotifier()


__all__ = ["LocalFanout", "create_notifier"]
