"""webhooks: deliveries (the outbox) and their attempts; tenants: the previous secret during a rotation; batches:
open_jobs (jobs not yet terminal), so the terminal move that closes a batch knows it in the same statement

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_PENDING = "status IN ('pending', 'delivering')"


def upgrade() -> None:
    op.add_column("tenants", sa.Column("webhook_secret_previous", sa.String(100), nullable=True))
    op.add_column("tenants", sa.Column("webhook_secret_rotated_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("batches", sa.Column("open_jobs", sa.Integer(), server_default="0", nullable=False))
    # Batches made before this revision: count their jobs that can still run.
    op.execute(
        "UPDATE batches b SET open_jobs = (SELECT count(*) FROM jobs j WHERE j.batch_id = b.id "
        "AND j.status IN ('queued', 'running'))"
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column(
            "id",
            sa.String(40),
            primary_key=True,
            server_default=sa.text("'whd_' || replace(gen_random_uuid()::text, '-', '')"),
        ),
        sa.Column("tenant_id", sa.String(40), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=True),
        sa.Column("batch_id", sa.String(40), sa.ForeignKey("batches.id", ondelete="CASCADE"), nullable=True),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("payload", JSONB(), nullable=False),
        sa.Column("status", sa.String(16), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "next_attempt_at", sa.DateTime(timezone=True), server_default=sa.text("clock_timestamp()"), nullable=False
        ),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.text("clock_timestamp()"), nullable=False
        ),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'delivering', 'succeeded', 'failed')", name="ck_webhook_deliveries_status"
        ),
        sa.CheckConstraint("(job_id IS NULL) <> (batch_id IS NULL)", name="ck_webhook_deliveries_subject"),
    )
    op.create_index(
        "ix_webhook_deliveries_due", "webhook_deliveries", ["next_attempt_at"], postgresql_where=sa.text(_PENDING)
    )
    op.create_index(
        "ix_webhook_deliveries_url_due",
        "webhook_deliveries",
        ["url", "next_attempt_at"],
        postgresql_where=sa.text(_PENDING),
    )
    op.create_index(
        "ix_webhook_deliveries_job", "webhook_deliveries", ["job_id"], postgresql_where=sa.text("job_id IS NOT NULL")
    )
    op.create_index(
        "uq_webhook_deliveries_batch",
        "webhook_deliveries",
        ["batch_id"],
        unique=True,
        postgresql_where=sa.text("batch_id IS NOT NULL"),
    )
    op.create_index("ix_webhook_deliveries_tenant", "webhook_deliveries", ["tenant_id"])
    op.create_table(
        "webhook_attempts",
        sa.Column(
            "delivery_id", sa.String(40), sa.ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("attempt", sa.Integer(), primary_key=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("latency_ms", sa.Integer(), nullable=False),
    )
    # Wakes the delivery process (LISTEN zimage_webhooks) when deliveries are committed: NOTIFY is sent at commit,
    # once per transaction, and only by statements that inserted a row (a terminal move without a webhook is silent).
    op.execute(
        """
CREATE FUNCTION zimage_webhooks_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted) THEN
        PERFORM pg_notify('zimage_webhooks', '');
    END IF;
    RETURN NULL;
END $$
"""
    )
    op.execute(
        "CREATE TRIGGER webhook_deliveries_notify AFTER INSERT ON webhook_deliveries "
        "REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION zimage_webhooks_notify()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS webhook_deliveries_notify ON webhook_deliveries")
    op.execute("DROP FUNCTION IF EXISTS zimage_webhooks_notify()")
    op.drop_table("webhook_attempts")
    op.drop_table("webhook_deliveries")
    op.drop_column("batches", "open_jobs")
    op.drop_column("tenants", "webhook_secret_rotated_at")
    op.drop_column("tenants", "webhook_secret_previous")
