"""Inference engine: loads the Z-Image pipelines and runs batches; imports nothing of the queue or storage."""

from worker.engine.pipelines import load_turbo, resolve_device, resolve_dtype
from worker.engine.run import BatchInterrupted, Engine, ImageRequest

__all__ = [
    "BatchInterrupted",
    "Engine",
    "ImageRequest",
    "load_turbo",
    "resolve_device",
    "resolve_dtype",
]
