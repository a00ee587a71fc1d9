"""Batch shapes: image tokens, caption-length buckets, worker-style batch plans, call plans, OOM halves.

How the Z-Image transformer sees a batch (diffusers 0.42.1, ``transformer_z_image.py``): every caption is padded
to a multiple of ``SEQ_MULTI_OF`` (32) tokens with a learned pad token that is NOT masked (it is part of what the
model was trained on, so a caption's bucket belongs to its image, whatever batch it runs in), and the image
patches likewise. The unified sequence of one item is ``[image patches, caption padded to 32k]``; when items of
one call have different unified lengths, the shorter ones are zero-padded and an attention mask is built. So two
captions in the same 32-token bucket with the same image size give equal lengths and a call needs no mask.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TypeVar

from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

T = TypeVar("T")

PATCH_PIXELS = 16  # VAE scale 8 x transformer patch 2: one image token per 16x16 pixels
DEFAULT_TOKEN_BUDGET = 8192  # 1024^2: 2 images, 512^2: 8, 256^2: 32
DEFAULT_MAX_IMAGES = 16
# A call with at least this many image tokens keeps an H100 busy (512^2: 4 images) and the tiny CPU model too.
DEFAULT_MIN_CALL_TOKENS = 4096


def image_tokens(width: int, height: int) -> int:
    """Image tokens (latent patches) one image of this size puts in the transformer's sequence."""
    return (width // PATCH_PIXELS) * (height // PATCH_PIXELS)


def caption_bucket(caption_tokens: int) -> int:
    """The padded caption length the transformer uses: the next multiple of 32 (at least 32)."""
    return max(SEQ_MULTI_OF, -(-caption_tokens // SEQ_MULTI_OF) * SEQ_MULTI_OF)


def plan_batches(
    items: Sequence[T],
    *,
    key: Callable[[T], Hashable],
    tokens: Callable[[T], int],
    images: Callable[[T], int],
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    max_images: int = DEFAULT_MAX_IMAGES,
) -> list[list[T]]:
    """Group items the way the worker claims them: in order, same key, up to the token budget and image cap.

    An item is never split, and one that alone exceeds a limit still runs, alone.
    """
    open_batches: dict[Hashable, tuple[list[T], int, int]] = {}
    done: list[list[T]] = []
    for item in items:
        k = key(item)
        batch, used_tokens, used_images = open_batches.get(k, ([], 0, 0))
        t, n = tokens(item), images(item)
        if batch and (used_tokens + t > token_budget or used_images + n > max_images):
            done.append(batch)
            batch, used_tokens, used_images = [], 0, 0
        open_batches[k] = (batch + [item], used_tokens + t, used_images + n)
    done.extend(batch for batch, _, _ in open_batches.values())
    # Keep the order of each batch's first item: priority then age, as claimed.
    position = {id(item): i for i, item in enumerate(items)}
    return sorted(done, key=lambda batch: position[id(batch[0])])


def plan_calls(buckets: Sequence[int], tokens_per_image: int, min_call_tokens: int) -> list[list[int]]:
    """Split one batch's images (given by caption bucket) into pipeline calls; returns image indices per call.

    Each bucket gets its own call, so the call needs no attention mask and no padding tokens. A bucket too small
    to fill the accelerator on its own (fewer than ``min_call_tokens`` image tokens) is merged with the next
    larger bucket instead: a masked call is cheaper than an underfilled extra call.
    """
    by_bucket: dict[int, list[int]] = {}
    for index, bucket in enumerate(buckets):
        by_bucket.setdefault(bucket, []).append(index)
    calls: list[list[int]] = []
    pending: list[int] = []
    for bucket in sorted(by_bucket):
        pending.extend(by_bucket[bucket])
        if len(pending) * tokens_per_image >= min_call_tokens:
            calls.append(pending)
            pending = []
    if pending:
        if calls and len(calls[-1]) * tokens_per_image < 2 * min_call_tokens:
            # A small remainder joins the last call rather than running underfilled on its own.
            calls[-1].extend(pending)
        else:
            calls.append(pending)
    return [sorted(call) for call in calls]


def halves(items: Sequence[T]) -> tuple[list[T], list[T]]:
    """Split a sequence in two halves (the first one the larger) for an out-of-memory retry."""
    middle = (len(items) + 1) // 2
    return list(items[:middle]), list(items[middle:])


def distinct(items: Iterable[T]) -> list[T]:
    """The items without repeats, in first-seen order."""
    return list(dict.fromkeys(items))
