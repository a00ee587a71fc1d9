"""Fast mode through the worker's batch loop, on real Postgres, S3 and the tiny pipeline: fast and exact jobs run
in separate batches, each image records its mode, and a fast image equals the engine's own fast image alone."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import Engine, insert, text

from core import storage
from core.models import jobs as jobs_table
from core.schemas import JobRequest
from core.settings import Settings
from core.submission import build_job_row
from tests.fixtures.services import clear_jobs
from tests.helpers.worker import add_tenant, in_process_worker
from worker.engine import ImageRequest
from worker.process import WorkerContext
from worker.runner import run_queue

pytest.importorskip("cache_dit")


@pytest.fixture(scope="module")
def ctx(settings: Settings) -> Iterator[WorkerContext]:
    yield from in_process_worker(settings, ("generate",), "fast", drain_s=30.0)


def add_job(db: Engine, tenant: str, prompt: str, acceleration: str) -> str:
    req = JobRequest.model_validate(
        {"prompt": prompt, "width": 256, "height": 256, "seed": 10, "acceleration": acceleration}
    )
    row = build_job_row(req, tenant_id=tenant, max_attempts=3)
    with db.begin() as conn:
        conn.execute(insert(jobs_table).values(**row))
    return str(row["id"])


def image_of(ctx: WorkerContext, db: Engine, job_id: str) -> Image.Image:
    with db.connect() as conn:
        row = conn.execute(text("SELECT status, outputs FROM jobs WHERE id = :id"), {"id": job_id}).one()
    assert row.status == "succeeded", row
    return Image.open(io.BytesIO(storage.get_object_bytes(ctx.s3, ctx.settings.s3_bucket, row.outputs[0]["key"])))


def test_fast_jobs_run_apart_and_record_their_mode(ctx: WorkerContext, db: Engine) -> None:
    clear_jobs(db)
    tenant = add_tenant(db, "fast")
    fast, other, exact = (
        add_job(db, tenant, "a lighthouse", "cache"),
        add_job(db, tenant, "a red fox in the snow at dusk", "cache"),
        add_job(db, tenant, "a lighthouse", "none"),
    )
    assert run_queue(ctx, "generate").batches == 2  # the two fast jobs together, the exact one alone
    images = {job: image_of(ctx, db, job) for job in (fast, other, exact)}
    assert [images[j].info.get("acceleration") for j in (fast, other, exact)] == ["cache", "cache", "none"]
    (alone,) = ctx.engine.generate(
        [ImageRequest("a lighthouse", 256, 256, steps=8, guidance_scale=0.0, seeds=(10,), acceleration="cache")]
    )
    assert isinstance(alone, list)

    def pixels(image: Image.Image) -> np.ndarray:
        return np.asarray(image.convert("RGB"), dtype=np.int16)

    assert int(np.abs(pixels(images[fast]) - pixels(alone[0])).max()) <= 2
    assert int(np.abs(pixels(images[fast]) - pixels(images[exact])).max()) > 2
