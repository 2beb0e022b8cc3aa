"""Web Push subscriptions: the keys a browser's push subscription carries.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("push_p256dh", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("push_auth", sa.String(length=100), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("push_auth")
        batch.drop_column("push_p256dh")
