"""Wake-ups for long-polls: publish(topic) after a commit, subscribe(topic) before a read."""

from pns_server.realtime.base import Notifier, Subscription
from pns_server.realtime.factory import create_notifier
from pns_server.realtime.memory import MemoryNotifier
from pns_server.realtime.postgres import PostgresNotifier

__all__ = ["MemoryNotifier", "Notifier", "PostgresNotifier", "Subscription", "create_notifier"]
