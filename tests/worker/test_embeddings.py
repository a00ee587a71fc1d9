"""Prompt embeddings: padded to the longest prompt they equal the pipeline's 512-padded ones; the cache works."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline

from tests.helpers.engine import EN_300, EN_LONG, EN_SHORT, TOLERANCE, ZH, diff, images_of, request, single
from worker.engine import Engine, EngineOptions
from worker.engine.embeddings import EmbeddingCache, PromptEncoder


@pytest.fixture
def engine(tiny_turbo_dir: Path) -> Engine:
    """A fresh engine (empty cache) per test."""
    return Engine.from_pretrained(str(tiny_turbo_dir), EngineOptions(device="cpu", dtype="float32"))


class EncoderCalls:
    """Counts text-encoder forward calls and records the length of their token inputs."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.lengths: list[int] = []
        self._handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.lengths.append(kwargs["input_ids"].shape[1])

    @property
    def count(self) -> int:
        """Forward calls so far."""
        return len(self.lengths)

    def remove(self) -> None:
        """Stop counting."""
        self._handle.remove()


@pytest.fixture
def encoder_calls(engine: Engine) -> Iterator[EncoderCalls]:
    """Counts the engine's text-encoder forward calls during one test."""
    calls = EncoderCalls(engine.pipe.text_encoder)
    yield calls
    calls.remove()


def test_longest_padding_gives_the_pipelines_embeddings(engine: Engine, reference: ZImagePipeline) -> None:
    prompts = [EN_SHORT, EN_300, ZH, EN_LONG]
    expected, _ = reference.encode_prompt(list(prompts), device=torch.device("cpu"), do_classifier_free_guidance=False)
    ours = engine.encoder.encode(prompts, "cpu")
    for prompt, a, b in zip(prompts, ours, expected, strict=True):
        assert a.shape == b.shape, prompt[:20]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # measured: <= 1e-8
    # The guard: a different prompt of the same length is far away, so the tolerance can tell prompts apart.
    other = engine.encoder.encode(["a dog"], "cpu")[0]
    assert other.shape == ours[0].shape and (other - ours[0]).abs().max() > 1e-2


def test_the_encoder_pads_to_the_longest_prompt_not_512(tiny_turbo_dir: Path) -> None:
    engine = Engine.from_pretrained(str(tiny_turbo_dir), EngineOptions(device="cpu", dtype="float32"))
    padded = Engine.from_pretrained(
        str(tiny_turbo_dir), EngineOptions(device="cpu", dtype="float32", pad_to_longest=False)
    )
    longest, full = EncoderCalls(engine.pipe.text_encoder), EncoderCalls(padded.pipe.text_encoder)
    engine.encoder.encode([EN_SHORT, EN_LONG, ZH], "cpu")
    padded.encoder.encode([EN_SHORT, EN_LONG, ZH], "cpu")
    # The longest prompt plus one padding position (so the encoder always takes its masked path, as at 512).
    assert longest.lengths == [engine.encoder.caption_tokens(EN_LONG) + 1] and longest.lengths[0] < 64
    assert full.lengths == [512]


def test_one_prompt_with_64_seeds_encodes_once(engine: Engine, encoder_calls: EncoderCalls) -> None:
    # A bulk submission: 64 one-image jobs with the same prompt, in four batches of sixteen.
    jobs = [request(EN_LONG, (seed,)) for seed in range(64)]
    for start in range(0, 64, 16):
        prepared = engine.prepare(jobs[start : start + 16])
        assert len(prepared.images) == 16
    assert encoder_calls.count == 1
    assert engine.embedding_cache is not None and len(engine.embedding_cache) == 1
    stats = engine.embedding_cache.stats()
    assert (stats.misses, stats.hits) == (1, 3)


def test_generate_reuses_cached_embeddings_and_images_match(
    engine: Engine, reference: ZImagePipeline, encoder_calls: EncoderCalls
) -> None:
    first = engine.generate([request(ZH, (1, 2)), request(EN_SHORT, (3,))])
    second = engine.generate([request(EN_SHORT, (4,)), request(ZH, (5,))])
    assert encoder_calls.count == 1  # both distinct prompts in one padded call, then only cache hits
    for result, req in ((first[0], request(ZH, (1, 2))), (second[0], request(EN_SHORT, (4,)))):
        for seed, image in zip(req.seeds, images_of(result), strict=True):
            assert diff(image, single(reference, req, seed)) <= TOLERANCE


def test_guidance_caches_the_negative_prompt_too(engine: Engine, encoder_calls: EncoderCalls) -> None:
    for seed in range(3):
        engine.prepare([request(EN_SHORT, (seed,), guidance_scale=1.5, negative_prompt="blurry")])
    assert encoder_calls.count == 2  # the prompt and its negative, once each


def test_without_a_cache_every_batch_encodes(tiny_turbo_dir: Path) -> None:
    # Guards the counting tests above: with the cache off the same counter goes up every time.
    engine = Engine.from_pretrained(
        str(tiny_turbo_dir), EngineOptions(device="cpu", dtype="float32", embedding_cache_bytes=0)
    )
    calls = EncoderCalls(engine.pipe.text_encoder)
    for seed in range(3):
        engine.prepare([request(EN_LONG, (seed,))])
    assert engine.embedding_cache is None and calls.count == 3


def test_the_cache_key_names_the_text_encoder(engine: Engine) -> None:
    shared = EmbeddingCache(2**20)
    one = PromptEncoder(engine.pipe.tokenizer, engine.pipe.text_encoder, identity=("a", "fp32"), cache=shared)
    other = PromptEncoder(engine.pipe.tokenizer, engine.pipe.text_encoder, identity=("b", "fp32"), cache=shared)
    calls = EncoderCalls(engine.pipe.text_encoder)
    one.encode([EN_SHORT], "cpu")
    one.encode([EN_SHORT], "cpu")
    other.encode([EN_SHORT], "cpu")
    assert calls.count == 2 and len(shared) == 2


def tensor_of(nbytes: int) -> torch.Tensor:
    """A float32 tensor of exactly ``nbytes`` bytes."""
    return torch.zeros(nbytes // 4, dtype=torch.float32)


def test_lru_is_bounded_in_bytes() -> None:
    cache = EmbeddingCache(max_bytes=1000)
    cache.put("a", tensor_of(400))
    cache.put("b", tensor_of(400))
    assert cache.get("a") is not None  # "a" is now the most recently used
    cache.put("c", tensor_of(400))  # 1200 > 1000: evicts the least recently used, "b"
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.stats().bytes == 800
    cache.put("huge", tensor_of(2000))  # larger than the whole cache: not stored, nothing evicted
    assert cache.get("huge") is None and len(cache) == 2
    cache.put("a", tensor_of(100))  # replacing an entry frees its old bytes
    assert cache.stats().bytes == 500
    with pytest.raises(ValueError, match="embedding_cache_bytes"):
        EmbeddingCache(-1)


def test_cache_is_thread_safe() -> None:
    cache = EmbeddingCache(max_bytes=64 * 40)
    errors: list[BaseException] = []

    def hammer(worker: int) -> None:
        try:
            for i in range(2000):
                key = (worker * 7 + i) % 97
                if cache.get(key) is None:
                    cache.put(key, tensor_of(64))
        except BaseException as exc:  # noqa: BLE001 - any error in a thread must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    stats = cache.stats()
    assert stats.entries == 40 and stats.bytes == 64 * 40
    assert stats.hits + stats.misses == 4 * 2000
