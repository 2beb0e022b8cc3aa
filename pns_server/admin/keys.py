"""`pns-server rotate-key`: re-seal every stored TOTP secret under the primary key.

Run it with PNS_SECRET_KEY=<new> and PNS_OLD_SECRET_KEYS=<old,...>; the server keeps
opening secrets with the old keys meanwhile. Idempotent, batched, safe while replicas serve.

Recovery codes are keyed hashes: they cannot be re-keyed without the codes themselves, so
they keep verifying under their old key while it stays in PNS_OLD_SECRET_KEYS; the report
counts them, and a client's next `POST /v1/recovery-codes` moves it to the new key."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select, update

from pns_server.db import Database
from pns_server.models import Device, Pairing, RecoveryCode
from pns_server.security import SealedAt, SecretBox

BATCH_SIZE = 500


@dataclass
class RotationReport:
    devices: int = 0
    pairings: int = 0
    # Unused recovery codes still keyed with an old key (they need it kept configured).
    recovery_codes_on_old_keys: int = 0


async def _rotate_table(db: Database, box: SecretBox, model: type[Device] | type[Pairing]) -> int:
    rotated = 0
    after = ""
    prefix = f"v2.{box.primary_key_id}."
    while True:
        async with db.session() as session:
            rows = (
                await session.execute(
                    select(model.id, model.client_id, model.totp_secret)
                    .where(model.id > after, model.totp_secret.is_not(None))
                    .order_by(model.id)
                    .limit(BATCH_SIZE)
                )
            ).all()
            for row_id, client_id, sealed in rows:
                if sealed is None or sealed.startswith(prefix):
                    continue
                site = SealedAt(model.__tablename__, row_id, client_id)
                try:
                    plain = box.open(sealed, site)
                except ValueError as exc:
                    raise ValueError(f"{model.__tablename__} row {row_id}: {exc}") from exc
                fresh = box.seal(plain, site)
                # Conditional on the old value: a row re-paired meanwhile is left alone.
                result = await session.execute(
                    update(model)
                    .where(model.id == row_id, model.totp_secret == sealed)
                    .values(totp_secret=fresh)
                )
                rotated += int(getattr(result, "rowcount", 0) or 0)
        if len(rows) < BATCH_SIZE:
            return rotated
        after = rows[-1][0]


async def _codes_on_old_keys(db: Database, box: SecretBox) -> int:
    async with db.session() as session:
        count = await session.scalar(
            select(func.count(RecoveryCode.id)).where(
                RecoveryCode.used_at.is_(None),
                RecoveryCode.code_hash.not_like(f"h2.{box.primary_key_id}.%"),
            )
        )
    return int(count or 0)


async def rotate_secrets(db: Database, box: SecretBox) -> RotationReport:
    """Raises ValueError when a secret does not open with the configured keys for its row."""
    return RotationReport(
        devices=await _rotate_table(db, box, Device),
        pairings=await _rotate_table(db, box, Pairing),
        recovery_codes_on_old_keys=await _codes_on_old_keys(db, box),
    )
