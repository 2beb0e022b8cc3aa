"""The realtime topics every layer agrees on, and the one clock the rules read.

A topic names what changed; a commit that changes it publishes the topic (see
`db.publish_after_commit`) and every long-poll subscribed to it re-reads. They live here,
below the domain packages, so the outbox worker and two domains can share them without
importing one another's services."""

from __future__ import annotations

from datetime import UTC, datetime

OUTBOX_TOPIC = "outbox"  # a delivery is due: wakes the dispatcher at once


# A topic may name what kind of change it is after a `/`: the approval's decision has no
# kind, a push's outcome one of these. A waiter subscribes to the topic alone and is woken
# only by the kinds it asked for (`Subscription.wants`): a long-poll that waits for the
# decision does not read the approval again because its push went out.
KIND_SEPARATOR = "/"
PUSH_SENT = "sent"  # a push was delivered to its provider
PUSH_RETRY = "retry"  # a push failed and is queued again
PUSH_FAILED = "failed"  # a push was given up


def approval_topic(approval_id: str, kind: str | None = None) -> str:
    """The approval's decision (expiry and cancel included); with `kind`, a push outcome."""
    topic = f"approval:{approval_id}"
    return topic if kind is None else f"{topic}{KIND_SEPARATOR}{kind}"


def approval_topic_around(kind: str) -> tuple[str, str]:
    """What comes before and after the approval's id in `approval_topic(id, kind)`: for a
    statement that NOTIFYs the topic of every approval it changes, building each itself."""
    before, after = approval_topic("\0", kind).split("\0")
    return before, after


def split_topic(topic: str) -> tuple[str, str]:
    """The topic subscribed to, and the kind of change ("" when none is named)."""
    subscribed, _, kind = topic.partition(KIND_SEPARATOR)
    return subscribed, kind


def pending_topic(client_id: str) -> str:
    """Wakes the phones of a client: an approval was created (an approval leaving the list
    cannot end a phone's wait, which lasts only while none is pending)."""
    return f"pending:{client_id}"


def pairing_topic(pairing_id: str) -> str:
    return f"pairing:{pairing_id}"


def now_utc() -> datetime:
    """Aware UTC now; the one clock services and the outbox compare expiries against."""
    return datetime.now(UTC)
