"""queue_counts: each tenant's queued jobs per queue and priority, kept by triggers on jobs, so that a submit's
queue position is read instead of counted over the whole queue

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# One function for every statement that can change what is queued: it nets the statement's rows entering and
# leaving 'queued' per (tenant, queue, priority) and appends one row per key with that change. Appended, never
# updated: a counter row updated in place would be locked by each submit until its commit, serializing a tenant's
# concurrent submits (and deadlocking against the quota row, locked in the other order by the careful path). A
# key's count is the sum of its rows; the sweeper folds them into one per key every few seconds
# (core.queue_counts.compact). Statement-level with transition tables: a group commit of 500 rows or a COPY of
# 10 000 appends one row per key, not one per job. No foreign key to tenants: a tenant's deletion cascades to
# its jobs, whose trigger brings its counts to 0.
_FUNCTION = """
CREATE FUNCTION jobs_count_queued() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO queue_counts (tenant_id, queue, priority, queued)
    SELECT tenant_id, queue, priority, count(*) FROM new_rows WHERE status = 'queued'
    GROUP BY 1, 2, 3;
  ELSIF TG_OP = 'UPDATE' THEN
    INSERT INTO queue_counts (tenant_id, queue, priority, queued)
    SELECT tenant_id, queue, priority, sum(d) FROM (
      SELECT tenant_id, queue, priority, 1 AS d FROM new_rows WHERE status = 'queued'
      UNION ALL
      SELECT tenant_id, queue, priority, -1 FROM old_rows WHERE status = 'queued'
    ) moved
    GROUP BY 1, 2, 3 HAVING sum(d) <> 0;
  ELSIF TG_OP = 'DELETE' THEN
    INSERT INTO queue_counts (tenant_id, queue, priority, queued)
    SELECT tenant_id, queue, priority, -count(*) FROM old_rows WHERE status = 'queued'
    GROUP BY 1, 2, 3;
  ELSE  -- TRUNCATE
    DELETE FROM queue_counts;
  END IF;
  RETURN NULL;
END $$
"""


def upgrade() -> None:
    op.create_table(
        "queue_counts",
        sa.Column("id", sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column("tenant_id", sa.String(40), nullable=False),
        sa.Column("queue", sa.String(32), nullable=False),
        sa.Column("priority", sa.SmallInteger(), nullable=False),
        sa.Column("queued", sa.BigInteger(), nullable=False),  # a change (+ or -), or a folded count
    )
    op.create_index("ix_queue_counts_key", "queue_counts", ["tenant_id", "queue", "priority"])
    op.execute(_FUNCTION)
    # No submit may slip between the first count and the triggers: hold writers off for the migration.
    op.execute("LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE")
    op.execute(
        "CREATE TRIGGER jobs_count_queued_insert AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION jobs_count_queued()"
    )
    op.execute(
        "CREATE TRIGGER jobs_count_queued_update AFTER UPDATE ON jobs "
        "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION jobs_count_queued()"
    )
    op.execute(
        "CREATE TRIGGER jobs_count_queued_delete AFTER DELETE ON jobs REFERENCING OLD TABLE AS old_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION jobs_count_queued()"
    )
    op.execute("CREATE TRIGGER jobs_count_queued_truncate AFTER TRUNCATE ON jobs FOR EACH STATEMENT "
               "EXECUTE FUNCTION jobs_count_queued()")
    op.execute(
        "INSERT INTO queue_counts (tenant_id, queue, priority, queued) "
        "SELECT tenant_id, queue, priority, count(*) FROM jobs WHERE status = 'queued' GROUP BY 1, 2, 3"
    )


def downgrade() -> None:
    for event in ("insert", "update", "delete", "truncate"):
        op.execute(f"DROP TRIGGER jobs_count_queued_{event} ON jobs")
    op.execute("DROP FUNCTION jobs_count_queued()")
    op.drop_table("queue_counts")
