"""The realtime topics every layer agrees on, and the one clock the rules read.

A topic names what changed; a commit that changes it publishes the topic (see
`db.publish_after_commit`) and every long-poll subscribed to it re-reads. They live here,
below the domain packages, so the outbox worker and two domains can share them without
importing one another's services."""

from __future__ import annotations

from datetime import UTC, datetime

OUTBOX_TOPIC = "outbox"  # a delivery is due: wakes the dispatcher at once


def approval_topic(approval_id: str) -> str:
    return f"approval:{approval_id}"


def pending_topic(client_id: str) -> str:
    """Wakes the phones of a client: an approval was created or left the pending list."""
    return f"pending:{client_id}"


def pairing_topic(pairing_id: str) -> str:
    return f"pairing:{pairing_id}"


def now_utc() -> datetime:
    """Aware UTC now; the one clock services and the outbox compare expiries against."""
    return datetime.now(UTC)
