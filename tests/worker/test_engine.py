"""The engine: one pipeline call per batch, each image equal to its single call, exact steps and cancel."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline
from PIL import Image

from core.errors import InvalidInput
from tests.helpers.engine import EN_300, EN_LONG, EN_SHORT, SIZE, TOLERANCE, ZH, diff, images_of, request, single
from worker.engine import BatchInterrupted, Engine, EngineOptions, ImageRequest
from worker.engine.options import resolve_device, resolve_dtype


@pytest.fixture(scope="module")
def engine(tiny_turbo_dir: Path) -> Engine:
    """An engine on the tiny checkpoint, loaded as the worker loads the real one."""
    return Engine.from_pretrained(str(tiny_turbo_dir), EngineOptions(device="cpu", dtype="float32"))


@pytest.fixture
def passes(engine: Engine) -> Iterator[list[int]]:
    """Counts the engine's transformer forward passes during one test."""
    count = [0]
    handle = engine.pipe.transformer.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    yield count
    handle.remove()


def generate(engine: Engine, requests: list[ImageRequest], **kwargs: Any) -> list[list[Image.Image]]:
    """engine.generate, every request expected to succeed."""
    return [images_of(result) for result in engine.generate(requests, **kwargs)]


def test_batch_equals_single_calls(engine: Engine, reference: ZImagePipeline, passes: list[int]) -> None:
    requests = [request(EN_SHORT, (11, 12)), request(EN_LONG, (13,)), request(ZH, (14, 15))]
    batches = generate(engine, requests)
    # One pipeline call per caption bucket (32: EN_SHORT and ZH; 64: EN_LONG), one pass per step: not per image.
    assert passes[0] == 2 * 2
    assert [len(images) for images in batches] == [2, 1, 2]
    for req, images in zip(requests, batches, strict=True):
        for seed, image in zip(req.seeds, images, strict=True):
            assert diff(image, single(reference, req, seed)) <= TOLERANCE, (req.prompt, seed)


def test_the_comparison_can_tell_prompts_and_seeds_apart(reference: ZImagePipeline) -> None:
    # Guards the test above: with a tolerance wider than the prompt's effect it would prove nothing.
    base = single(reference, request(EN_SHORT), seed=11)
    assert diff(base, single(reference, request(ZH), seed=11)) > 4 * TOLERANCE
    assert diff(base, single(reference, request(EN_LONG), seed=11)) > 4 * TOLERANCE
    assert diff(base, single(reference, request(EN_SHORT), seed=12)) > 4 * TOLERANCE


def test_guidance_uses_each_requests_negative_prompt(engine: Engine, reference: ZImagePipeline) -> None:
    requests = [
        request(EN_SHORT, (21,), guidance_scale=1.5, negative_prompt="blurry"),
        request(ZH, (22,), guidance_scale=1.5),
    ]
    batches = generate(engine, requests)
    for req, images in zip(requests, batches, strict=True):
        assert diff(images[0], single(reference, req, req.seeds[0])) <= TOLERANCE
    other_negative = request(EN_SHORT, (21,), guidance_scale=1.5, negative_prompt="sharp, colourful")
    assert diff(batches[0][0], single(reference, other_negative, 21)) > TOLERANCE


def test_eight_steps_run_eight_transformer_passes(engine: Engine, passes: list[int]) -> None:
    engine.generate([request(steps=8, seeds=(1, 2)), request(ZH, (3,), steps=8)])
    assert passes[0] == 8


def test_on_step_reports_every_step(engine: Engine) -> None:
    calls: list[tuple[int, ...]] = []

    def record(steps: Sequence[int]) -> bool:
        calls.append(tuple(steps))
        return False

    images = generate(engine, [request(steps=4), request(ZH, steps=4)], on_step=record)
    assert calls == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert len(images[0]) == 1 and len(images[1]) == 1


def test_on_step_true_interrupts_the_batch(engine: Engine, passes: list[int]) -> None:
    calls: list[int] = []

    def cancel_after_three(steps: Sequence[int]) -> bool:
        calls.append(steps[0])
        return steps[0] == 3

    with pytest.raises(BatchInterrupted) as info:
        engine.generate([request(steps=8, seeds=(1, 2))], on_step=cancel_after_three)
    assert passes[0] == 3
    assert calls == [1, 2, 3]
    assert "3/8" in info.value.message
    # The next batch runs in full: the pipeline's interrupt flag does not leak into it.
    passes[0] = 0
    assert len(generate(engine, [request(steps=2)])[0]) == 1
    assert passes[0] == 2


@pytest.mark.parametrize(
    "other",
    [{"width": 2 * SIZE}, {"height": 2 * SIZE}, {"steps": 3}, {"guidance_scale": 1.5}],
    ids=["width", "height", "steps", "guidance"],
)
def test_incompatible_requests_are_refused(engine: Engine, passes: list[int], other: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput, match="share"):
        engine.generate([request(), request(ZH, **other)])
    assert passes[0] == 0


@pytest.mark.parametrize("bad", [{"width": 250}, {"height": 0}, {"steps": 0}, {"seeds": ()}, {"guidance_scale": -1.0}])
def test_invalid_requests_are_refused(engine: Engine, bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        engine.generate([request(**bad)])


def test_generate_twice_gives_the_same_images(engine: Engine) -> None:
    # ZImagePipeline rewrites a list prompt in place; reusing a list would wrap the prompt twice.
    requests = [request(EN_SHORT, (5, 6)), request(ZH, (7,))]
    first = generate(engine, requests)
    second = generate(engine, requests)
    for a, b in zip(sum(first, []), sum(second, []), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(("width", "height"), [(256, 384), (384, 256)])
def test_output_has_the_requested_size(engine: Engine, width: int, height: int) -> None:
    images = generate(engine, [request(width=width, height=height, seeds=(1, 2))])
    assert [image.size for image in images[0]] == [(width, height)] * 2
    assert all(image.mode == "RGB" for image in images[0])


def test_empty_batch(engine: Engine) -> None:
    assert engine.generate([]) == []


def test_load_count_and_warmup(engine: Engine, reference: ZImagePipeline, passes: list[int]) -> None:
    assert engine.load_count == 1
    assert Engine(reference, model_id="x").load_count == 0
    engine.warmup()
    assert passes[0] == 1


def test_resolve_device_and_dtype() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="device"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")


def test_engine_runs_without_the_service_packages() -> None:
    # A bare GPU host has only torch, diffusers and friends (and this repository, whose pure core modules the
    # engine shares: errors, status, work): simulate it by hiding the service packages.
    code = (
        "import sys\n"
        "for name in ['celery', 'kombu', 'redis', 'sqlalchemy', 'pydantic', 'pydantic_settings', 'boto3',\n"
        "             'botocore', 'fastapi', 'starlette', 'psycopg', 'api']:\n"
        "    sys.modules[name] = None\n"
        "import worker.engine, worker.encode, deploy.tiny_checkpoint\n"
        "assert {m for m in sys.modules if m.startswith('core')} <= {'core', 'core.errors', 'core.status',"
        " 'core.work'}\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=120)


def test_mixed_lengths_and_seeds_equal_single_calls(engine: Engine, reference: ZImagePipeline) -> None:
    assert engine.caption_bucket(EN_300) == 320 and engine.caption_bucket(EN_SHORT) == 32
    requests = [request(EN_300, (31, 32)), request(EN_SHORT, (33,)), request(ZH, (34, 35, 36)), request(EN_LONG, (37,))]
    batches = engine.generate(requests)
    for req, result in zip(requests, batches, strict=True):
        images = images_of(result)
        assert len(images) == len(req.seeds)
        for seed, image in zip(req.seeds, images, strict=True):
            assert diff(image, single(reference, req, seed)) <= TOLERANCE, (req.prompt[:20], seed)


@pytest.mark.parametrize("others", [0, 1, 3])
def test_an_image_does_not_depend_on_its_batch(engine: Engine, reference: ZImagePipeline, others: int) -> None:
    target = request(EN_300, (77,))
    companions = [request(EN_SHORT, (1,)), request(ZH, (2, 3)), request(EN_LONG, (4,))][:others]
    batch = [*companions[:1], target, *companions[1:]]
    image = images_of(engine.generate(batch)[batch.index(target)])[0]
    assert diff(image, single(reference, target, 77)) <= TOLERANCE


def test_prepare_then_run_equals_generate(engine: Engine) -> None:
    requests = [request(EN_SHORT, (5, 6)), request(ZH, (7,))]
    prepared = engine.prepare(requests)
    assert [item.seed for item in prepared.images] == [5, 6, 7]
    assert [item.request for item in prepared.images] == [0, 0, 1]
    # A prepared batch is plain data: running it twice gives the same images.
    first, second = engine.run(prepared), engine.run(prepared)
    direct = engine.generate(requests)
    flat = [[np.asarray(im) for result in results for im in images_of(result)] for results in (first, second, direct)]
    assert len(flat[0]) == 3
    for a, b, c in zip(*flat, strict=True):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    assert engine.run(engine.prepare([])) == []


def test_busy_seconds_counts_run_only(engine: Engine) -> None:
    before = engine.busy_seconds
    prepared = engine.prepare([request(steps=2)])
    assert engine.busy_seconds == before  # prepare is not accelerator work of a run
    started = time.perf_counter()
    engine.run(prepared)
    elapsed = time.perf_counter() - started
    assert 0 < engine.busy_seconds - before <= elapsed


def test_prepare_runs_safely_while_a_batch_runs(engine: Engine, reference: ZImagePipeline) -> None:
    # The worker prepares batch N+1 in a thread while batch N denoises: both must give correct images.
    running = [request(EN_LONG, (41, 42), steps=4)]
    following = [request(EN_300, (43,), steps=4), request(ZH, (44,), steps=4)]
    prepared_next: list[Any] = []
    thread = threading.Thread(target=lambda: prepared_next.append(engine.prepare(following)))

    def start_preparing(steps: Sequence[int]) -> bool:
        if steps[0] == 1:
            thread.start()
        return False

    threads_before = torch.get_num_threads()
    current = engine.generate(running, on_step=start_preparing)
    thread.join(timeout=60)
    # The background prepare limited its own thread to one intra-op thread; this thread keeps its setting.
    assert torch.get_num_threads() == threads_before
    after = engine.run(prepared_next[0])
    for reqs, results in ((running, current), (following, after)):
        for req, result in zip(reqs, results, strict=True):
            for seed, image in zip(req.seeds, images_of(result), strict=True):
                assert diff(image, single(reference, req, seed)) <= TOLERANCE


def test_bfloat16_batches_equal_single_calls() -> None:
    # Half precision rounds differently for other attention key lengths, masks and decode batch sizes: the
    # engine then encodes each prompt alone at 512, keeps caption buckets apart and decodes one image at a time.
    # The random-weight pipeline of bench.gpu (N(0, 0.02) weights) is sensitive enough to show it.
    from bench import workloads
    from bench.gpu import TINY_SCALE, build_pipeline

    torch.manual_seed(0)  # the weights are random: fixed, so the drift the guard below needs is there every run
    pipe = build_pipeline(TINY_SCALE, torch.device("cpu"), torch.bfloat16)
    jobs = workloads.mixed(12, SIZE)
    direct = [single(pipe, job, job.seeds[0]) for job in jobs]
    engine = Engine(pipe, model_id="bf16")
    assert not engine.encoder.pad_to_longest and not engine.merge_buckets
    batched = [images[0] for images in generate(engine, jobs)]
    assert max(diff(a, b) for a, b in zip(batched, direct, strict=True)) <= TOLERANCE
    # The guard: with float32's choice, a prompt encoded alone pads to its own length (+1) and drifts in bf16.
    loose = Engine(pipe, model_id="bf16-loose", options=EngineOptions(device="cpu", pad_to_longest=True))
    drifted = [generate(loose, [job])[0][0] for job in jobs]
    assert max(diff(a, b) for a, b in zip(drifted, direct, strict=True)) > TOLERANCE
