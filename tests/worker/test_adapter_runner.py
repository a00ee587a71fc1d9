"""Adapters through the worker's batch loop, on real Postgres, S3 and the tiny pipeline: a mixed queue runs
each adapter set in its own batches with every file fetched once, a bare job after adapter jobs is the bare
image, a deleted or corrupted adapter fails its jobs clearly, and a restarted worker re-warms what was used."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import Engine, insert, text

from core import ids, storage
from core.models import adapters as adapters_table
from core.models import jobs as jobs_table
from core.schemas import JobRequest, LoraRef
from core.settings import Settings
from core.submission import build_job_row
from tests.fixtures.services import clear_jobs
from tests.helpers.worker import add_tenant, in_process_worker
from worker import process
from worker.adapters import AdapterStore
from worker.engine import Engine as InferenceEngine
from worker.engine import EngineOptions
from worker.process import WorkerContext
from worker.runner import run_queue


@pytest.fixture(scope="module")
def ctx(settings: Settings) -> Iterator[WorkerContext]:
    yield from in_process_worker(settings, ("generate",), "lora", drain_s=30.0)


@pytest.fixture
def tenant(db: Engine) -> str:
    return add_tenant(db, "lora")


@pytest.fixture(autouse=True)
def empty_queue(db: Engine) -> None:
    clear_jobs(db)


def add_adapter(ctx: WorkerContext, tenant: str, path: Path, *, sha256: str | None = None) -> str:
    """Store an adapter file and its row the way the API does (the API's checks are tested on their own)."""
    data = path.read_bytes()
    adapter = ids.adapter_id()
    key = storage.adapter_key(tenant, adapter)
    storage.put_object_checked(ctx.s3, ctx.settings.s3_bucket, key, data, "application/octet-stream")
    with ctx.db.begin() as conn:
        conn.execute(
            insert(adapters_table).values(
                id=adapter, tenant_id=tenant, name=path.stem, key=key, bytes=len(data),
                sha256=sha256 or hashlib.sha256(data).hexdigest(), rank=4, target_modules=["layers.0.attention.to_q"],
            )
        )  # fmt: skip
    return adapter


def add_job(db: Engine, tenant: str, loras: list[tuple[str, float]], seed: int = 10) -> str:
    req = JobRequest.model_validate({"prompt": "a lighthouse", "width": 256, "height": 256, "seed": seed})
    req = req.model_copy(update={"loras": [LoraRef(adapter_id=a, scale=s) for a, s in loras]})
    row = build_job_row(req, tenant_id=tenant, max_attempts=3)
    with db.begin() as conn:
        conn.execute(insert(jobs_table).values(**row))
    return str(row["id"])


def finished(db: Engine, job_ids: list[str]) -> dict[str, Any]:
    with db.connect() as conn:
        rows = conn.execute(
            text("SELECT id, status, error_code, error_message AS error, outputs FROM jobs WHERE id = ANY(:ids)"),
            {"ids": job_ids},
        )
        return {r.id: r for r in rows}


def pixels(ctx: WorkerContext, key: str) -> np.ndarray:
    """An output image's pixels."""
    image = Image.open(io.BytesIO(storage.get_object_bytes(ctx.s3, ctx.settings.s3_bucket, key)))
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_a_mixed_queue_runs_per_adapter_set_and_fetches_each_file_once(
    ctx: WorkerContext, db: Engine, tenant: str, tiny_adapters: dict[str, Path]
) -> None:
    a, b = (add_adapter(ctx, tenant, tiny_adapters[n]) for n in ("a", "b"))
    downloads, loads = ctx.adapter_store.downloads, ctx.engine.adapters.loads
    order = [[], [(a, 1.0)], [(b, 0.7)], [], [(a, 1.0)], [(b, 0.7), (a, 1.0)], []]
    job_ids = [add_job(db, tenant, loras) for loras in order]
    run_queue(ctx, "generate")
    rows = finished(db, job_ids)
    assert {r.status for r in rows.values()} == {"succeeded"}, [(r.error_code, r.error) for r in rows.values()]
    # Pixels, not file digests: each PNG carries its own job's metadata. Equal requests give equal images within
    # the service's batching tolerance (2/255); an adapter changes the image far more than that.
    image = [pixels(ctx, rows[j].outputs[0]["key"]) for j in job_ids]

    def same(i: int, j: int) -> bool:
        return int(np.abs(image[i] - image[j]).max()) <= 2

    assert same(0, 3) and same(0, 6) and same(1, 4)  # a bare job after adapter jobs is the bare image
    distinct = (0, 1, 2, 5)  # bare, a, b, a + b
    assert not any(same(i, j) for i in distinct for j in distinct if i < j)
    assert ctx.adapter_store.downloads - downloads == 2
    assert ctx.engine.adapters.loads - loads == 2


def test_a_deleted_or_corrupted_adapter_fails_its_job_and_not_its_neighbours(
    ctx: WorkerContext, db: Engine, tenant: str, tiny_adapters: dict[str, Path]
) -> None:
    corrupted = add_adapter(ctx, tenant, tiny_adapters["a"], sha256="0" * 64)
    gone = ids.adapter_id()
    bad_sum, missing, bare = (
        add_job(db, tenant, [(corrupted, 1.0)]),
        add_job(db, tenant, [(gone, 1.0)]),
        add_job(db, tenant, []),
    )
    run_queue(ctx, "generate")
    rows = finished(db, [bad_sum, missing, bare])
    assert rows[bare].status == "succeeded"
    assert (rows[missing].status, rows[missing].error_code) == ("failed", "invalid_input")
    assert gone in rows[missing].error
    assert rows[bad_sum].status == "failed" and "SHA-256" in rows[bad_sum].error


def test_another_tenants_adapter_is_not_applied(
    ctx: WorkerContext, db: Engine, tenant: str, tiny_adapters: dict[str, Path]
) -> None:
    other = add_tenant(db, "lora")
    theirs = add_adapter(ctx, other, tiny_adapters["b"])
    job = add_job(db, tenant, [(theirs, 1.0)])  # the API refuses this; the worker must not trust that alone
    run_queue(ctx, "generate")
    assert finished(db, [job])[job].error_code == "invalid_input"


def test_a_restarted_worker_rewarms_the_adapters_used_most(
    ctx: WorkerContext, db: Engine, tenant: str, tiny_adapters: dict[str, Path], tiny_turbo_dir: Path
) -> None:
    a, b = (add_adapter(ctx, tenant, tiny_adapters[n]) for n in ("a", "b"))
    for loras in ([(a, 1.0)], [(a, 0.5)], [(a, 1.0), (b, 1.0)]):
        add_job(db, tenant, loras)
    fresh = InferenceEngine.from_pretrained(str(tiny_turbo_dir), EngineOptions(device="cpu", dtype="float32"))
    store = AdapterStore(db=ctx.db, s3=ctx.s3, bucket=ctx.settings.s3_bucket, max_bytes=1 << 30,
                         db_retry_s=5, storage_retry_s=5)  # fmt: skip
    assert process.rewarm_adapters(fresh, store, ("generate",), 1) == [a]  # the most used first
    assert process.rewarm_adapters(fresh, store, ("generate",), 4) == [b]
    assert fresh.adapters.active == ()  # loaded, not applied: the next bare batch is still bare
    assert process.rewarm_adapters(fresh, store, ("edit",), 4) == []
