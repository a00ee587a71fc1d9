"""Z-Image Base beside Turbo: one text encoder, tokenizer and VAE in memory for both (the same objects, counted
once), one prompt-embedding cache keyed by the text encoder, and every Base image (CFG, negative prompts) equal to
a direct ZImagePipeline call with the same prompt, negative prompt, size, steps, guidance and seed, in any batch."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline
from PIL import Image

from core import catalog
from deploy.tiny_checkpoint import build_tiny_base
from tests.helpers.engine import EN_LONG, EN_SHORT, TOLERANCE, ZH, diff, images_of, request, single
from worker.engine import Engine, EngineOptions, ImageRequest
from worker.engine.sharing import parameter_bytes

OPTIONS = EngineOptions(device="cpu", dtype="float32")
BASE = catalog.MODELS[catalog.BASE]


@pytest.fixture(scope="module")
def turbo(tiny_turbo_dir: Path) -> Engine:
    return Engine.from_pretrained(str(tiny_turbo_dir), OPTIONS)


@pytest.fixture(scope="module")
def base(tiny_base_dir: Path, turbo: Engine) -> Engine:
    """Base loaded as a worker serving both queues loads it: beside Turbo, sharing what matches."""
    return Engine.base_from_pretrained(str(tiny_base_dir), OPTIONS, turbo=turbo)


@pytest.fixture(scope="module")
def base_reference(tiny_base_dir: Path) -> ZImagePipeline:
    """The tiny Base plainly loaded in float32: the direct calls every Base image must equal."""
    import torch

    pipe = ZImagePipeline.from_pretrained(tiny_base_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cfg(prompt: str, seeds: tuple[int, ...], negative: str | None = None, **fields: object) -> ImageRequest:
    """A Base request at Base's default guidance, few steps (the tiny model's)."""
    values: dict[str, object] = {"steps": 3, "guidance_scale": BASE.guidance_scale, "negative_prompt": negative}
    values.update(fields)
    return request(prompt, seeds, **values)


def generate(engine: Engine, requests: list[ImageRequest]) -> list[list[Image.Image]]:
    return [images_of(result) for result in engine.generate(requests)]


def test_base_holds_turbos_text_encoder_tokenizer_and_vae(turbo: Engine, base: Engine) -> None:
    assert base.shared == {"text_encoder": True, "vae": True, "tokenizer": True}
    assert base.pipe.text_encoder is turbo.pipe.text_encoder
    assert base.pipe.vae is turbo.pipe.vae
    assert base.pipe.tokenizer is turbo.pipe.tokenizer
    assert base.pipe.transformer is not turbo.pipe.transformer
    # One prompt encoder (one lock) and one cache: a prompt encoded for one model is a hit for the other.
    assert base.encoder is turbo.encoder
    assert base.embedding_cache is turbo.embedding_cache


def test_shared_components_count_once_in_memory(turbo: Engine, base: Engine) -> None:
    together = parameter_bytes([*turbo.modules(), *base.modules()])
    turbo_alone = parameter_bytes(turbo.modules())
    base_transformer = parameter_bytes([base.pipe.transformer])
    shared = parameter_bytes([turbo.pipe.text_encoder, turbo.pipe.vae])
    copies = turbo_alone + parameter_bytes(base.modules())
    print(
        f"\nmemory: Turbo {turbo_alone} B, Base transformer {base_transformer} B, both {together} B "
        f"(text encoder + VAE {shared} B held once; two copies would be {copies} B)"
    )
    assert together == turbo_alone + base_transformer
    assert together == parameter_bytes(turbo.modules()) + parameter_bytes(base.modules()) - shared


def test_the_embedding_cache_serves_both_models(turbo: Engine, base: Engine) -> None:
    prompt = "a lighthouse on a cliff, cached once for two models"
    cache = turbo.embedding_cache
    assert cache is not None
    generate(turbo, [request(prompt, (1,))])
    before = cache.stats()
    generate(base, [cfg(prompt, (1,))])  # the prompt hits; only the (empty) negative may miss
    after = cache.stats()
    assert after.hits - before.hits >= 1
    assert after.misses - before.misses <= 1


def test_base_batch_equals_direct_calls(base: Engine, base_reference: ZImagePipeline) -> None:
    requests = [
        cfg(EN_SHORT, (31, 32), negative="blurry, low quality"),
        cfg(EN_LONG, (33,)),  # no negative: the pipeline's "" then
        cfg(ZH, (34,), negative="cartoon"),
        cfg(EN_SHORT, (35,), negative="cartoon"),
    ]
    batches = generate(base, requests)
    for req, images in zip(requests, batches, strict=True):
        for seed, image in zip(req.seeds, images, strict=True):
            assert diff(image, single(base_reference, req, seed)) <= TOLERANCE, (req.prompt, req.negative_prompt, seed)


def test_a_base_image_is_the_same_in_any_batch(base: Engine, base_reference: ZImagePipeline) -> None:
    alone = cfg(EN_SHORT, (41,), negative="blurry")
    crowd = [cfg(ZH, (42, 43), negative="sharp"), alone, cfg(EN_LONG, (44,))]
    by_itself = generate(base, [alone])[0][0]
    in_crowd = generate(base, crowd)[1][0]
    assert diff(by_itself, in_crowd) <= TOLERANCE
    assert diff(by_itself, single(base_reference, alone, 41)) <= TOLERANCE


def test_the_comparison_tells_models_and_negatives_apart(
    base_reference: ZImagePipeline, reference: ZImagePipeline
) -> None:
    # Guards the tests above: Base is not Turbo, and the negative prompt moves the image.
    req = cfg(EN_SHORT, (51,), negative="blurry")
    image = single(base_reference, req, 51)
    assert diff(image, single(reference, req, 51)) > 4 * TOLERANCE
    assert diff(image, single(base_reference, cfg(EN_SHORT, (51,), negative="vivid colours"), 51)) > TOLERANCE


def test_a_base_with_other_components_loads_its_own(turbo: Engine, tmp_path: Path) -> None:
    other = build_tiny_base(tmp_path / "other-base", seed=7, transformer_seed=1)  # another text encoder and VAE
    engine = Engine.base_from_pretrained(str(other), OPTIONS, turbo=turbo)
    assert engine.shared == {"text_encoder": False, "vae": False, "tokenizer": False}
    assert engine.pipe.text_encoder is not turbo.pipe.text_encoder
    assert engine.encoder is not turbo.encoder
    # Still one cache, but keyed by each text encoder: the same prompt is two entries, never confused.
    assert engine.embedding_cache is turbo.embedding_cache
    assert engine.encoder.identity != turbo.encoder.identity


def test_base_alone_loads_everything(tiny_base_dir: Path) -> None:
    engine = Engine.base_from_pretrained(str(tiny_base_dir), OPTIONS, turbo=None)
    assert engine.shared == {"text_encoder": False, "vae": False, "tokenizer": False}
    assert len(images_of(engine.generate([cfg(EN_SHORT, (1,))])[0])) == 1
