"""Job events: a small message on Redis pub/sub after each Postgres write that changes what a client sees of a job
(status, progress), on the job's channel and, for a job of a batch, the batch's channel.

Events are hints with the state they report: each carries the job's status and progress as written and the row's
``updated_at`` (Postgres's clock, so events from the API, the workers and the sweeper order the same way). A
client stream that receives an event older than what it already sent drops it; a lost event (Redis down) costs
freshness, never correctness, since a stream always starts from the row itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from core.models import jobs

log = logging.getLogger(__name__)

# What a write returns so its events can be published (add to the statement's RETURNING).
EVENT_COLUMNS = (
    jobs.c.id,
    jobs.c.batch_id,
    jobs.c.status,
    jobs.c.attempt,
    jobs.c.progress_step,
    jobs.c.progress_total,
    jobs.c.updated_at,
)


@dataclass(frozen=True)
class JobEvent:
    """One job's state right after a write."""

    job_id: str
    batch_id: str | None
    status: str
    attempt: int
    step: int | None
    total: int | None
    at: datetime  # the row's updated_at

    @property
    def event_id(self) -> str:
        """The SSE id: microseconds of ``updated_at``, monotonic per job."""
        return str(micros(self.at))

    def to_json(self) -> str:
        """The message published (and the SSE data of a progress or status event)."""
        return json.dumps(
            {
                "job_id": self.job_id,
                "batch_id": self.batch_id,
                "status": self.status,
                "attempt": self.attempt,
                "progress": {"step": self.step or 0, "total": self.total} if self.total else None,
                "at": micros(self.at),
            },
            separators=(",", ":"),
        )


def micros(at: datetime) -> int:
    """Microseconds since the epoch (an event id)."""
    return int(at.timestamp() * 1_000_000)


def from_rows(rows: Iterable[Any]) -> list[JobEvent]:
    """The events of the rows a write returned with ``EVENT_COLUMNS``."""
    return [
        JobEvent(
            job_id=r["id"],
            batch_id=r["batch_id"],
            status=r["status"],
            attempt=r["attempt"],
            step=r["progress_step"],
            total=r["progress_total"],
            at=r["updated_at"],
        )
        for r in rows
    ]


def job_channel(prefix: str, job_id: str) -> str:
    """The pub/sub channel of one job's events."""
    return f"{prefix}events:job:{job_id}"


def batch_channel(prefix: str, batch_id: str) -> str:
    """The pub/sub channel of a batch's events (one per change of one of its jobs' status)."""
    return f"{prefix}events:batch:{batch_id}"


def _messages(prefix: str, events: Sequence[JobEvent]) -> list[tuple[str, str]]:
    out = []
    for event in events:
        data = event.to_json()
        out.append((job_channel(prefix, event.job_id), data))
        # A batch's streams count statuses: a running job's progress does not change them.
        progress_only = event.status == "running" and (event.step or 0) > 0
        if event.batch_id is not None and not progress_only:
            out.append((batch_channel(prefix, event.batch_id), data))
    return out


def publish(redis_client: Any, prefix: str, events: Sequence[JobEvent]) -> None:
    """Publish events in one pipelined round trip (sync client); a Redis error is logged, never raised."""
    if not events:
        return
    try:
        with redis_client.pipeline(transaction=False) as pipe:
            for channel, data in _messages(prefix, events):
                pipe.publish(channel, data)
            pipe.execute()
    except Exception as exc:  # events are hints: streams fall back to the row
        log.warning("could not publish %d event(s): %s", len(events), exc)


async def publish_async(redis_client: Any, prefix: str, events: Sequence[JobEvent]) -> None:
    """Publish events in one pipelined round trip (asyncio client); a Redis error is logged, never raised."""
    if not events:
        return
    try:
        async with redis_client.pipeline(transaction=False) as pipe:
            for channel, data in _messages(prefix, events):
                pipe.publish(channel, data)
            await pipe.execute()
    except Exception as exc:  # events are hints: streams fall back to the row
        log.warning("could not publish %d event(s): %s", len(events), exc)
