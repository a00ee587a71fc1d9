"""bench.gpu: the tiny run on the CPU writes complete results; the full-size configuration is the published one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gpu import FULL_SCALE, TINY_SCALE, build_pipeline, count_parameters, materialize

ROOT = Path(__file__).resolve().parents[2]


def run_bench(out: Path, *args: str, timeout: int) -> dict:
    """Run ``python -m bench.gpu`` in a subprocess, as an operator would; returns its JSON."""
    subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--out", str(out), *args],
        cwd=ROOT,
        check=True,
        timeout=timeout,
        capture_output=True,
    )
    return json.loads(out.read_text())


def test_tiny_run_writes_every_row(tmp_path: Path) -> None:
    results = run_bench(tmp_path / "gpu.json", "--tiny", "--jobs", "2", timeout=180)
    assert results["mode"] == "tiny" and results["device"] == "cpu"
    rows = results["rows"]
    workloads = {row["workload"] for row in rows}
    assert workloads == {"256²", "128²", "mix"}
    for workload in workloads:
        variants = {row["variant"] for row in rows if row["workload"] == workload}
        assert {"naive", "engine", "batching only", "cache only", "longest padding only", "overlap only"} <= variants
    for row in rows:
        assert row["images"] > 0 and row["images/s"] > 0 and row["s/image"] > 0
        if row["variant"] != "naive":
            assert row["x naive"] is not None and 0 < row["busy %"] <= 100
    # The engine's images are the naive loop's, pixel for pixel within 2/255, mixed sizes included.
    diffs = [row["max pixel diff vs naive"] for row in rows if row["variant"] == "engine"]
    assert len(diffs) == 3 and all(d is not None and d <= 2 for d in diffs)
    assert set(results["goals"]) == {"s_per_image_large", "x_naive_small", "busy_percent_min"}
    assert "environment" in results and results["parameters"]["transformer"] > 0
    # The mixed adapter queue: naive load-generate-unload per job, the engine job by job and batched.
    adapters = results["adapters"]
    assert [row["variant"] for row in adapters["rows"]][0].startswith("naive")
    assert len(adapters["rows"]) == 3 and all(row["seconds"] > 0 for row in adapters["rows"])
    assert adapters["rows"][2]["adapter loads"] == 0 and adapters["rows"][2]["switches"] == 3
    assert adapters["switch"]["switch_ms"] > 0 and adapters["switch"]["rank"] == 4
    # Fast mode: exact and fast rows for Turbo at both sizes and Base (CFG, 28 steps) at the large one.
    fast = results["fast"]["rows"]
    assert [(row["workload"], row["variant"]) for row in fast][::2] == [
        ("256² turbo", "exact"), ("128² turbo", "exact"), ("256² base cfg", "exact")
    ]  # fmt: skip
    assert all(row["s/image"] > 0 for row in fast) and all(row["blocks skipped"] > 0 for row in fast[1::2])


def test_the_benches_import_on_a_bare_gpu_host() -> None:
    # The GPU host has torch, transformers, accelerate, diffusers: no service packages.
    code = (
        "import sys\n"
        "for name in ['celery', 'kombu', 'redis', 'sqlalchemy', 'pydantic', 'pydantic_settings', 'boto3',\n"
        "             'botocore', 'fastapi', 'starlette', 'psycopg', 'api', 'peft', 'cache_dit']:\n"
        "    sys.modules[name] = None\n"
        "import bench.gpu, bench.engine_bench\n"
        # The repository travels with the benches: its pure core modules (errors, status, work) may load.
        "assert {m for m in sys.modules if m.startswith('core')} <= {'core', 'core.errors', 'core.status',"
        " 'core.work', 'core.adapter_shapes'}\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_full_configuration_has_the_published_sizes() -> None:
    # Built on the meta device: no memory, about a second. GPU.md: 6.15 B, 4.02 B and 84 M parameters.
    counts = count_parameters(FULL_SCALE)
    assert round(counts["transformer"] / 1e9, 2) == 6.15
    assert round(counts["text_encoder"] / 1e9, 2) == 4.02
    assert round(counts["vae"] / 1e6) == 84


def test_materialize_keeps_computed_buffers_and_fills_weights() -> None:
    pipe = build_pipeline(TINY_SCALE, torch.device("cpu"), torch.bfloat16)
    rotary = pipe.text_encoder.rotary_emb
    # RoPE inverse frequencies are computed, not loaded: they must survive to_empty, in float32.
    assert rotary.inv_freq.dtype == torch.float32 and rotary.inv_freq[0] == 1.0
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    weight = pipe.transformer.layers[0].attention.to_q.weight.float()
    assert 0.01 < weight.std() < 0.03
    assert torch.all(pipe.transformer.layers[0].attention_norm1.weight == 1)
    assert len(pipe.tokenizer) <= TINY_SCALE.text_encoder["vocab_size"] < FULL_SCALE.text_encoder["vocab_size"]
    linear = materialize(lambda: torch.nn.Linear(4, 4), torch.device("cpu"), torch.float32)
    assert isinstance(linear, torch.nn.Linear)
    assert not linear.weight.requires_grad and int(torch.count_nonzero(linear.bias)) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_full_size_run_on_the_gpu(tmp_path: Path) -> None:
    results = run_bench(tmp_path / "gpu.json", "--jobs", "2", "--no-compile", "--budget-s", "120", timeout=600)
    assert results["mode"] == "full" and results["dtype"] == "bfloat16"
    engine = [row for row in results["rows"] if row["variant"] == "engine"]
    assert engine and all(row["peak GiB"] < 75 for row in engine)
