"""Fair share between tenants by virtual time (stride scheduling): whom a claim serves first, and what being
served costs a tenant.

Each tenant has a virtual clock (``tenants.vclock``) that advances by the image tokens it was served divided by
its weight (``tenants.weight``). A claim serves first the tenant with queued jobs whose clock is smallest, so
over time each backlogged tenant gets image tokens in proportion to its weight, however many jobs the others
queued. A clock never lags the other queued tenants' clocks by more than one batch: a tenant that was idle
rejoins near the current minimum instead of monopolising the queue with a clock it earned long ago.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, text

from core.status import JobStatus


@dataclass(frozen=True)
class TenantClock:
    """A tenant with queued jobs in a queue, as a claim found it: its clock, its weight and its head job."""

    id: str
    vclock: float
    weight: float
    # The priority and age of its first job in priority-then-age order; None when it has none this claim may
    # take (a claim made ahead of time takes no job that already lost a worker).
    head_priority: int | None
    head_created_at: datetime | None


# The tenants with queued jobs in a queue, found by skipping from one tenant id to the next in the queued-jobs
# index (a handful of index probes however many jobs each tenant queued), with their clocks and head jobs.
_QUEUED_TENANTS = text(
    f"""
WITH RECURSIVE queued(tenant_id) AS (
    (SELECT tenant_id FROM jobs
     WHERE status = '{JobStatus.QUEUED}' AND queue = :queue
     ORDER BY tenant_id LIMIT 1)
    UNION ALL
    SELECT (SELECT j.tenant_id FROM jobs j
            WHERE j.status = '{JobStatus.QUEUED}' AND j.queue = :queue AND j.tenant_id > q.tenant_id
            ORDER BY j.tenant_id LIMIT 1)
    FROM queued q WHERE q.tenant_id IS NOT NULL
)
SELECT t.id, t.vclock, t.weight, h.priority, h.created_at
FROM queued q
JOIN tenants t ON t.id = q.tenant_id
LEFT JOIN LATERAL (
    SELECT priority, created_at FROM jobs
    WHERE status = '{JobStatus.QUEUED}' AND queue = :queue AND tenant_id = t.id AND (attempt = 0 OR NOT :fresh_only)
    ORDER BY priority DESC, created_at
    LIMIT 1
) h ON true
"""
)


def queued_tenants(conn: Connection, queue: str, *, fresh_only: bool) -> list[TenantClock]:
    """Every tenant with queued jobs in ``queue``, with its clock, weight and head job (no row is locked)."""
    rows = conn.execute(_QUEUED_TENANTS, {"queue": queue, "fresh_only": fresh_only}).all()
    return [TenantClock(*row) for row in rows]


def service_order(clocks: Sequence[TenantClock]) -> list[str]:
    """The tenants a claim may serve, first served first: smallest clock, then (for equal clocks) the head job
    of highest priority, then the oldest, as a single queue would order them."""
    ready = [c for c in clocks if c.head_priority is not None]
    ready.sort(key=lambda c: (c.vclock, -(c.head_priority or 0), c.head_created_at, c.id))
    return [c.id for c in ready]


def floors(clocks: Sequence[TenantClock], served: Sequence[str], *, token_budget: int) -> dict[str, float]:
    """The clock each served tenant is raised to at least before its service is added: the smallest clock of the
    other tenants that had queued jobs, less one batch of credit (``token_budget`` over the smallest of their
    weights). A tenant served without rivals has no floor.

    The credit is what a tenant backlogged all along may legitimately trail the others by (each of them ran
    ahead by at most one batch of its own), so the floor never touches such a tenant's clock and the weights
    hold; only a clock left behind while its tenant was idle is raised.
    """
    out: dict[str, float] = {}
    for tenant in served:
        others = [c for c in clocks if c.id != tenant]
        if others:
            credit = token_budget / min(c.weight for c in others)
            out[tenant] = min(c.vclock for c in others) - credit
    return out


# One statement: the served tenants' rows are locked in id order first (two claims serving the same tenants
# cannot deadlock), then each clock is raised to its floor (NULL: none) and advanced by tokens / weight.
_ADVANCE = text(
    """
WITH locked AS MATERIALIZED (
    SELECT id FROM tenants WHERE id = ANY(CAST(:ids AS text[])) ORDER BY id FOR UPDATE
), served AS (
    SELECT * FROM unnest(CAST(:ids AS text[]), CAST(:tokens AS float8[]), CAST(:floors AS float8[]))
        AS s(id, tokens, floor)
)
UPDATE tenants t
SET vclock = greatest(t.vclock, s.floor) + s.tokens / t.weight
FROM locked l JOIN served s ON s.id = l.id
WHERE t.id = l.id
"""
)


def advance(conn: Connection, served: Mapping[str, int], clocks: Sequence[TenantClock], *, token_budget: int) -> None:
    """Advance the clock of each tenant in ``served`` (tenant id → image tokens this claim gave it), in the
    claim's transaction: ``vclock = greatest(vclock, floor) + tokens / weight``."""
    ids = sorted(served)
    if not ids:
        return
    raised = floors(clocks, ids, token_budget=token_budget)
    conn.execute(
        _ADVANCE,
        {"ids": ids, "tokens": [float(served[t]) for t in ids], "floors": [raised.get(t) for t in ids]},
    )
