"""Inference engine: loads the Z-Image pipelines and runs batches; imports nothing of the queue or storage."""

from worker.engine.batching import caption_bucket, image_tokens, plan_batches
from worker.engine.embeddings import CacheStats, EmbeddingCache, PromptEncoder
from worker.engine.oom import OutOfMemory
from worker.engine.pipelines import ATTENTION_BACKENDS, load_turbo, resolve_device, resolve_dtype, resolve_options
from worker.engine.run import BatchInterrupted, Engine, ImageRequest, PreparedBatch, RequestResult

__all__ = [
    "ATTENTION_BACKENDS",
    "BatchInterrupted",
    "CacheStats",
    "EmbeddingCache",
    "Engine",
    "ImageRequest",
    "OutOfMemory",
    "PreparedBatch",
    "PromptEncoder",
    "RequestResult",
    "caption_bucket",
    "image_tokens",
    "load_turbo",
    "plan_batches",
    "resolve_device",
    "resolve_dtype",
    "resolve_options",
]
