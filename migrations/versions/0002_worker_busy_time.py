"""workers: images run and accelerator-busy time

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("workers", sa.Column("images_run", sa.Integer(), server_default="0", nullable=False))
    op.add_column("workers", sa.Column("busy_seconds", sa.Float(), server_default="0", nullable=False))
    op.add_column("workers", sa.Column("wall_seconds", sa.Float(), server_default="0", nullable=False))


def downgrade() -> None:
    op.drop_column("workers", "wall_seconds")
    op.drop_column("workers", "busy_seconds")
    op.drop_column("workers", "images_run")
