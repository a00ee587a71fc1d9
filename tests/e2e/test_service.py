"""End to end: the API and a real Celery worker as processes; jobs go submit → Redis → worker → S3 → Postgres,
and each downloaded image equals a direct ``ZImagePipeline`` call with the same prompt, size and seed."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
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
from tests.fixtures.services import cancel_backlog

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
    cancel_backlog(settings)  # this module's jobs run first, not earlier modules' leftovers
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
    requests.append({"prompt": "a webp of a dog", "width": 256, "height": 256, "seed": 6, "output_format": "webp"})

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
        ahead = [client.submit({"prompt": f"filler {i}", "width": 512, "height": 512, "seed": i}) for i in range(6)]
        victim = client.submit({"prompt": "never runs", "width": 256, "height": 256, "priority": 0})
        canceled = client.cancel(victim["id"])
        assert canceled["status"] == "canceled"
        client.wait([j["id"] for j in ahead], timeout_s=300)
        final = client.get(victim["id"])
    assert final["status"] == "canceled" and final["outputs"] == [] and final["attempts"] == 0


def _tenant(db: Engine, job_id: str) -> str:
    with db.connect() as conn:
        return str(conn.execute(text("SELECT tenant_id FROM jobs WHERE id = :id"), {"id": job_id}).scalar())


def _tenant_keys(s3: object, bucket: str, tenant_id: str) -> set[str]:
    """Every result object of a tenant in S3."""
    keys: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"results/{tenant_id}/"):  # type: ignore[attr-defined]
        keys.update(o["Key"] for o in page.get("Contents", []))
    return keys


def _tenant_of(db: Engine, batch_id: str) -> str:
    with db.connect() as conn:
        return str(conn.execute(text("SELECT tenant_id FROM batches WHERE id = :b"), {"b": batch_id}).scalar_one())


def test_a_batch_runs_and_its_manifest_matches_s3_object_for_object(
    stack: Stack,
    settings: Settings,
    new_key,
    db: Engine,  # type: ignore[no-untyped-def]
) -> None:
    s3 = storage.make_s3_client(settings)
    with ZImageClient(stack.api_url, new_key()) as client:
        jobs = [{"prompt": PROMPTS[i % len(PROMPTS)], "seed": 300 + i, "num_images": 1 + i % 2, "metadata": {"i": i}}
                for i in range(8)]  # fmt: skip
        batch = client.submit_batch(jobs, defaults={"width": 256, "height": 256}, metadata={"e2e": True})
        done = client.wait_batch(batch["id"], timeout_s=300)
        assert done["status"] == "completed" and done["counts"]["succeeded"] == 8 and done["finished_at"]
        manifest = list(client.iter_manifest(batch["id"]))
        assert [line["index"] for line in manifest] == list(range(8))
        assert [line["metadata"] for line in manifest] == [{"i": i} for i in range(8)]
        keys = {out["key"] for line in manifest for out in line["outputs"]}
        assert len(keys) == sum(1 + i % 2 for i in range(8))
        # Object for object: every output the manifest names is in S3, and S3 holds nothing else of the tenant.
        assert _tenant_keys(s3, settings.s3_bucket, _tenant_of(db, batch["id"])) == keys
        for line in manifest:
            for out in line["outputs"]:
                assert hashlib.sha256(client.download(out)).hexdigest() == out["sha256"]


def test_cancel_of_a_running_batch_stops_it_and_leaves_only_finished_results(
    stack: Stack,
    settings: Settings,
    new_key,
    db: Engine,  # type: ignore[no-untyped-def]
) -> None:
    s3 = storage.make_s3_client(settings)
    with ZImageClient(stack.api_url, new_key()) as client:
        jobs = [{"prompt": f"{PROMPTS[i % len(PROMPTS)]} #{i}", "seed": i} for i in range(40)]
        batch = client.submit_batch(jobs, defaults={"width": 512, "height": 512, "steps": 8})
        deadline = time.monotonic() + 120
        while client.get_batch(batch["id"])["counts"]["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        canceled = client.cancel_batch(batch["id"])
        assert canceled["status"] == "canceled" and canceled["counts"]["canceled"] > 0
        # Running jobs stop at their next denoising step: soon nothing of the batch is active.
        final = client.wait_batch(batch["id"], timeout_s=120)
        counts = final["counts"]
        assert counts["queued"] == counts["running"] == 0
        assert counts["succeeded"] + counts["canceled"] == 40 and counts["canceled"] >= 30
        manifest = list(client.iter_manifest(batch["id"]))
        finished = {out["key"] for line in manifest if line["status"] == "succeeded" for out in line["outputs"]}
        assert all(not line["outputs"] for line in manifest if line["status"] == "canceled")
    time.sleep(1.0)  # a canceled job's upload that raced the cancel deletes what it stored
    assert _tenant_keys(s3, settings.s3_bucket, _tenant_of(db, batch["id"])) == finished


def _sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Parse server-sent events (id, event, data as JSON) from a stream's lines; comments are yielded as such."""
    event: dict[str, Any] = {}
    for line in lines:
        if line.startswith(":"):
            yield {"comment": line}
        elif not line:
            if event:
                yield event
            event = {}
        else:
            name, _, value = line.partition(": ")
            event[name] = json.loads(value) if name == "data" else value


def test_job_events_stream_status_and_progress_to_the_end_and_resume(
    stack: Stack,
    new_key,  # type: ignore[no-untyped-def]
) -> None:
    key = new_key()
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=stack.api_url, headers=headers, timeout=60) as api:
        job = api.post("/v1/jobs", json={"prompt": "events", "width": 256, "height": 256, "steps": 6}).json()
        with api.stream("GET", f"/v1/jobs/{job['id']}/events") as answer:
            assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
            got = [e for e in _sse(answer.iter_lines()) if "event" in e]
        kinds = [e["event"] for e in got]
        assert kinds[0] == "job" and kinds[-1] == "job" and got[-1]["data"]["status"] == "succeeded"
        assert got[-1]["data"]["outputs"] and got[-1]["data"]["outputs"][0]["url"]
        ids = [int(e["id"]) for e in got]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)  # monotonic: resumable
        steps = [e["data"]["progress"]["step"] for e in got if e["event"] == "progress"]
        assert steps == sorted(steps) and all(0 < s <= 6 for s in steps)
        # Resume from the first event: only what came after, ending with the same final state.
        with api.stream("GET", f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": got[0]["id"]}) as again:
            resumed = [e for e in _sse(again.iter_lines()) if "event" in e]
        assert [e["id"] for e in resumed] == [got[-1]["id"]]
        # A client that connects after the end gets the final state at once, and the stream ends.
        started = time.monotonic()
        with api.stream("GET", f"/v1/jobs/{job['id']}/events") as late:
            final = [e for e in _sse(late.iter_lines()) if "event" in e]
        assert [e["data"]["status"] for e in final] == ["succeeded"] and time.monotonic() - started < 5
        other = {"Authorization": f"Bearer {new_key()}"}
        assert api.get(f"/v1/jobs/{job['id']}/events", headers=other).status_code == 404


def test_batch_events_count_jobs_to_the_end(stack: Stack, new_key) -> None:  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {new_key()}"}, timeout=60) as api:
        body = {"defaults": {"width": 256, "height": 256}, "jobs": [{"prompt": f"b{i}", "seed": i} for i in range(6)]}
        batch = api.post("/v1/batches", json=body).json()
        with api.stream("GET", f"/v1/batches/{batch['id']}/events") as answer:
            got = [e for e in _sse(answer.iter_lines()) if "event" in e]
        assert all(e["event"] == "batch" for e in got)
        done = [e["data"]["counts"]["succeeded"] for e in got]
        assert done == sorted(done) and got[-1]["data"]["status"] == "completed" and done[-1] == 6
        with api.stream("GET", f"/v1/batches/{batch['id']}/events", headers={"Last-Event-ID": got[-1]["id"]}) as again:
            assert [e for e in _sse(again.iter_lines()) if "event" in e] == []  # nothing newer: it just ends


def test_adapters_through_the_api_equal_diffusers_and_leave_no_state(
    stack: Stack,
    new_key,
    tiny_adapters: dict[str, Path],
    tiny_turbo_dir: Path,
    reference: ZImagePipeline,  # type: ignore[no-untyped-def]
) -> None:
    """An outside client's view: hostile and mismatched files refused, an adapter image equal to diffusers' own
    load_lora_weights + set_adapters call, and a bare job after adapter jobs equal to the bare model's image."""
    from zimage_client import Client, UnsupportedMediaType, ValidationError

    with Client(stack.api_url, new_key()) as client:
        with pytest.raises(UnsupportedMediaType):
            client.create_adapter(pickle.dumps({"transformer.layers.0.attention.to_q.lora_A.weight": [0.0]}))
        cut = tiny_adapters["a"].read_bytes()[:-100]
        with pytest.raises(ValidationError, match="cut short"):
            client.create_adapter(cut)
        adapter = client.create_adapter(tiny_adapters["a"], name="style-a")
        base = {"prompt": "a red fox in fresh snow", "width": 256, "height": 256, "seed": 4321}
        styled = {**base, "loras": [{"adapter_id": adapter["id"], "scale": 0.8}]}
        jobs = [client.submit(request) for request in (base, styled, styled, base)]
        done = [client.wait(job["id"], timeout=400) for job in jobs]
        assert [job["status"] for job in done] == ["succeeded"] * 4
        got = [np.asarray(Image.open(io.BytesIO(client.read_output(job["outputs"][0]))).convert("RGB"), dtype=np.int16)
               for job in done]  # fmt: skip

    pipe = ZImagePipeline.from_pretrained(tiny_turbo_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tiny_adapters["a"]), adapter_name="a")
    pipe.set_adapters(["a"], [0.8])
    with_adapter = _direct(pipe, base["prompt"], 256, 256, 4321)
    bare = _direct(reference, base["prompt"], 256, 256, 4321)
    assert np.abs(got[1] - with_adapter).max() <= 2 and np.abs(got[2] - with_adapter).max() <= 2
    assert np.abs(got[0] - bare).max() <= 2 and np.abs(got[3] - bare).max() <= 2
    assert np.abs(with_adapter - bare).max() > 20  # the comparison can tell them apart
