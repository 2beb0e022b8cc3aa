"""`pns-server rotate-key`: re-encrypt every stored TOTP secret under the primary key.

Run it with PNS_SECRET_KEY=<new> and PNS_OLD_SECRET_KEYS=<old,...>; the server keeps
decrypting with the old keys meanwhile. Idempotent, batched, safe while replicas serve."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import InstrumentedAttribute

from pns_server.db import Database
from pns_server.models import Device, Pairing
from pns_server.security import SecretBox

BATCH_SIZE = 500


@dataclass
class RotationReport:
    devices: int = 0
    pairings: int = 0


async def _rotate_column(
    db: Database,
    box: SecretBox,
    key: InstrumentedAttribute[str],
    column: InstrumentedAttribute[str] | InstrumentedAttribute[str | None],
) -> int:
    rotated = 0
    after = ""
    prefix = f"v1.{box.primary_key_id}."
    while True:
        async with db.session() as session:
            rows = (
                await session.execute(
                    select(key, column)
                    .where(key > after, column.is_not(None))
                    .order_by(key)
                    .limit(BATCH_SIZE)
                )
            ).all()
            for row_id, sealed in rows:
                if sealed is None or sealed.startswith(prefix):
                    continue
                fresh = box.encrypt(box.decrypt(sealed))
                # Conditional on the old value: a row re-paired meanwhile is left alone.
                result = await session.execute(
                    update(key.class_)
                    .where(key == row_id, column == sealed)
                    .values({column.key: fresh})
                )
                rotated += int(getattr(result, "rowcount", 0) or 0)
        if len(rows) < BATCH_SIZE:
            return rotated
        after = rows[-1][0]


async def rotate_secrets(db: Database, box: SecretBox) -> RotationReport:
    """Raises ValueError when a secret was sealed with a key that is not configured."""
    return RotationReport(
        devices=await _rotate_column(db, box, Device.id, Device.totp_secret),
        pairings=await _rotate_column(db, box, Pairing.id, Pairing.totp_secret),
    )
