"""The webhook outbox: the deliveries a terminal move owes, written by the very statement that makes the move.

``core.transition`` hands every terminal move through ``with_deliveries``, which wraps the gate's UPDATE in one
statement of data-modifying CTEs::

    WITH moved AS (the gate's UPDATE of jobs … RETURNING …),
         job_hooks AS (INSERT INTO webhook_deliveries … SELECT … FROM moved WHERE the request has a webhook_url),
         closed AS (UPDATE batches SET open_jobs = open_jobs - n FROM (moved, counted per batch) … RETURNING …),
         batch_hooks AS (INSERT INTO webhook_deliveries … SELECT … FROM closed WHERE open_jobs = 0 AND webhook_url …)
    SELECT <the caller's RETURNING columns> FROM moved

So a delivery commits exactly when the status does: no crash can leave one without the other. The batch's
counter is a row UPDATE on purpose: two transactions ending a batch's last two jobs at once each see the other's
job still running in their snapshots, but the second to update ``batches`` waits for the first, then re-reads
the row as committed (READ COMMITTED re-checks an updated row), so exactly one of them sees the counter reach 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import ColumnElement, Select, Table, Update, func, literal, select, text, update
from sqlalchemy.dialects.postgresql import insert

from core.models import batches, jobs, webhook_deliveries

_HOOK = "_webhook_url"  # the job's webhook URL among the moved rows' columns (a name no jobs column has)
_NEEDED: tuple[ColumnElement[Any], ...] = (
    jobs.c.id,
    jobs.c.tenant_id,
    jobs.c.batch_id,
    jobs.c.status,
    jobs.c.request["webhook_url"].astext.label(_HOOK),
)


def _columns(returning: Iterable[Any]) -> list[ColumnElement[Any]]:
    """The caller's RETURNING items as columns (a whole table stands for all of its columns)."""
    out: list[ColumnElement[Any]] = []
    for item in returning:
        out.extend(item.c if isinstance(item, Table) else [item])
    return out


def with_deliveries(move: Update, returning: Iterable[Any]) -> Select[Any]:
    """One statement: the terminal ``move``, the webhook deliveries it owes (the jobs' own, and their batches' when
    it ends them), and the caller's ``returning`` columns of the moved rows."""
    wanted = _columns(returning) or [jobs.c.id]
    names = [str(c.key) for c in wanted]
    inner: dict[str, ColumnElement[Any]] = {str(c.key): c for c in wanted}
    for c in _NEEDED:
        inner.setdefault(str(c.key), c)
    moved = move.returning(*inner.values()).cte("moved")

    job_hooks = (
        insert(webhook_deliveries)
        .from_select(
            ["tenant_id", "job_id", "url", "payload"],
            select(
                moved.c.tenant_id,
                moved.c.id,
                moved.c[_HOOK],
                func.jsonb_build_object(
                    literal("object"), literal("job"), literal("id"), moved.c.id, literal("status"), moved.c.status
                ),
            ).where(moved.c[_HOOK].is_not(None)),
        )
        .cte("job_hooks")
    )

    ended = (
        select(moved.c.batch_id, func.count().label("n"))
        .where(moved.c.batch_id.is_not(None))
        .group_by(moved.c.batch_id)
        .subquery("ended")
    )
    closed = (
        update(batches)
        .where(batches.c.id == ended.c.batch_id)
        .values(open_jobs=batches.c.open_jobs - ended.c.n)
        .returning(batches.c.id, batches.c.tenant_id, batches.c.webhook_url, batches.c.open_jobs)
        .cte("closed")
    )
    batch_hooks = (
        insert(webhook_deliveries)
        .from_select(
            ["tenant_id", "batch_id", "url", "payload"],
            select(
                closed.c.tenant_id,
                closed.c.id,
                closed.c.webhook_url,
                func.jsonb_build_object(literal("object"), literal("batch"), literal("id"), closed.c.id),
            ).where(closed.c.open_jobs == 0, closed.c.webhook_url.is_not(None)),
        )
        # One delivery per batch, whatever happens: a batch can only be finished once, but a counter set wrong
        # must not fail the job's move.
        .on_conflict_do_nothing(index_elements=["batch_id"], index_where=text("batch_id IS NOT NULL"))
        .cte("batch_hooks")
    )
    return select(*(moved.c[name] for name in names)).add_cte(job_hooks, batch_hooks)
