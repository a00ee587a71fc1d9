"""Step progress of one batch that may run as several pipeline calls, reported on the requests' own step scale."""

from __future__ import annotations

from collections.abc import Callable

StepCallback = Callable[[int, int], bool]


class BatchProgress:
    """Turns (call, step) events into on_step(step, steps) calls: monotonic, ending at (steps, steps).

    One call: exactly (1, steps) ... (steps, steps). Several calls (caption buckets, out-of-memory halves): the
    batch's overall fraction, scaled to ``steps`` so a job's progress never reads past its own step count.
    """

    def __init__(self, on_step: StepCallback | None, steps: int, calls: int) -> None:
        self.on_step = on_step
        self.steps = steps
        self.total = steps * calls
        self.finished = 0  # steps of the calls that completed
        self.reported = 0

    def step(self, step_in_call: int) -> bool:
        """Report one finished denoising step of the current call; True means: stop the batch."""
        if self.on_step is None:
            return False
        done = self.finished + step_in_call
        scaled = done * self.steps // max(self.total, 1)
        self.reported = min(self.steps, max(self.reported, scaled))
        return bool(self.on_step(self.reported, self.steps))

    def call_done(self) -> None:
        """The current call completed all its steps."""
        self.finished += self.steps

    def call_split(self) -> None:
        """The current call failed and runs again as two halves: one more call to go."""
        self.total += self.steps

    def call_dropped(self) -> None:
        """The current call will not run (again): nothing of it remains to do."""
        self.total -= self.steps
