"""Engine test helpers: the prompts, the image size and tolerance, and requests compared with single calls."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline
from PIL import Image

from core.errors import OutOfMemory
from core.schemas import JobRequest
from worker.engine import ImageRequest

TOLERANCE = 2  # max abs difference on uint8 pixels: 2/255
SIZE = 256

EN_SHORT = "a cat"
EN_LONG = (
    "Young Chinese woman in red Hanfu, intricate embroidery. Impeccable makeup, red floral forehead pattern. "
    "Elaborate high bun, golden phoenix headdress, red flowers, beads. Holds a round folding fan."
)
ZH = "一名穿著紅色漢服的年輕中國女子"
EN_300 = (  # 314 tokens with the chat template: long enough to span ten caption buckets
    "A sweeping cinematic photograph of an ancient mountain monastery at dawn, golden light spilling over "
    "terraced tea fields, monks in saffron robes crossing a rope bridge above a misty gorge, prayer flags "
    "fluttering in the cold wind, snow-capped peaks glowing pink behind them, a lone eagle circling overhead, "
    "wooden walkways slick with dew, lanterns still burning in the windows, a stone stairway winding down "
    "through pine forest to a turquoise river, ultra detailed, 85mm lens, shallow depth of field, soft volumetric "
    "light, film grain, muted earth tones with touches of crimson and gold."
)


def request(prompt: str = EN_SHORT, seeds: tuple[int, ...] = (0,), **overrides: Any) -> ImageRequest:
    """A small request with test defaults."""
    fields: dict[str, Any] = {"width": SIZE, "height": SIZE, "steps": 2, "guidance_scale": 0.0}
    fields.update(overrides)
    return ImageRequest(prompt=prompt, seeds=seeds, **fields)


def single(pipe: ZImagePipeline, req: ImageRequest | JobRequest, seed: int) -> Image.Image:
    """The plain one-image call a user would write for this request (engine or job request) and seed."""
    return pipe(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        width=req.width,
        height=req.height,
        num_inference_steps=req.steps,
        guidance_scale=req.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]


def diff(a: Image.Image, b: Image.Image) -> int:
    """Max abs pixel difference of two uint8 images."""
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def images_of(result: list[Image.Image] | OutOfMemory) -> list[Image.Image]:
    """A request's images; fails the test on an OutOfMemory marker."""
    assert not isinstance(result, OutOfMemory), result
    return result
