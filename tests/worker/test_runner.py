"""The worker's batch loop in-process, on real Postgres, S3 and the tiny pipeline: out-of-memory, time limits,
cancel mid-batch, refused input, fencing of a stale worker, overlap of batches and the busy-time export."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import Engine, insert, text

from core import ids, lifecycle, storage
from core.models import jobs as jobs_table
from core.models import uploads
from core.schemas import JobRequest
from core.settings import Settings
from core.status import ErrorCode
from core.submission import build_job_row
from tests.fixtures.services import clear_jobs
from tests.helpers.worker import add_tenant, in_process_worker
from worker import process
from worker.process import WorkerContext
from worker.results import Recorder
from worker.runner import run_queue


@pytest.fixture(scope="module")
def ctx(settings: Settings) -> Iterator[WorkerContext]:
    """A worker context in this process (the sweeper off), on its own Redis prefix."""
    yield from in_process_worker(settings, ("generate",), "runner", drain_s=30.0, max_batch_images=4)


@pytest.fixture
def tenant(db: Engine) -> str:
    """A fresh tenant id (jobs are inserted straight into Postgres)."""
    return add_tenant(db, "runner")


@pytest.fixture(autouse=True)
def empty_queue(db: Engine) -> None:
    """Each test sees only its own jobs in the queue."""
    clear_jobs(db)


def add_jobs(db: Engine, tenant: str, n: int, **fields: Any) -> list[str]:
    """Insert ``n`` queued generate jobs (256², seeds 10..) and return their ids."""
    ids = []
    with db.begin() as conn:
        for i in range(n):
            req = JobRequest.model_validate(
                {"prompt": f"runner job {i}", "width": 256, "height": 256, "seed": 10 + i, **fields}
            )
            row = build_job_row(req, tenant_id=tenant, max_attempts=3)
            conn.execute(insert(jobs_table).values(**row))
            ids.append(row["id"])
    return ids


def ends(db: Engine, ids: list[str]) -> dict[str, tuple[str, str | None]]:
    """Each job's status and error code."""
    with db.connect() as conn:
        rows = conn.execute(text("SELECT id, status, error_code FROM jobs WHERE id = ANY(:ids)"), {"ids": ids})
        return {r.id: (r.status, r.error_code) for r in rows}


@contextmanager
def oom_above(engine: Any, images: int | None) -> Iterator[None]:
    """Pipeline calls of ``engine`` (generate or edit) over ``images`` images run out of memory in the block."""
    saved = engine.options
    engine.options = replace(saved, oom_above_images=images)
    try:
        yield
    finally:
        engine.options = saved


def add_img2img_job(ctx: WorkerContext, db: Engine, tenant: str, num_images: int) -> str:
    """An uploaded picture and a queued img2img job on it (straight into S3 and Postgres)."""
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), (200, 40, 40)).save(buffer, "PNG")
    upload = ids.upload_id()
    key = storage.upload_key(tenant, upload, "png")
    storage.put_object_checked(ctx.s3, ctx.settings.s3_bucket, key, buffer.getvalue(), "image/png")
    req = JobRequest.model_validate(
        {"kind": "edit", "mode": "img2img", "prompt": "oom", "width": 256, "height": 256, "seed": 5,
         "num_images": num_images, "input_images": [{"upload_id": upload}]}
    )  # fmt: skip
    row = build_job_row(req, tenant_id=tenant, max_attempts=3)
    with db.begin() as conn:
        conn.execute(
            insert(uploads).values(
                id=upload, tenant_id=tenant, key=key, width=256, height=256, format="png",
                bytes=len(buffer.getvalue()), sha256="0" * 64,
            )
        )  # fmt: skip
        conn.execute(insert(jobs_table).values(**row))
    return str(row["id"])


def test_an_edit_batch_out_of_memory_splits_or_fails_only_with_out_of_memory(ctx, db, tenant) -> None:  # type: ignore[no-untyped-def]
    # Like a generate batch: split until each part fits; an image that fits nowhere fails as out_of_memory.
    fits = add_img2img_job(ctx, db, tenant, num_images=2)
    with oom_above(ctx.edit_engine, 1):
        run_queue(ctx, "generate")
    assert ends(db, [fits]) == {fits: ("succeeded", None)}
    assert len(objects_of(ctx, tenant, fits)) == 2
    doomed = add_img2img_job(ctx, db, tenant, num_images=1)
    with oom_above(ctx.edit_engine, 0):
        run_queue(ctx, "generate")
    assert ends(db, [doomed]) == {doomed: ("failed", "out_of_memory")}


def objects_of(ctx: WorkerContext, tenant: str, job_id: str) -> list[str]:
    """The S3 keys under a job's result prefix."""
    listing = ctx.s3.list_objects_v2(Bucket=ctx.settings.s3_bucket, Prefix=f"results/{tenant}/{job_id}/")
    return [o["Key"] for o in listing.get("Contents", [])]


def test_out_of_memory_fails_the_job_and_the_worker_serves_the_next(ctx, db, tenant) -> None:  # type: ignore[no-untyped-def]
    doomed = add_jobs(db, tenant, 1)
    with oom_above(ctx.engine, 0):  # not even one image fits
        run_queue(ctx, "generate")
    assert ends(db, doomed) == {doomed[0]: ("failed", "out_of_memory")}
    assert objects_of(ctx, tenant, doomed[0]) == []
    fine = add_jobs(db, tenant, 1)
    run_queue(ctx, "generate")
    assert ends(db, fine) == {fine[0]: ("succeeded", None)}


def test_a_batch_that_does_not_fit_is_split_and_every_job_succeeds(ctx, db, tenant) -> None:  # type: ignore[no-untyped-def]
    ids = add_jobs(db, tenant, 4)
    with oom_above(ctx.engine, 1):
        report = run_queue(ctx, "generate")
    assert report.batches == 1  # claimed together, split only on the accelerator
    assert set(ends(db, ids).values()) == {("succeeded", None)}


def test_a_batch_past_its_time_limit_fails_with_timeout(ctx, db, tenant) -> None:  # type: ignore[no-untyped-def]
    ids = add_jobs(db, tenant, 2)
    saved = ctx.settings
    ctx.settings = saved.model_copy(update={"batch_timeout_base_s": 0.01, "batch_timeout_per_image_step_s": 0.0})
    try:
        run_queue(ctx, "generate")
    finally:
        ctx.settings = saved
    assert set(ends(db, ids).values()) == {("failed", "timeout")}


def test_a_job_canceled_mid_batch_stops_and_leaves_no_object(ctx, db, tenant) -> None:  # type: ignore[no-untyped-def]
    victim, other = add_jobs(db, tenant, 2)
    saved = ctx.settings
    ctx.settings = saved.model_copy(update={"fault_step_delay_s": 0.2, "progress_interval_s": 0.0})

    def cancel_when_running() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with db.begin() as conn:
                done = conn.execute(
                    text(
                        "UPDATE jobs SET status = 'canceled', finished_at = now()"
                        " WHERE id = :id AND status = 'running' AND progress_step >= 1 RETURNING id"
                    ),
                    {"id": victim},
                ).scalar()
            if done:
                return
            time.sleep(0.05)

    canceler = threading.Thread(target=cancel_when_running)
    canceler.start()
    try:
        run_queue(ctx, "generate")
    finally:
        ctx.settings = saved
        canceler.join()
    assert ends(db, [victim, other]) == {victim: ("canceled", None), other: ("succeeded", None)}
    assert objects_of(ctx, tenant, victim) == []
    assert len(objects_of(ctx, tenant, other)) == 1


def test_input_the_engine_refuses_fails_with_invalid_input(ctx, db, tenant) -> None:  # type: ignore[no-untyped-def]
    (job,) = add_jobs(db, tenant, 1)
    with db.begin() as conn:  # a row the API would never write: 250 is no multiple of 16
        conn.execute(text("UPDATE jobs SET request = jsonb_set(request, '{width}', '250') WHERE id = :id"), {"id": job})
    run_queue(ctx, "generate")
    assert ends(db, [job]) == {job: ("failed", "invalid_input")}


def test_a_stale_worker_cannot_overwrite_the_attempt_that_replaced_it(ctx, db, tenant) -> None:  # type: ignore[no-untyped-def]
    (job,) = add_jobs(db, tenant, 1)
    claim = dict(queue="generate", lease_s=60, max_images=4, token_budget=8192)
    with db.connect() as conn:
        (first,) = lifecycle.claim_batch(conn, worker_id="worker-a", **claim)
        # Worker A's lease runs out; the job goes back to the queue and worker B claims it.
        conn.execute(text("UPDATE jobs SET lease_expires_at = now() - interval '1 s' WHERE id = :id"), {"id": job})
        conn.execute(text("UPDATE jobs SET status = 'queued' WHERE id = :id"), {"id": job})
        conn.commit()
        (second,) = lifecycle.claim_batch(conn, worker_id="worker-b", **claim)
        assert (first.attempt, second.attempt) == (1, 2)
        outputs_b = [{"index": 0, "key": "b"}]
        assert lifecycle.record_success(conn, second, outputs=outputs_b, inference_ms=1, upload_ms=1)
        # A wakes up late: every write it tries is fenced off.
        assert not lifecycle.record_success(
            conn, first, outputs=[{"index": 0, "key": "a"}], inference_ms=1, upload_ms=1
        )
        assert not lifecycle.record_failure(conn, first, code=ErrorCode.INTERNAL_ERROR, message="late")
        assert not lifecycle.release(conn, first)
        assert lifecycle.heartbeat(conn, [first], steps=[3], lease_s=60) == set()
        row = conn.execute(text("SELECT status, attempt, outputs FROM jobs WHERE id = :id"), {"id": job}).one()
    assert (row.status, row.attempt, row.outputs) == ("succeeded", 2, outputs_b)


def test_batches_overlap_and_the_busy_time_is_exported(ctx, db, tenant) -> None:  # type: ignore[no-untyped-def]
    ids = add_jobs(db, tenant, 12)  # three batches of four
    report = run_queue(ctx, "generate")
    assert report.batches == 3 and report.ends["succeeded"] == 12
    with db.connect() as conn:
        rows = conn.execute(
            text("SELECT started_at, finished_at FROM jobs WHERE id = ANY(:ids) ORDER BY started_at"), {"ids": ids}
        ).all()
        worker = conn.execute(
            text("SELECT busy_seconds, wall_seconds, images_run FROM workers WHERE id = :id"), {"id": ctx.worker_id}
        ).one()
    claims = sorted({r.started_at for r in rows})
    first_batch_end = max(r.finished_at for r in rows if r.started_at == claims[0])
    # The second batch was claimed while the first one was still running or uploading.
    assert claims[1] < first_batch_end
    assert 0 < worker.busy_seconds <= worker.wall_seconds
    assert worker.images_run >= 12
    assert 0 < process.busy_fraction(ctx) <= 1


def test_the_worker_waits_to_fill_a_batch_only_while_a_burst_is_arriving(ctx, db, tenant) -> None:  # type: ignore[no-untyped-def]
    from worker.runner import _filling

    saved = ctx.settings
    ctx.settings = saved.model_copy(update={"batch_wait_ms": 50})
    try:
        add_jobs(db, tenant, 1)
        assert not _filling(ctx, "generate")  # a lone job is never kept waiting
        clear_jobs(db)
        add_jobs(db, tenant, 2)  # in one transaction: both well inside the 50 ms window even on a loaded machine
        assert _filling(ctx, "generate")  # two just arrived, the batch holds four: worth a moment
        add_jobs(db, tenant, 2)
        assert not _filling(ctx, "generate")  # already a full batch
        clear_jobs(db)
        add_jobs(db, tenant, 2)
        time.sleep(0.1)
        assert not _filling(ctx, "generate")  # the burst is over
    finally:
        ctx.settings = saved


def test_a_retried_job_runs_only_once_earlier_results_are_recorded(ctx, db, tenant, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import worker.runner as runner

    fresh, retried = add_jobs(db, tenant, 2)
    with db.begin() as conn:  # it lost a worker once: it may be the job that crashes workers
        conn.execute(text("UPDATE jobs SET attempt = 1 WHERE id = :id"), {"id": retried})
    slow_store = Recorder.store

    def store_slowly(*args: Any) -> str:
        time.sleep(0.5)  # the upload of the fresh job is still going when the retried job is claimed
        return slow_store(*args)

    seen: dict[str, tuple[str, str | None]] = {}
    run_batch = runner.run_batch

    def watch(ctx_: WorkerContext, batch: Any, report: Any) -> Any:
        if any(j.id == retried for j in batch.jobs):
            seen.update(ends(db, [fresh]))
        return run_batch(ctx_, batch, report)

    monkeypatch.setattr(Recorder, "store", store_slowly)
    monkeypatch.setattr(runner, "run_batch", watch)
    report = run_queue(ctx, "generate")
    # Were the retried job to crash the worker, the fresh job's finished image would not be lost with it.
    assert seen == {fresh: ("succeeded", None)}
    assert report.batches == 2 and report.ends["succeeded"] == 2
