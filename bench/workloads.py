"""Deterministic job sets for the benchmarks: mixed English/Chinese prompts of varied lengths, or one prompt."""

from __future__ import annotations

import random

from worker.engine import ImageRequest

STEPS = 8  # Z-Image-Turbo's model card
GUIDANCE = 0.0

_SUBJECTS_EN = (
    "a red fox",
    "an old lighthouse keeper",
    "a bowl of ramen",
    "a futuristic city street",
    "a cat sitting on a red mat",
    "a mountain lake at sunrise",
    "a vintage steam train",
    "a young woman in red Hanfu",
    "a neon lightning-bolt lamp",
    "a wooden sailing boat",
)
_STYLES_EN = (
    "photo",
    "oil painting",
    "watercolor",
    "cinematic still, 35mm film",
    "studio portrait, 85mm lens, shallow depth of field",
    "isometric 3D render",
)
_DETAILS_EN = (
    "golden hour light",
    "mist over the water",
    "rain on the street with reflections",
    "intricate embroidery",
    "soft volumetric light",
    "steam rising from the bowl",
    "snow-capped peaks in the distance",
    "lanterns glowing in the windows",
    "a lone eagle circling overhead",
    "muted earth tones with touches of crimson and gold",
    "ultra detailed, sharp focus",
    "film grain",
)
_SUBJECTS_ZH = (
    "一只猫坐在红色的垫子上",
    "西安大雁塔的夜景",
    "一名穿着红色汉服的年轻中国女子",
    "山水画，高山流水",
    "一辆复古蒸汽小火车",
    "一碗热气腾腾的拉面",
)
_DETAILS_ZH = (
    "阳光从窗户照进来",
    "远处模糊的彩色灯光",
    "云雾缭绕",
    "水墨风格",
    "高清摄影",
    "温暖的色调",
    "精致的刺绣",
    "柔和的户外光线",
)


def mixed_prompt(rng: random.Random) -> str:
    """One prompt: 30% Chinese; lengths from a few words to a paragraph (about 10 to 300 tokens)."""
    length = rng.choices(("short", "medium", "long"), weights=(40, 40, 20))[0]
    extra = {"short": 0, "medium": 3, "long": 14}[length]
    if rng.random() < 0.3:
        parts = [rng.choice(_SUBJECTS_ZH), *rng.choices(_DETAILS_ZH, k=extra)]
        return "，".join(parts) + "。"
    parts = [rng.choice(_SUBJECTS_EN), rng.choice(_STYLES_EN), *rng.choices(_DETAILS_EN, k=extra)]
    return ", ".join(parts if length != "short" else parts[:1])


def mixed(n: int, size: int | tuple[int, ...], *, seed: int = 0) -> list[ImageRequest]:
    """``n`` one-image jobs with mixed prompts and distinct seeds; ``size`` may be a tuple of sizes to mix."""
    rng = random.Random(seed)
    sizes = (size,) if isinstance(size, int) else size
    jobs = []
    for i in range(n):
        side = sizes[i % len(sizes)]
        jobs.append(ImageRequest(mixed_prompt(rng), side, side, STEPS, GUIDANCE, seeds=(seed * 100_003 + i,)))
    return jobs


def one_prompt(seeds: int = 64, size: int = 256, *, prompt: str | None = None) -> list[ImageRequest]:
    """A bulk submission: ``seeds`` one-image jobs with the same prompt and seeds 0..seeds-1."""
    text = prompt or "一名穿着红色汉服的年轻中国女子, studio portrait, 85mm lens, soft volumetric light, film grain"
    return [ImageRequest(text, size, size, STEPS, GUIDANCE, seeds=(i,)) for i in range(seeds)]


def images_in(jobs: list[ImageRequest]) -> int:
    """Total images of a job set."""
    return sum(len(job.seeds) for job in jobs)
