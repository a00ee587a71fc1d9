"""Load the Z-Image pipelines once per process: device and dtype choice, the Turbo loader."""

from __future__ import annotations

import torch

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


def load_turbo(model: str, device: torch.device, dtype: torch.dtype) -> ZImagePipeline:
    """Load a Z-Image-Turbo pipeline (hub id or local folder) onto ``device`` in ``dtype``, quietly."""
    # diffusers 0.42 deprecates `torch_dtype=` in favour of `dtype=`.
    pipe = ZImagePipeline.from_pretrained(model, dtype=dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
