"""Each tenant's queued jobs per queue and priority, without counting the queue.

Triggers on ``jobs`` (migration 0008) append a row to ``queue_counts`` for every statement that changes what is
queued: one per (tenant, queue, priority) it touched, holding the net change. Rows are only ever appended, so no
submit waits on another for a counter; a key's count is the sum of its rows, exact in every transaction's
snapshot. ``compact`` folds each key's rows into one; the sweeper calls it every few seconds, so a read sums a
few hundred rows at most under a bulk load, however deep the queue.
"""

from __future__ import annotations

from sqlalchemy import Connection, text

# Only keys with more than one row (or a count of 0) are rewritten. The rows one compaction deletes are exactly
# those it sums back: a change appended meanwhile is not in its snapshot and stays; a second compaction running at
# once waits on the first's deleted rows, then skips them.
_COMPACT = text(
    """
WITH loose AS (
  SELECT tenant_id, queue, priority FROM queue_counts GROUP BY 1, 2, 3 HAVING count(*) > 1 OR sum(queued) = 0
), folded AS (
  DELETE FROM queue_counts c USING loose l
  WHERE (c.tenant_id, c.queue, c.priority) = (l.tenant_id, l.queue, l.priority)
  RETURNING c.tenant_id, c.queue, c.priority, c.queued
)
INSERT INTO queue_counts (tenant_id, queue, priority, queued)
SELECT tenant_id, queue, priority, sum(queued) FROM folded GROUP BY 1, 2, 3 HAVING sum(queued) <> 0
"""
)

# The tenant's queued jobs of a queue at a priority or above (a correlated subquery: used inside other statements).
AT_OR_ABOVE = """(SELECT coalesce(sum(c.queued), 0)::bigint FROM queue_counts c
  WHERE c.tenant_id = {tenant} AND c.queue = {queue} AND c.priority >= {priority})"""


def compact(conn: Connection) -> None:
    """Fold each key's rows into one (in the caller's transaction)."""
    conn.execute(_COMPACT)
