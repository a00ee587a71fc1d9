"""Fast mode (Cache-DiT, static step mask) on the tiny checkpoint: the blocks computed per step follow cache-dit's
mask for the batch's own step count, a fast image is the same whatever its batch, exact jobs around fast ones stay
the bare model's images, and no ZImagePipeline (class or other instance) is touched."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline
from PIL import Image

from tests.helpers.engine import EN_LONG, EN_SHORT, TOLERANCE, ZH, diff, images_of, request, single
from worker.engine import Engine, EngineOptions, ImageRequest
from worker.engine.fast import FN_BLOCKS, MASK_POLICY, fast_mask, skipped_fraction

cache_dit = pytest.importorskip("cache_dit")

BARE_CALL = ZImagePipeline.__call__


@pytest.fixture(scope="module")
def engine(tiny_turbo_dir: Path) -> Engine:
    return Engine.from_pretrained(str(tiny_turbo_dir), EngineOptions(device="cpu", dtype="float32"))


@pytest.fixture
def blocks(engine: Engine) -> Iterator[list[list[int]]]:
    """The main blocks computed in each transformer forward (one list per denoising step) during one test."""
    transformer = engine.pipe.transformer
    steps: list[list[int]] = []
    handles = [transformer.register_forward_pre_hook(lambda *_: steps.append([]))]
    for index, block in enumerate(transformer.layers):
        handles.append(block.register_forward_hook(lambda *_, i=index: steps[-1].append(i)))
    yield steps
    for handle in handles:
        handle.remove()


def fast(prompt: str = EN_SHORT, seeds: tuple[int, ...] = (0,), steps: int = 8) -> ImageRequest:
    return request(prompt, seeds, steps=steps, acceleration="cache")


def run(engine: Engine, *requests: ImageRequest) -> list[list[Image.Image]]:
    return [images_of(result) for result in engine.generate(list(requests))]


def test_the_static_mask_decides_the_blocks_of_every_step(engine: Engine, blocks: list[list[int]]) -> None:
    layers = len(engine.pipe.transformer.layers)
    for steps in (8, 12, 8):  # a step count other than the last call's gets its own mask, not the previous one's
        blocks.clear()
        run(engine, fast(steps=steps))
        mask = fast_mask(steps)
        assert list(mask) == cache_dit.steps_mask(total_steps=steps, mask_policy=MASK_POLICY)
        assert 0 in mask and mask[0] == mask[-1] == 1
        assert [len(b) for b in blocks] == [layers if m else FN_BLOCKS for m in mask], steps
        assert all(b == list(range(len(b))) for b in blocks)  # the first blocks, in order
        skipped = sum(layers - len(b) for b in blocks) / (steps * layers)
        assert skipped == pytest.approx(skipped_fraction(steps, layers)) and skipped > 0
    blocks.clear()
    run(engine, request(steps=8))  # exact: every block of every step
    assert [len(b) for b in blocks] == [layers] * 8


def test_a_fast_image_is_the_same_whatever_its_batch(engine: Engine) -> None:
    (alone,) = run(engine, fast(EN_SHORT, (11,)))
    # Other prompts (another caption bucket among them) and seeds around it, and other fast calls before it.
    batch = run(engine, fast(ZH, (5, 6)), fast(EN_SHORT, (3, 11)), fast(EN_LONG, (7,)))
    assert diff(batch[1][1], alone[0]) <= TOLERANCE
    (again,) = run(engine, fast(EN_SHORT, (11,)))
    assert diff(again[0], alone[0]) <= TOLERANCE
    # The seeds still differ, and the cache changed the image: the comparisons could tell.
    assert diff(batch[1][0], alone[0]) > 4 * TOLERANCE
    (exact,) = run(engine, request(EN_SHORT, (11,), steps=8))
    assert diff(exact[0], alone[0]) > TOLERANCE


def test_exact_jobs_around_fast_ones_are_the_bare_model(tiny_turbo_dir: Path, reference: ZImagePipeline) -> None:
    engine = Engine.from_pretrained(str(tiny_turbo_dir), EngineOptions(device="cpu", dtype="float32"))
    exact = request(EN_SHORT, (21, 22), steps=8)
    (before,) = run(engine, exact)
    assert not engine.fast.installed
    run(engine, fast(EN_SHORT, (21,)), fast(ZH, (4,)))
    assert engine.fast.installed and engine.fast.calls == 1
    twin = Engine(engine.pipe, model_id="twin", options=engine.options)  # another engine on the same modules
    assert twin.fast is engine.fast
    (after,) = run(engine, exact)
    for seed, b, a in zip(exact.seeds, before, after, strict=True):
        assert a.tobytes() == b.tobytes()  # bit for bit the engine's own exact image
        assert diff(a, single(reference, exact, seed)) <= TOLERANCE  # and the plain pipeline's
    # Enabled on the transformer alone: ZImagePipeline's class is untouched, so is every other instance.
    assert ZImagePipeline.__call__ is BARE_CALL and not hasattr(ZImagePipeline, "_original_call")
    assert "forward" not in vars(engine.pipe.transformer)  # the bare forward between fast batches
    assert not hasattr(reference.transformer, "_context_manager")


def test_fast_and_exact_requests_do_not_share_a_call(engine: Engine) -> None:
    from core.errors import InvalidInput

    with pytest.raises(InvalidInput, match="acceleration"):
        engine.prepare([fast(steps=8), request(steps=8)])


def test_base_runs_fast_with_cfg_beside_turbo(engine: Engine, tiny_base_dir: Path, blocks: list[list[int]]) -> None:
    # A second transformer in the process (Base's, holding Turbo's text encoder): its own cache, one forward per
    # step for the doubled CFG batch, and its images independent of their batch like Turbo's.
    base = Engine.base_from_pretrained(str(tiny_base_dir), engine.options, turbo=engine)
    run(engine, fast(steps=8))  # Turbo's cache installed first
    steps = 12

    def cfg(prompt: str, seeds: tuple[int, ...], negative: str = "blurry") -> ImageRequest:
        return request(prompt, seeds, steps=steps, guidance_scale=4.0, negative_prompt=negative, acceleration="cache")

    (alone,) = run(base, cfg(EN_SHORT, (8,)))
    blocks.clear()  # counts Turbo's blocks only: Base's must not touch them
    batch = run(base, cfg(ZH, (1,), ""), cfg(EN_SHORT, (8,)))
    assert blocks == [] and base.fast is not engine.fast and base.fast.installed
    assert diff(batch[1][0], alone[0]) <= TOLERANCE
    (exact,) = run(base, request(EN_SHORT, (8,), steps=steps, guidance_scale=4.0, negative_prompt="blurry"))
    assert diff(exact[0], alone[0]) > TOLERANCE
    layers = len(base.pipe.transformer.layers)
    counted: list[int] = []
    handles = [b.register_forward_hook(lambda *_: counted.append(1)) for b in base.pipe.transformer.layers]
    try:
        run(base, cfg(EN_SHORT, (8,)))
    finally:
        for handle in handles:
            handle.remove()
    assert len(counted) == sum(layers if m else FN_BLOCKS for m in fast_mask(steps))
