"""Out-of-memory handling: running a call in halves until each part fits, freeing memory, fault injection.

A request whose image does not fit even alone gets ``core.errors.OutOfMemory`` in place of its images; the
other requests of its batch still get theirs.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from core.errors import OutOfMemory
from worker.engine.batching import halves

T = TypeVar("T")


def run_in_halves(
    images: Sequence[int],
    run: Callable[[list[int]], Sequence[T]],
    *,
    request_of: Callable[[int], int],
    failed: dict[int, OutOfMemory],
    device: torch.device,
    what: str,
) -> dict[int, T]:
    """``run(images)`` for the images (by index), returning each one's result by index. On out-of-memory, free
    memory and run each half, down to single images; an image that does not fit alone fails its request
    (``failed[request]``), whose other images are then dropped. ``what`` names one image in the message."""
    images = [i for i in images if request_of(i) not in failed]
    if not images:
        return {}
    message = ""
    try:
        return dict(zip(images, run(images), strict=True))
    except torch.OutOfMemoryError as exc:
        message = short_message(exc)
    # Outside the except block: the error's traceback (and the tensors its frames hold) is released now.
    free_memory(device)
    if len(images) == 1:
        failed[request_of(images[0])] = OutOfMemory(f"out of memory generating one {what} image: {message}")
        return {}
    results: dict[int, T] = {}
    for half in halves(images):
        results.update(run_in_halves(half, run, request_of=request_of, failed=failed, device=device, what=what))
    return results


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
