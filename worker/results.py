"""Settling claimed jobs: encode and store a job's images, then record its end with a fenced write."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar

from PIL import Image
from sqlalchemy import Connection

from core import lifecycle, storage
from core.lifecycle import ClaimedJob
from core.retry import Backoff, retrying
from core.status import ErrorCode
from worker.encode import CONTENT_TYPES, EXTENSIONS, encode_image
from worker.process import WorkerContext

log = logging.getLogger(__name__)

T = TypeVar("T")


def db_call(ctx: WorkerContext, fn: Callable[[Connection], T], what: str) -> T:
    """Run ``fn`` on a fresh connection, retrying lost connections with backoff for ``db_retry_s``."""

    def attempt() -> T:
        with ctx.db.connect() as conn:
            return fn(conn)

    return retrying(attempt, backoff=Backoff(deadline_s=ctx.settings.db_retry_s), what=what)


def fail(ctx: WorkerContext, jobs: Sequence[ClaimedJob], code: ErrorCode, message: str) -> int:
    """Record jobs as failed (fenced); how many were."""
    failed = 0
    for job in jobs:
        failed += db_call(ctx, partial(lifecycle.record_failure, job=job, code=code, message=message), "record failure")
    return failed


def release(ctx: WorkerContext, jobs: Sequence[ClaimedJob]) -> int:
    """Give jobs back to the queue (fenced); how many were."""
    return sum(db_call(ctx, partial(lifecycle.release, job=job), "release") for job in jobs)


def store_job(ctx: WorkerContext, job: ClaimedJob, images: Sequence[Image.Image], inference_ms: int) -> str:
    """Store one job's images and record it; returns its end: succeeded, failed, released or canceled.

    Keys depend only on the job and image index, so a re-run overwrites and never adds; success is recorded
    only once every object is stored with a verified checksum; a job canceled meanwhile leaves nothing behind.
    """
    # No check for a cancel first: it would cost every job a round trip; the fenced record below catches it.
    try:
        outputs, upload_ms = _upload(ctx, job, images)
    except storage.StorageError as exc:
        if exc.transient and job.attempt < job.max_attempts:
            log.warning("storing %s failed (%s); job returned to the queue", job.id, exc)
            return "released" if release(ctx, [job]) else "canceled"
        fail(ctx, [job], ErrorCode.INTERNAL_ERROR, f"storing the result failed: {exc}")
        return "failed"
    ok = db_call(
        ctx,
        lambda conn: lifecycle.record_success(
            conn, job, outputs=outputs, inference_ms=inference_ms, upload_ms=upload_ms
        ),
        "record success",
    )
    if ok:
        return "succeeded"
    keys = [o["key"] for o in outputs]  # canceled (or lease lost) while uploading
    retrying(
        lambda: storage.delete_keys(ctx.s3, ctx.settings.s3_bucket, keys),
        backoff=Backoff(deadline_s=ctx.settings.storage_retry_s),
        what="delete canceled outputs",
    )
    return "canceled"


def _upload(ctx: WorkerContext, job: ClaimedJob, images: Sequence[Image.Image]) -> tuple[list[dict[str, Any]], int]:
    started = time.perf_counter()
    r = job.request
    fmt = r["output_format"]
    backoff = Backoff(deadline_s=ctx.settings.storage_retry_s)
    outputs = []
    for index, (image, seed) in enumerate(zip(images, job.seeds, strict=True)):
        data = encode_image(
            image,
            fmt,
            quality=r["output_quality"],
            text={"job_id": job.id, "prompt": r["prompt"], "seed": str(seed), "model": ctx.engine.model_id},
        )
        key = storage.result_key(job.tenant_id, job.id, index, EXTENSIONS[fmt])
        sha256 = retrying(
            partial(storage.put_object_checked, ctx.s3, ctx.settings.s3_bucket, key, data, CONTENT_TYPES[fmt]),
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
