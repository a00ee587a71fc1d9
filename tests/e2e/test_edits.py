"""Edit jobs end to end: uploads through the API, img2img / inpaint on the Turbo weights and instruct on the
Omni checkpoint, run by a real worker serving both queues; each image equals a direct diffusers call."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline, ZImageOmniPipeline
from PIL import Image, ImageDraw

from client import ZImageClient
from core.settings import Settings
from deploy.stack import Stack, free_port
from tests.fixtures.services import cancel_backlog

pytestmark = pytest.mark.e2e

SIZE = 256


@pytest.fixture(scope="module")
def stack(settings: Settings, tiny_omni_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The API and one worker serving generate and edit, with the tiny Omni as the edit model."""
    port = free_port()
    run = Stack(
        settings.model_copy(update={"edit_model": str(tiny_omni_dir), "api_base_url": f"http://127.0.0.1:{port}"}),
        tmp_path_factory.mktemp("edit-stack"),
        api_port=port,
        s3_port=None,
        worker_queues="generate,edit",
    )
    cancel_backlog(settings)  # this module's jobs run first, not earlier modules' leftovers
    run.start()
    yield run
    run.stop()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _source() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (40, 90, 160))
    draw = ImageDraw.Draw(image)
    draw.ellipse((60, 60, 196, 196), fill=(230, 200, 40))
    draw.rectangle((0, 200, SIZE, SIZE), fill=(30, 140, 60))
    return image


def _mask() -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle((64, 64, 192, 192), fill=255)
    return mask


def _upload(stack: Stack, key: str, image: Image.Image) -> str:
    r = httpx.post(
        f"{stack.api_url}/v1/uploads",
        headers={"Authorization": f"Bearer {key}"},
        files={"file": ("in.png", _png(image), "image/png")},
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_each_edit_mode_runs_end_to_end_and_equals_diffusers(
    stack: Stack, new_key, tiny_turbo_dir: Path, tiny_omni_dir: Path  # type: ignore[no-untyped-def]
) -> None:
    key = new_key()
    source, mask, second = _source(), _mask(), _source().transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    src_id, mask_id, second_id = _upload(stack, key, source), _upload(stack, key, mask), _upload(stack, key, second)
    common = {"kind": "edit", "width": SIZE, "height": SIZE, "steps": 8}
    requests = {
        "img2img": {**common, "mode": "img2img", "prompt": "make it a watercolor", "seed": 11, "strength": 0.6,
                    "input_images": [{"upload_id": src_id}]},
        "inpaint": {**common, "mode": "inpaint", "prompt": "a red apple", "seed": 12, "strength": 0.9,
                    "input_images": [{"upload_id": src_id}], "mask": {"upload_id": mask_id}},
        "instruct": {**common, "mode": "instruct", "prompt": "把背景换成下雨的纽约街道", "seed": 13,
                     "input_images": [{"upload_id": src_id}, {"upload_id": second_id}]},
    }
    with ZImageClient(stack.api_url, key) as client:
        submitted = {mode: client.submit(req) for mode, req in requests.items()}
        done = client.wait([j["id"] for j in submitted.values()], timeout_s=300)
        got = {}
        for mode, job in submitted.items():
            result = done[job["id"]]
            assert result["status"] == "succeeded", (mode, result["error"])
            (out,) = result["outputs"]
            got[mode] = Image.open(io.BytesIO(client.download(out)))
            assert got[mode].size == (SIZE, SIZE)

    gen = lambda seed: torch.Generator("cpu").manual_seed(seed)  # noqa: E731
    img2img = ZImageImg2ImgPipeline.from_pretrained(tiny_turbo_dir, dtype=torch.float32)
    img2img.set_progress_bar_config(disable=True)
    expected = img2img(prompt="make it a watercolor", image=source, strength=0.6, width=SIZE, height=SIZE,
                       num_inference_steps=8, guidance_scale=0.0, generator=gen(11)).images[0]
    assert np.abs(_pixels(got["img2img"]) - _pixels(expected)).max() <= 2

    inpaint = ZImageInpaintPipeline(**img2img.components)
    inpaint.set_progress_bar_config(disable=True)
    expected = inpaint(prompt="a red apple", image=source, mask_image=mask, strength=0.9, width=SIZE, height=SIZE,
                       num_inference_steps=8, guidance_scale=0.0, generator=gen(12)).images[0]
    assert np.abs(_pixels(got["inpaint"]) - _pixels(expected)).max() <= 2

    # The worker runs Omni as on a float32 host: its own VAE in bf16 (Omni encodes images in bf16).
    omni = ZImageOmniPipeline.from_pretrained(tiny_omni_dir, dtype={"default": torch.float32, "vae": torch.bfloat16})
    omni.set_progress_bar_config(disable=True)
    expected = omni(prompt="把背景换成下雨的纽约街道", image=[source, second], width=SIZE, height=SIZE,
                    num_inference_steps=8, guidance_scale=0.0, generator=gen(13)).images[0]
    assert np.abs(_pixels(got["instruct"]) - _pixels(expected)).max() <= 2


def test_bad_edit_inputs_are_refused_at_submit_and_create_nothing(stack: Stack, new_key) -> None:  # type: ignore[no-untyped-def]
    key, other = new_key(), new_key()
    mine = _upload(stack, key, _source())
    theirs = _upload(stack, other, _source())
    small_mask = _upload(stack, key, _mask().resize((128, 128)))
    base = {"kind": "edit", "prompt": "x", "width": SIZE, "height": SIZE}
    cases = [
        ({**base, "mode": "img2img"}, "input_images"),  # no image
        ({"prompt": "x", "input_images": [{"upload_id": mine}]}, "input_images"),  # generate with an image
        ({**base, "mode": "inpaint", "input_images": [{"upload_id": mine}]}, "mask"),
        ({**base, "mode": "inpaint", "input_images": [{"upload_id": mine}], "mask": {"upload_id": small_mask}},
         "mask"),
        ({**base, "mode": "img2img", "strength": 1.5, "input_images": [{"upload_id": mine}]}, "strength"),
        ({**base, "mode": "instruct", "input_images": [{"upload_id": mine}] * 4}, "input_images"),
        ({**base, "mode": "img2img", "input_images": [{"upload_id": "upl_0000000000unknown"}]},
         "input_images.0.upload_id"),
        ({**base, "mode": "img2img", "input_images": [{"upload_id": theirs}]}, "input_images.0.upload_id"),
    ]
    with ZImageClient(stack.api_url, key) as client:
        for body, field in cases:
            r = httpx.post(f"{stack.api_url}/v1/jobs", json=body, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 422, (body, r.text)
            fields = [d["field"] for d in r.json()["error"]["details"]]
            assert any(f.startswith(field) for f in fields), (field, fields)
        assert client.list()["data"] == []
