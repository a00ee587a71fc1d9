"""The naive diffusers loop against the engine on the same jobs, on the tiny checkpoint on the CPU.

Usage: ``python -m bench.engine_bench --out bench/results/engine.json`` (about 2-4 minutes on 2 cores).

Naive: one ``pipe(prompt=..., num_inference_steps=8, guidance_scale=0.0, generator=...)`` call per image, as a
user writes it. Engine: the worker's batches (same size, up to a token budget and an image cap), prompt cache,
text padded to the longest prompt, the next batch prepared while this one runs; then each optimisation alone.
``run_naive`` and ``run_engine`` are what the whole-service bench reuses.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline
from PIL import Image

from bench import report, workloads
from core.errors import OutOfMemory
from core.work import image_tokens
from worker.engine import Engine, EngineOptions, ImageRequest
from worker.engine.batching import DEFAULT_MAX_IMAGES, DEFAULT_TOKEN_BUDGET, plan_batches
from worker.engine.embeddings import DEFAULT_CACHE_BYTES

DEFAULT_CHECKPOINT = Path("checkpoints/tiny/turbo")
COLUMNS = ("workload", "variant", "images", "seconds", "images/s", "s/image", "x naive", "busy %", "batches")


ImageKey = tuple[str, int, int, int]


def image_key(job: ImageRequest, seed: int) -> ImageKey:
    """What identifies one output image across runs: prompt, size and seed."""
    return (job.prompt, job.width, job.height, seed)


@dataclass(frozen=True)
class Variant:
    """Which engine optimisations are on."""

    name: str
    batching: bool = True
    cache: bool = True
    longest: bool = True
    overlap: bool = True


FULL = Variant("engine")
TOGGLES = (
    Variant("batching only", batching=True, cache=False, longest=False, overlap=False),
    Variant("cache only", batching=False, cache=True, longest=False, overlap=False),
    Variant("longest padding only", batching=False, cache=False, longest=True, overlap=False),
)
OVERLAP_ONLY = Variant("overlap only", batching=False, cache=False, longest=False, overlap=True)


@dataclass
class Timing:
    """One measured run over a job set."""

    images: int
    seconds: float
    busy_seconds: float | None = None
    calls: int | None = None
    peak_memory_gib: float | None = None
    kept: dict[ImageKey, Image.Image] = field(default_factory=dict, repr=False)  # a few images, to compare

    @property
    def images_per_s(self) -> float:
        """Throughput."""
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def busy_fraction(self) -> float | None:
        """Share of the wall time the engine spent inside run() (accelerator work)."""
        return None if self.busy_seconds is None or not self.seconds else self.busy_seconds / self.seconds

    def row(self, workload: str, variant: str, naive: Timing | None) -> dict[str, Any]:
        """A results row for the table and the JSON."""
        busy = self.busy_fraction
        return {
            "workload": workload,
            "variant": variant,
            "images": self.images,
            "seconds": round(self.seconds, 3),
            "images/s": round(self.images_per_s, 3),
            "s/image": round(self.seconds / self.images, 4) if self.images else None,
            "x naive": round(self.images_per_s / naive.images_per_s, 2) if naive and naive.images_per_s else None,
            "busy %": round(100 * busy, 1) if busy is not None else None,
            "batches": self.calls,
            "peak GiB": self.peak_memory_gib,
        }


def _sync(device: torch.device) -> None:
    """Wait for queued accelerator work so a timing is real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float | None:
    """Peak accelerator memory allocated since the last reset, in GiB (None off CUDA)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def run_naive(jobs: Sequence[ImageRequest], pipe: ZImagePipeline, *, keep: int = 0) -> Timing:
    """The loop a user writes: one pipeline call per image, the model card's arguments."""
    device = pipe._execution_device
    kept: dict[ImageKey, Image.Image] = {}
    images = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    started = time.perf_counter()
    for job in jobs:
        for seed in job.seeds:
            image = pipe(
                prompt=job.prompt,
                negative_prompt=job.negative_prompt,
                height=job.height,
                width=job.width,
                num_inference_steps=job.steps,
                guidance_scale=job.guidance_scale,
                generator=torch.Generator().manual_seed(seed),
            ).images[0]
            images += 1
            if len(kept) < keep:
                kept[image_key(job, seed)] = image
    _sync(device)
    seconds = time.perf_counter() - started
    return Timing(images, seconds, calls=images, peak_memory_gib=_peak_gib(device), kept=kept)


def worker_batches(
    jobs: Sequence[ImageRequest], *, token_budget: int = DEFAULT_TOKEN_BUDGET, max_images: int = DEFAULT_MAX_IMAGES
) -> list[list[ImageRequest]]:
    """Batches as the worker claims them: in order, same size/steps/guidance, up to the budget and the cap."""
    return plan_batches(
        jobs,
        key=lambda job: (job.width, job.height, job.steps, job.guidance_scale),
        tokens=lambda job: image_tokens(job.width, job.height) * len(job.seeds),
        images=lambda job: len(job.seeds),
        token_budget=token_budget,
        max_images=max_images,
    )


def run_engine(
    jobs: Sequence[ImageRequest],
    engine: Engine,
    *,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    max_images: int = DEFAULT_MAX_IMAGES,
    overlap: bool = True,
    keep: int = 0,
) -> Timing:
    """The engine on worker-style batches; with ``overlap`` the next batch is prepared while one runs."""
    batches = worker_batches(jobs, token_budget=token_budget, max_images=max_images)
    wanted = {image_key(job, seed) for job in jobs[:keep] for seed in job.seeds}
    kept: dict[ImageKey, Image.Image] = {}
    images = 0
    calls = 0
    busy_before = engine.busy_seconds
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    _sync(engine.device)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare") as pool:
        prepare: Callable[[list[ImageRequest]], Any] = engine.prepare
        pending: Future[Any] | None = pool.submit(prepare, batches[0]) if overlap and batches else None
        for index, batch in enumerate(batches):
            if overlap:
                assert pending is not None
                prepared = pending.result()
                pending = pool.submit(prepare, batches[index + 1]) if index + 1 < len(batches) else None
            else:
                prepared = engine.prepare(batch)
            for job, result in zip(batch, engine.run(prepared), strict=True):
                if isinstance(result, OutOfMemory):
                    raise RuntimeError(f"benchmark batch ran out of memory: {result.message}")
                images += len(result)
                for seed, image in zip(job.seeds, result, strict=True):
                    if image_key(job, seed) in wanted:
                        kept[image_key(job, seed)] = image
            calls += 1
    _sync(engine.device)
    seconds = time.perf_counter() - started
    return Timing(images, seconds, engine.busy_seconds - busy_before, calls, _peak_gib(engine.device), kept)


def engine_for(pipe: ZImagePipeline, variant: Variant, model_id: str = "bench") -> Engine:
    """An engine over the shared pipeline with this variant's cache and padding (a fresh, empty cache)."""
    options = EngineOptions(
        device=str(pipe._execution_device),
        embedding_cache_bytes=DEFAULT_CACHE_BYTES if variant.cache else 0,
        # The full engine pads to the longest prompt where that is exact (float32) and not in bf16; the
        # "longest padding only" row forces it, to show what it would be worth.
        pad_to_longest=None if variant is FULL else variant.longest,
    )
    return Engine(pipe, model_id=model_id, options=options)


def run_variant(
    jobs: Sequence[ImageRequest],
    pipe: ZImagePipeline,
    variant: Variant,
    *,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    max_images: int = DEFAULT_MAX_IMAGES,
    keep: int = 0,
) -> Timing:
    """Run one engine variant on the jobs."""
    return run_engine(
        jobs,
        engine_for(pipe, variant),
        token_budget=token_budget,
        max_images=max_images if variant.batching else 1,
        overlap=variant.overlap,
        keep=keep,
    )


def max_pixel_diff(a: dict[ImageKey, Image.Image], b: dict[ImageKey, Image.Image]) -> int | None:
    """Largest uint8 difference between the images both runs kept for the same job and seed."""
    diffs = [
        int(np.abs(np.asarray(a[key], dtype=np.int16) - np.asarray(b[key], dtype=np.int16)).max())
        for key in a.keys() & b.keys()
    ]
    return max(diffs) if diffs else None


def warm(pipe: ZImagePipeline, size: int) -> None:
    """One untimed naive and engine call at this size: allocator, kernels, RoPE tables."""
    job = workloads.one_prompt(seeds=2, size=size)
    run_naive(job[:1], pipe)
    run_engine(job, engine_for(pipe, FULL))


@dataclass
class Plan:
    """One workload of the benchmark: its jobs, and how many of them the single-optimisation variants run."""

    name: str
    jobs: list[ImageRequest]
    toggle_jobs: int | None = None  # None: all


@dataclass
class Tally:
    """A variant's timings over the interleaved rounds: summed, and kept per round."""

    timing: Timing = field(default_factory=lambda: Timing(0, 0.0))
    rates: dict[int, float] = field(default_factory=dict)  # round -> images/s

    def add(self, round_index: int, part: Timing) -> None:
        """Add one round."""
        t = self.timing
        t.images += part.images
        t.seconds += part.seconds
        if part.busy_seconds is not None:
            t.busy_seconds = (t.busy_seconds or 0.0) + part.busy_seconds
        t.calls = (t.calls or 0) + (part.calls or 0)
        if part.peak_memory_gib is not None:
            t.peak_memory_gib = max(t.peak_memory_gib or 0.0, part.peak_memory_gib)
        for key, image in part.kept.items():
            if len(t.kept) < 4:
                t.kept[key] = image
        self.rates[round_index] = part.images_per_s

    def ratio_to(self, naive: Tally) -> float | None:
        """Median over rounds of this variant's rate over the naive rate of the same round."""
        ratios = sorted(rate / naive.rates[r] for r, rate in self.rates.items() if naive.rates.get(r))
        if not ratios:
            return None
        middle = len(ratios) // 2
        return ratios[middle] if len(ratios) % 2 else (ratios[middle - 1] + ratios[middle]) / 2


def measure(
    pipe: ZImagePipeline,
    plans: Sequence[Plan],
    toggles: Sequence[Variant],
    *,
    token_budget: int,
    max_images: int,
    rounds: int = 4,
    deadline: float = float("inf"),
    log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Naive, engine and each toggle per workload; rows for the table and notes on anything scaled or skipped.

    The jobs are cut into ``rounds`` slices and every variant runs slice by slice in turn, so a burst of load
    from elsewhere on a shared machine hits all of them alike; "x naive" is the median over rounds of the
    variant's rate over the naive loop's rate in the same round. Each variant keeps one engine (and so one
    prompt cache) across its slices, as a worker would.
    """
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    # Each workload gets a share of the time left, in proportion to its work (images x image tokens); past its
    # share it stops after the current round -- every variant then has run the same slices.
    weights = [sum(image_tokens(job.width, job.height) * len(job.seeds) for job in plan.jobs) for plan in plans]
    for index, plan in enumerate(plans):
        share = weights[index] / max(1, sum(weights[index:]))
        plan_deadline = time.monotonic() + max(0.0, deadline - time.monotonic()) * share
        warm(pipe, plan.jobs[0].width)
        variants = [FULL, *toggles]
        engines = {variant.name: engine_for(pipe, variant) for variant in variants}
        naive, tallies = Tally(), {variant.name: Tally() for variant in variants}
        rounds_here = max(1, min(rounds, len(plan.jobs)))
        toggle_count = len(plan.jobs) if plan.toggle_jobs is None else min(plan.toggle_jobs, len(plan.jobs))
        per_round = -(-toggle_count // rounds_here)
        for r in range(rounds_here):
            if r and time.monotonic() > plan_deadline:
                notes.append(f"{plan.name}: stopped after {r} of {rounds_here} rounds to stay within the time budget")
                break
            part = plan.jobs[r * len(plan.jobs) // rounds_here : (r + 1) * len(plan.jobs) // rounds_here]
            naive.add(r, run_naive(part, pipe, keep=4))
            for variant in variants:
                # Single-optimisation rows may run on fewer jobs: the first few of every slice.
                jobs = part if variant is FULL else part[:per_round]
                if not jobs:
                    continue
                timing = run_engine(
                    jobs,
                    engines[variant.name],
                    token_budget=token_budget,
                    max_images=max_images if variant.batching else 1,
                    overlap=variant.overlap,
                    keep=4,
                )
                tallies[variant.name].add(r, timing)
        rows.append(naive.timing.row(plan.name, "naive", naive.timing))
        for variant in variants:
            tally = tallies[variant.name]
            if not tally.timing.images:
                continue
            row = tally.timing.row(plan.name, variant.name, naive.timing)
            ratio = tally.ratio_to(naive)
            row["x naive (totals)"] = row["x naive"]
            row["x naive"] = round(ratio, 2) if ratio is not None else None
            if variant is FULL:
                row["max pixel diff vs naive"] = max_pixel_diff(naive.timing.kept, tally.timing.kept)
            rows.append(row)
            log(f"{plan.name}: {variant.name} {tally.timing.images_per_s:.2f} images/s ({row['x naive']}x naive)")
        ran = min((tallies[v.name].timing.images for v in toggles), default=toggle_count)
        if toggles and ran < naive.timing.images:
            notes.append(f"{plan.name}: single-optimisation rows ran on {ran} of the {naive.timing.images} images")
    return rows, notes


def load_pipe(checkpoint: Path) -> ZImagePipeline:
    """The tiny checkpoint (built if missing), loaded on the CPU in float32 as the worker loads it."""
    from deploy.tiny_checkpoint import ensure_tiny_turbo

    path = ensure_tiny_turbo(checkpoint)
    pipe = ZImagePipeline.from_pretrained(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: run the CPU benchmark, print the table, write the JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.engine_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/engine.json"))
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--jobs", type=int, default=200, help="jobs at 256x256")
    parser.add_argument("--jobs-512", type=int, default=120, help="jobs at 512x512 (200 takes too long here)")
    parser.add_argument("--toggle-jobs-512", type=int, default=48, help="jobs for the 512x512 single-optimisation rows")
    parser.add_argument("--seeds", type=int, default=64, help="seeds of the one-prompt workload")
    parser.add_argument("--token-budget", type=int, default=DEFAULT_TOKEN_BUDGET)
    parser.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES)
    parser.add_argument("--rounds", type=int, default=8, help="interleaved slices per workload")
    parser.add_argument(
        "--budget-s", type=float, default=230.0, help="measuring time: a workload past its share stops its rounds"
    )
    args = parser.parse_args(argv)

    started = time.monotonic()
    load_before = os.getloadavg()
    pipe = load_pipe(args.checkpoint)
    plans = [
        Plan("256² mixed", workloads.mixed(args.jobs, 256)),
        Plan("512² mixed", workloads.mixed(args.jobs_512, 512, seed=1), args.toggle_jobs_512),
        Plan("256² one prompt", workloads.one_prompt(args.seeds, 256)),
    ]
    rows, notes = measure(
        pipe,
        plans,
        TOGGLES,
        token_budget=args.token_budget,
        max_images=args.max_images,
        rounds=args.rounds,
        deadline=started + args.budget_s,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    elapsed = time.monotonic() - started
    print(report.table(rows, COLUMNS))
    for note in notes:
        print(f"note: {note}")
    goal = next(r for r in rows if r["workload"] == "256² mixed" and r["variant"] == "engine")["x naive"]
    print(f"goal engine >= 1.5x naive at 256²: {goal}x ({'met' if goal >= 1.5 else 'NOT met'}); {elapsed:.0f} s in all")
    print(
        f"torch threads {torch.get_num_threads()}; load average before {load_before[0]:.2f}, after "
        f"{os.getloadavg()[0]:.2f} (other work on these cores slows the naive loop most: see the README)"
    )
    report.write_json(
        args.out,
        {
            "bench": "engine",
            "checkpoint": "tiny random-weight Z-Image-Turbo (deploy.tiny_checkpoint), CPU, float32",
            "settings": {"token_budget": args.token_budget, "max_images": args.max_images, "steps": workloads.STEPS},
            "rows": rows,
            "notes": notes,
            "goal_256_engine_over_naive": {"target": 1.5, "measured": goal},
            "seconds": round(elapsed, 1),
            "load_average_before": list(load_before),
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
