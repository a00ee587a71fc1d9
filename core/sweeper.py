"""The sweeper: re-publishes committed jobs whose message never reached Redis, ends or requeues jobs whose lease
expired, and folds the queue counters (``core.queue_counts``). Any number may run (API processes, workers); a
Postgres advisory lock lets one act at a time.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from sqlalchemy import Engine, Text, cast, func, text

from core import events, metrics, queue, queue_counts
from core.events import EVENT_COLUMNS
from core.models import jobs
from core.settings import Settings
from core.status import HELD, ErrorCode, JobStatus
from core.transition import transition

log = logging.getLogger(__name__)

_LOCK_KEY = 0x5A494D47  # "ZIMG": the advisory lock every sweeper takes before acting

_EXPIRED = jobs.c.lease_expires_at < func.clock_timestamp()
_ATTEMPTS_LEFT = jobs.c.attempt < jobs.c.max_attempts
# A lease that ran out: the job goes back to the queue while it has attempts left, else it fails.
_REQUEUE = transition(JobStatus.QUEUED, from_=HELD, where=[_EXPIRED, _ATTEMPTS_LEFT]).returning(*EVENT_COLUMNS)
_GIVE_UP = transition(
    JobStatus.FAILED,
    from_=HELD,
    where=[_EXPIRED, ~_ATTEMPTS_LEFT],
    values={
        "error_code": ErrorCode.MAX_ATTEMPTS_EXCEEDED.value,
        "error_message": "the job lost its worker " + cast(jobs.c.attempt, Text) + " times",
        "worker_id": None,
        "dispatched_at": None,
    },
).returning(*EVENT_COLUMNS)

_UNDISPATCHED = text(
    f"""
SELECT id, queue FROM jobs
WHERE status = '{JobStatus.QUEUED}' AND dispatched_at IS NULL
  AND created_at < clock_timestamp() - make_interval(secs => :age_s)
ORDER BY created_at
LIMIT :limit
FOR UPDATE SKIP LOCKED
"""
)

_MARK_DISPATCHED = text("UPDATE jobs SET dispatched_at = clock_timestamp() WHERE id = ANY(CAST(:ids AS text[]))")


_STALE_COUNTS = text(
    f"""
SELECT queue, count(*) AS n FROM jobs
WHERE status = '{JobStatus.QUEUED}' AND dispatched_at < clock_timestamp() - make_interval(secs => :age_s)
GROUP BY queue
"""
)

_STALE = text(
    f"""
SELECT id, queue FROM jobs
WHERE status = '{JobStatus.QUEUED}' AND queue = :queue
  AND dispatched_at < clock_timestamp() - make_interval(secs => :age_s)
ORDER BY priority DESC, created_at
LIMIT :limit
FOR UPDATE SKIP LOCKED
"""
)


@dataclass(frozen=True)
class SweepResult:
    """What one sweep did."""

    acted: bool  # False when another sweeper held the lock
    requeued: int = 0
    failed: int = 0
    published: int = 0


def sweep_once(engine: Engine, redis_client, settings: Settings, *, limit: int = 10_000) -> SweepResult:
    """One pass of the sweeper (a no-op when another sweeper holds the lock). Raises if Redis is down."""
    with engine.connect() as conn:
        if not conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _LOCK_KEY}).scalar():
            conn.rollback()
            return SweepResult(acted=False)
        moved = [*conn.execute(_REQUEUE).mappings().all(), *conn.execute(_GIVE_UP).mappings().all()]
        queue_counts.compact(conn)
        conn.commit()  # the expiry stands even if Redis is down below
        failed = sum(1 for r in moved if r["status"] == JobStatus.FAILED)
        requeued = len(moved) - failed
        metrics.SWEEPER_ACTIONS.labels("requeued").inc(requeued)
        metrics.SWEEPER_ACTIONS.labels("failed").inc(failed)
        metrics.count_ends(JobStatus.FAILED.value, failed, ErrorCode.MAX_ATTEMPTS_EXCEEDED.value)
        events.publish(redis_client, settings.redis_prefix, events.from_rows(moved))
        if requeued or failed:
            log.warning("sweeper: %d expired leases requeued, %d failed", requeued, failed)

        if not conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _LOCK_KEY}).scalar():
            conn.rollback()
            return SweepResult(acted=True, requeued=requeued, failed=failed)
        rows = list(conn.execute(_UNDISPATCHED, {"age_s": settings.redispatch_after_s, "limit": limit}).all())
        rows += _lost_messages(conn, redis_client, settings, limit)
        if not rows:
            conn.rollback()
            return SweepResult(acted=True, requeued=requeued, failed=failed)
        try:
            queue.publish(redis_client, settings.redis_prefix, [(r.id, r.queue) for r in rows])
        except Exception:
            conn.rollback()
            raise
        conn.execute(_MARK_DISPATCHED, {"ids": [r.id for r in rows]})
        conn.commit()
        metrics.SWEEPER_ACTIONS.labels("published").inc(len(rows))
        log.info("sweeper: published %d jobs", len(rows))
        return SweepResult(acted=True, requeued=requeued, failed=failed, published=len(rows))


def _lost_messages(conn, redis_client, settings: Settings, limit: int) -> list:
    """Queued jobs whose messages Redis lost (restarted empty, evicted): long-published jobs outnumber the
    messages waiting in their queue. Every queued job normally has its own message, so a shortfall means loss;
    publishing again costs at most one no-op wake-up per job."""
    rows = []
    for stale in conn.execute(_STALE_COUNTS, {"age_s": settings.stale_dispatch_s}).all():
        depth = queue.queue_depth(redis_client, settings.redis_prefix, stale.queue)
        if depth < stale.n:
            log.warning(
                "sweeper: %s holds %d messages for %d waiting jobs; publishing again", stale.queue, depth, stale.n
            )
            rows += conn.execute(
                _STALE, {"queue": stale.queue, "age_s": settings.stale_dispatch_s, "limit": limit}
            ).all()
    return rows


class SweeperThread(threading.Thread):
    """Runs ``sweep_once`` every ``settings.sweep_interval_s`` until stopped; errors are logged, never fatal."""

    def __init__(self, engine: Engine, redis_client, settings: Settings) -> None:
        super().__init__(name="zimage-sweeper", daemon=True)
        self._engine = engine
        self._redis = redis_client
        self._settings = settings
        self._stop_event = threading.Event()

    def run(self) -> None:
        """Sweep until ``stop`` is called."""
        while not self._stop_event.wait(self._settings.sweep_interval_s):
            try:
                sweep_once(self._engine, self._redis, self._settings)
            except Exception as exc:  # a dependency is down: try again next interval
                log.warning("sweep failed: %s", exc)

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the loop to end and wait for it."""
        self._stop_event.set()
        self.join(timeout)
