"""Live progress on stderr: one job's steps, or a batch's jobs done / failed / running with images/s and an ETA.
On a terminal a rich bar; otherwise (a log, CI) a plain line every few seconds and at the end."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..objects import Batch, Job

PLAIN_EVERY_S = 5.0


class JobProgress:
    """A job's status and denoising steps while ``wait`` follows it."""

    def __init__(self, console: Console, job_id: str) -> None:
        self._console = console
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        )
        self._task = self._progress.add_task(job_id, total=None, status="queued")

    def __enter__(self) -> JobProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, job: Job) -> None:
        """Show the job's latest state."""
        progress = job.get("progress") or None
        status = job.get("status", "?")
        if progress:
            self._progress.update(self._task, total=progress["total"], completed=progress["step"], status=status)
        else:
            self._progress.update(self._task, status=status)


class BatchProgress:
    """A batch's counts as a bar: jobs finished of the total, with failed / running / queued, images/s since this
    run attached, downloads, and the time left."""

    def __init__(self, console: Console, batch_id: str, images_per_job: float, *, downloading: bool = False) -> None:
        self._console = console
        self._downloading = downloading
        self._batch_id = batch_id
        self._images_per_job = images_per_job
        self._started = time.monotonic()
        self._first_succeeded: int | None = None
        self._last_plain = 0.0
        self._line = ""
        self._printed = ""
        self.downloaded = 0
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not console.is_terminal,
        )
        self._task = self._progress.add_task(batch_id, total=None, detail="")

    def __enter__(self) -> BatchProgress:
        self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()
        if not self._console.is_terminal and self._line != self._printed:
            self._print_line()

    def _print_line(self) -> None:
        self._console.print(self._line, soft_wrap=True)
        self._printed = self._line
        self._last_plain = time.monotonic()

    def update(self, batch: Batch) -> None:
        """Show the batch's latest counts."""
        counts = batch.get("counts")
        if counts is None:
            return
        finished = counts["succeeded"] + counts["failed"] + counts["canceled"]
        if self._first_succeeded is None:
            self._first_succeeded = counts["succeeded"]
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = (counts["succeeded"] - self._first_succeeded) * self._images_per_job / elapsed
        detail = (
            f"[green]{counts['succeeded']} ok[/] [red]{counts['failed']} failed[/] "
            f"[yellow]{counts['running']} running[/] {counts['queued']} queued · {rate:.2f} img/s"
        )
        if self._downloading:
            detail += f" · {self.downloaded} downloaded"
        self._progress.update(self._task, total=counts["total"], completed=finished, detail=detail)
        self._line = (
            f"{self._batch_id}: {finished}/{counts['total']} done, {counts['succeeded']} succeeded, "
            f"{counts['failed']} failed, {counts['running']} running, {counts['queued']} queued, "
            f"{rate:.2f} images/s" + (f", {self.downloaded} downloaded" if self._downloading else "")
        )
        if not self._console.is_terminal and time.monotonic() - self._last_plain >= PLAIN_EVERY_S:
            self._print_line()

    def add_downloaded(self, count: int) -> None:
        """Count files downloaded (shown with the next update)."""
        self.downloaded += count
