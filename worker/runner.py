"""Running a queue: claim a batch, prepare it, run it on the accelerator, hand its results to the upload pool.

While batch N runs, batch N+1 is claimed and prepared (prompts encoded, noise drawn) in another thread, and
batch N-1's images are encoded and uploaded in the upload pool: the accelerator does not wait for Postgres, the
text encoder's cache misses, PNG encoding or S3.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import torch

from core import catalog, lifecycle
from core.errors import InvalidInput, OutOfMemory, ServiceError, job_error_code
from core.events import JobEvent
from core.lifecycle import ClaimedJob
from core.status import ErrorCode
from worker import metrics, process
from worker.engine import BatchInterrupted, EditRequest, Engine, ImageRequest, LoraUse, PreparedBatch, RequestResult
from worker.guard import BatchGuard
from worker.inputs import edit_request
from worker.process import WorkerContext, record_stats

log = logging.getLogger(__name__)


def image_request(job: ClaimedJob, loras: tuple[LoraUse, ...] = ()) -> ImageRequest:
    """The engine request of a generate job (with its adapters, fetched by the caller)."""
    r = job.request
    return ImageRequest(
        prompt=r["prompt"],
        width=r["width"],
        height=r["height"],
        steps=r["steps"],
        guidance_scale=r["guidance_scale"],
        seeds=job.seeds,
        negative_prompt=r.get("negative_prompt"),
        loras=loras,
        acceleration=r.get("acceleration") or "none",
    )


@dataclass
class Batch:
    """Claimed jobs under one guard, prepared for the engine (or refused by it)."""

    jobs: list[ClaimedJob]
    guard: BatchGuard
    prepared: PreparedBatch | None = None  # generate jobs
    engine: Engine | None = None  # the model that runs them
    edits: list[EditRequest] | None = None  # edit jobs, their input images loaded
    prepare_s: float = 0.0  # text encoding and noise of a generate batch: part of its inference time
    invalid: str | None = None  # why the batch cannot run at all
    code: ErrorCode = ErrorCode.INVALID_INPUT  # what its jobs fail with then


@dataclass
class DrainReport:
    """What one wake-up did: batches run and how their jobs ended."""

    batches: int = 0
    ends: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, int]:
        """Plain numbers (the task's return value)."""
        return {"batches": self.batches, **self.ends}


def claim(ctx: WorkerContext, queue: str, *, ahead: bool = False) -> Batch | None:
    """Claim the next batch of ``queue`` and prepare it; None when nothing is queued.

    ``ahead``: claimed while another batch runs; jobs that already lost a worker are left for a later claim.
    """
    s = ctx.settings
    if s.batch_wait_ms and _filling(ctx, queue):
        time.sleep(s.batch_wait_ms / 1000)
    found: list[JobEvent] = []
    jobs = ctx.recorder.db_call(
        lambda conn: lifecycle.claim_batch(
            conn,
            queue=queue,
            worker_id=ctx.worker_id,
            lease_s=s.lease_s,
            max_images=s.max_batch_images,
            token_budget=s.batch_token_budget,
            fresh_only=ahead,
            events=found,
        ),
        "claim",
    )
    if not jobs:
        return None
    ctx.recorder.publish(found)
    batch = Batch(jobs, BatchGuard(jobs, db=ctx.db, settings=s, publish=ctx.recorder.publish).start())
    try:
        if jobs[0].kind == "edit":
            if ctx.edit_engine is None:
                raise InvalidInput("this worker does not load Turbo, which edits need")
            batch.edits = _edit_requests(ctx, batch)
        else:
            # A batch is one group (the group key names the model): its first job's model runs it.
            batch.engine = engine_for(ctx, jobs[0])
            started = time.perf_counter()
            # The batch's adapters are fetched here, off the accelerator's thread (once per worker, then cached).
            requests = [image_request(j, ctx.adapter_store.uses(j)) for j in jobs]
            batch.prepared = batch.engine.prepare(requests)
            batch.prepare_s = time.perf_counter() - started
    except ServiceError as exc:  # refused input, or an adapter gone or unreadable: running it again cannot help
        batch.invalid, batch.code = exc.message, job_error_code(exc)
    except torch.OutOfMemoryError as exc:  # the text encoder did not fit: running it again will not either
        oom = OutOfMemory(f"out of memory while encoding prompts: {exc}")
        batch.invalid, batch.code = oom.message, job_error_code(oom)
    return batch


def engine_for(ctx: WorkerContext, job: ClaimedJob) -> Engine:
    """The loaded model a generate job names (Turbo when it names none); InvalidInput when this worker has none."""
    model = job.request.get("model") or catalog.default_model(job.kind, job.request.get("mode"))
    engine = ctx.engines.get(model)
    if engine is None:
        raise InvalidInput(f"this worker does not load {model}")
    return engine


def _edit_requests(ctx: WorkerContext, batch: Batch) -> list[EditRequest]:
    """Load every edit job's inputs; a job with an unusable input fails alone and leaves the batch."""
    requests, kept = [], []
    for job in batch.jobs:
        try:
            request = edit_request(job, db=ctx.db, s3=ctx.s3, settings=ctx.settings)
            requests.append(replace(request, loras=ctx.adapter_store.uses(job)))
            kept.append(job)
        except ServiceError as exc:  # an input that cannot be used: this job fails alone
            ctx.recorder.fail([job], job_error_code(exc), exc.message)
    batch.jobs = kept
    batch.guard.keep(kept)
    return requests


def _filling(ctx: WorkerContext, queue: str) -> bool:
    """Whether a short wait would fill the next batch: too few images queued, and a burst arriving right now
    (two or more jobs in the last wait window; a lone job is never kept waiting)."""
    window_s = ctx.settings.batch_wait_ms / 1000
    images, recent = ctx.recorder.db_call(
        lambda conn: lifecycle.queue_snapshot(conn, queue, window_s=window_s), "snapshot"
    )
    return 0 < images < ctx.settings.max_batch_images and recent >= 2


def run_queue(ctx: WorkerContext, queue: str) -> DrainReport:
    """Run batches of ``queue`` for up to ``drain_s``, claiming and preparing each next batch during the current."""
    report = DrainReport()
    deadline = time.monotonic() + ctx.settings.drain_s
    pending: list[Future[str]] = []
    batch = claim(ctx, queue)
    while batch is not None:
        more = time.monotonic() < deadline and not process.shutdown_requested()
        # A batch of a job that already lost a worker may crash this one too: nothing may be at risk with it,
        # neither a batch claimed ahead nor the results of earlier batches still being stored.
        suspect = any(j.attempt > 1 for j in batch.jobs)
        if suspect:
            _settle(pending, report)
        following = ctx.prefetch.submit(claim, ctx, queue, ahead=True) if more and not suspect else None
        pending += run_batch(ctx, batch, report)
        batch = following.result() if following is not None else None
        if batch is None and more and not process.shutdown_requested():
            batch = claim(ctx, queue)  # nothing fresh was queued ahead: take what is queued now, retries too
        if batch is not None and process.shutdown_requested():
            report.ends["released"] += ctx.recorder.release(batch.jobs)
            batch.guard.close()
            batch = None
    _settle(pending, report)  # the task ends (and its message is acked) once its results are recorded
    return report


def _settle(pending: list[Future[str]], report: DrainReport) -> None:
    """Wait for the stored results of earlier batches to be recorded, and count how they ended."""
    for future in pending:
        report.ends[future.result()] += 1
    pending.clear()


def run_batch(ctx: WorkerContext, batch: Batch, report: DrainReport) -> list[Future[str]]:
    """Run one prepared batch; its jobs' storing and recording go to the upload pool (returned futures)."""
    jobs, guard = batch.jobs, batch.guard
    report.batches += 1
    if batch.invalid is not None:
        report.ends["failed"] += ctx.recorder.fail(jobs, batch.code, batch.invalid)
        guard.close()
        return []
    if not jobs:  # every edit job of the batch had an unusable input
        guard.close()
        return []
    for job in jobs:
        with ctx.recorder.log_context(job):
            log.info("job running in a batch of %d", len(jobs))
    started = time.perf_counter()
    try:
        results: list[RequestResult]
        if batch.edits is not None:
            assert ctx.edit_engine is not None  # claim refused edits without it
            results = ctx.edit_engine.edit(batch.edits, on_step=guard)
        else:
            assert batch.prepared is not None and batch.engine is not None
            results = batch.engine.run(batch.prepared, on_step=guard)
    except BatchInterrupted as exc:
        exc.reason = guard.reason
        _interrupted(ctx, batch, exc, report)
        guard.close()
        return []
    except Exception as exc:
        log.exception("batch failed")
        report.ends["failed"] += ctx.recorder.fail(jobs, job_error_code(exc), f"{type(exc).__name__}: {exc}")
        guard.close()
        return []
    inference_s = time.perf_counter() - started + batch.prepare_s
    inference_ms = round(inference_s * 1000)
    metrics.batch_ran(jobs, inference_s)
    futures: list[Future[str]] = []
    for job, result in zip(jobs, results, strict=True):
        if isinstance(result, ServiceError):  # this job's image did not fit; its batch-mates' did
            report.ends["failed"] += ctx.recorder.fail([job], job_error_code(result), result.message)
        else:
            futures.append(ctx.uploads.submit(ctx.recorder.store, job, result, inference_ms))
    record_stats(ctx, jobs=len(jobs), images=sum(j.request["num_images"] for j in jobs))
    _when_done(futures, guard.close)
    return futures


def _when_done(futures: list[Future[str]], then) -> None:
    """Call ``then`` once every future is done (at once when there are none)."""
    left = [len(futures)]
    lock = threading.Lock()

    def one_done(_: Future[str]) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            then()

    if not futures:
        then()
    for future in futures:
        future.add_done_callback(one_done)


def _interrupted(ctx: WorkerContext, batch: Batch, exc: BatchInterrupted, report: DrainReport) -> None:
    """Settle a batch its guard stopped: a timeout fails it, a shutdown gives it back, cancels are done."""
    guard = batch.guard
    live = [j for j in batch.jobs if j.id in guard.live]
    report.ends["canceled"] += len(batch.jobs) - len(live)
    if guard.reason == "timeout":
        message = f"the batch ran past its time limit of {guard.time_limit_s:.0f} s"
        report.ends["failed"] += ctx.recorder.fail(live, job_error_code(exc), message)
    elif guard.reason == "shutdown":
        released = ctx.recorder.release(live)
        report.ends["released"] += released
        log.warning("shutting down: %d job(s) returned to the queue", released)
