"""Load the Z-Image pipelines once per process: device and dtype choice, operator options, the Turbo loader."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import AttentionBackendName

# The defining module, not `from diffusers import ...`: type checkers resolve the top-level name to a dummy.
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline

_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}
_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
ATTENTION_BACKENDS: tuple[str, ...] = tuple(sorted(member.value for member in AttentionBackendName))


@dataclass(frozen=True)
class LoadOptions:
    """Operator options, checked: where and how the pipeline is loaded. All off by default."""

    device: torch.device
    dtype: torch.dtype
    compile_transformer: bool = False
    attention_backend: str | None = None
    cpu_offload: bool = False


def resolve_device(name: str) -> torch.device:
    """Turn a device name ("auto", "cpu", "cuda", "cuda:1", ...) into a torch.device; "auto" prefers CUDA."""
    key = name.strip().lower()
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(key)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"unknown device {name!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if device.type not in _DEVICE_TYPES:
        raise ValueError(f"unsupported device {name!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    # Fail at startup with a clear message rather than on the first tensor moved to a missing GPU.
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this host")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Turn a dtype name into a torch.dtype; "auto" is bfloat16 on CUDA and float32 elsewhere."""
    key = name.strip().lower()
    if key == "auto":
        # bf16 is what the weights are published in; CPUs run it slowly, so they get float32.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[key]
    except KeyError:
        allowed = ", ".join(["auto", *sorted(_DTYPES)])
        raise ValueError(f"unknown dtype {name!r}: use one of {allowed}") from None


def resolve_options(
    *,
    device: str = "auto",
    dtype: str = "auto",
    compile_transformer: bool = False,
    attention_backend: str | None = None,
    cpu_offload: bool = False,
) -> LoadOptions:
    """Check every operator option before any weight is read; a bad one is a ValueError naming it."""
    for name, value in (("compile_transformer", compile_transformer), ("cpu_offload", cpu_offload)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
    torch_device = resolve_device(device)
    backend = None
    if attention_backend is not None and attention_backend.strip():
        backend = attention_backend.strip().lower()
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"unknown attention_backend {attention_backend!r}: use one of {', '.join(ATTENTION_BACKENDS)} "
                "(or leave it unset for PyTorch's scaled_dot_product_attention)"
            )
    if cpu_offload and torch_device.type != "cuda":
        raise ValueError(f"cpu_offload needs CUDA (device is {torch_device}); set cpu_offload=false")
    return LoadOptions(
        device=torch_device,
        dtype=resolve_dtype(dtype, torch_device),
        compile_transformer=compile_transformer,
        attention_backend=backend,
        cpu_offload=cpu_offload,
    )


def apply_options(pipe: ZImagePipeline, options: LoadOptions) -> ZImagePipeline:
    """Place a loaded pipeline (or offload it) and apply the attention backend and compile options."""
    if options.cpu_offload:
        # Weights stay on the host; each model moves to the GPU when its forward runs.
        pipe.enable_model_cpu_offload(device=options.device)
    else:
        pipe.to(options.device)
    if options.attention_backend is not None:
        try:
            pipe.transformer.set_attention_backend(options.attention_backend)
        except Exception as exc:  # a missing package (flash-attn, sageattention, kernels) or a hub download
            raise ValueError(f"attention_backend {options.attention_backend!r} cannot be used here: {exc}") from exc
    if options.compile_transformer:
        # Regional compilation: the 30 identical blocks share one compiled graph, so it compiles in seconds
        # rather than minutes, with the speed of a whole-model compile (diffusers' compile_repeated_blocks).
        pipe.transformer.compile_repeated_blocks()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_turbo(
    model: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    compile_transformer: bool = False,
    attention_backend: str | None = None,
    cpu_offload: bool = False,
) -> ZImagePipeline:
    """Load a Z-Image-Turbo pipeline (hub id or local folder) onto ``device`` in ``dtype``, quietly."""
    options = LoadOptions(device, dtype, compile_transformer, attention_backend, cpu_offload)
    # diffusers 0.42 deprecates `torch_dtype=` in favour of `dtype=`.
    pipe = ZImagePipeline.from_pretrained(model, dtype=dtype)
    return apply_options(pipe, options)
