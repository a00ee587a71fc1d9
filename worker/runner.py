"""One batch from claim to record: claim compatible jobs, run them in one pipeline call, upload, record."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from PIL import Image
from sqlalchemy import Connection

from core import lifecycle, storage
from core.lifecycle import ClaimedJob
from core.retry import Backoff, retrying
from core.status import ErrorCode
from worker import process
from worker.encode import CONTENT_TYPES, EXTENSIONS, encode_image
from worker.engine import BatchInterrupted, ImageRequest
from worker.process import WorkerContext, record_stats

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class BatchReport:
    """What one call of ``run_next_batch`` did."""

    claimed: int = 0
    succeeded: int = 0
    failed: int = 0
    canceled: int = 0
    released: int = 0
    inference_ms: int = 0


def image_request(job: ClaimedJob) -> ImageRequest:
    """The engine request of a generate job: image i uses seed + i."""
    r = job.request
    return ImageRequest(
        prompt=r["prompt"],
        width=r["width"],
        height=r["height"],
        steps=r["steps"],
        guidance_scale=r["guidance_scale"],
        seeds=tuple(r["seed"] + i for i in range(r["num_images"])),
        negative_prompt=r.get("negative_prompt"),
    )


def db_call(ctx: WorkerContext, fn: Callable[[Connection], T], what: str) -> T:
    """Run ``fn`` on a fresh connection, retrying lost connections with backoff for ``db_retry_s``."""

    def attempt() -> T:
        with ctx.db.connect() as conn:
            return fn(conn)

    return retrying(attempt, backoff=Backoff(deadline_s=ctx.settings.db_retry_s), what=what)


class BatchGuard:
    """Watches one running batch: throttled progress, lease renewal, cancel, time limit and shutdown.

    It is the engine's step callback (returning True stops the batch) and runs a thread that renews the
    leases while the batch decodes and uploads, when no step callback comes.
    """

    def __init__(self, ctx: WorkerContext, jobs: Sequence[ClaimedJob]) -> None:
        self._ctx = ctx
        self._jobs = list(jobs)
        self._last_progress = time.monotonic()
        first = jobs[0].request
        images = sum(j.request["num_images"] for j in jobs)
        self._deadline = time.monotonic() + ctx.settings.batch_timeout_s(images, first["steps"])
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_loop, name="lease-renewer", daemon=True)
        self.live = {j.id for j in jobs}
        self.reason: str | None = None  # why the batch was stopped: canceled | timeout | shutdown
        self._crash = bool(ctx.settings.fault_crash_marker) and any(
            ctx.settings.fault_crash_marker in j.request["prompt"] for j in jobs
        )

    def __enter__(self) -> BatchGuard:
        self._renewer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._renewer.join(5)

    def _renew_loop(self) -> None:
        period = max(0.5, self._ctx.settings.lease_s / 3)
        while not self._stop.wait(period):
            try:
                with self._ctx.db.connect() as conn:
                    lifecycle.renew_leases(conn, self._jobs, lease_s=self._ctx.settings.lease_s)
            except Exception as exc:  # the next renewal may work; the lease has slack for two misses
                log.warning("lease renewal failed: %s", exc)

    def __call__(self, step: int, total: int) -> bool:
        settings = self._ctx.settings
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
        if now - self._last_progress < settings.progress_interval_s and step < total:
            return False
        self._last_progress = now
        try:
            with self._ctx.db.connect() as conn:
                self.live = lifecycle.heartbeat(conn, self._jobs, step=step, lease_s=settings.lease_s)
        except Exception as exc:  # progress is best effort; the final, fenced write is what counts
            log.warning("progress write failed: %s", exc)
            return False
        if not self.live:
            self.reason = "canceled"
            return True
        return False


def run_next_batch(ctx: WorkerContext, queue: str) -> BatchReport:
    """Claim the next batch of ``queue`` from Postgres and see it through; a no-op when nothing is queued."""
    settings = ctx.settings
    jobs = db_call(
        ctx,
        lambda conn: lifecycle.claim_batch(
            conn,
            queue=queue,
            worker_id=ctx.worker_id,
            lease_s=settings.lease_s,
            max_images=settings.max_batch_images,
            token_budget=settings.batch_token_budget,
        ),
        "claim",
    )
    if not jobs:
        return BatchReport()
    log.info("batch of %d job(s): %s", len(jobs), ", ".join(j.id for j in jobs))
    with BatchGuard(ctx, jobs) as guard:
        started = time.perf_counter()
        try:
            images = ctx.engine.generate([image_request(j) for j in jobs], on_step=guard)
        except BatchInterrupted:
            return _interrupted(ctx, jobs, guard)
        except ValueError as exc:  # the pipeline refused the input: running it again cannot help
            return _fail(ctx, jobs, ErrorCode.INVALID_INPUT, str(exc))
        except Exception as exc:
            log.exception("batch failed")
            return _fail(ctx, jobs, ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
        inference_ms = round((time.perf_counter() - started) * 1000)
        live = db_call(ctx, lambda conn: lifecycle.still_running(conn, jobs), "check cancels")
        report = _finish(ctx, jobs, images, live, inference_ms)
    record_stats(ctx, jobs=len(jobs))
    return report


def _interrupted(ctx: WorkerContext, jobs: Sequence[ClaimedJob], guard: BatchGuard) -> BatchReport:
    """Settle a batch its guard stopped: timeouts fail, a shutdown gives the jobs back, cancels are done."""
    live = [j for j in jobs if j.id in guard.live]
    if guard.reason == "timeout":
        limit = ctx.settings.batch_timeout_s(sum(j.request["num_images"] for j in jobs), jobs[0].request["steps"])
        report = _fail(ctx, live, ErrorCode.TIMEOUT, f"the batch ran past its time limit of {limit:.0f} s")
        return BatchReport(claimed=len(jobs), failed=report.failed, canceled=len(jobs) - len(live))
    if guard.reason == "shutdown":
        released = sum(db_call(ctx, lambda conn, j=j: lifecycle.release(conn, j), "release") for j in live)
        log.warning("shutting down: %d job(s) returned to the queue", released)
        return BatchReport(claimed=len(jobs), released=released, canceled=len(jobs) - len(live))
    log.info("batch stopped: every job was canceled")
    return BatchReport(claimed=len(jobs), canceled=len(jobs))


def _finish(
    ctx: WorkerContext,
    jobs: Sequence[ClaimedJob],
    images: Sequence[Sequence[Image.Image]],
    live: set[str],
    inference_ms: int,
) -> BatchReport:
    """Encode and upload each live job's images in the upload pool, then record each job (fenced)."""
    pending: list[tuple[ClaimedJob, Future[tuple[list[dict[str, Any]], int]]]] = [
        (job, ctx.uploads.submit(_upload_job, ctx, job, imgs))
        for job, imgs in zip(jobs, images, strict=True)
        if job.id in live
    ]
    succeeded = failed = released = 0
    for job, future in pending:
        try:
            outputs, upload_ms = future.result()
        except storage.StorageError as exc:
            if exc.transient and job.attempt < job.max_attempts:
                released += db_call(ctx, lambda conn, j=job: lifecycle.release(conn, j), "release")
                log.warning("storing %s failed (%s); job returned to the queue", job.id, exc)
            else:
                failed += _fail(ctx, [job], ErrorCode.INTERNAL_ERROR, f"storing the result failed: {exc}").failed
            continue
        ok = db_call(
            ctx,
            lambda conn, j=job, o=outputs, u=upload_ms: lifecycle.record_success(
                conn, j, outputs=o, inference_ms=inference_ms, upload_ms=u
            ),
            "record success",
        )
        if ok:
            succeeded += 1
        else:  # canceled (or lost its lease) while uploading: leave nothing behind
            keys = [o["key"] for o in outputs]
            retrying(
                lambda k=keys: storage.delete_keys(ctx.s3, ctx.settings.s3_bucket, k),
                backoff=Backoff(deadline_s=ctx.settings.storage_retry_s),
                what="delete canceled outputs",
            )
    return BatchReport(
        claimed=len(jobs),
        succeeded=succeeded,
        failed=failed,
        canceled=len(jobs) - len(pending),
        released=released,
        inference_ms=inference_ms,
    )


def _upload_job(
    ctx: WorkerContext, job: ClaimedJob, images: Sequence[Image.Image]
) -> tuple[list[dict[str, Any]], int]:
    """Encode and store one job's images; keys depend only on the job, so a re-run overwrites, never adds."""
    started = time.perf_counter()
    r = job.request
    fmt = r["output_format"]
    backoff = Backoff(deadline_s=ctx.settings.storage_retry_s)
    outputs = []
    for index, image in enumerate(images):
        seed = r["seed"] + index
        data = encode_image(
            image,
            fmt,
            quality=r["output_quality"],
            text={"job_id": job.id, "prompt": r["prompt"], "seed": str(seed), "model": ctx.engine.model_id},
        )
        key = storage.result_key(job.tenant_id, job.id, index, EXTENSIONS[fmt])
        sha256 = retrying(
            lambda k=key, d=data: storage.put_object_checked(ctx.s3, ctx.settings.s3_bucket, k, d, CONTENT_TYPES[fmt]),
            backoff=backoff,
            what=f"upload {key}",
        )
        outputs.append(
            {
                "index": index,
                "key": key,
                "width": image.width,
                "height": image.height,
                "seed": seed,
                "format": fmt,
                "bytes": len(data),
                "sha256": sha256,
            }
        )
    return outputs, round((time.perf_counter() - started) * 1000)


def _fail(ctx: WorkerContext, jobs: Sequence[ClaimedJob], code: ErrorCode, message: str) -> BatchReport:
    failed = sum(
        db_call(ctx, lambda conn, j=j: lifecycle.record_failure(conn, j, code=code, message=message), "record failure")
        for j in jobs
    )
    return BatchReport(claimed=len(jobs), failed=failed)
