"""The job state machine, written once as data. Every status change in the service goes through it."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"  # committed, waiting for a worker to claim it
    RUNNING = "running"  # claimed by a worker under a lease; `attempt` fences its writes
    SUCCEEDED = "succeeded"  # images are in S3 and recorded in `outputs`
    FAILED = "failed"  # ended with `error_code`; never runs again
    CANCELED = "canceled"  # canceled by the client; never runs again


class ErrorCode(StrEnum):
    """Why a job failed (the `error.code` of a failed job)."""

    INVALID_INPUT = "invalid_input"  # the request cannot be run (permanent)
    OUT_OF_MEMORY = "out_of_memory"  # one image does not fit the accelerator
    TIMEOUT = "timeout"  # the batch ran past its time limit
    MAX_ATTEMPTS_EXCEEDED = "max_attempts_exceeded"  # lost its worker too many times
    INTERNAL_ERROR = "internal_error"  # a bug or an unexpected failure


TERMINAL: frozenset[JobStatus] = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})
ACTIVE: frozenset[JobStatus] = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})
# The status in which a worker holds a job under a lease: the only one its attempt-fenced writes apply to.
HELD = JobStatus.RUNNING

# from-status -> the statuses it may move to. Anything not listed is refused. `core.transition` builds every
# status write from this table.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    # running: a worker claims it; canceled: by the client; failed: refused before it could run;
    # succeeded: an identical earlier result was reused (core.reuse), nothing ran.
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELED, JobStatus.FAILED, JobStatus.SUCCEEDED}),
    # running -> running: its holder reports progress and renews the lease; queued: given back or lease lost.
    JobStatus.RUNNING: frozenset(
        {JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.QUEUED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELED: frozenset(),
}


def can_move(src: JobStatus, dst: JobStatus) -> bool:
    """Whether the state machine allows ``src`` → ``dst``."""
    return dst in TRANSITIONS[src]


def sources_of(dst: JobStatus) -> tuple[str, ...]:
    """Every status from which ``dst`` may be reached (the WHERE clause of a conditional UPDATE)."""
    return tuple(src.value for src, dsts in TRANSITIONS.items() if dst in dsts)


def is_terminal(status: str | JobStatus) -> bool:
    """Whether a job in ``status`` will never change again."""
    return JobStatus(status) in TERMINAL
