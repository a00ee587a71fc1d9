"""tenants: per-tenant overrides of the request rate and quotas; tenant_usage: each tenant's images today and
what the open-jobs quota needs to decide without counting every time

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL: the setting's default; 0: no limit. max_queued_jobs exists since 0001 (unused until now).
    op.add_column("tenants", sa.Column("rate_limit_rps", sa.Integer(), nullable=True))
    op.add_column("tenants", sa.Column("max_batch_jobs", sa.Integer(), nullable=True))
    op.add_column("tenants", sa.Column("max_images_per_day", sa.Integer(), nullable=True))
    op.create_check_constraint(
        "ck_tenants_limits",
        "tenants",
        "rate_limit_rps >= 0 AND max_queued_jobs >= 0 AND max_batch_jobs >= 0 AND max_images_per_day >= 0",
    )
    op.create_table(
        "tenant_usage",
        sa.Column("tenant_id", sa.String(40), sa.ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("day", sa.Date(), nullable=False, server_default=sa.text("(now() AT TIME ZONE 'UTC')::date")),
        sa.Column("images", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("submitted", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("open_at_check", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("submitted_at_check", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=True),
    )
    # Existing tenants start with today's images counted from their jobs; checked_at NULL makes the first submit
    # count their open jobs.
    op.execute(
        "INSERT INTO tenant_usage (tenant_id, images) SELECT t.id, coalesce(sum((j.request->>'num_images')::int), 0) "
        "FROM tenants t LEFT JOIN jobs j ON j.tenant_id = t.id "
        "AND j.created_at >= (now() AT TIME ZONE 'UTC')::date AT TIME ZONE 'UTC' GROUP BY t.id"
    )


def downgrade() -> None:
    op.drop_table("tenant_usage")
    op.drop_constraint("ck_tenants_limits", "tenants")
    op.drop_column("tenants", "max_images_per_day")
    op.drop_column("tenants", "max_batch_jobs")
    op.drop_column("tenants", "rate_limit_rps")
