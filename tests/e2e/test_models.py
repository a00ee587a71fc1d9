"""Every model side by side, end to end: an outside client submits Turbo, Base and instruct jobs together to a
stack whose one worker serves the generate, base and edit queues; each job is routed to its model's queue and
its image equals its model's direct diffusers call. GET /v1/models shows all three available."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from diffusers import ZImageOmniPipeline, ZImagePipeline
from PIL import Image
from sqlalchemy import Engine, text

from client import ZImageClient
from core.settings import Settings
from deploy.stack import Stack, free_port
from tests.fixtures.services import cancel_backlog

pytestmark = pytest.mark.e2e

SIZE = 256


@pytest.fixture(scope="module")
def stack(
    settings: Settings, tiny_omni_dir: Path, tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The API and one worker serving generate, base and edit: the tiny Turbo, Base and Omni."""
    port = free_port()
    served = {"edit_model": str(tiny_omni_dir), "base_model": str(tiny_base_dir), "worker_heartbeat_s": 2.0}
    run = Stack(
        settings.model_copy(update={**served, "api_base_url": f"http://127.0.0.1:{port}"}),
        tmp_path_factory.mktemp("models-stack"),
        api_port=port,
        s3_port=None,
        worker_queues="generate,base,edit",
    )
    cancel_backlog(settings)
    run.start()
    yield run
    run.stop()


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_turbo_base_and_instruct_jobs_together_each_equal_their_model(
    stack: Stack,
    new_key,  # type: ignore[no-untyped-def]
    db: Engine,
    tiny_turbo_dir: Path,
    tiny_base_dir: Path,
    tiny_omni_dir: Path,
) -> None:
    key = new_key()
    headers = {"Authorization": f"Bearer {key}"}
    models = httpx.get(f"{stack.api_url}/v1/models", headers=headers).json()["data"]
    assert {m["id"]: m["available"] for m in models} == {
        "z-image-turbo": True,
        "z-image-base": True,
        "z-image-edit": True,
    }
    source = Image.new("RGB", (SIZE, SIZE), (40, 90, 160))
    upload = httpx.post(
        f"{stack.api_url}/v1/uploads", headers=headers, files={"file": ("in.png", _png(source), "image/png")}
    ).json()["id"]
    common = {"width": SIZE, "height": SIZE}
    requests = {
        "turbo": {**common, "prompt": "a red fox in snow", "seed": 21, "steps": 4},
        "base": {**common, "prompt": "a red fox in snow", "seed": 21, "steps": 4, "model": "z-image-base",
                 "negative_prompt": "blurry, low quality"},
        "base-default-negative": {**common, "prompt": "一只熊猫", "seed": 22, "steps": 3, "guidance_scale": 2.5,
                                  "model": "z-image-base"},
        "instruct": {**common, "kind": "edit", "prompt": "make it night", "seed": 23, "steps": 4,
                     "input_images": [{"upload_id": upload}]},
    }  # fmt: skip
    with ZImageClient(stack.api_url, key) as client:
        submitted = {name: client.submit(req) for name, req in requests.items()}
        done = client.wait([j["id"] for j in submitted.values()], timeout_s=300)
        got = {}
        for name, job in submitted.items():
            result = done[job["id"]]
            assert result["status"] == "succeeded", (name, result["error"])
            (out,) = result["outputs"]
            got[name] = Image.open(io.BytesIO(client.download(out)))
    with db.connect() as conn:
        queues = dict(
            conn.execute(
                text("SELECT id, queue FROM jobs WHERE id = ANY(:ids)"), {"ids": [j["id"] for j in submitted.values()]}
            ).all()
        )
    assert {name: queues[job["id"]] for name, job in submitted.items()} == {
        "turbo": "generate",
        "base": "base",
        "base-default-negative": "base",
        "instruct": "edit",
    }
    assert submitted["base"]["request"]["guidance_scale"] == 4.0  # Base's default: CFG

    gen = lambda seed: torch.Generator("cpu").manual_seed(seed)  # noqa: E731
    for name, folder in (("turbo", tiny_turbo_dir), ("base", tiny_base_dir), ("base-default-negative", tiny_base_dir)):
        req = submitted[name]["request"]
        pipe = ZImagePipeline.from_pretrained(folder, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        expected = pipe(prompt=req["prompt"], negative_prompt=req["negative_prompt"], width=SIZE, height=SIZE,
                        num_inference_steps=req["steps"], guidance_scale=req["guidance_scale"],
                        generator=gen(req["seed"])).images[0]  # fmt: skip
        assert np.abs(_pixels(got[name]) - _pixels(expected)).max() <= 2, name
    assert np.abs(_pixels(got["turbo"]) - _pixels(got["base"])).max() > 8  # two models, two images

    omni = ZImageOmniPipeline.from_pretrained(tiny_omni_dir, dtype={"default": torch.float32, "vae": torch.bfloat16})
    omni.set_progress_bar_config(disable=True)
    expected = omni(prompt="make it night", image=[source], width=SIZE, height=SIZE, num_inference_steps=4,
                    guidance_scale=0.0, generator=gen(23)).images[0]  # fmt: skip
    assert np.abs(_pixels(got["instruct"]) - _pixels(expected)).max() <= 2


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_the_sdk_and_cli_list_models_and_name_one(stack: Stack, new_key, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from zimage_client import Client

    key = new_key()
    with Client(stack.api_url, key) as zc:
        listed = {m["id"]: m for m in zc.list_models()}
    assert listed["z-image-base"]["defaults"] == {"steps": 28, "guidance_scale": 4.0}
    env = {**os.environ, "ZIMAGE_API_URL": stack.api_url, "ZIMAGE_API_KEY": key}
    zimage = str(Path(sys.executable).with_name("zimage"))
    shown = subprocess.run([zimage, "models"], env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    lines = {line.split("\t")[0]: line for line in shown.stdout.splitlines()}
    assert set(lines) == {"z-image-turbo", "z-image-base", "z-image-edit"}
    assert "\tavailable\t28 steps\tguidance 4\t" in lines["z-image-base"]
    args = ["generate", "a fox", "--model", "z-image-base", "--size", "256x256", "--steps", "2", "--out", str(tmp_path)]
    made = subprocess.run([zimage, *args], env=env, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    (path,) = [Path(p) for p in made.stdout.split()]
    assert Image.open(path).info.get("model") == str(stack.settings.base_model)
