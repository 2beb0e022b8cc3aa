from __future__ import annotations

from pns_server.realtime.base import LocalFanout, Notifier
from pns_server.realtime.memory import MemoryNotifier
from pns_server.realtime.postgres import PostgresNotifier


def create_notifier(sqlalchemy_url: str, listen_url: str | None = None) -> Notifier:
    """The backend follows the database: PostgreSQL fans out across replicas. `listen_url`:
    where the LISTEN connection goes when the pool's URL is a transaction pooler."""
    if sqlalchemy_url.startswith("postgresql"):
        return PostgresNotifier(sqlalchemy_url, listen_url=listen_url)
    return MemoryNotifier()


__all__ = ["LocalFanout", "create_notifier"]
