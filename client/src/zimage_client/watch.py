"""Following a job or a batch to its end, the part the sync and async clients share: what an event says, when
an object is final, how long to wait between polls, and when time is up."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import WaitTimeout
from .objects import Batch, Job

TERMINAL = frozenset({"succeeded", "failed", "canceled"})

# Answers of an events endpoint that mean "not served here" (rather than "no such job"): fall back to polling.
EVENTS_NOT_SERVED = frozenset({404, 405, 406, 501})

# A stream that sends only keep-alives this long is checked against the object itself: an event lost on the
# server's side must not stall a wait.
RECONCILE_S = 30.0


def job_finished(job: Mapping[str, Any]) -> bool:
    """Whether a job is succeeded, failed or canceled."""
    return job.get("status") in TERMINAL


def batch_finished(batch: Mapping[str, Any]) -> bool:
    """Whether a batch has nothing left to run (``completed`` or ``canceled``)."""
    return batch.get("status") not in (None, "running")


def apply_job_event(job: Job, payload: Any) -> Job | None:
    """The job as an event describes it: a whole job object replaces it, a state event (status, progress)
    updates it; None for an event that says nothing about the job (a keep-alive, an unknown shape)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("status"), str):
        return None
    if payload.get("object") == "job":
        return Job(**payload)
    updated = Job(**job)
    updated["status"] = payload["status"]
    if "progress" in payload:
        updated["progress"] = payload["progress"]
    return updated


def apply_batch_event(batch: Batch, payload: Any) -> Batch | None:
    """The batch as an event describes it when the event carries its counts (or is a whole batch object);
    None when it does not (e.g. one job's state change): then the batch must be read again."""
    if not isinstance(payload, dict) or not isinstance(payload.get("counts"), dict):
        return None
    if payload.get("object") == "batch":
        return Batch(**payload)
    updated = Batch(**batch)
    updated["counts"] = payload["counts"]
    if isinstance(payload.get("status"), str):
        updated["status"] = payload["status"]
    return updated


@dataclass(frozen=True)
class PollBackoff:
    """Delays between polls: ``initial_s``, growing by ``factor`` up to ``max_s``."""

    initial_s: float = 0.25
    factor: float = 1.5
    max_s: float = 5.0

    def delays(self) -> Iterator[float]:
        """The delays, forever."""
        delay = self.initial_s
        while True:
            yield delay
            delay = min(self.max_s, delay * self.factor)


class Quiet:
    """How long a stream has said nothing new, and whether it is time to read the object itself."""

    def __init__(self, every_s: float | None = None) -> None:
        self._every_s = RECONCILE_S if every_s is None else every_s
        self._last = time.monotonic()

    def heard(self) -> None:
        """An event came."""
        self._last = time.monotonic()

    def due(self) -> bool:
        """True (once per period) when nothing came for ``every_s``."""
        if time.monotonic() - self._last < self._every_s:
            return False
        self._last = time.monotonic()
        return True


class Deadline:
    """A point in time (monotonic) a wait must not pass; no deadline for ``timeout=None``."""

    def __init__(self, timeout: float | None, what: str) -> None:
        self._end = None if timeout is None else time.monotonic() + timeout
        self._timeout = timeout
        self._what = what

    def remaining(self) -> float | None:
        """Seconds left (never negative), or None without a deadline."""
        return None if self._end is None else max(0.0, self._end - time.monotonic())

    def check(self) -> None:
        """Raise WaitTimeout once the deadline has passed."""
        if self._end is not None and time.monotonic() >= self._end:
            raise WaitTimeout(f"{self._what} still running after {self._timeout:g} s")

    def clip(self, delay: float) -> float:
        """``delay``, shortened so as not to sleep past the deadline."""
        remaining = self.remaining()
        return delay if remaining is None else min(delay, remaining)
