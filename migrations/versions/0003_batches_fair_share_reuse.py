"""batches: idempotency; tenants: fair-share weight and virtual clock; jobs: result-reuse key

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("batches", sa.Column("idempotency_key", sa.String(255), nullable=True))
    op.add_column("batches", sa.Column("request_hash", sa.String(64), nullable=True))
    op.create_index(
        "uq_batches_idempotency",
        "batches",
        ["tenant_id", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.add_column("tenants", sa.Column("weight", sa.Float(), server_default="1", nullable=False))
    op.add_column("tenants", sa.Column("vclock", sa.Float(), server_default="0", nullable=False))
    op.create_check_constraint("ck_tenants_weight", "tenants", "weight > 0")
    op.create_index(
        "ix_jobs_batch_index",
        "jobs",
        ["batch_id", "batch_index"],
        postgresql_where=sa.text("batch_id IS NOT NULL"),
    )
    op.add_column("jobs", sa.Column("reuse_key", sa.String(64), nullable=True))
    op.add_column("jobs", sa.Column("reused_from", sa.String(40), nullable=True))
    op.create_index(
        "ix_jobs_reuse",
        "jobs",
        ["tenant_id", "reuse_key"],
        postgresql_where=sa.text("reuse_key IS NOT NULL AND status = 'succeeded'"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_reuse", table_name="jobs")
    op.drop_column("jobs", "reused_from")
    op.drop_column("jobs", "reuse_key")
    op.drop_index("ix_jobs_batch_index", table_name="jobs")
    op.drop_constraint("ck_tenants_weight", "tenants")
    op.drop_column("tenants", "vclock")
    op.drop_column("tenants", "weight")
    op.drop_index("uq_batches_idempotency", table_name="batches")
    op.drop_column("batches", "request_hash")
    op.drop_column("batches", "idempotency_key")
