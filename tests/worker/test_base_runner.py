"""A worker serving Turbo and Base, in-process on real Postgres and S3 with the tiny checkpoints: each job runs
on the model it names (Base's jobs from the base queue, with CFG and their negative prompts), each image equal to
the direct ZImagePipeline call of its model, and Base holds Turbo's text encoder and VAE."""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline
from PIL import Image
from sqlalchemy import Engine, insert, text

from core import catalog, ids, storage
from core.models import adapters as adapters_table
from core.models import jobs as jobs_table
from core.schemas import JobRequest
from core.settings import Settings
from core.submission import build_job_row
from tests.fixtures.services import clear_jobs
from tests.helpers.engine import TOLERANCE, diff, single
from tests.helpers.worker import add_tenant, in_process_worker
from worker import process
from worker.process import WorkerContext
from worker.runner import run_queue


@pytest.fixture(scope="module")
def ctx(settings: Settings, tiny_base_dir: Path) -> Iterator[WorkerContext]:
    """A worker consuming generate and base (the sweeper off), on its own Redis prefix."""
    yield from in_process_worker(
        settings, ("base", "generate"), "base-runner",
        drain_s=5.0, base_model=str(tiny_base_dir), batch_wait_ms=0, worker_heartbeat_s=0.2,
    )  # fmt: skip


@pytest.fixture(scope="module")
def direct(tiny_turbo_dir: Path, tiny_base_dir: Path) -> dict[str, ZImagePipeline]:
    """Each model plainly loaded in float32: the calls a user would write."""
    pipes = {}
    for name, folder in ((catalog.TURBO, tiny_turbo_dir), (catalog.BASE, tiny_base_dir)):
        pipe = ZImagePipeline.from_pretrained(folder, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        pipes[name] = pipe
    return pipes


@pytest.fixture
def tenant(db: Engine) -> str:
    return add_tenant(db, "base-runner")


@pytest.fixture(autouse=True)
def empty_queue(db: Engine) -> None:
    clear_jobs(db)


def add_job(db: Engine, tenant: str, **fields: Any) -> tuple[str, JobRequest]:
    req = JobRequest.model_validate({"width": 256, "height": 256, **fields})
    row = build_job_row(req, tenant_id=tenant, max_attempts=3)
    with db.begin() as conn:
        conn.execute(insert(jobs_table).values(**row))
    return str(row["id"]), req


def outputs(ctx: WorkerContext, db: Engine, job_id: str) -> list[Image.Image]:
    with db.connect() as conn:
        row = conn.execute(text("SELECT status, error_message, outputs FROM jobs WHERE id = :id"), {"id": job_id}).one()
    assert row.status == "succeeded", row.error_message
    return [
        Image.open(io.BytesIO(storage.get_object_bytes(ctx.s3, ctx.settings.s3_bucket, o["key"]))).convert("RGB")
        for o in row.outputs
    ]


def test_the_worker_loads_each_model_once_sharing_components(ctx: WorkerContext) -> None:
    turbo, base = ctx.engines[catalog.TURBO], ctx.engines[catalog.BASE]
    assert ctx.engine is turbo
    assert base.pipe.text_encoder is turbo.pipe.text_encoder and base.pipe.vae is turbo.pipe.vae
    assert base.encoder is turbo.encoder
    assert [cache.max_bytes for cache in process.cache_stats(ctx)] == [ctx.settings.embedding_cache_bytes]


def test_the_worker_beats_while_idle(ctx: WorkerContext, db: Engine) -> None:
    # GET /v1/models reads a model as available while a ready worker of its queue was seen lately.
    with db.begin() as conn:
        conn.execute(
            text("UPDATE workers SET last_seen_at = now() - interval '1 hour' WHERE id = :id"), {"id": ctx.worker_id}
        )
    time.sleep(1.0)
    with db.connect() as conn:
        row = conn.execute(
            text(
                "SELECT ready, queues, now() - last_seen_at < interval '5 seconds' AS fresh FROM workers WHERE id = :id"
            ),
            {"id": ctx.worker_id},
        ).one()
    assert (row.ready, row.queues, row.fresh) == (True, "base,generate", True)


def test_each_job_runs_on_its_model_and_equals_its_direct_call(
    ctx: WorkerContext, db: Engine, tenant: str, direct: dict[str, ZImagePipeline]
) -> None:
    base_a = add_job(db, tenant, prompt="a red fox", model="z-image-base", steps=3, seed=7, num_images=2,
                     negative_prompt="blurry")  # fmt: skip
    base_b = add_job(db, tenant, prompt="a blue whale", model="z-image-base", steps=3, seed=9)
    turbo = add_job(db, tenant, prompt="a red fox", steps=2, seed=7)
    with db.connect() as conn:
        queues = dict(conn.execute(text("SELECT id, queue FROM jobs WHERE tenant_id = :t"), {"t": tenant}).all())
    assert [queues[base_a[0]], queues[base_b[0]], queues[turbo[0]]] == ["base", "base", "generate"]
    assert run_queue(ctx, "base").batches == 1  # both Base jobs in one batch (one group)
    assert run_queue(ctx, "generate").batches == 1
    for (job_id, req), model in ((base_a, catalog.BASE), (base_b, catalog.BASE), (turbo, catalog.TURBO)):
        images = outputs(ctx, db, job_id)
        assert len(images) == req.num_images
        for i, image in enumerate(images):
            assert req.seed is not None
            assert diff(image, single(direct[model], req, req.seed + i)) <= TOLERANCE, (model, req.prompt)
    # Base is not Turbo: the same prompt and seed give another image.
    assert diff(outputs(ctx, db, base_a[0])[0], outputs(ctx, db, turbo[0])[0]) > 4 * TOLERANCE


def test_a_base_image_records_the_base_weights(ctx: WorkerContext, db: Engine, tenant: str) -> None:
    job_id, _ = add_job(db, tenant, prompt="a lighthouse", model="z-image-base", steps=1, seed=3)
    run_queue(ctx, "base")
    with db.connect() as conn:
        key = conn.execute(text("SELECT outputs FROM jobs WHERE id = :id"), {"id": job_id}).scalar_one()[0]["key"]
    image = Image.open(io.BytesIO(storage.get_object_bytes(ctx.s3, ctx.settings.s3_bucket, key)))
    assert image.info.get("model") == ctx.settings.base_model


def test_base_jobs_take_adapters_on_their_own_transformer(
    ctx: WorkerContext, db: Engine, tenant: str, tiny_adapters: dict[str, Path]
) -> None:
    # The tiny Base transformer has Turbo's shape, so a LoRA made for one loads into the other; each model's
    # transformer holds its own adapters (Turbo's slots are untouched by a Base job).
    adapter = _store_adapter(ctx, tenant, tiny_adapters["a"])
    turbo, base = ctx.engines[catalog.TURBO], ctx.engines[catalog.BASE]
    turbo_loads, base_loads = turbo.adapters.loads, base.adapters.loads
    fields: dict[str, Any] = {"prompt": "a lighthouse", "model": "z-image-base", "steps": 2, "seed": 5}
    styled, _ = add_job(db, tenant, **fields, loras=[{"adapter_id": adapter, "scale": 1.0}])
    run_queue(ctx, "base")
    bare, _ = add_job(db, tenant, **fields)
    run_queue(ctx, "base")
    assert base.adapters.loads == base_loads + 1 and turbo.adapters.loads == turbo_loads
    assert diff(outputs(ctx, db, styled)[0], outputs(ctx, db, bare)[0]) > TOLERANCE


def _store_adapter(ctx: WorkerContext, tenant: str, path: Path) -> str:
    """An adapter file and its row, stored the way the API stores them (its checks are tested on their own)."""
    data = path.read_bytes()
    adapter = ids.adapter_id()
    key = storage.adapter_key(tenant, adapter)
    storage.put_object_checked(ctx.s3, ctx.settings.s3_bucket, key, data, "application/octet-stream")
    with ctx.db.begin() as conn:
        conn.execute(
            insert(adapters_table).values(
                id=adapter, tenant_id=tenant, name=path.stem, key=key, bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(), rank=4, target_modules=["layers.0.attention.to_q"],
            )
        )  # fmt: skip
    return adapter
