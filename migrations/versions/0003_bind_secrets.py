"""bind sealed TOTP secrets to their row and client; pepper recovery codes

Data only, no schema change. Release 1 sealed TOTP secrets bound to nothing but the key id
(`v1.`), so a sealed value copied into another client's row opened there; it stored
recovery codes as a plain scrypt hash, so anyone able to write the database could plant
one. This re-seals every secret as `v2.` with its table, row and client as associated data,
and replaces every recovery-code hash with a keyed hash over it (`h2.`). Both need the
secret key: from the caller (`pns-server migrate`, start-up) or from the PNS_* settings.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

from pns_server.security import SealedAt, SecretBox

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SEALED_TABLES = ("devices", "pairings")


def pepper_input(client_id: str, inner_hash: str) -> bytes:
    """Frozen copy of `pns_server.otp.recovery_codes.pepper_input` as of this revision."""
    return f"pns-recovery-v2|{client_id}|{inner_hash}".encode()


def _table(name: str, *columns: str) -> sa.TableClause:
    return sa.table(name, *(sa.column(c, sa.String) for c in columns))


def _box() -> SecretBox:
    keys = context.config.attributes.get("secret_keys")
    if keys is None:
        from pns_server.config import Settings
        from pns_server.runtime import secret_keys

        keys = secret_keys(Settings())
    return SecretBox(keys)


def upgrade() -> None:
    bind = op.get_bind()
    box: SecretBox | None = None
    for name in SEALED_TABLES:
        table = _table(name, "id", "client_id", "totp_secret")
        rows = bind.execute(
            sa.select(table.c.id, table.c.client_id, table.c.totp_secret).where(
                table.c.totp_secret.like("v1.%")
            )
        ).all()
        for row_id, client_id, sealed in rows:
            box = box or _box()
            try:
                plain = box.open_legacy(sealed)
            except ValueError as exc:
                raise RuntimeError(
                    f"the TOTP secret of {name} row {row_id} does not decrypt ({exc}); add the "
                    "key that sealed it to PNS_OLD_SECRET_KEYS and migrate again"
                ) from exc
            bind.execute(
                table.update()
                .where(table.c.id == row_id, table.c.totp_secret == sealed)
                .values(totp_secret=box.seal(plain, SealedAt(name, row_id, client_id)))
            )
    codes = _table("recovery_codes", "id", "client_id", "code_hash")
    rows = bind.execute(
        sa.select(codes.c.id, codes.c.client_id, codes.c.code_hash).where(
            codes.c.code_hash.not_like("h2.%")
        )
    ).all()
    for row_id, client_id, inner in rows:
        box = box or _box()
        bind.execute(
            codes.update()
            .where(codes.c.id == row_id)
            .values(code_hash=box.keyed_hash(pepper_input(client_id, inner)))
        )


def downgrade() -> None:
    """Secrets go back to the unbound format. Peppered recovery codes cannot be turned back
    into plain hashes: they are deleted, and clients create new ones after the downgrade."""
    bind = op.get_bind()
    box: SecretBox | None = None
    for name in SEALED_TABLES:
        table = _table(name, "id", "client_id", "totp_secret")
        rows = bind.execute(
            sa.select(table.c.id, table.c.client_id, table.c.totp_secret).where(
                table.c.totp_secret.like("v2.%")
            )
        ).all()
        for row_id, client_id, sealed in rows:
            box = box or _box()
            plain = box.open(sealed, SealedAt(name, row_id, client_id))
            bind.execute(
                table.update()
                .where(table.c.id == row_id)
                .values(totp_secret=box.seal_legacy(plain))
            )
    codes = _table("recovery_codes", "code_hash")
    bind.execute(codes.delete().where(codes.c.code_hash.like("h2.%")))
