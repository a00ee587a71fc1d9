"""Full-size GPU benchmark: Z-Image at its real configuration with random bf16 weights, naive loop against engine.

Usage on a GPU host (torch, transformers, accelerate, diffusers; no network, no weights):
    python -m bench.gpu --out bench/results/gpu.json           # about 4-6 minutes on an H100, start included
    python -m bench.gpu --tiny --out /tmp/gpu-tiny.json        # the same code at tiny size on the CPU, seconds

Timing does not depend on weight values (see docs/performance.md): each component is built on the meta device at
the real configuration, allocated directly on the GPU in bf16 and filled with N(0, 0.02) (norm weights 1, biases
0). The tokenizer is the tiny byte-level BPE of deploy.tiny_checkpoint (its ids are far below the real vocab), so
prompts tokenize into more tokens than Qwen's own tokenizer would make: a little more text-encoder work, a
slightly conservative result.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from transformers import Qwen3Config, Qwen3Model

from bench import adapter_bench, fast_bench, report, workloads
from bench.engine_bench import COLUMNS, FULL, OVERLAP_ONLY, TOGGLES, Plan, Variant, engine_for, measure, run_engine
from core.adapter_shapes import ZIMAGE_TRANSFORMER, linear_layers
from deploy.tiny_adapter import random_lora, save_lora
from deploy.tiny_checkpoint import build_tokenizer
from worker.engine.batching import DEFAULT_MAX_IMAGES, DEFAULT_TOKEN_BUDGET

REAL_VOCAB = 151936
COMPILE_IF_DONE_BY_S = 270.0  # the torch.compile row runs only if measuring ended this soon after the start
GPU_COLUMNS = (*COLUMNS, "peak GiB")

# The published Z-Image-Turbo configuration (docs/performance.md): 6.15 B, 4.02 B and 84 M parameters.
FULL_TRANSFORMER: dict[str, Any] = {
    **ZIMAGE_TRANSFORMER,  # patch sizes, channels, dim, layers, heads, caption features: the layer table's shape
    "norm_eps": 1e-5,
    "qk_norm": True,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
}
FULL_TEXT_ENCODER: dict[str, Any] = {
    "vocab_size": REAL_VOCAB,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "tie_word_embeddings": True,
}
FULL_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
# The same layouts at the tiny checkpoint's size, for --tiny.
TINY_TRANSFORMER = {
    **FULL_TRANSFORMER,
    "dim": 64,
    "n_layers": 2,
    "n_refiner_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 2,
    "cap_feat_dim": 32,
    "axes_dims": [8, 12, 12],
}
TINY_TEXT_ENCODER = {
    **FULL_TEXT_ENCODER,
    "vocab_size": 2048,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
}
TINY_VAE = {**FULL_VAE, "block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4}


@dataclass(frozen=True)
class Scale:
    """What one mode of the benchmark builds and runs."""

    name: str
    transformer: dict[str, Any]
    text_encoder: dict[str, Any]
    vae: dict[str, Any]
    large: int  # the "1024^2" workload's side
    small: int  # the "512^2" workload's side
    jobs_large: int
    jobs_small: int
    jobs_mix: int


FULL_SCALE = Scale("full", FULL_TRANSFORMER, FULL_TEXT_ENCODER, FULL_VAE, 1024, 512, 12, 32, 24)
TINY_SCALE = Scale("tiny", TINY_TRANSFORMER, TINY_TEXT_ENCODER, TINY_VAE, 256, 128, 3, 4, 4)


def _init_parameters(module: torch.nn.Module) -> None:
    """Random weights with sane scales: N(0, 0.02); norm weights 1; biases 0."""
    with torch.no_grad():
        for sub in module.modules():
            is_norm = "norm" in type(sub).__name__.lower()  # RMSNorm, Qwen3RMSNorm, GroupNorm, LayerNorm
            for name, param in sub.named_parameters(recurse=False):
                if name == "bias":
                    param.zero_()
                elif is_norm:
                    param.fill_(1.0)
                else:
                    param.normal_(mean=0.0, std=0.02)


def materialize(build: Callable[[], torch.nn.Module], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Build a module with no memory, then allocate it on ``device`` in ``dtype`` and fill it: no CPU copy."""
    with init_empty_weights():  # parameters on the meta device; buffers (RoPE inverse frequencies) real, on CPU
        module = build()
    buffers = {name: buffer.clone() for name, buffer in module.named_buffers()}
    # Cast while still on meta (free), so the GPU allocation is bf16 from the start: a 6B model never exists
    # in fp32 anywhere.
    torch.nn.Module.to(module, dtype=dtype)
    module.to_empty(device=device)
    _init_parameters(module)
    for name, value in buffers.items():  # computed buffers keep their values and their own dtype (fp32)
        owner, _, leaf = name.rpartition(".")
        (module.get_submodule(owner) if owner else module)._buffers[leaf] = value.to(device)
    return module.eval().requires_grad_(False)


def count_parameters(scale: Scale) -> dict[str, int]:
    """Parameter counts of the three models at this scale, built on the meta device (no memory, a second)."""
    with init_empty_weights():
        return {
            "transformer": sum(p.numel() for p in ZImageTransformer2DModel(**scale.transformer).parameters()),
            "text_encoder": sum(p.numel() for p in Qwen3Model(Qwen3Config(**scale.text_encoder)).parameters()),
            "vae": sum(p.numel() for p in AutoencoderKL(**scale.vae).parameters()),
        }


def build_pipeline(scale: Scale, device: torch.device, dtype: torch.dtype) -> ZImagePipeline:
    """A ZImagePipeline of random-weight components at this scale, directly on the device."""
    tokenizer = build_tokenizer()
    vocab = scale.text_encoder["vocab_size"]
    # Every id the tokenizer can emit must index the embedding table (151936 rows at full size).
    if len(tokenizer) > vocab:
        raise ValueError(f"tokenizer ids go up to {len(tokenizer) - 1}, past the text encoder's vocab {vocab}")
    config = Qwen3Config(**scale.text_encoder, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.pad_token_id)
    text_encoder = materialize(lambda: Qwen3Model(config), device, dtype)
    transformer = materialize(lambda: ZImageTransformer2DModel(**scale.transformer), device, dtype)
    vae = materialize(lambda: AutoencoderKL(**scale.vae), device, dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(
        scheduler=scheduler,
        vae=vae,  # type: ignore[arg-type]
        text_encoder=text_encoder,  # type: ignore[arg-type]
        tokenizer=tokenizer,  # type: ignore[arg-type]
        transformer=transformer,  # type: ignore[arg-type]
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


ADAPTER_RANK = 32  # on every attention and feed-forward projection: ~0.14 GB a file in bf16 at full size


def adapter_rows(
    pipe: ZImagePipeline, scale: Scale, folder: Path, log: Callable[[str], None]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A mixed queue (bare / adapter A / adapter B) at the large size: naive load-generate-unload per job against
    the engine (``bench.adapter_bench``), with two random rank-32 adapters. The naive pipeline shares the text
    encoder and VAE but has a transformer of its own (unloading adapters must not touch the engine's)."""
    device, dtype = pipe._execution_device, pipe.transformer.dtype
    rank = ADAPTER_RANK if scale is FULL_SCALE else 4
    layers = linear_layers(scale.transformer)
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        name: save_lora(random_lora(layers, rank=rank, seed=seed, dtype=dtype), folder / f"{name}.safetensors")
        for name, seed in (("a", 1), ("b", 2))
    }
    naive = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config),
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        transformer=materialize(lambda: ZImageTransformer2DModel(**scale.transformer), device, dtype),  # type: ignore[arg-type]
    )
    naive.set_progress_bar_config(disable=True)
    jobs = 12 if scale is FULL_SCALE else 6
    try:
        rows, figures = adapter_bench.measure(
            naive, engine_for(pipe, FULL), files, jobs=jobs, size=scale.large, steps=workloads.STEPS, log=log, rounds=1
        )
    finally:
        del naive
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, {**figures, "rank": rank, "size": scale.large, "jobs": jobs}


def fast_rows(
    pipe: ZImagePipeline, scale: Scale, log: Callable[[str], None]
) -> tuple[list[dict[str, Any]], str | None]:
    """Exact and fast (Cache-DiT, static mask) rows: Turbo's schedule at the large and small sizes, Base's (CFG,
    28 steps) at the large size; s/image and the share of block calls skipped (``bench.fast_bench``). Without
    cache-dit on this host: no rows and a note."""
    from worker.engine.fast import available

    if not available():
        return [], "fast rows skipped: cache-dit is not installed here (pip install cache-dit==1.5.3)"
    full = scale is FULL_SCALE
    rows = fast_bench.measure(
        engine_for(pipe, FULL),
        [
            fast_bench.Workload(f"{scale.large}² turbo", scale.large, 8, 0.0, 4 if full else 2),
            fast_bench.Workload(f"{scale.small}² turbo", scale.small, 8, 0.0, 8 if full else 2),
            fast_bench.Workload(f"{scale.large}² base cfg", scale.large, 28, 4.0, 2 if full else 1),
        ],
        log,
    )
    return rows, None


def goals(rows: list[dict[str, Any]], scale: Scale) -> dict[str, Any]:
    """The issue's GPU goals against the measured rows (meaningful at full size on an H100)."""

    def find(workload: str, variant: str) -> dict[str, Any] | None:
        return next((r for r in rows if r["workload"] == workload and r["variant"] == variant), None)

    large = find(f"{scale.large}²", FULL.name)
    small = find(f"{scale.small}²", FULL.name)
    engine_rows = [r for r in rows if r["variant"] == FULL.name and r["busy %"] is not None]
    return {
        "s_per_image_large": {"target": 0.65, "measured": large["s/image"] if large else None},
        "x_naive_small": {"target": 2.5, "measured": small["x naive"] if small else None},
        "busy_percent_min": {"target": 95.0, "measured": min((r["busy %"] for r in engine_rows), default=None)},
    }


def run_compiled(
    pipe: ZImagePipeline, plan: Plan, *, token_budget: int, max_images: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """The full engine with the transformer's blocks compiled (warm-up compile timed apart); mutates ``pipe``."""
    started = time.perf_counter()
    pipe.transformer.compile_repeated_blocks()
    engine = engine_for(pipe, FULL)
    run_engine(plan.jobs[: max(2, len(plan.jobs) // 4)], engine, token_budget=token_budget, max_images=max_images)
    compile_s = time.perf_counter() - started
    timing = run_engine(plan.jobs, engine, token_budget=token_budget, max_images=max_images)
    row = timing.row(plan.name, "engine + torch.compile", None)
    row["compile s"] = round(compile_s, 1)
    log(f"{plan.name}: engine + compile {timing.images_per_s:.2f} images/s (compile and warm-up {compile_s:.0f} s)")
    return row


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: build, measure, print the table, write the JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu.json"))
    parser.add_argument("--tiny", action="store_true", help="tiny configuration on the CPU (a smoke run, seconds)")
    parser.add_argument("--jobs", type=int, default=None, help="override every workload's job count")
    parser.add_argument("--token-budget", type=int, default=DEFAULT_TOKEN_BUDGET)
    parser.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES)
    parser.add_argument("--budget-s", type=float, default=300.0, help="measuring time: a workload past its share stops")
    parser.add_argument("--no-compile", action="store_true", help="skip the engine + torch.compile row")
    parser.add_argument("--no-adapters", action="store_true", help="skip the mixed adapter queue rows")
    parser.add_argument("--no-fast", action="store_true", help="skip the fast-mode and Base rows")
    args = parser.parse_args(argv)
    started = time.monotonic()
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731

    scale = TINY_SCALE if args.tiny else FULL_SCALE
    if not args.tiny and not torch.cuda.is_available():
        print("bench.gpu needs CUDA for the full-size run; use --tiny for the CPU smoke run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    parameters = count_parameters(scale)
    built = time.monotonic()
    pipe = build_pipeline(scale, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    build_s = time.monotonic() - built
    log(f"built {scale.name} pipeline in {build_s:.1f} s: {parameters}")

    def jobs(count: int) -> int:
        return args.jobs if args.jobs is not None else count

    plans = [
        Plan(f"{scale.large}²", workloads.mixed(jobs(scale.jobs_large), scale.large, seed=10)),
        Plan(f"{scale.small}²", workloads.mixed(jobs(scale.jobs_small), scale.small, seed=11)),
        Plan("mix", workloads.mixed(jobs(scale.jobs_mix), (scale.large, scale.small), seed=12)),
    ]
    toggles: tuple[Variant, ...] = (*TOGGLES, OVERLAP_ONLY)
    rows, notes = measure(
        pipe,
        plans,
        toggles,
        token_budget=args.token_budget,
        max_images=args.max_images,
        # A dedicated accelerator has nothing to interleave against; two rounds let a slow GPU drop the second
        # half of a workload rather than overrun the time budget.
        rounds=1 if args.tiny else 2,
        deadline=started + args.budget_s,
        log=log,
    )
    if not args.no_compile and not args.tiny:
        # Compiling the blocks and its warm-up take one to three minutes: only with that much of the run's
        # 8 minutes left.
        if time.monotonic() - started < COMPILE_IF_DONE_BY_S:
            try:
                rows.append(
                    run_compiled(pipe, plans[0], token_budget=args.token_budget, max_images=args.max_images, log=log)
                )
            except Exception as exc:  # compile is an option; its failure must not lose the measured rows
                notes.append(f"engine + torch.compile failed: {type(exc).__name__}: {exc}")
        else:
            notes.append("engine + torch.compile skipped to stay within the time budget")
    adapter_table: list[dict[str, Any]] = []
    switch: dict[str, Any] = {}
    if not args.no_adapters:
        try:
            adapter_table, switch = adapter_rows(pipe, scale, args.out.parent / "gpu-adapters", log)
        except Exception as exc:  # a row of its own: its failure must not lose the measured rows
            notes.append(f"adapter rows failed: {type(exc).__name__}: {exc}")
    fast_table: list[dict[str, Any]] = []
    if not args.no_fast:
        try:
            fast_table, skipped = fast_rows(pipe, scale, log)
            if skipped:
                notes.append(skipped)
        except Exception as exc:  # a row of its own: its failure must not lose the measured rows
            notes.append(f"fast rows failed: {type(exc).__name__}: {exc}")
    elapsed = time.monotonic() - started
    measured_goals = goals(rows, scale)
    print(report.table(rows, GPU_COLUMNS))
    if adapter_table:
        print(report.table(adapter_table, adapter_bench.COLUMNS))
        print(f"adapters: {switch}")
    if fast_table:
        print(report.table(fast_table, fast_bench.COLUMNS))
    for note in notes:
        print(f"note: {note}")
    print(f"goals: {measured_goals}; {elapsed:.0f} s in all (build {build_s:.0f} s)")
    report.write_json(
        args.out,
        {
            "bench": "gpu",
            "mode": scale.name,
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
            "dtype": str(dtype).removeprefix("torch."),
            "parameters": parameters,
            "build_seconds": round(build_s, 1),
            "settings": {"token_budget": args.token_budget, "max_images": args.max_images, "steps": workloads.STEPS},
            "rows": rows,
            "adapters": {"rows": adapter_table, "switch": switch},
            "fast": {"rows": fast_table},
            "notes": notes,
            "goals": measured_goals,
            "seconds": round(elapsed, 1),
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
