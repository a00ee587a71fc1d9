"""Prompt embeddings: the text encoder run as ZImagePipeline runs it, padded to the longest prompt, and cached.

ZImagePipeline._encode_prompt wraps each prompt in the chat template (enable_thinking=True), tokenizes with
``padding="max_length"`` (512), runs the text encoder and keeps ``hidden_states[-2]`` at the unmasked positions.
The Qwen tokenizer pads on the right and the encoder is causal, so a real token never attends to padding: padding
to the longest prompt of the call instead of 512 gives the same embeddings for far less work -- exactly so in
float32 (within 1e-8). In bf16 the attention kernels round differently for different key lengths and batch
sizes (1 ulp in the embedding, measured up to 8/255 in the tiny model's image), so in half precision each prompt
is encoded alone at 512 tokens, as the pipeline encodes it: still cached, never batch-dependent.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from worker.engine.batching import distinct

MAX_SEQUENCE_LENGTH = 512  # the pipeline's default truncation
DEFAULT_CACHE_BYTES = 256 * 2**20  # about 500 prompts of 100 tokens at the real size (2560 x bf16)
ENCODE_CHUNK = 16  # prompts per text-encoder call: bounds the memory of its 37 kept hidden states


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of the cache's counters."""

    hits: int
    misses: int
    entries: int
    bytes: int
    max_bytes: int


class EmbeddingCache:
    """A thread-safe LRU of prompt embeddings, bounded in bytes; keys name the text encoder and the prompt."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"embedding_cache_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    @staticmethod
    def size_of(tensor: torch.Tensor) -> int:
        """Bytes a cached tensor holds."""
        return tensor.numel() * tensor.element_size()

    def get(self, key: Hashable) -> torch.Tensor | None:
        """The cached tensor (now most recently used), or None."""
        with self._lock:
            tensor = self._entries.get(key)
            if tensor is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return tensor

    def put(self, key: Hashable, tensor: torch.Tensor) -> None:
        """Store a tensor, evicting the least recently used ones past the byte bound; too large ones are skipped."""
        size = self.size_of(tensor)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= self.size_of(old)
            if size > self.max_bytes:
                return
            self._entries[key] = tensor
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= self.size_of(evicted)

    def clear(self) -> None:
        """Drop every entry (counters stay)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        """Counters and current size."""
        with self._lock:
            return CacheStats(self._hits, self._misses, len(self._entries), self._bytes, self.max_bytes)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class PromptEncoder:
    """Encodes prompts with a pipeline's tokenizer and text encoder, as its encode_prompt does; thread-safe."""

    def __init__(
        self,
        tokenizer: object,
        text_encoder: torch.nn.Module,
        *,
        identity: Hashable,
        cache: EmbeddingCache | None = None,
        pad_to_longest: bool = True,
        chunk: int = ENCODE_CHUNK,
        lock: threading.Lock | None = None,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    ) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.identity = identity
        self.cache = cache
        self.pad_to_longest = pad_to_longest
        self.chunk = chunk
        self.max_sequence_length = max_sequence_length
        # One lock for the tokenizer and the text encoder: the worker prepares the next batch in a thread while
        # the current one runs, and a fast tokenizer must not be used from two threads at once.
        self.lock = lock or threading.Lock()

    def template(self, prompt: str) -> str:
        """The prompt wrapped in the chat template exactly as ZImagePipeline wraps it."""
        return self.tokenizer.apply_chat_template(  # type: ignore[attr-defined]
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=True,
        )

    def caption_tokens(self, prompt: str) -> int:
        """Tokens the prompt's caption has (template included, truncated as the pipeline truncates)."""
        with self.lock:
            ids = self.tokenizer(  # type: ignore[operator]
                self.template(prompt), truncation=True, max_length=self.max_sequence_length
            ).input_ids
        return len(ids)

    def encode(self, prompts: Sequence[str], device: torch.device | str) -> list[torch.Tensor]:
        """One embedding (tokens x hidden) per prompt; each distinct uncached prompt is encoded once."""
        found: dict[str, torch.Tensor] = {}
        missing: list[str] = []
        for prompt in distinct(prompts):
            cached = self.cache.get((self.identity, prompt)) if self.cache is not None else None
            if cached is None:
                missing.append(prompt)
            else:
                found[prompt] = cached
        # Similar lengths share a call, so padding to the longest wastes little.
        missing.sort(key=len)
        for start in range(0, len(missing), self.chunk):
            chunk = missing[start : start + self.chunk]
            for prompt, embedding in zip(chunk, self._run_encoder(chunk, device), strict=True):
                found[prompt] = embedding
                if self.cache is not None:
                    self.cache.put((self.identity, prompt), embedding)
        return [found[prompt] for prompt in prompts]

    def _run_encoder(self, prompts: list[str], device: torch.device | str) -> list[torch.Tensor]:
        """The pipeline's _encode_prompt on fresh strings, padded to the longest prompt (or to 512 if asked)."""
        texts = [self.template(prompt) for prompt in prompts]
        with self.lock, torch.no_grad():
            length = self.max_sequence_length
            if self.pad_to_longest:
                unpadded = self.tokenizer(texts, truncation=True, max_length=length)  # type: ignore[operator]
                longest = max(len(ids) for ids in unpadded.input_ids)
                # One padding position past the longest prompt: with none at all, transformers drops the
                # attention mask and SDPA takes its unmasked causal path, not the masked one the pipeline's
                # 512-padded call takes (the same values in float32; in bf16, 1 ulp apart).
                length = min(length, longest + 1)
            inputs = self.tokenizer(  # type: ignore[operator]
                texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
            )
            mask = inputs.attention_mask.bool()
            # Lengths from the CPU mask: right padding makes the real tokens a prefix, and slicing by a known
            # length avoids a boolean-index sync on the accelerator (which would wait for the running batch).
            lengths = mask.sum(dim=1).tolist()
            hidden = self.text_encoder(
                input_ids=inputs.input_ids.to(device),
                attention_mask=mask.to(device),
                output_hidden_states=True,
            ).hidden_states[-2]
            if getattr(self.tokenizer, "padding_side", "right") != "right":
                return [hidden[i][mask[i].to(hidden.device)] for i in range(len(texts))]
            # clone(): a slice would keep the whole padded batch alive in the cache.
            return [hidden[i, :real].clone() for i, real in enumerate(lengths)]
