"""Fast mode (a job's "acceleration": "cache") against the exact model: s/image and the share of transformer
compute it skips.

    python -m bench.fast_bench --out bench/results/fast.json    # the tiny checkpoint on the CPU (make bench)

The share skipped is counted, not derived: a forward hook on each of the transformer's main blocks counts the
block calls of the fast run against the exact run's (the refiner layers, the embedders and the final layer always
run and are not counted). The tiny checkpoint's random weights say nothing about the images' quality, and its 2
blocks (of which fast mode keeps the first on a cached step) make its share smaller than the real 30-block
model's; ``bench/gpu.py`` runs the same rows at full size. Each variant runs once untimed first (cache-dit's
import and install happen there), then timed in alternating rounds (the median kept).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench import report
from worker.engine import Engine, EngineOptions, ImageRequest
from worker.engine.fast import MASK_POLICY, available, fast_mask

COLUMNS = ("workload", "variant", "steps", "guidance", "images", "s/image", "x exact", "blocks skipped", "mask")
PROMPTS = ("a lighthouse on a cliff at dawn", "a red fox in the snow", "a bowl of ramen, studio light")
TINY_CHECKPOINT = Path("checkpoints/tiny/turbo")


@dataclass(frozen=True)
class Workload:
    """One batch shape run exact and fast."""

    name: str
    size: int
    steps: int
    guidance: float
    images: int


def tiny_workloads(images: int = 4) -> list[Workload]:
    """Turbo's schedule and Base's (CFG, 28 steps), at the tiny size."""
    return [
        Workload("256² turbo", 256, 8, 0.0, images),
        Workload("256² base cfg", 256, 28, 4.0, max(images // 2, 1)),
    ]


@contextmanager
def counting_blocks(engine: Engine) -> Iterator[list[int]]:
    """Counts the calls of the transformer's main blocks while the block runs."""
    count = [0]
    handles = [
        block.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        for block in engine.pipe.transformer.layers
    ]
    try:
        yield count
    finally:
        for handle in handles:
            handle.remove()


def _requests(workload: Workload, acceleration: str) -> list[ImageRequest]:
    guided = workload.guidance > 0
    return [
        ImageRequest(
            prompt=PROMPTS[i % len(PROMPTS)],
            width=workload.size,
            height=workload.size,
            steps=workload.steps,
            guidance_scale=workload.guidance,
            seeds=(100 + i,),
            negative_prompt="" if guided else None,
            acceleration=acceleration,
        )
        for i in range(workload.images)
    ]


def _timed(engine: Engine, requests: list[ImageRequest]) -> tuple[float, int]:
    """Seconds for one batch (the engine synchronizes CUDA) and the main-block calls it made."""
    with counting_blocks(engine) as count:
        started = time.perf_counter()
        results = engine.generate(requests)
        seconds = time.perf_counter() - started
    if any(not isinstance(result, list) for result in results):
        raise RuntimeError(f"a request ran out of memory: {results}")
    return seconds, count[0]


def measure(
    engine: Engine, workloads: list[Workload], log: Callable[[str], None], rounds: int = 1
) -> list[dict[str, Any]]:
    """An exact and a fast row per workload (the fast one with its speed-up and its share of blocks skipped):
    each variant once untimed, then ``rounds`` alternating timed runs, the median kept."""
    rows = []
    for workload in workloads:
        exact, fast = _requests(workload, "none"), _requests(workload, "cache")
        engine.generate(exact)  # untimed: kernels, allocator, cache-dit's import and install
        engine.generate(fast)
        timings = [(_timed(engine, exact), _timed(engine, fast)) for _ in range(rounds)]
        exact_s = statistics.median(e[0] for e, _ in timings)
        fast_s = statistics.median(f[0] for _, f in timings)
        exact_blocks, fast_blocks = timings[0][0][1], timings[0][1][1]
        skipped = 1 - fast_blocks / exact_blocks
        common = {"workload": workload.name, "steps": workload.steps, "guidance": workload.guidance}
        common["images"] = workload.images
        rows.append({**common, "variant": "exact", "s/image": round(exact_s / workload.images, 4),
                     "x exact": 1.0, "blocks skipped": 0.0, "mask": "1" * workload.steps})  # fmt: skip
        rows.append({**common, "variant": "fast (cache)", "s/image": round(fast_s / workload.images, 4),
                     "x exact": round(exact_s / fast_s, 2), "blocks skipped": round(skipped, 4),
                     "mask": "".join(map(str, fast_mask(workload.steps)))})  # fmt: skip
        log(f"{workload.name}: exact {exact_s:.2f} s, fast {fast_s:.2f} s, {skipped:.1%} of block calls skipped")
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: the tiny checkpoint on the CPU."""
    parser = argparse.ArgumentParser(prog="python -m bench.fast_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/fast.json"))
    parser.add_argument("--checkpoint", type=Path, default=TINY_CHECKPOINT)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if not available():
        print("bench.fast_bench needs cache-dit (pip install cache-dit==1.5.3)", file=sys.stderr)
        return 2
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    started = time.monotonic()
    engine = Engine.from_pretrained(str(args.checkpoint), EngineOptions(device="cpu", dtype="float32"))
    rows = measure(engine, tiny_workloads(args.images), log, rounds=args.rounds)
    print(report.table(rows, COLUMNS))
    report.write_json(
        args.out,
        {
            "bench": "fast",
            "checkpoint": str(args.checkpoint),
            "blocks": len(engine.pipe.transformer.layers),
            "mask_policy": MASK_POLICY,
            "threads": torch.get_num_threads(),
            "rows": rows,
            "seconds": round(time.monotonic() - started, 1),
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
