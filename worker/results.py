"""``Recorder``: settles claimed jobs. It stores a job's images in S3 and records each job's end with a
fenced write: succeeded, failed, or given back to the queue."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from PIL import Image
from sqlalchemy import Connection, Engine

from core import events, lifecycle, logs, storage
from core.errors import StorageError
from core.events import JobEvent
from core.lifecycle import ClaimedJob
from core.retry import Backoff, db_call, retrying
from core.status import ErrorCode, JobStatus
from worker import metrics
from worker.encode import CONTENT_TYPES, EXTENSIONS, encode_image

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Recorder:
    """What settling a job uses: the database and the bucket, how long to retry each, the model's name."""

    db: Engine
    s3: Any
    bucket: str
    db_retry_s: float
    storage_retry_s: float
    model_id: str  # written into each image's metadata
    redis: Any = None  # where job events are published (None: not published)
    redis_prefix: str = ""
    log_prompts: bool = False  # whether a job's log lines may carry its prompt
    # The weights of each model a job may name (core.catalog), for its images' metadata; model_id otherwise.
    model_ids: Mapping[str, str] = field(default_factory=dict)

    def log_context(self, job: ClaimedJob) -> AbstractContextManager[None]:
        """Lines logged in the block are about ``job``: its id, batch, tenant and attempt."""
        return logs.bind(
            **logs.job_fields(
                job_id=job.id,
                tenant=job.tenant_id,
                attempt=job.attempt,
                batch_id=job.batch_id,
                prompt=job.request.get("prompt"),
                log_prompts=self.log_prompts,
            )
        )

    def db_call(self, fn: Callable[[Connection], T], what: str) -> T:
        """Run ``fn`` on a fresh connection, retrying lost connections with backoff."""
        return db_call(self.db, fn, deadline_s=self.db_retry_s, what=what)

    def publish(self, found: Sequence[JobEvent]) -> None:
        """Publish the events of committed writes (best effort: streams fall back to the rows)."""
        if self.redis is not None:
            events.publish(self.redis, self.redis_prefix, found)

    def fail(self, jobs: Sequence[ClaimedJob], code: ErrorCode, message: str) -> int:
        """Record jobs as failed (fenced); how many were."""
        found: list[JobEvent] = []
        failed = 0
        for job in jobs:
            with self.log_context(job):
                call = partial(lifecycle.record_failure, job=job, code=code, message=message, events=found)
                if self.db_call(call, "record failure"):
                    failed += 1
                    metrics.job_ended(job, JobStatus.FAILED.value, code.value)
                    log.info("job failed: %s", code.value, extra={"error_message": message})
        self.publish(found)
        return failed

    def release(self, jobs: Sequence[ClaimedJob]) -> int:
        """Give jobs back to the queue (fenced); how many were."""
        found: list[JobEvent] = []
        released = 0
        for job in jobs:
            with self.log_context(job):
                if self.db_call(partial(lifecycle.release, job=job, events=found), "release"):
                    released += 1
                    log.info("job returned to the queue")
        self.publish(found)
        return released

    def store(self, job: ClaimedJob, images: Sequence[Image.Image], inference_ms: int) -> str:
        """Store one job's images and record it; returns its end: succeeded, failed, released or canceled.

        Keys depend only on the job and image index, so a re-run overwrites and never adds; success is recorded
        only once every object is stored with a verified checksum; a job canceled meanwhile leaves nothing.
        """
        with self.log_context(job):
            return self._store(job, images, inference_ms)

    def _store(self, job: ClaimedJob, images: Sequence[Image.Image], inference_ms: int) -> str:
        # No check for a cancel first: it would cost every job a round trip; the fenced record below catches it.
        try:
            outputs, upload_ms = self._upload(job, images)
        except StorageError as exc:
            if exc.transient and job.attempt < job.max_attempts:
                log.warning("storing %s failed (%s); job returned to the queue", job.id, exc)
                return "released" if self.release([job]) else "canceled"
            self.fail([job], ErrorCode.INTERNAL_ERROR, f"storing the result failed: {exc}")
            return "failed"
        found: list[JobEvent] = []
        ok = self.db_call(
            lambda conn: lifecycle.record_success(
                conn, job, outputs=outputs, inference_ms=inference_ms, upload_ms=upload_ms, events=found
            ),
            "record success",
        )
        if ok:
            self.publish(found)
            metrics.job_ended(job, JobStatus.SUCCEEDED.value)
            log.info("job succeeded", extra={"inference_ms": inference_ms, "upload_ms": upload_ms})
            return "succeeded"
        keys = [o["key"] for o in outputs]  # canceled (or lease lost) while uploading
        retrying(
            lambda: storage.delete_keys(self.s3, self.bucket, keys),
            backoff=Backoff(deadline_s=self.storage_retry_s),
            what="delete canceled outputs",
        )
        return "canceled"

    def _model_of(self, request: dict[str, Any]) -> str:
        """The weights that ran a job: its named model's, else the worker's default."""
        return self.model_ids.get(request.get("model") or "", self.model_id)

    def _upload(self, job: ClaimedJob, images: Sequence[Image.Image]) -> tuple[list[dict[str, Any]], int]:
        started = time.perf_counter()
        r = job.request
        fmt = r["output_format"]
        backoff = Backoff(deadline_s=self.storage_retry_s)
        outputs = []
        for index, (image, seed) in enumerate(zip(images, job.seeds, strict=True)):
            data = encode_image(
                image,
                fmt,
                quality=r["output_quality"],
                text={
                    "job_id": job.id,
                    "prompt": r["prompt"],
                    "seed": str(seed),
                    "model": self._model_of(r),
                    "acceleration": r.get("acceleration") or "none",
                },
            )
            key = storage.result_key(job.tenant_id, job.id, index, EXTENSIONS[fmt])
            sha256 = retrying(
                partial(storage.put_object_checked, self.s3, self.bucket, key, data, CONTENT_TYPES[fmt]),
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
