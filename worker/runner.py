"""One batch from claim to record: claim compatible jobs, run them in one pipeline call, upload, record."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from PIL import Image

from core import lifecycle, storage
from core.lifecycle import ClaimedJob
from core.status import ErrorCode
from worker.encode import CONTENT_TYPES, EXTENSIONS, encode_image
from worker.engine import BatchInterrupted, ImageRequest
from worker.process import WorkerContext, record_stats

log = logging.getLogger(__name__)


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


class ProgressReporter:
    """The engine's step callback: writes progress (and renews leases) at most every ``interval_s``.

    Returns True, which stops the batch, once none of its jobs is still running (all were canceled).
    """

    def __init__(self, ctx: WorkerContext, jobs: Sequence[ClaimedJob]) -> None:
        self._ctx = ctx
        self._jobs = list(jobs)
        self._last = time.monotonic()
        self.live = {j.id for j in jobs}

    def __call__(self, step: int, total: int) -> bool:
        now = time.monotonic()
        if now - self._last < self._ctx.settings.progress_interval_s and step < total:
            return False
        self._last = now
        try:
            with self._ctx.db.connect() as conn:
                self.live = lifecycle.heartbeat(
                    conn, self._jobs, step=step, lease_s=self._ctx.settings.lease_s
                )
        except Exception as exc:  # progress is best effort; the final write is what counts
            log.warning("progress write failed: %s", exc)
            return False
        return not self.live


def run_next_batch(ctx: WorkerContext, queue: str) -> BatchReport:
    """Claim the next batch of ``queue`` from Postgres and see it through; a no-op when nothing is queued."""
    settings = ctx.settings
    with ctx.db.connect() as conn:
        jobs = lifecycle.claim_batch(
            conn,
            queue=queue,
            worker_id=ctx.worker_id,
            lease_s=settings.lease_s,
            max_images=settings.max_batch_images,
            token_budget=settings.batch_token_budget,
        )
    if not jobs:
        return BatchReport()
    log.info("batch of %d job(s): %s", len(jobs), ", ".join(j.id for j in jobs))
    progress = ProgressReporter(ctx, jobs)
    started = time.perf_counter()
    try:
        images = ctx.engine.generate([image_request(j) for j in jobs], on_step=progress)
    except BatchInterrupted:
        log.info("batch stopped: every job was canceled")
        return BatchReport(claimed=len(jobs), canceled=len(jobs))
    except ValueError as exc:  # the pipeline refused the input: running it again cannot help
        return _fail_all(ctx, jobs, ErrorCode.INVALID_INPUT, str(exc))
    except Exception as exc:
        log.exception("batch failed")
        return _fail_all(ctx, jobs, ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
    inference_ms = round((time.perf_counter() - started) * 1000)

    with ctx.db.connect() as conn:
        live = lifecycle.still_running(conn, jobs)
    report = _finish(ctx, jobs, images, live, inference_ms)
    record_stats(ctx, jobs=len(jobs))
    return report


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
                with ctx.db.connect() as conn:
                    released += lifecycle.release(conn, job)
                log.warning("upload of %s failed (%s); job returned to the queue", job.id, exc)
            else:
                with ctx.db.connect() as conn:
                    failed += lifecycle.record_failure(
                        conn, job, code=ErrorCode.INTERNAL_ERROR, message=f"storing the result failed: {exc}"
                    )
            continue
        with ctx.db.connect() as conn:
            ok = lifecycle.record_success(
                conn, job, outputs=outputs, inference_ms=inference_ms, upload_ms=upload_ms
            )
        if ok:
            succeeded += 1
        else:  # canceled (or lost its lease) while uploading: leave nothing behind
            storage.delete_keys(ctx.s3, ctx.settings.s3_bucket, [o["key"] for o in outputs])
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
    """Encode and store one job's images; the keys depend only on the job, so a re-run overwrites them."""
    started = time.perf_counter()
    r = job.request
    fmt = r["output_format"]
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
        sha256 = storage.put_object_checked(ctx.s3, ctx.settings.s3_bucket, key, data, CONTENT_TYPES[fmt])
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


def _fail_all(ctx: WorkerContext, jobs: Sequence[ClaimedJob], code: ErrorCode, message: str) -> BatchReport:
    with ctx.db.connect() as conn:
        failed = sum(lifecycle.record_failure(conn, job, code=code, message=message) for job in jobs)
    return BatchReport(claimed=len(jobs), failed=failed)
