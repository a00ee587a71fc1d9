"""Inference engine: loads the Z-Image pipelines and runs batches; imports nothing of the queue or storage.

What the worker uses is exported here; benchmarks and tests reach into the submodules for the rest.
"""

from worker.engine.adapters import Adapter, AdapterSlots, LoraUse
from worker.engine.edit import EditEngine, EditRequest
from worker.engine.options import EngineOptions
from worker.engine.progress import BatchInterrupted, StepCallback
from worker.engine.run import Engine, ImageRequest, PreparedBatch, RequestResult

__all__ = [
    "Adapter",
    "AdapterSlots",
    "LoraUse",
    "BatchInterrupted",
    "EditEngine",
    "EditRequest",
    "Engine",
    "EngineOptions",
    "ImageRequest",
    "PreparedBatch",
    "RequestResult",
    "StepCallback",
]
