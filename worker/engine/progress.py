"""``Progress``: each request's denoising steps over a batch that runs as one or several pipeline calls.

One rule for every engine: a request counts the steps its own images have run, on its own scale (``steps``
for generate and instruct, ``steps × strength`` rounded as diffusers does for img2img and inpaint), so a job's
progress never reads past its total whatever else shares its batch. With several calls (caption buckets,
out-of-memory halves, one instruct job after another) each request moves only while its own images run. An
image that runs again (its call ran out of memory) starts over, but a request's reported step never goes back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from core.errors import Interrupted

# Called after every denoising step with each request's steps done (in request order); True stops the batch.
StepCallback = Callable[[Sequence[int]], bool]


class BatchInterrupted(Interrupted):
    """The step callback asked the batch to stop (cancel, time limit, shutdown)."""


class Progress:
    """Tracks every image's steps in its current call and reports each request's progress to ``on_step``."""

    def __init__(self, on_step: StepCallback | None, totals: Sequence[int], image_requests: Sequence[int]) -> None:
        """``totals[r]``: the steps request r counts to; ``image_requests[i]``: the request of image i."""
        self.on_step = on_step
        self.totals = tuple(totals)
        self._request_of = tuple(image_requests)
        self._images_per_request = [0] * len(self.totals)
        for request in self._request_of:
            self._images_per_request[request] += 1
        self._done = [0] * len(self._request_of)  # steps each image has run in its current call
        self._current: tuple[int, ...] = ()
        self.reported = [0] * len(self.totals)
        self.stopped = False

    def begin(self, images: Sequence[int]) -> None:
        """A pipeline call on these images (by index) starts: they start from step 0."""
        self._current = tuple(images)
        for image in self._current:
            self._done[image] = 0

    def step(self, done: int) -> bool:
        """The current call finished its step ``done`` (1-based); returns True when the batch must stop."""
        for image in self._current:
            self._done[image] = done
        sums = [0] * len(self.totals)
        for image, steps in enumerate(self._done):
            sums[self._request_of[image]] += steps
        for request, total in enumerate(self.totals):
            count = self._images_per_request[request]
            steps = sums[request] // count if count else 0
            self.reported[request] = max(self.reported[request], min(total, steps))
        if self.on_step is not None and self.on_step(tuple(self.reported)):
            self.stopped = True
        return self.stopped

    def callback(self, pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        """diffusers' ``callback_on_step_end``: count the step; on a stop, set the pipeline's interrupt flag."""
        if self.step(index + 1):
            # The pipeline skips every remaining step once its interrupt flag is set.
            pipe._interrupt = True
        return {}

    def raise_if_stopped(self) -> None:
        """Raise BatchInterrupted when ``on_step`` asked to stop during the last call."""
        if self.stopped:
            done = ", ".join(f"{s}/{t}" for s, t in zip(self.reported, self.totals, strict=True))
            raise BatchInterrupted(f"batch interrupted at steps {done}")
