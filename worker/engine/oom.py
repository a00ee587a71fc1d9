"""Out-of-memory handling: the per-request failure marker, freeing memory, and the test-only fault injection."""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OutOfMemory:
    """Stands in for a request's images: one of them did not fit in accelerator memory even alone."""

    message: str


def free_memory(device: torch.device) -> None:
    """Give cached accelerator memory back after an out-of-memory error, before the retry."""
    # The failed call's tensors die with its frames; collect cycles so they are really gone.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_injected(images: int, oom_above_images: int | None) -> None:
    """Raise torch.OutOfMemoryError when fault injection says a call of this many images does not fit."""
    if oom_above_images is not None and images > oom_above_images:
        raise torch.OutOfMemoryError(
            f"injected out-of-memory: a call of {images} image(s) exceeds oom_above_images={oom_above_images}"
        )


def short_message(exc: BaseException) -> str:
    """The first line of an out-of-memory error: CUDA's own message runs to several lines of allocator advice."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
