"""Submitting jobs: commit the rows first, then publish their ids to Redis (the outbox pattern).

Requests that arrive together share one transaction and one pipelined publish (group commit): each request
still waits until its own row is committed before it answers 202, but a burst of 32 costs one round trip, not
32. A Redis outage does not refuse a submit: the committed rows keep ``dispatched_at`` NULL and the sweeper
publishes them once Redis answers again. A Postgres outage refuses them (503) before anything is published.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from typing import Any

import orjson
import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads
from sqlalchemy import func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from api.jobs import log_job, render
from api.resources import Resources
from core import errors, fastjson, metrics, queue, queue_counts
from core.adapter_refs import check_adapters
from core.db import connect_driver, driver_connection
from core.job_object import COLUMNS as JOB_COLUMNS
from core.job_object import job_object
from core.models import jobs
from core.quotas import FAST_CHARGE, Defaults, charge, fast_params, fits
from core.retry import is_transient
from core.reuse import model_identity, reuse_earlier
from core.schemas import JobRequest
from core.status import JobStatus
from core.submission import build_job_row, request_hash

log = logging.getLogger(__name__)

_REDIS_BACKOFF_S = 1.0
MAX_GROUP = 500  # rows per group commit
_KEPT_CONNECTIONS = 2  # one per group in flight
_IDLE_PING_S = 2.0  # a kept connection idle longer than this is pinged before use

# A group's rows in one statement of constant text, prepared once per connection (a multi-row VALUES is a new
# statement, compiled, parsed and planned, for every group size), with the rows as one JSON array in one parameter:
# one JSON encoding for the group, where an array per column cost psycopg's Python dumpers per value. The columns
# a group's rows leave NULL (batch, idempotency, reuse) are not named: such rows never come here. The statement
# returns neither ``request`` nor ``metadata``: this process holds them already, and loading them back cost a JSON
# parse each.
_GROUP_COLUMNS = (
    ("id", "text"), ("tenant_id", "text"), ("kind", "text"), ("queue", "text"), ("group_key", "text"),
    ("cost_tokens", "int"), ("priority", "smallint"), ("request", "jsonb"), ("metadata", "jsonb"),
    ("max_attempts", "int"),
)  # fmt: skip
_GROUP_NULLS = ("batch_id", "batch_index", "idempotency_key", "request_hash", "reuse_key")
# What the statement returns, named (not *: a column added by a later migration would change a prepared result):
# what the job object reads, and what placing and publishing the rows needs, but request and metadata (in the
# group's rows already).
_KEPT_COLUMNS = ("request", "metadata")
_RETURNED = [c for c in (*JOB_COLUMNS, "tenant_id", "queue") if c not in _KEPT_COLUMNS]


def _insert_statement(*, charged: bool) -> str:
    """A group's INSERT. It also reads, for the first row of each (tenant, queue, priority), how many of the
    tenant's queued jobs are already ahead of it (api.jobs.queue_positions, without a round trip of its own): those
    of its priority or higher, from the counters the jobs table's triggers keep (queue_counts, migration 0008), as
    the statement's snapshot sees them, before its own rows (which _positions adds). Counting the queue instead
    cost a scan of every queued job of the tenant per group: 5 ms at 20 000 queued, most of this process's wait
    under a bulk load. ``charged``: the group (of one tenant) is also counted against its quotas in the same
    statement (core.quotas' quick UPDATE, run once whatever the statement reads of it; ``charged`` says whether it
    counted them): a round trip and a statement less per group."""
    columns = ", ".join(c for c, _ in _GROUP_COLUMNS)
    typed = ", ".join(f"{c} {t}" for c, t in _GROUP_COLUMNS)
    ahead = queue_counts.AT_OR_ABOVE.format(tenant="f.tenant_id", queue="f.queue", priority="f.priority")
    return f"""
WITH {f"charged AS ({FAST_CHARGE})," if charged else ""} ins AS (
  INSERT INTO jobs ({columns}, dispatched_at)
  SELECT *, now() FROM jsonb_to_recordset(%(rows)s::jsonb) AS r({typed})
  RETURNING {', '.join(_RETURNED)}
), firsts AS (
  SELECT DISTINCT tenant_id, queue, priority FROM ins
), ahead AS MATERIALIZED (  -- one read per (tenant, queue, priority), not per row
  SELECT f.tenant_id, f.queue, f.priority, {ahead} AS n FROM firsts f
)
SELECT {', '.join(f"ins.{c}" for c in _RETURNED)}, a.n AS ahead_in_table
  {", (SELECT count(*) FROM charged) AS charged" if charged else ""}
FROM ins JOIN ahead a ON (a.tenant_id, a.queue, a.priority) = (ins.tenant_id, ins.queue, ins.priority)
"""


_INSERT_GROUP = _insert_statement(charged=False)
_INSERT_CHARGED = _insert_statement(charged=True)


class GroupCommitter:
    """Coalesces concurrent submissions into one INSERT, one COMMIT and one Redis publish per group."""

    def __init__(self, res: Resources) -> None:
        self._res = res
        self._pending: list[tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Connections of its own (psycopg's, outside the engine's pool: every statement of a group is a prepared one
        # on the driver, and SQLAlchemy's work per call was a tenth of this process's CPU), kept between groups with
        # when each was last used (a pool's checkout costs a ping and a rollback per group).
        self._idle: list[tuple[psycopg.AsyncConnection, float]] = []

    def start(self) -> None:
        """Start the flushing task (in the app's event loop)."""
        self._task = asyncio.create_task(self._run(), name="group-commit")

    async def stop(self) -> None:
        """Flush what is pending and stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._pending:
            await self._flush()  # what arrived during shutdown
        for conn, _ in self._idle:
            with contextlib.suppress(Exception):
                await conn.close()
        self._idle.clear()

    async def _checkout(self) -> psycopg.AsyncConnection:
        """A kept connection (pinged first if it sat idle: Postgres may have dropped it meanwhile), or a new one."""
        while self._idle:
            conn, last_used = self._idle.pop()
            if time.monotonic() - last_used < _IDLE_PING_S:
                return conn
            try:
                await conn.execute("SELECT 1")
                await conn.rollback()
                return conn
            except Exception:
                with contextlib.suppress(Exception):
                    await conn.close()
        conn = await connect_driver(self._res.db)
        # The only JSON these connections read back is a new row's defaults (outputs, timings): orjson's parser,
        # never the standard library's (its detection of the encoding alone cost more, per column of each row).
        set_json_loads(orjson.loads, conn)
        return conn

    async def _checkin(self, conn: psycopg.AsyncConnection, *, healthy: bool) -> None:
        """Keep a connection for the next group, or close it (after an error: it may be broken)."""
        if healthy and len(self._idle) < _KEPT_CONNECTIONS:
            self._idle.append((conn, time.monotonic()))
            return
        with contextlib.suppress(Exception):
            await conn.close()

    async def submit(self, row: dict[str, Any]) -> dict[str, Any]:
        """Insert ``row`` with whatever else is being submitted now; the job object once it is committed."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending.append((row, future))
        self._wake.set()
        return await future

    async def _run(self) -> None:
        # Two groups in flight at once: one commits while the next one fills and inserts.
        slots = asyncio.Semaphore(2)
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                await slots.acquire()
                group, self._pending = self._pending[:MAX_GROUP], self._pending[MAX_GROUP:]
                task = asyncio.create_task(self._flush(group))
                task.add_done_callback(lambda _: slots.release())

    async def _flush(self, group: list[tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]] | None = None) -> None:
        if group is None:
            group, self._pending = self._pending, []
        conn: psycopg.AsyncConnection | None = None
        try:
            conn = await self._checkout()
            # Quotas last: counting them locks each tenant's usage row until the commit, and a group charged
            # first would hold it through its insert, making the next group of the same tenant wait for all of
            # it. When some tenant's jobs might not fit (or it never submitted before), start again the careful
            # way: charge first, then insert only what fits.
            tenants = _by_tenant(group)
            if len(tenants) == 1:  # counted in the insert's own statement
                [(tenant, members)] = tenants.items()
                charged = fast_params(tenant, _images(members), Defaults.of(self._res.settings))
                by_id, positions, fit = await _insert_group(conn, group, charge=charged)
            else:
                by_id, positions, _ = await _insert_group(conn, group)
                fit = await _all_fit(conn, self._res, group)
            if not fit:
                await conn.rollback()
                group = await _admit(conn, self._res, group)  # the rows over a quota get their 429 now
                if not group:
                    await conn.commit()  # what the quota check learned (a fresh count of open jobs)
                    await self._checkin(conn, healthy=True)
                    return
                by_id, positions, _ = await _insert_group(conn, group)
            await conn.commit()
            await self._checkin(conn, healthy=True)
        except Exception as exc:  # nothing was committed
            if conn is not None:
                await self._checkin(conn, healthy=False)
            if len(group) > 1 and not is_transient(exc):
                # One bad row must not fail its neighbours: commit each alone so only it gets the error.
                for one in group:
                    await self._flush([one])
                return
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
            return
        await dispatch(self._res, [(r["id"], r["queue"]) for r in by_id.values()], marked=True)
        for row, future in group:
            if not future.done():
                created_row = by_id[row["id"]]
                future.set_result(
                    job_object(created_row, presign=self._res.presign, queue_position=positions[row["id"]])
                )


_Pending = tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]  # a row and its submitter's future


async def _insert_group(
    conn: psycopg.AsyncConnection, group: list[_Pending], *, charge: dict[str, Any] | None = None
) -> tuple[dict[str, dict[str, Any]], dict[str, int], bool]:
    """Insert a group's rows, each already marked dispatched (saves a round trip per group: should the publish
    fail, the mark is undone; should this process die between commit and publish, the sweeper's lost-message
    check publishes them again); the stored rows by id, their queue positions, and whether ``charge`` (the
    parameters of ``core.quotas.FAST_CHARGE`` for the group's one tenant) counted them against its quotas in the
    same statement (True when there is no ``charge``)."""
    rows = [r for r, _ in group]
    if any(r[c] is not None for r in rows for c in _GROUP_NULLS):
        raise ValueError("a group commit takes no batch, idempotent or reusing rows (submit_job writes those)")
    params: dict[str, Any] = {"rows": fastjson.dumps([{c: r[c] for c, _ in _GROUP_COLUMNS} for r in rows]).decode()}
    statement = _INSERT_GROUP if charge is None else _INSERT_CHARGED
    async with conn.cursor(row_factory=dict_row) as cursor:
        await cursor.execute(statement, params if charge is None else {**params, **charge}, prepare=True, binary=True)
        stored = await cursor.fetchall()
    fit = charge is None or bool(stored and stored[0]["charged"])
    by_id = {r["id"]: r for r in rows}
    for r in stored:
        r.pop("charged", None)
        for c in _KEPT_COLUMNS:
            r[c] = by_id[r["id"]][c]
    return {r["id"]: r for r in stored}, _positions(stored), fit


def _positions(stored: list[dict[str, Any]]) -> dict[str, int]:
    """Queue positions of a group's rows (as ``api.jobs.queue_positions`` counts them): the table's jobs ahead of
    the first row of each (tenant, queue, priority), the group's own rows of higher priority, then one by one."""
    order = sorted(stored, key=lambda r: (-r["priority"], r["created_at"], r["id"]))
    positions: dict[str, int] = {}
    earlier: Counter[tuple[str, str]] = Counter()  # the group's rows ahead so far, by tenant and queue
    base: dict[tuple[str, str, int], int] = {}
    seen: Counter[tuple[str, str, int]] = Counter()
    for r in order:
        key = (r["tenant_id"], r["queue"], r["priority"])
        if key not in base:
            base[key] = r["ahead_in_table"] + earlier[key[:2]]
        positions[r["id"]] = base[key] + seen[key]
        seen[key] += 1
        earlier[key[:2]] += 1
        del r["ahead_in_table"]
    return positions


def _by_tenant(group: list[_Pending]) -> dict[str, list[_Pending]]:
    """A group's rows by tenant, tenants in one order for every group, so two groups never wait on each other."""
    by_tenant: dict[str, list[_Pending]] = {}
    for member in group:
        by_tenant.setdefault(member[0]["tenant_id"], []).append(member)
    return dict(sorted(by_tenant.items()))


def _images(members: list[_Pending]) -> list[int]:
    """Each row's image count, in order (what the quotas count)."""
    return [row["request"]["num_images"] for row, _ in members]


async def _all_fit(conn: psycopg.AsyncConnection, res: Resources, group: list[_Pending]) -> bool:
    """Count the group against its tenants' quotas the quick way; False when that cannot decide for one."""
    defaults = Defaults.of(res.settings)
    for tenant, members in _by_tenant(group).items():
        if not await fits(conn, tenant, _images(members), defaults):
            return False
    return True


async def _admit(conn: psycopg.AsyncConnection, res: Resources, group: list[_Pending]) -> list[_Pending]:
    """The rows of ``group`` that fit their tenants' quotas; each other row's submitter gets the refusal."""
    admitted = []
    defaults = Defaults.of(res.settings)
    for tenant, members in _by_tenant(group).items():
        admission = await charge(conn, tenant, _images(members), defaults)
        admitted += members[: admission.admitted]
        for _, future in members[admission.admitted :]:
            if admission.refusal is not None and not future.done():
                future.set_exception(admission.refusal)
    return admitted


async def _existing_for_key(conn: AsyncConnection, tenant_id: str, key: str) -> Any:
    query = select(jobs).where(jobs.c.tenant_id == tenant_id, jobs.c.idempotency_key == key)
    return (await conn.execute(query)).mappings().first()


async def submit_job(
    res: Resources, *, tenant_id: str, req: JobRequest, idempotency_key: str | None
) -> tuple[dict[str, Any], bool]:
    """Create a job (or find the one its idempotency key made); returns the job object and whether it is new."""
    row = build_job_row(
        req,
        tenant_id=tenant_id,
        max_attempts=res.settings.max_attempts,
        idempotency_key=idempotency_key,
        model=model_identity(res.settings, req.kind, req.mode, req.model),
    )
    log_job(res, {"attempt": 0, "batch_id": None, **row})
    if idempotency_key is None and res.settings.group_commit and row["reuse_key"] is None:
        if req.loras:  # one query, only for a job that names adapters
            async with res.db.connect() as conn:
                await check_adapters(conn, tenant_id, req)
        return await res.submitter.submit(row), True
    async with res.db.connect() as conn:
        existing = None
        if idempotency_key is not None:
            # One holder per (tenant, key) at a time: a second request while the first is written is a 409.
            got = await conn.scalar(
                text("SELECT pg_try_advisory_xact_lock(hashtextextended(:k, 0))"),
                {"k": f"{tenant_id}:{idempotency_key}"},  # tenant ids never hold ':', so this is unambiguous
            )
            if not got:
                raise errors.Conflict("a request with this Idempotency-Key is still being processed")
            existing = await _existing_for_key(conn, tenant_id, idempotency_key)
        if existing is not None:
            if existing["request_hash"] != request_hash(req.normalized()):
                raise errors.ValidationFailed(
                    "this Idempotency-Key was used with a different request body",
                    [{"field": "Idempotency-Key", "message": "reused with a different body"}],
                )
            view = await render(conn, res, existing)
            await conn.rollback()
            return view, False
        if req.loras:  # after the replay above: an adapter deleted since does not change the original's answer
            await check_adapters(conn, tenant_id, req)
        admission = await charge(await driver_connection(conn), tenant_id, [req.num_images], Defaults.of(res.settings))
        if admission.refusal is not None:
            raise admission.refusal
        created = (await conn.execute(insert(jobs).values(**row).returning(jobs))).mappings().one()
        reused = row["reuse_key"] is not None and bool(
            (await conn.execute(reuse_earlier(tenant_id, where=[jobs.c.id == created["id"]]))).first()
        )
        if reused:  # an identical earlier job succeeded: this one is done already, nothing to publish
            created = (await conn.execute(select(jobs).where(jobs.c.id == created["id"]))).mappings().one()
        # Rendered inside the transaction: once it commits, nothing can fail the answer but the network.
        view = await render(conn, res, created)
        await conn.commit()
    if reused:
        metrics.REUSE_HITS.inc()
        metrics.count_ends(JobStatus.SUCCEEDED.value)
    else:
        await dispatch(res, [(created["id"], created["queue"])])
    return view, True


async def dispatch(res: Resources, pairs: list[tuple[str, str]], *, marked: bool = False) -> bool:
    """Publish committed jobs and record whether they were; on a Redis error leave them to the sweeper.

    ``marked``: the rows were inserted already marked dispatched (group commit); only a failure is written.
    """
    published = False
    if time.monotonic() >= res.redis_down_until:  # else Redis failed a moment ago: don't wait for its timeout
        try:
            await queue.publish_async(res.redis, res.settings.redis_prefix, pairs)
            published = True
        except Exception as exc:  # Redis down or slow: the rows are committed, the sweeper will publish them
            res.redis_down_until = time.monotonic() + _REDIS_BACKOFF_S
            log.warning("publish failed, %d job(s) left to the sweeper: %s", len(pairs), exc)
    if published == marked:
        return published
    try:
        async with res.db.begin() as conn:
            await conn.execute(
                update(jobs)
                .where(jobs.c.id.in_([p[0] for p in pairs]))
                .values(dispatched_at=func.now() if published else None)
            )
    except Exception as exc:  # the sweeper's lost-message check covers a wrong mark, later
        log.warning("could not record the dispatch of %d job(s): %s", len(pairs), exc)
    return published
