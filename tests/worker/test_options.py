"""Operator options: checked before any weight loads, with messages naming the option; applied when valid."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName

from tests.helpers.engine import diff, images_of, request
from worker.engine import Engine, EngineOptions
from worker.engine.options import ATTENTION_BACKENDS

MISSING = "/nonexistent/model"  # a bad option must be reported before the loader ever looks for weights


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dtype": "int8"}, "dtype"),
        ({"device": "gpu0"}, "device"),
        ({"attention_backend": "fastest"}, "attention_backend"),
        ({"compile_transformer": "yes"}, "compile_transformer"),
        ({"cpu_offload": 1}, "cpu_offload"),
        ({"embedding_cache_bytes": -5}, "embedding_cache_bytes"),
        ({"min_call_tokens": -1}, "min_call_tokens"),
        ({"decode_pixels": 0}, "decode_pixels"),
    ],
)
def test_bad_options_fail_before_loading(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Engine.from_pretrained(MISSING, EngineOptions(**options))


def test_unknown_attention_backend_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        EngineOptions(attention_backend="flash4")
    assert "native" in str(info.value) and "_native_flash" in str(info.value)
    assert set(ATTENTION_BACKENDS) == {member.value for member in AttentionBackendName}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cpu_offload_needs_cuda() -> None:
    with pytest.raises(ValueError, match="cpu_offload needs CUDA"):
        Engine.from_pretrained(MISSING, EngineOptions(cpu_offload=True))
    with pytest.raises(ValueError, match="cpu_offload needs CUDA"):
        Engine.from_pretrained(MISSING, EngineOptions(device="cpu", cpu_offload=True))


def test_defaults_are_safe() -> None:
    options = EngineOptions()
    assert not options.compile_transformer and not options.cpu_offload and options.attention_backend is None
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert options.torch_device.type == expected
    assert options.torch_dtype == (torch.bfloat16 if expected == "cuda" else torch.float32)


def test_attention_backend_is_applied(tiny_turbo_dir: Path) -> None:
    engine = Engine.from_pretrained(
        str(tiny_turbo_dir), EngineOptions(device="cpu", dtype="float32", attention_backend="NATIVE")
    )
    processors = [block.attention.processor for block in engine.pipe.transformer.layers]
    assert all(p._attention_backend == AttentionBackendName.NATIVE for p in processors)
    default = Engine.from_pretrained(str(tiny_turbo_dir), EngineOptions(device="cpu", dtype="float32"))
    assert default.pipe.transformer.layers[0].attention.processor._attention_backend is None
    # It still runs, and gives the default backend's image.
    a = images_of(engine.generate([request(steps=1)])[0])[0]
    b = images_of(default.generate([request(steps=1)])[0])[0]
    assert diff(a, b) <= 1


def test_a_backend_that_cannot_run_here_is_a_clear_error(tiny_turbo_dir: Path) -> None:
    # flash-attn is not installed on this host (nor on the bare GPU host unless the operator adds it).
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ValueError, match="attention_backend 'flash' cannot be used here"):
        Engine.from_pretrained(
            str(tiny_turbo_dir), EngineOptions(device="cpu", dtype="float32", attention_backend="flash")
        )


def test_compile_transformer_is_applied(tiny_turbo_dir: Path) -> None:
    engine = Engine.from_pretrained(
        str(tiny_turbo_dir), EngineOptions(device="cpu", dtype="float32", compile_transformer=True)
    )
    transformer = engine.pipe.transformer
    blocks = [*transformer.layers, *transformer.noise_refiner, *transformer.context_refiner]
    # Regional compilation: every repeated block is compiled (lazily, at its first forward, not run here).
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert transformer._compiled_call_impl is None
    plain = Engine.from_pretrained(str(tiny_turbo_dir), EngineOptions(device="cpu", dtype="float32"))
    assert plain.pipe.transformer.layers[0]._compiled_call_impl is None


def test_upload_threads_default_to_one_beside_cpu_inference_and_four_beside_a_gpu() -> None:
    from core.settings import Settings
    from worker.process import upload_threads

    assert upload_threads(Settings(), torch.device("cpu")) == 1
    assert upload_threads(Settings(), torch.device("cuda", 0)) == 4
    assert upload_threads(Settings(upload_threads=6), torch.device("cpu")) == 6
