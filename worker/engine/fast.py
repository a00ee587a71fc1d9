"""Fast mode (a job's ``"acceleration": "cache"``): Cache-DiT's DBCache on the transformer with a static step mask.

On a cached step the transformer runs its first block (``FN_BLOCKS``) and adds the residual its middle blocks
produced at the last computed step instead of running them; which steps are cached is cache-dit's
``steps_mask(total_steps=steps, mask_policy=MASK_POLICY)`` for the batch's step count, fixed before the call.
Never a dynamic threshold: the residual-difference test would be one decision for the whole batch, and an image
would then depend on its batch-mates. With a static mask every image of a call follows the same schedule and
each carries its own residual (cache-dit keeps the residual tensor per image), so a fast image is the same
whatever batch it runs in.

The pitfalls of cache-dit 1.5.3 this is built around:

- ``enable_cache`` on a *pipeline* patches ``ZImagePipeline.__call__`` for the whole class (and enabling two
  instances, then disabling both, breaks every ZImagePipeline in the process): it is enabled on the transformer
  alone (a persistent context, no class patched), once per transformer, and never disabled.
- A transformer-only cache keeps its context between calls (the first step would reuse the previous request's
  residual) and caches the configured step count's steps: ``refresh`` rebuilds the context with the call's own
  step count and mask before **every** pipeline call (each caption bucket, each retried half).
- Exact batches must stay the bare model's computation: the transformer's ``forward`` is cache-dit's only inside
  ``FastMode.active`` (a fast batch, under the engine's run lock) and the bare one at every other time, so exact
  jobs, img2img and inpaint on the same transformer never go through the cache.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

MASK_POLICY = "medium"  # cache-dit's middle predefined policy (slow, medium, fast, ultra)
FN_BLOCKS = 1  # blocks run first on every step (DBCache "F1B0": the rest are the cached middle)
BN_BLOCKS = 0  # blocks run last on every step


@functools.lru_cache(maxsize=128)
def fast_mask(steps: int) -> tuple[int, ...]:
    """The static mask of a ``steps``-step call: 1 computes every block, 0 reuses the middle blocks' residual.

    cache-dit's predefined policy for the step count; it has none for 1, 2, 3, 5 and 7 steps, which then compute
    every step (fast mode runs them exactly)."""
    if steps < 8 and steps not in (4, 6):
        return (1,) * steps
    from cache_dit import steps_mask

    mask = tuple(int(m) for m in steps_mask(total_steps=steps, mask_policy=MASK_POLICY))
    if len(mask) != steps:
        raise RuntimeError(f"cache-dit's mask for {steps} steps has {len(mask)} entries")
    return mask


def skipped_fraction(steps: int, blocks: int) -> float:
    """The fraction of the main blocks' calls a fast call of ``steps`` steps skips on a ``blocks``-block stack."""
    cached = fast_mask(steps).count(0)
    middle = max(blocks - FN_BLOCKS - BN_BLOCKS, 0)
    return cached * middle / (steps * blocks)


def available() -> bool:
    """Whether cache-dit can be imported here."""
    try:
        import cache_dit  # noqa: F401
    except ImportError:
        return False
    return True


def _config(steps: int) -> Any:
    """A DBCache config that caches exactly the steps of ``fast_mask(steps)`` and decides nothing at run time."""
    from cache_dit import DBCacheConfig

    return DBCacheConfig(
        Fn_compute_blocks=FN_BLOCKS,
        Bn_compute_blocks=BN_BLOCKS,
        num_inference_steps=steps,
        steps_computation_mask=list(fast_mask(steps)),
        steps_computation_policy="static",
        # The dynamic test answers "compute" whatever the residuals (a threshold of 0 never caches), so no
        # step outside the mask could ever be cached on a data-dependent decision.
        residual_diff_threshold=0.0,
        enable_separate_cfg=False,  # ZImagePipeline runs CFG as one doubled batch: one forward per step
    )


class FastMode:
    """Cache-DiT installed on one transformer, switched on only for fast batches (see the module's notes).

    One per transformer (``FastMode.of``): every engine built on the same modules shares it, as cache-dit can
    be enabled on a transformer only once."""

    @classmethod
    def of(cls, transformer: torch.nn.Module) -> FastMode:
        """The transformer's FastMode, made at its first use."""
        fast = _PER_TRANSFORMER.get(transformer)
        if fast is None:
            fast = _PER_TRANSFORMER[transformer] = cls(transformer)
        return fast

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer
        self._bare: Any = None  # the transformer's own ``forward`` attribute before cache-dit (None: the class's)
        self._cached: Any = None  # cache-dit's forward, once installed
        self.calls = 0  # fast pipeline calls (refreshes)

    @property
    def installed(self) -> bool:
        """Whether cache-dit has been enabled on the transformer (at the first fast batch)."""
        return self._cached is not None

    def _install(self, steps: int) -> None:
        import cache_dit

        self._bare = self.transformer.__dict__.get("forward")  # an accelerate hook's forward, if any
        cache_dit.enable_cache(self.transformer, cache_config=_config(steps))
        self._cached = self.transformer.__dict__["forward"]
        self._restore()

    def _restore(self) -> None:
        """The bare forward back: the transformer's own attribute as it was, or the class's method."""
        if self._bare is None:
            self.transformer.__dict__.pop("forward", None)
        else:
            self.transformer.forward = self._bare

    def needed(self, steps: int) -> bool:
        """Whether a fast call of ``steps`` steps skips anything (else it runs the bare model)."""
        return 0 in fast_mask(steps)

    @contextmanager
    def active(self, steps: int | None) -> Iterator[None]:
        """Within the block the transformer runs with the cache (``steps``: the batch's step count), or bare
        (``steps`` None: an exact batch, or a fast one whose mask caches nothing)."""
        if steps is None or not self.needed(steps):
            yield
            return
        if not self.installed:
            self._install(steps)
        self.transformer.forward = self._cached
        try:
            yield
        finally:
            self._restore()

    def refresh(self, steps: int) -> None:
        """A fresh context for the next pipeline call of ``steps`` steps: step counter, residuals and mask."""
        if not self.installed or self.transformer.__dict__.get("forward") is not self._cached:
            return  # bare: nothing cached to reset
        import cache_dit

        cache_dit.refresh_context(self.transformer, cache_config=_config(steps))
        self.calls += 1


_PER_TRANSFORMER: weakref.WeakKeyDictionary[torch.nn.Module, FastMode] = weakref.WeakKeyDictionary()
