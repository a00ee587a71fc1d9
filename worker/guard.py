"""``BatchGuard``: watches one claimed batch from claim to record — lease renewal, throttled progress, cancel,
time limit, shutdown grace and the injected crash of the fault suite."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence

from sqlalchemy import Engine

from core import lifecycle
from core.events import JobEvent
from core.lifecycle import ClaimedJob
from core.settings import Settings
from core.work import progress_total
from worker import process

log = logging.getLogger(__name__)


class BatchGuard:
    """The engine's step callback for one batch (returning True stops it), plus a thread that renews the
    batch's leases from its claim until its last result is recorded, while no step callback comes (prepare,
    decode, upload).

    The engine reports each request's steps done; request i is ``jobs[i]`` (``keep`` narrows the jobs when some
    leave the batch before it runs)."""

    def __init__(
        self,
        jobs: Sequence[ClaimedJob],
        *,
        db: Engine,
        settings: Settings,
        publish: Callable[[Sequence[JobEvent]], None] | None = None,
    ) -> None:
        self._db = db
        self._publish = publish or (lambda _: None)
        self._settings = settings
        self._jobs = list(jobs)
        self._totals = [progress_total(j.request) for j in jobs]
        self._last_progress = time.monotonic()
        images = sum(j.request["num_images"] for j in jobs)
        self.time_limit_s = settings.batch_timeout_s(images, jobs[0].request["steps"])
        self._deadline = time.monotonic() + self.time_limit_s
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_loop, name="lease-renewer", daemon=True)
        self.live = {j.id for j in jobs}
        self.reason: str | None = None  # why the batch was stopped: canceled | timeout | shutdown
        marker = settings.fault_crash_marker
        self._crash = bool(marker) and any(marker in j.request["prompt"] for j in jobs)

    def start(self) -> BatchGuard:
        """Start renewing the leases."""
        self._renewer.start()
        return self

    def keep(self, jobs: Sequence[ClaimedJob]) -> None:
        """The jobs the engine runs, in request order (the others left the batch and are settled)."""
        self._jobs = list(jobs)
        self._totals = [progress_total(j.request) for j in jobs]

    def close(self) -> None:
        """Stop renewing (the batch's jobs are all recorded or given back)."""
        self._stop.set()

    def _renew_loop(self) -> None:
        period = max(0.5, self._settings.lease_s / 3)
        while not self._stop.wait(period):
            try:
                with self._db.connect() as conn:
                    lifecycle.renew_leases(conn, self._jobs, lease_s=self._settings.lease_s)
            except Exception as exc:  # the next renewal may work; the lease has slack for two misses
                log.warning("lease renewal failed: %s", exc)

    def __call__(self, steps: Sequence[int]) -> bool:
        """The engine's report after a denoising step: each job's steps done. True: stop the batch."""
        settings = self._settings
        if self._crash:
            log.error("fault injection: crashing on a poison job")
            os._exit(70)
        if settings.fault_step_delay_s:
            time.sleep(settings.fault_step_delay_s)
        now = time.monotonic()
        if now > self._deadline:
            self.reason = "timeout"
            return True
        if process.shutdown_overdue():
            self.reason = "shutdown"
            return True
        finished = all(step >= total for step, total in zip(steps, self._totals, strict=True))
        if now - self._last_progress < settings.progress_interval_s and not finished:
            return False
        self._last_progress = now
        found: list[JobEvent] = []
        try:
            with self._db.connect() as conn:
                self.live = lifecycle.heartbeat(conn, self._jobs, steps=steps, lease_s=settings.lease_s, events=found)
            self._publish(found)
        except Exception as exc:  # progress is best effort; the final, fenced write is what counts
            log.warning("progress write failed: %s", exc)
            return False
        if not self.live:
            self.reason = "canceled"
            return True
        return False
