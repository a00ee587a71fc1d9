"""A mixed queue of adapter jobs: the naive way (load, generate, unload per job) against the engine (adapters
loaded once and switched per batch), on the tiny checkpoint on the CPU; ``bench.gpu`` reuses ``measure`` at full
size with rank-32 adapters.

Usage: ``python -m bench.adapter_bench --out bench/results/adapters.json`` (about a minute on 2 cores).

The queue interleaves bare jobs, adapter A and adapter B (one image each, one prompt, seeds apart). Rows:
- naive: ``pipe.load_lora_weights(file)`` + ``set_adapters`` before an adapter job, ``pipe(...)``, then
  ``unload_lora_weights()``, job by job, as a script without a cache does it;
- engine, job by job: the engine in queue order, adapters cached (a switch at every job, no batching);
- engine, batched: the worker's way: jobs grouped by adapter set (the claim's group key), one switch per batch.
Figures: the switch between two cached adapters (median of 200), one denoising step of a one-image call, their
ratio, and one adapter load (what the naive way pays per job). ``--full-size-switch`` adds the switch and load
on the full-size 6B transformer (uninitialised bf16 weights on the CPU: a switch runs no kernel, only peft's
per-layer bookkeeping, so it costs the same there as beside a GPU) with two rank-32 adapters.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline

from bench import report
from worker.engine import Adapter, Engine, EngineOptions, ImageRequest, LoraUse

DEFAULT_CHECKPOINT = Path("checkpoints/tiny/turbo")
COLUMNS = ("variant", "jobs", "seconds", "s/job", "x naive", "adapter loads", "switches")
PROMPT = "a lighthouse on a cliff at dusk, oil painting"


@dataclass(frozen=True)
class QueuedJob:
    """One job of the mixed queue: its request and its adapter (None: bare) at scale 1."""

    request: ImageRequest
    adapter: str | None


def mixed_queue(count: int, size: int, steps: int, names: Sequence[str]) -> list[QueuedJob]:
    """``count`` one-image jobs cycling bare, then each adapter in ``names``."""
    cycle = [None, *names]
    return [
        QueuedJob(ImageRequest(PROMPT, size, size, steps, 0.0, (100 + i,)), cycle[i % len(cycle)]) for i in range(count)
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_naive(pipe: ZImagePipeline, queue: Sequence[QueuedJob], files: dict[str, Path]) -> float:
    """Load, generate, unload per job; returns seconds."""
    device = pipe._execution_device
    _sync(device)
    started = time.perf_counter()
    for job in queue:
        r = job.request
        if job.adapter is not None:
            pipe.load_lora_weights(str(files[job.adapter]), adapter_name=job.adapter)
            pipe.set_adapters([job.adapter], [1.0])
        pipe(
            prompt=r.prompt, width=r.width, height=r.height, num_inference_steps=r.steps, guidance_scale=0.0,
            generator=torch.Generator("cpu").manual_seed(r.seeds[0]),
        )  # fmt: skip
        if job.adapter is not None:
            pipe.unload_lora_weights()
    _sync(device)
    return time.perf_counter() - started


def _requests(queue: Sequence[QueuedJob], adapters: dict[str, Adapter]) -> list[ImageRequest]:
    return [replace(j.request, loras=(LoraUse(adapters[j.adapter], 1.0),) if j.adapter else ()) for j in queue]


def run_engine(engine: Engine, queue: Sequence[QueuedJob], adapters: dict[str, Adapter], *, batched: bool) -> float:
    """The engine job by job or batched by adapter set (in order of first appearance); returns seconds."""
    requests = _requests(queue, adapters)
    if batched:
        groups: dict[Any, list[ImageRequest]] = {}
        for request in requests:
            groups.setdefault(tuple(u.key for u in request.loras), []).append(request)
        batches = list(groups.values())
    else:
        batches = [[request] for request in requests]
    _sync(engine.device)
    started = time.perf_counter()
    for batch in batches:
        engine.generate(batch)
    _sync(engine.device)
    return time.perf_counter() - started


def switch_figures(
    engine: Engine, adapters: dict[str, Adapter], size: int, repeats: int = 200
) -> dict[str, float | None]:
    """Median milliseconds of a switch between two cached adapters, of one denoising step, and of one load."""
    a, b = list(adapters.values())[:2]
    slots = engine.adapters
    slots.activate([LoraUse(a, 1.0)])
    slots.activate([LoraUse(b, 1.0)])
    samples = []
    for i in range(repeats):
        use = LoraUse(a if i % 2 == 0 else b, 1.0)
        _sync(engine.device)
        started = time.perf_counter()
        slots.activate([use])
        _sync(engine.device)
        samples.append(time.perf_counter() - started)
    switch_ms = statistics.median(samples) * 1000
    slots.activate([])
    # One step: a two-step call minus a one-step call (prompt cached, same size, one image).
    one = ImageRequest(PROMPT, size, size, 1, 0.0, (1,))
    timings: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(5):
        for steps in (1, 2):
            _sync(engine.device)
            started = time.perf_counter()
            engine.generate([replace(one, steps=steps)])
            _sync(engine.device)
            timings[steps].append(time.perf_counter() - started)
    step_ms = max(0.0, statistics.median(timings[2]) - statistics.median(timings[1])) * 1000
    # One load of a fresh adapter (what a cache miss, and every naive adapter job, costs).
    fresh = Adapter(f"{a.name}-copy", a.state, a.metadata, a.nbytes)
    _sync(engine.device)
    started = time.perf_counter()
    slots.activate([LoraUse(fresh, 1.0)])
    _sync(engine.device)
    load_ms = (time.perf_counter() - started) * 1000
    slots.activate([])
    return {
        "switch_ms": round(switch_ms, 3),
        "step_ms": round(step_ms, 2),
        "switch_per_step": round(switch_ms / step_ms, 4) if step_ms else None,
        "load_ms": round(load_ms, 1),
    }


def full_size_switch(rank: int = 32, repeats: int = 40) -> dict[str, float]:
    """Switch and load milliseconds on the full-size transformer with two random rank-``rank`` adapters on every
    attention and feed-forward projection (no forward pass: the weights are left uninitialised)."""
    from accelerate import init_empty_weights
    from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel

    from core.adapter_shapes import ZIMAGE_TRANSFORMER, linear_layers
    from deploy.tiny_adapter import random_lora
    from worker.engine import AdapterSlots

    with init_empty_weights():
        transformer = ZImageTransformer2DModel(**ZIMAGE_TRANSFORMER)
    torch.nn.Module.to(transformer, dtype=torch.bfloat16)
    transformer.to_empty(device="cpu")
    transformer.requires_grad_(False)
    layers = linear_layers(ZIMAGE_TRANSFORMER)
    pair = [Adapter(f"full-{seed}", random_lora(layers, rank=rank, seed=seed), None, 0) for seed in (1, 2)]
    slots = AdapterSlots(transformer, 8 << 30)
    started = time.perf_counter()
    slots.activate([LoraUse(pair[0], 1.0)])
    load_ms = (time.perf_counter() - started) * 1000
    slots.activate([LoraUse(pair[1], 1.0)])
    samples = []
    for i in range(repeats):
        started = time.perf_counter()
        slots.activate([LoraUse(pair[i % 2], 1.0)])
        samples.append(time.perf_counter() - started)
    started = time.perf_counter()
    slots.activate([])
    disable_ms = (time.perf_counter() - started) * 1000
    return {
        "rank": rank,
        "lora_layers": sum(
            1 for name in layers if name.endswith(("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"))
        ),
        "switch_ms": round(statistics.median(samples) * 1000, 2),
        "disable_ms": round(disable_ms, 2),
        "load_ms": round(load_ms, 1),
        "adapter_mib": round(pair[0].parameters() * 2 / 2**20, 1),
    }


def measure(
    pipe: ZImagePipeline,
    engine: Engine,
    files: dict[str, Path],
    *,
    jobs: int,
    size: int,
    steps: int,
    log: Callable[[str], None],
    rounds: int = 3,
) -> tuple[list[dict[str, Any]], dict[str, float | None]]:
    """The three rows (medians of ``rounds``) and the switch figures. ``pipe`` is a plain pipeline for the naive
    row with a transformer of its own (unloading adapters from it must not touch the engine's)."""
    adapters = {name: Adapter.from_bytes(f"bench-{name}", path.read_bytes()) for name, path in files.items()}
    queue = mixed_queue(jobs, size, steps, list(files))
    # Warm both paths (kernels, the prompt's embedding, the adapters' first load in the engine).
    run_naive(pipe, queue[: len(files) + 1], files)
    run_engine(engine, queue[: len(files) + 1], adapters, batched=True)
    variants = ("naive", "engine, job by job", "engine, batched by adapter set")
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    counts: dict[str, tuple[int, int]] = {}
    # Rounds alternate the variants, and each row is the median of its rounds: a shared machine's drift hits
    # them all alike.
    for round_ in range(rounds):
        seconds["naive"].append(run_naive(pipe, queue, files))
        for name, batched in zip(variants[1:], (False, True), strict=True):
            loads, switches = engine.adapters.loads, engine.adapters.switches
            seconds[name].append(run_engine(engine, queue, adapters, batched=batched))
            counts[name] = (engine.adapters.loads - loads, engine.adapters.switches - switches)
        log(f"round {round_ + 1}: " + ", ".join(f"{n} {seconds[n][-1]:.2f} s" for n in variants))
    naive_s = statistics.median(seconds["naive"])
    adapter_jobs = sum(1 for job in queue if job.adapter is not None)
    rows = [_row("naive: load, generate, unload per job", jobs, naive_s, naive_s, adapter_jobs, None)]
    for name in variants[1:]:
        rows.append(_row(name, jobs, statistics.median(seconds[name]), naive_s, *counts[name]))
    return rows, switch_figures(engine, adapters, size)


def _row(variant: str, jobs: int, seconds: float, naive_s: float, loads: int, switches: int | None) -> dict[str, Any]:
    return {
        "variant": variant,
        "jobs": jobs,
        "seconds": round(seconds, 2),
        "s/job": round(seconds / jobs, 3),
        "x naive": round(naive_s / seconds, 2),
        "adapter loads": loads,
        "switches": switches,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.adapter_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/adapters.json"))
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--full-size-switch", action="store_true", help="also time a switch on the 6B transformer")
    args = parser.parse_args(argv)
    from deploy.tiny_adapter import build_tiny_adapter

    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    folder = args.out.parent / "adapters"
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        n: build_tiny_adapter(args.checkpoint, folder / f"{n}.safetensors", seed=s) for n, s in (("a", 1), ("b", 2))
    }
    pipe = ZImagePipeline.from_pretrained(args.checkpoint, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    engine = Engine.from_pretrained(str(args.checkpoint), EngineOptions(device="cpu", dtype="float32"))
    rows, figures = measure(
        pipe, engine, files, jobs=args.jobs, size=args.size, steps=args.steps, log=log, rounds=args.rounds
    )
    print(report.table(rows, COLUMNS))
    print(
        f"switch between cached adapters: {figures['switch_ms']} ms; one denoising step ({args.size}², one image):"
        f" {figures['step_ms']} ms; ratio {figures['switch_per_step']}; one adapter load: {figures['load_ms']} ms"
    )
    full = full_size_switch() if args.full_size_switch else None
    if full is not None:
        print(
            f"full size ({full['lora_layers']} LoRA layers, rank {full['rank']}, {full['adapter_mib']} MiB each):"
            f" switch {full['switch_ms']} ms, disable {full['disable_ms']} ms, load {full['load_ms']} ms"
        )
    report.write_json(args.out, {"bench": "adapters", "rows": rows, "switch": figures, "full_size": full,
                                 "settings": {"size": args.size, "steps": args.steps, "jobs": args.jobs}})  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
