"""The states an approval, a pairing and an outbox delivery move through.

Each is a `StrEnum`, so a member is the very string stored in the `status` column and
compared in SQL; the columns stay plain strings and old rows read the same."""

from __future__ import annotations

from enum import StrEnum


class ApprovalStatus(StrEnum):
    PENDING = "pending"  # the only state a decision, an expiry or a cancel may leave
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


class PairingStatus(StrEnum):
    PENDING = "pending"
    COMPLETED = "completed"
    EXPIRED = "expired"


class DeliveryStatus(StrEnum):
    """queued -> sending (leased) -> sent | failed | dropped"""

    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"  # gave up: dead token, bad configuration, the approval expired first
    DROPPED = "dropped"  # not needed any more: the approval was decided before it went out


# Deliveries still owed a send: what the dispatcher claims and the outbox gauge counts.
OPEN_DELIVERY = (DeliveryStatus.QUEUED, DeliveryStatus.SENDING)
