"""key proofs at pairing, client nonces on approvals

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Both nullable: devices paired by older apps have no proof, older clients send no nonce.
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("key_proof", sa.String(length=64), nullable=True))
    with op.batch_alter_table("approvals") as batch:
        batch.add_column(sa.Column("client_nonce", sa.String(length=100), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("approvals") as batch:
        batch.drop_column("client_nonce")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("key_proof")
