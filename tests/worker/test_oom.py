"""Out-of-memory resilience: a call that does not fit runs again in halves; one image that cannot fit fails alone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline

from core.errors import OutOfMemory
from tests.helpers.engine import EN_LONG, EN_SHORT, TOLERANCE, ZH, diff, images_of, request, single
from worker.engine import Engine, EngineOptions


def engine_with(tiny_turbo_dir: Path, **options: Any) -> Engine:
    """An engine on the tiny checkpoint with the given options."""
    return Engine.from_pretrained(str(tiny_turbo_dir), EngineOptions(device="cpu", dtype="float32", **options))


class CallSizes:
    """Records the batch size of every transformer pass."""

    def __init__(self, engine: Engine) -> None:
        self.sizes: list[int] = []
        self._handle = engine.pipe.transformer.register_forward_pre_hook(self._record)

    def _record(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self.sizes.append(len(args[0]))


def test_a_batch_of_four_splits_into_halves_and_matches_single_calls(
    tiny_turbo_dir: Path, reference: ZImagePipeline
) -> None:
    engine = engine_with(tiny_turbo_dir, oom_above_images=2)
    calls = CallSizes(engine)
    # Four short captions (one bucket), so the engine plans them as ONE call of four.
    requests = [request(EN_SHORT, (1,)), request(ZH, (2,)), request("a dog", (3,)), request("一只猫", (4,))]
    assert len({engine.caption_bucket(r.prompt) for r in requests}) == 1
    results = engine.generate(requests)
    # The call of 4 raised before running; its halves of 2 ran, two passes each.
    assert calls.sizes == [2, 2, 2, 2]
    for req, result in zip(requests, results, strict=True):
        assert diff(images_of(result)[0], single(reference, req, req.seeds[0])) <= TOLERANCE


def test_a_request_split_across_calls_still_matches_single_calls(
    tiny_turbo_dir: Path, reference: ZImagePipeline
) -> None:
    engine = engine_with(tiny_turbo_dir, oom_above_images=1)
    req = request(EN_LONG, (5, 6, 7))
    (result,) = engine.generate([req])
    images = images_of(result)
    assert len(images) == 3
    for seed, image in zip(req.seeds, images, strict=True):
        assert diff(image, single(reference, req, seed)) <= TOLERANCE


def test_when_nothing_fits_every_request_is_out_of_memory(tiny_turbo_dir: Path) -> None:
    engine = engine_with(tiny_turbo_dir, oom_above_images=0)
    calls = CallSizes(engine)
    results = engine.generate([request(EN_SHORT, (1, 2)), request(ZH, (3,))])
    assert all(isinstance(result, OutOfMemory) for result in results)
    assert "out of memory" in results[0].message and "256x256" in results[0].message  # type: ignore[union-attr]
    assert calls.sizes == []
    # The engine stays usable: the next batch, once it fits, runs.
    engine.options = replace(engine.options, oom_above_images=None)
    assert len(images_of(engine.generate([request(EN_SHORT, (1,))])[0])) == 1


def test_one_image_that_cannot_fit_fails_only_its_request(
    tiny_turbo_dir: Path, reference: ZImagePipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_with(tiny_turbo_dir)
    poison_seed = 12
    real = engine._denoise_and_decode

    def denoise(prepared: Any, shape: Any, indices: list[int], progress: Any) -> Any:
        # Any call holding the poison image runs out of memory, however small.
        if any(prepared.images[i].seed == poison_seed for i in indices):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore advice")
        return real(prepared, shape, indices, progress)

    monkeypatch.setattr(engine, "_denoise_and_decode", denoise)
    seen: list[tuple[int, ...]] = []

    def record(steps: Sequence[int]) -> bool:
        seen.append(tuple(steps))
        return False

    requests = [request(EN_SHORT, (11, poison_seed, 13)), request(ZH, (14,)), request(EN_LONG, (15, 16))]
    results = engine.generate(requests, on_step=record)
    assert isinstance(results[0], OutOfMemory)
    assert results[0].message.endswith("CUDA out of memory. Tried to allocate 20.00 GiB")
    for req, result in zip(requests[1:], results[1:], strict=True):
        for seed, image in zip(req.seeds, images_of(result), strict=True):
            assert diff(image, single(reference, req, seed)) <= TOLERANCE
    # The two requests that ran end at their own step count; no request ever reads past it.
    assert seen[-1][1:] == (2, 2)
    assert all(step <= 2 for steps in seen for step in steps)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_oom_above_images_is_checked(tiny_turbo_dir: Path, bad: Any) -> None:
    with pytest.raises(ValueError, match="oom_above_images"):
        engine_with(tiny_turbo_dir, oom_above_images=bad)
