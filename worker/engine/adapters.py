"""LoRA adapters in the transformer: loaded once by name, kept in an LRU bounded in bytes, switched per batch.

diffusers (through peft) wraps each targeted ``nn.Linear`` in a LoRA layer the first time an adapter is loaded;
the wrapped layer holds every loaded adapter's A and B, and choosing which of them run and at what scale is a
few attribute writes per layer, no weights move. A batch without adapters disables them (each wrapped layer
then runs its base layer alone, the bare model's exact computation).

A switch does per wrapped layer exactly what diffusers' ``enable_lora`` + ``set_adapters(names, scales)`` (and
``disable_lora``) do, peft's ``enable_adapters`` / ``set_adapter`` / ``set_scale``, but over the wrapped layers
listed once per load instead of a walk of every module of the model, twice: measured on the 6B transformer with
238 wrapped layers (``python -m bench.adapter_bench --full-size-switch``), 19.7 ms became 5.3 ms.

Every batch names its adapter set (the claim groups jobs by it), so a switch happens at most once per batch.
img2img and inpaint run on the Turbo transformer too: one ``AdapterSlots`` per transformer serves both.
"""

from __future__ import annotations

import json
import struct
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# The defining module, not `from diffusers import ...`: type checkers resolve the top-level name to a dummy.
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline
from safetensors.torch import load as load_safetensors

from core.errors import InvalidInput

_METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights keeps the adapter's peft config


@dataclass(frozen=True, eq=False)
class Adapter:
    """One adapter's weights on the host, as its file holds them, and the peft config saved with them."""

    name: str
    state: Mapping[str, torch.Tensor]
    metadata: dict[str, Any] | None
    nbytes: int  # of ``state`` on the host

    @classmethod
    def from_bytes(cls, name: str, data: bytes) -> Adapter:
        """Parse a .safetensors file (checked by the API when it was uploaded)."""
        state = load_safetensors(data)
        return cls(name, state, _file_metadata(data), sum(t.numel() * t.element_size() for t in state.values()))

    def parameters(self) -> int:
        """Numbers the adapter holds (what it takes on the accelerator, times the transformer's element size)."""
        return sum(t.numel() for t in self.state.values() if t.dim() > 0)


@dataclass(frozen=True)
class LoraUse:
    """An adapter applied to a request at a scale."""

    adapter: Adapter
    scale: float

    @property
    def key(self) -> tuple[str, float]:
        """What a batch must share: the adapter's name and scale."""
        return (self.adapter.name, float(self.scale))


def lora_key(uses: Sequence[LoraUse]) -> tuple[tuple[str, float], ...]:
    """The adapter set of a request, in a canonical order: requests sharing a call must have equal keys."""
    return tuple(sorted(use.key for use in uses))


class AdapterSlots:
    """The adapters loaded into one transformer: an LRU bounded in (accelerator) bytes. One per transformer
    (``of``): every pipeline built on it (generate, img2img, inpaint) must see the same loaded and active set."""

    @classmethod
    def of(cls, transformer: torch.nn.Module, max_bytes: int) -> AdapterSlots:
        """The transformer's slots, made at its first use with ``max_bytes``."""
        slots = _PER_TRANSFORMER.get(transformer)
        if slots is None:
            slots = _PER_TRANSFORMER[transformer] = cls(transformer, max_bytes)
        return slots

    def __init__(self, transformer: torch.nn.Module, max_bytes: int) -> None:
        self.transformer: Any = transformer  # a diffusers model with peft's adapter methods
        self.max_bytes = max_bytes
        self._loaded: OrderedDict[str, int] = OrderedDict()  # name -> bytes in the transformer, oldest use first
        self._active: tuple[tuple[str, float], ...] = ()
        self._layers: list[Any] = []  # the transformer's LoRA-wrapped layers (peft BaseTunerLayer), after each load
        self._lock = threading.Lock()
        self.loads = 0  # adapters loaded into the transformer (a miss)
        self.evictions = 0
        self.switches = 0  # changes of the active set
        self.switch_seconds = 0.0  # time spent in those changes, loads excluded

    @property
    def loaded(self) -> list[str]:
        """Names of the adapters in the transformer, least recently used first."""
        return list(self._loaded)

    @property
    def active(self) -> tuple[tuple[str, float], ...]:
        """The (name, scale) pairs the next call runs with; empty: adapters disabled."""
        return self._active

    def bytes_used(self) -> int:
        """Bytes the loaded adapters take in the transformer."""
        return sum(self._loaded.values())

    def activate(self, uses: Sequence[LoraUse]) -> None:
        """Make the transformer run with exactly ``uses`` (none: the bare model), loading what is missing."""
        key = lora_key(uses)
        with self._lock:
            names = [name for name, _ in key]
            if len(set(names)) != len(names):
                raise InvalidInput(f"an adapter is named twice: {names}")
            for use in uses:
                self._ensure(use.adapter, keep=set(names))
            if key == self._active:
                return
            started = time.perf_counter()
            for layer in self._layers:
                if not key:
                    layer.enable_adapters(False)
                    continue
                if layer.disable_adapters:
                    layer.enable_adapters(True)
                layer.set_adapter(names)
                for name, scale in key:
                    layer.set_scale(name, scale)
            self._active = key
            self.switches += 1
            self.switch_seconds += time.perf_counter() - started

    def preload(self, adapters: Sequence[Adapter]) -> list[str]:
        """Load adapters ahead of their first batch (a restart re-warming), as far as the budget allows; the
        transformer keeps running bare. Returns the names loaded."""
        done = []
        with self._lock:
            for adapter in adapters:
                if adapter.name in self._loaded or self._size(adapter) + self.bytes_used() > self.max_bytes:
                    continue
                self._ensure(adapter, keep=set())
                done.append(adapter.name)
            if done:  # a load activates the adapter it loads: back to the bare model
                for layer in self._layers:
                    layer.enable_adapters(False)
                self._active = ()
        return done

    def _size(self, adapter: Adapter) -> int:
        return adapter.parameters() * self.transformer.dtype.itemsize

    def _ensure(self, adapter: Adapter, *, keep: set[str]) -> None:
        """Load ``adapter`` unless it is loaded, evicting least recently used ones (never those in ``keep``)."""
        if adapter.name in self._loaded:
            self._loaded.move_to_end(adapter.name)
            return
        size = self._size(adapter)
        for name in list(self._loaded):
            if self.bytes_used() + size <= self.max_bytes:
                break
            if name not in keep:
                self._evict(name)
        # The two public halves of ZImagePipeline.load_lora_weights: the format conversion (kohya and ComfyUI
        # layouts to diffusers'), then the load into the transformer, with the file's own peft config (its
        # lora_alpha) as load_lora_weights reads it from a file.
        state = ZImagePipeline.lora_state_dict(dict(adapter.state))
        ZImagePipeline.load_lora_into_transformer(
            state, transformer=self.transformer, adapter_name=adapter.name, metadata=adapter.metadata
        )
        self._loaded[adapter.name] = size
        self._list_layers()
        self.loads += 1
        self._active = (("?", -1.0),)  # a load activates the new adapter alone: the next activate must set it

    def _list_layers(self) -> None:
        """List the wrapped layers again (a load can wrap new ones; an eviction can unwrap some)."""
        # Imported here: peft is needed once an adapter is loaded, not to run the bare engine (a GPU host
        # benchmarking the bare model may not have it).
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._layers = [m for m in self.transformer.modules() if isinstance(m, BaseTunerLayer)]

    def _evict(self, name: str) -> None:
        self.transformer.delete_adapters(name)
        del self._loaded[name]
        self._list_layers()
        self.evictions += 1
        self._active = (("?", -1.0),)


_PER_TRANSFORMER: weakref.WeakKeyDictionary[torch.nn.Module, AdapterSlots] = weakref.WeakKeyDictionary()


def _file_metadata(data: bytes) -> dict[str, Any] | None:
    """The adapter config diffusers saved in the file's header, as load_lora_weights reads it."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    raw = (header.get("__metadata__") or {}).get(_METADATA_KEY)
    return json.loads(raw) if raw else None
