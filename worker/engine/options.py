"""``EngineOptions``: every option of the inference engine in one frozen object, checked once when built.

The worker builds it from the service's settings (``worker.process.engine_options``); benchmarks and tests build
it directly. A bad option is a ValueError naming it, raised before any weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.models.attention_dispatch import AttentionBackendName

from worker.engine.decode import DEFAULT_DECODE_PIXELS
from worker.engine.embeddings import DEFAULT_CACHE_BYTES

DEFAULT_ADAPTER_BYTES = 1 << 30  # LoRA weights kept in the transformer (rank 32 on every projection: ~0.2 GB)

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
class EngineOptions:
    """Where and how the pipelines load and run. Every field is checked when the object is built.

    ``device`` / ``dtype`` are names ("auto" prefers CUDA, and bf16 there, float32 elsewhere); ``torch_device``
    and ``torch_dtype`` are what they resolve to. The tuning fields default to what measurements chose (None:
    decided from the dtype and device); ``oom_above_images`` is fault injection for tests and drills.
    """

    device: str = "auto"
    dtype: str = "auto"
    compile_transformer: bool = False  # torch.compile the transformer's repeated blocks
    attention_backend: str | None = None  # a diffusers attention backend; None: PyTorch's SDPA
    cpu_offload: bool = False  # model CPU offload for cards too small for the pipeline (CUDA only)
    embedding_cache_bytes: int = DEFAULT_CACHE_BYTES  # prompt-embedding LRU; 0 turns it off
    adapter_cache_bytes: int = DEFAULT_ADAPTER_BYTES  # LoRA adapters kept loaded in the transformer
    pad_to_longest: bool | None = None  # pad prompts to the longest of the batch, not 512
    min_call_tokens: int | None = None  # below this, caption buckets share one (masked) call
    decode_pixels: int = DEFAULT_DECODE_PIXELS  # VAE decode chunk, in output pixels
    oom_above_images: int | None = None  # pipeline calls of more images raise out-of-memory (0: every call)
    merge_buckets: bool | None = None  # let caption buckets share a masked call
    torch_device: torch.device = field(init=False)
    torch_dtype: torch.dtype = field(init=False)

    def __post_init__(self) -> None:
        for name in ("compile_transformer", "cpu_offload"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name, low in (
            ("embedding_cache_bytes", 0),
            ("adapter_cache_bytes", 0),
            ("min_call_tokens", 0),
            ("decode_pixels", 1),
        ):
            value = getattr(self, name)
            if name == "min_call_tokens" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        oom = self.oom_above_images
        if oom is not None and (isinstance(oom, bool) or not isinstance(oom, int) or oom < 0):
            raise ValueError(f"oom_above_images must be None or an integer >= 0, got {oom!r}")
        device = resolve_device(self.device)
        if self.cpu_offload and device.type != "cuda":
            raise ValueError(f"cpu_offload needs CUDA (device is {device}); set cpu_offload=false")
        object.__setattr__(self, "torch_device", device)
        object.__setattr__(self, "torch_dtype", resolve_dtype(self.dtype, device))
        object.__setattr__(self, "attention_backend", _attention_backend(self.attention_backend))


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


def _attention_backend(name: str | None) -> str | None:
    """The attention backend's canonical name, or None for PyTorch's default."""
    if name is None or not name.strip():
        return None
    backend = name.strip().lower()
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention_backend {name!r}: use one of {', '.join(ATTENTION_BACKENDS)} "
            "(or leave it unset for PyTorch's scaled_dot_product_attention)"
        )
    return backend
