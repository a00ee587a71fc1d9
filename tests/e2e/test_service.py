"""End to end: the API and a real Celery worker as processes; jobs go submit → Redis → worker → S3 → Postgres,
and each downloaded image equals a direct ``ZImagePipeline`` call with the same prompt, size and seed."""

from __future__ import annotations

import hashlib
import io
import socket
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline
from PIL import Image
from sqlalchemy import Engine, text

from client import ZImageClient
from core import storage
from core.settings import Settings
from deploy.stack import Stack

pytestmark = pytest.mark.e2e

PROMPTS = [
    "a red fox in fresh snow",
    "一名穿著紅色漢服的年輕中國女子",
    "a lighthouse on a cliff during a storm, oil painting, dramatic clouds, high detail",
    "一只在竹林里吃竹子的大熊猫",
    "macro photo of a dew drop",
]
SIZES = [(256, 256), (384, 256), (256, 384)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def stack(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """SeaweedFS (the session's), the API and one worker, as real processes."""
    port = _free_port()
    run = Stack(
        settings.model_copy(update={"api_base_url": f"http://127.0.0.1:{port}"}),
        tmp_path_factory.mktemp("stack"),
        api_port=port,
        s3_port=None,
    )
    run.start()
    yield run
    run.stop()


def _direct(pipe: ZImagePipeline, prompt: str, width: int, height: int, seed: int) -> np.ndarray:
    image = pipe(
        prompt=prompt,
        width=width,
        height=height,
        num_inference_steps=8,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_jobs_run_end_to_end(
    stack: Stack,
    settings: Settings,
    new_key,
    db: Engine,
    reference: ZImagePipeline,  # type: ignore[no-untyped-def]
) -> None:
    requests = []
    for i in range(20):
        width, height = SIZES[i % len(SIZES)]
        requests.append(
            {
                "prompt": PROMPTS[i % len(PROMPTS)],
                "width": width,
                "height": height,
                "seed": 7000 + i,
                "metadata": {"i": i},
                "num_images": 2 if i % 7 == 0 else 1,
            }
        )
    requests.append(
        {
            "prompt": "a jpeg of a cat",
            "width": 256,
            "height": 256,
            "seed": 5,
            "output_format": "jpeg",
            "output_quality": 80,
        }
    )
    requests.append(
        {"prompt": "a webp of a dog", "width": 256, "height": 256, "seed": 6, "output_format": "webp"}
    )

    s3 = storage.make_s3_client(settings)
    with ZImageClient(stack.api_url, new_key()) as client:
        submitted = [client.submit(r) for r in requests]
        assert all(j["status"] == "queued" for j in submitted)
        done = client.wait([j["id"] for j in submitted], timeout_s=400)

        assert {d["status"] for d in done.values()} == {"succeeded"}, {
            k: (v["status"], v["error"]) for k, v in done.items() if v["status"] != "succeeded"
        }
        for req, job in zip(requests, submitted, strict=True):
            result = done[job["id"]]
            assert result["metadata"] == req.get("metadata", {})
            assert len(result["outputs"]) == req.get("num_images", 1)
            assert result["timings"]["inference_ms"] > 0 and result["timings"]["total_ms"] > 0
            assert result["attempts"] == 1
            for out in result["outputs"]:
                data = client.download(out)
                assert hashlib.sha256(data).hexdigest() == out["sha256"]
                assert storage.object_sha256(s3, settings.s3_bucket, out["key"]) == out["sha256"]
                assert (
                    out["key"]
                    == f"results/{_tenant(db, job['id'])}/{job['id']}/{out['index']}."
                    + ({"png": "png", "jpeg": "jpg", "webp": "webp"}[out["format"]])
                )
                image = Image.open(io.BytesIO(data))
                image.load()
                assert image.format == out["format"].upper()
                assert image.size == (req["width"], req["height"]) == (out["width"], out["height"])
                assert out["seed"] == req["seed"] + out["index"]
                if out["format"] == "png":
                    assert image.text["job_id"] == job["id"] and image.text["prompt"] == req["prompt"]
                    expected = _direct(reference, req["prompt"], req["width"], req["height"], out["seed"])
                    got = np.asarray(image.convert("RGB"), dtype=np.int16)
                    assert np.abs(got - expected).max() <= 2, job["id"]

    with db.connect() as conn:
        worker = conn.execute(
            text("SELECT pipeline_loads, jobs_run, batches_run FROM workers WHERE pid = :pid"),
            {"pid": stack.pids()["worker"]},
        ).one()
    # One load for the whole process, however many jobs it ran, and jobs really shared batches.
    assert worker.pipeline_loads == 1
    assert worker.jobs_run >= len(requests)
    assert worker.batches_run < len(requests)


def test_cancel_queued_job_never_runs(stack: Stack, new_key, db: Engine) -> None:  # type: ignore[no-untyped-def]
    with ZImageClient(stack.api_url, new_key()) as client:
        # Enough work ahead that the last job is still queued when canceled.
        ahead = [
            client.submit({"prompt": f"filler {i}", "width": 512, "height": 512, "seed": i}) for i in range(6)
        ]
        victim = client.submit({"prompt": "never runs", "width": 256, "height": 256, "priority": 0})
        canceled = client.cancel(victim["id"])
        assert canceled["status"] == "canceled"
        client.wait([j["id"] for j in ahead], timeout_s=300)
        final = client.get(victim["id"])
    assert final["status"] == "canceled" and final["outputs"] == [] and final["attempts"] == 0


def _tenant(db: Engine, job_id: str) -> str:
    with db.connect() as conn:
        return str(conn.execute(text("SELECT tenant_id FROM jobs WHERE id = :id"), {"id": job_id}).scalar())
