"""jobs: queued jobs of a queue by tenant, for the fair-share claim

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The claim walks the tenants with queued jobs and reads each one's jobs in priority and age order; without
    # this index, a tenant with one job behind another's 20 000 costs a scan of all of them (~100 ms a claim).
    op.create_index(
        "ix_jobs_claim_tenant",
        "jobs",
        ["queue", "tenant_id", sa.text("priority DESC"), "created_at"],
        postgresql_where=sa.text("status = 'queued'"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_claim_tenant", table_name="jobs")
