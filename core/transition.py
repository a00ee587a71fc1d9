"""The one gate every job status write goes through: ``transition`` builds its UPDATE from the state machine.

The WHERE clause names exactly the statuses ``core.status.TRANSITIONS`` allows the move from; a worker's write
is fenced by the attempt it claimed, and a fenced write applies only while the job is held (``running``). The
SET clause always holds what entering the status means (a terminal status ends the lease, the progress and the
clock; a job given back to the queue loses its worker and its dispatch mark). The caller adds only what is its
own (outputs, error, lease length) and its RETURNING. A write the table forbids matches no row: it changes
nothing, and its caller learns so from the empty RETURNING.

A terminal move also owes webhooks: ``Move.returning`` builds it as one statement that writes the job's webhook
delivery (and its batch's, when the move ends the batch) beside the status (``core.webhook_outbox``), so every
terminal path (worker success and failure, sweeper give-up, cancel, batch cancel, reuse) commits its deliveries
with its status and none can forget them.

The statement is plain SQLAlchemy Core, so the worker (sync) and the API (async) execute the same thing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import BigInteger, ColumnElement, Select, Update, func, literal, literal_column, tuple_, update
from sqlalchemy.dialects.postgresql import JSONB

from core.models import jobs
from core.status import HELD, TERMINAL, JobStatus, can_move, sources_of
from core.webhook_outbox import with_deliveries


class Attempt(Protocol):
    """What fences a worker's write: the job and the attempt it was claimed with."""

    @property
    def id(self) -> str: ...

    @property
    def attempt(self) -> int: ...


@dataclass(frozen=True)
class Move:
    """A status move the gate built: ``returning`` makes the statement to execute."""

    update: Update  # the UPDATE of the jobs rows alone (what the move changes in ``jobs``)
    to: JobStatus

    def returning(self, *columns: Any) -> Update | Select[Any]:
        """The statement of the move, returning ``columns`` of each moved row (a table: all its columns). A
        terminal move writes the webhook deliveries it owes in the same statement."""
        if self.to in TERMINAL:
            return with_deliveries(self.update, columns)
        return self.update.returning(*columns)


def _ms_between(start: Any, end: Any) -> ColumnElement[Any]:
    """Whole milliseconds from ``start`` to ``end``."""
    return func.floor(func.extract("epoch", end - start) * 1000).cast(BigInteger)


def _entering(to: JobStatus) -> dict[str, Any]:
    """The columns that entering ``to`` sets, whoever moves the job there."""
    now = func.clock_timestamp()
    values: dict[str, Any] = {"status": to.value, "updated_at": now}
    if to in TERMINAL:
        values.update(
            finished_at=now,
            lease_expires_at=None,
            progress_step=None,
            progress_total=None,
            # Where the time went; the worker adds its own measurements (inference, upload) to these.
            timings=func.jsonb_build_object(
                literal_column("'queued_ms'"),
                _ms_between(jobs.c.created_at, jobs.c.started_at),
                literal_column("'total_ms'"),
                _ms_between(jobs.c.created_at, now),
            ),
        )
    elif to == JobStatus.QUEUED:
        # Back in the queue: nobody holds it, and it waits for the sweeper to publish its wake-up again.
        values.update(
            lease_expires_at=None, worker_id=None, progress_step=None, progress_total=None, dispatched_at=None
        )
    return values


def transition(
    to: JobStatus,
    *,
    fence: Iterable[Attempt] | None = None,
    from_: JobStatus | None = None,
    where: Sequence[ColumnElement[bool]] = (),
    values: Mapping[str, Any] | None = None,
    timings: Mapping[str, Any] | None = None,
) -> Move:
    """The move of jobs to ``to`` from every status the state machine allows it from.

    ``fence``: the claimed attempts of a worker's write; only those (id, attempt) pairs match, and only while
    the job is held (``running``): a stale worker's late write changes nothing. Without a fence, ``where``
    must say which jobs (by id, tenant, lease); ``from_`` narrows the move to one source status the table
    allows (the sweeper's moves apply only to held jobs, whose leases run out). ``values`` are the caller's
    own columns; they may not set the status or what entering it sets. ``timings`` (terminal moves only)
    are added to the job's timings.
    """
    own = dict(values or {})
    entering = _entering(to)
    clash = sorted(set(own) & set(entering))
    if clash:
        raise ValueError(f"the gate sets {', '.join(clash)} on entering {to}; the caller may not")
    if fence is not None:
        if not can_move(HELD, to):
            raise ValueError(f"a held job cannot move to {to}")
        sources: tuple[str, ...] = (HELD.value,)
        pairs = [(a.id, a.attempt) for a in fence]
        conditions = [tuple_(jobs.c.id, jobs.c.attempt).in_(pairs)] if pairs else [literal(False)]
    else:
        # Unfenced, a job never "moves" to the status it is in: only its holder writes it there.
        sources = tuple(s for s in sources_of(to) if s != to.value)
        if from_ is not None:
            if from_.value not in sources:
                raise ValueError(f"the state machine does not move {from_} to {to}")
            sources = (from_.value,)
        if not sources:
            raise ValueError(f"only a job's holder may write it in {to}")
        if not where:
            raise ValueError("an unfenced transition must say which jobs it moves")
        conditions = []
    if timings:
        if to not in TERMINAL:
            raise ValueError("timings are recorded when a job ends")
        entering["timings"] = entering["timings"].op("||")(literal(dict(timings), JSONB))
    return Move(update(jobs).where(jobs.c.status.in_(sources), *conditions, *where).values({**entering, **own}), to)
