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

DEFAULT_TOKEN_BUDGET = 8192  # 1024^2: 2 images, 512^2: 8, 256^2: 32
DEFAULT_MAX_IMAGES = 32  # the token budget is the real limit; this caps tiny images
# Token equivalents below which a transformer call underuses the device: an H100 needs about four 512^2 images
# (4096 tokens) to run the 6B model at full rate; two CPU cores run the tiny model at its best from about 512.
MIN_CALL_TOKENS_CUDA = 4096
MIN_CALL_TOKENS_CPU = 512


def default_min_call_tokens(device_type: str) -> int:
    """The saturation point of ``call_cost`` for a device type."""
    return MIN_CALL_TOKENS_CUDA if device_type == "cuda" else MIN_CALL_TOKENS_CPU


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


def call_cost(images: int, sequence: int, model_dim: int, min_call_tokens: int) -> float:
    """Estimated work of one transformer call, in token equivalents; a call below saturation costs as if full.

    Per token, the linear layers cost about 24 * dim^2 FLOPs and attention 4 * sequence * dim, hence the
    ``1 + sequence / (6 * dim)`` factor. Below ``min_call_tokens`` the accelerator is underused: a small call costs
    about what a full one does (on an H100 one 512^2 image runs at a third of a batch of four's rate).
    """
    tokens = images * sequence * (1 + sequence / (6 * model_dim))
    return max(tokens, min_call_tokens) + 1.0  # +1: of two equal plans, the one with fewer calls wins


def plan_calls(
    buckets: Sequence[int], tokens_per_image: int, min_call_tokens: int, model_dim: int = 3840, *, merge: bool = True
) -> list[list[int]]:
    """Split one batch's images (given by caption bucket) into pipeline calls; returns image indices per call.

    Images of one bucket share a call without mask or padding. Buckets next to each other may share a call
    too, every caption padded (and masked) to the call's longest bucket: cheaper than underfilled calls when
    buckets are small, dearer when captions are long next to the image (256^2: 256 image tokens against
    captions of up to 512). The cheapest contiguous grouping of the sorted buckets under ``call_cost`` is
    found exactly (a small dynamic programme: a batch has at most 16 buckets). ``merge=False``: one call per
    bucket, never a mask.
    """
    by_bucket: dict[int, list[int]] = {}
    for index, bucket in enumerate(buckets):
        by_bucket.setdefault(bucket, []).append(index)
    keys = sorted(by_bucket)
    best = [0.0] + [float("inf")] * len(keys)
    start_of = [0] * (len(keys) + 1)
    for end in range(1, len(keys) + 1):
        images = 0
        for start in range(end, 0 if merge else end - 1, -1):  # the call holds buckets keys[start-1 .. end-1]
            images += len(by_bucket[keys[start - 1]])
            cost = best[start - 1] + call_cost(images, tokens_per_image + keys[end - 1], model_dim, min_call_tokens)
            if cost < best[end]:
                best[end], start_of[end] = cost, start - 1
    calls: list[list[int]] = []
    end = len(keys)
    while end > 0:
        start = start_of[end]
        calls.append(sorted(i for key in keys[start:end] for i in by_bucket[key]))
        end = start
    return calls[::-1]


def halves(items: Sequence[T]) -> tuple[list[T], list[T]]:
    """Split a sequence in two halves (the first one the larger) for an out-of-memory retry."""
    middle = (len(items) + 1) // 2
    return list(items[:middle]), list(items[middle:])


def distinct(items: Iterable[T]) -> list[T]:
    """The items without repeats, in first-seen order."""
    return list(dict.fromkeys(items))
