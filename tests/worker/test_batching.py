"""Batch shapes: caption buckets, worker-style plans, call plans; a one-bucket call runs without attention mask."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline

from core.work import image_tokens
from tests.helpers.engine import EN_300, EN_LONG, EN_SHORT, SIZE, TOLERANCE, ZH, diff, images_of, request, single
from worker.engine import Engine, EngineOptions
from worker.engine.batching import caption_bucket, halves, plan_batches, plan_calls


@pytest.fixture(scope="module")
def engine(tiny_turbo_dir: Path) -> Engine:
    """An engine with the default call planning."""
    return Engine.from_pretrained(str(tiny_turbo_dir), EngineOptions(device="cpu", dtype="float32"))


@pytest.fixture
def masks(engine: Engine) -> Iterator[list[bool]]:
    """For each main-layer forward of the transformer: whether it got an attention mask."""
    seen: list[bool] = []

    def record(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(args[1] is not None)  # ZImageTransformerBlock.forward(x, attn_mask, freqs_cis, ...)

    handle = engine.pipe.transformer.layers[0].register_forward_pre_hook(record)
    yield seen
    handle.remove()


def test_caption_bucket_is_the_next_multiple_of_32() -> None:
    assert [caption_bucket(n) for n in (0, 1, 10, 32, 33, 64, 314, 512)] == [32, 32, 32, 32, 64, 64, 320, 512]


def test_image_tokens() -> None:
    assert image_tokens(1024, 1024) == 4096
    assert image_tokens(512, 512) == 1024
    assert image_tokens(256, 384) == 16 * 24


def test_plan_batches_keeps_order_key_budget_and_cap() -> None:
    # (name, key, tokens, images)
    jobs = [("a", 1, 4, 1), ("b", 2, 4, 1), ("c", 1, 4, 2), ("d", 1, 4, 1), ("e", 1, 20, 1), ("f", 2, 4, 1)]
    batches = plan_batches(
        jobs, key=lambda j: j[1], tokens=lambda j: j[2], images=lambda j: j[3], token_budget=12, max_images=3
    )
    names = [[j[0] for j in batch] for batch in batches]
    # a+c fill 3 images, so d opens a new batch; e alone exceeds the budget and still runs, alone.
    assert names == [["a", "c"], ["b", "f"], ["d"], ["e"]]


def test_plan_calls_splits_buckets_only_when_each_call_stays_full() -> None:
    # 512^2 images (1024 tokens): four per bucket fill a call, so the buckets run apart, without masks.
    assert plan_calls([32, 64, 32, 64, 32, 64, 32, 64], 1024, 4096) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    # The same batch at 256^2 (256 tokens) would underfill both: one (masked) call.
    assert plan_calls([32, 64, 32, 64, 32, 64, 32, 64], 256, 4096) == [list(range(8))]
    # 1024^2 images fill a call alone: every bucket its own call.
    assert plan_calls([96, 32], 4096, 4096) == [[1], [0]]
    # Small buckets are merged upwards until a call is full; a small remainder joins the last call.
    assert plan_calls([32, 64, 96, 96, 96, 96, 128], 1024, 4096) == [[0, 1, 2, 3, 4, 5, 6]]
    assert plan_calls([32] * 4 + [64] * 4 + [96], 1024, 4096) == [[0, 1, 2, 3], [4, 5, 6, 7, 8]]
    assert plan_calls([64, 32], 1024, 0) == [[1], [0]]


def test_plan_calls_keeps_long_captions_apart_at_small_sizes() -> None:
    # The tiny model on 2 cores (dim 64, saturated from 512 token equivalents) at 256^2: a 256-token caption
    # would double a short one's sequence, so buckets mostly run apart; the real model on an H100 merges more.
    buckets = [32] * 8 + [64] * 4 + [96] * 2 + [192, 256]
    assert plan_calls(buckets, 256, 512, model_dim=64) == [list(range(8)), [8, 9, 10, 11], [12, 13], [14], [15]]
    assert plan_calls(buckets, 256, 4096, model_dim=3840) == [list(range(12)), [12, 13, 14, 15]]


def test_halves() -> None:
    assert halves([1, 2, 3]) == ([1, 2], [3])
    assert halves([1, 2]) == ([1], [2])
    assert halves([1]) == ([1], [])


def test_one_bucket_runs_without_an_attention_mask(engine: Engine, masks: list[bool]) -> None:
    # EN_SHORT and ZH both have 10 caption tokens: bucket 32, same image size, so equal sequence lengths.
    engine.generate([request(EN_SHORT, (1, 2)), request(ZH, (3,))])
    assert masks == [False, False]
    masks.clear()
    # Buckets 32 and 320 run as two calls here, each without a mask ...
    engine.generate([request(EN_SHORT, (1,)), request(EN_300, (2,))])
    assert masks == [False] * 4


def test_merged_buckets_need_a_mask(tiny_turbo_dir: Path) -> None:
    # ... and the guard: sharing one call, they need one.
    merging = Engine.from_pretrained(
        str(tiny_turbo_dir), EngineOptions(device="cpu", dtype="float32", min_call_tokens=10**9)
    )
    seen: list[bool] = []
    handle = merging.pipe.transformer.layers[0].register_forward_pre_hook(
        lambda module, args: seen.append(args[1] is not None)
    )
    merging.generate([request(EN_SHORT, (1,)), request(EN_300, (2,))])
    handle.remove()
    assert seen == [True, True]


def test_split_and_merged_buckets_give_the_same_images(tiny_turbo_dir: Path, reference: ZImagePipeline) -> None:
    splitting = Engine.from_pretrained(
        str(tiny_turbo_dir), EngineOptions(device="cpu", dtype="float32", min_call_tokens=0)
    )
    merging = Engine.from_pretrained(
        str(tiny_turbo_dir), EngineOptions(device="cpu", dtype="float32", min_call_tokens=10**9)
    )
    requests = [request(EN_SHORT, (1, 2)), request(EN_300, (3,)), request(ZH, (4,)), request(EN_LONG, (5,))]
    passes: list[bool] = []
    handle = splitting.pipe.transformer.layers[0].register_forward_pre_hook(
        lambda module, args: passes.append(args[1] is not None)
    )
    split = splitting.generate(requests)
    handle.remove()
    # Three buckets (32, 64, 320): three calls of two steps, none masked.
    assert passes == [False] * 6
    merged = merging.generate(requests)
    for req, a, b in zip(requests, split, merged, strict=True):
        for seed, x, y in zip(req.seeds, images_of(a), images_of(b), strict=True):
            assert diff(x, y) <= TOLERANCE
            assert diff(x, single(reference, req, seed)) <= TOLERANCE


def test_progress_over_several_calls_is_monotonic_and_ends_at_steps(tiny_turbo_dir: Path) -> None:
    splitting = Engine.from_pretrained(
        str(tiny_turbo_dir), EngineOptions(device="cpu", dtype="float32", min_call_tokens=0)
    )
    seen: list[tuple[int, ...]] = []

    def record(steps: Sequence[int]) -> bool:
        seen.append(tuple(steps))
        return False

    splitting.generate([request(EN_SHORT, steps=4), request(EN_300, steps=4)], on_step=record)
    assert len(seen) == 8  # two calls (one per caption bucket), four steps each
    # Each request moves only while its own call runs, and never past its own steps.
    assert seen == [(1, 0), (2, 0), (3, 0), (4, 0), (4, 1), (4, 2), (4, 3), (4, 4)]


def test_plan_batches_on_requests_by_shape() -> None:
    small = [request(EN_SHORT, (i,)) for i in range(5)]
    large = [request(ZH, (i,), width=2 * SIZE, height=2 * SIZE) for i in range(3)]
    jobs = [small[0], large[0], *small[1:], *large[1:]]
    batches = plan_batches(
        jobs,
        key=lambda r: (r.width, r.height, r.steps, r.guidance_scale),
        tokens=lambda r: image_tokens(r.width, r.height) * len(r.seeds),
        images=lambda r: len(r.seeds),
        token_budget=2048,
        max_images=4,
    )
    assert [len(b) for b in batches] == [4, 2, 1, 1]
    assert batches[0][0] is small[0] and batches[1][0] is large[0]
