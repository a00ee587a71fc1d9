"""Run one batch of compatible image requests through a loaded pipeline in a single call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# The defining module, not `from diffusers import ...`: type checkers resolve the top-level name to a dummy.
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline
from PIL import Image

from worker.engine.pipelines import load_turbo, resolve_device, resolve_dtype

StepCallback = Callable[[int, int], bool]

WARMUP_SIZE = 256  # the smallest size the service allows


@dataclass(frozen=True)
class ImageRequest:
    """One job's worth of images: every image shares the prompt; image i uses seeds[i]."""

    prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seeds: tuple[int, ...]
    negative_prompt: str | None = None


class BatchInterrupted(Exception):
    """The step callback asked the batch to stop (cancel)."""

    def __init__(self, steps_done: int, total: int) -> None:
        super().__init__(f"batch interrupted after step {steps_done} of {total}")
        self.steps_done = steps_done
        self.total = total


@dataclass(frozen=True)
class _BatchShape:
    """What every request in one pipeline call must share."""

    width: int
    height: int
    steps: int
    guidance_scale: float


class Engine:
    """Runs compatible image requests through one loaded pipeline in a single call."""

    def __init__(self, pipe: ZImagePipeline, *, model_id: str) -> None:
        self.pipe = pipe
        self.model_id = model_id
        self.load_count = 0

    @classmethod
    def from_pretrained(cls, model: str, *, device: str = "auto", dtype: str = "auto") -> Engine:
        """Load the Turbo pipeline from a hub id or local folder and wrap it in an engine."""
        torch_device = resolve_device(device)
        engine = cls(load_turbo(model, torch_device, resolve_dtype(dtype, torch_device)), model_id=model)
        engine.load_count = 1
        return engine

    @property
    def device(self) -> torch.device:
        """The device the pipeline runs on."""
        return self.pipe._execution_device

    def warmup(self) -> None:
        """Run one tiny call so kernels, allocator and RoPE tables are ready before the first real batch."""
        request = ImageRequest("warmup", WARMUP_SIZE, WARMUP_SIZE, steps=1, guidance_scale=0.0, seeds=(0,))
        self.generate([request])

    def generate(
        self, requests: Sequence[ImageRequest], on_step: StepCallback | None = None
    ) -> list[list[Image.Image]]:
        """Generate every request's images in one pipeline call; returns the images grouped per request."""
        if not requests:
            return []
        shape = self._shared_shape(requests)
        prompts = [request.prompt for request in requests for _ in request.seeds]
        seeds = [seed for request in requests for seed in request.seeds]
        negative_prompts = None
        # ZImagePipeline runs classifier-free guidance whenever guidance_scale > 0 (pos + s * (pos - neg)),
        # not only above 1, encoding "" as the negative: pass the requests' own negatives exactly then.
        if shape.guidance_scale > 0:
            negative_prompts = [request.negative_prompt or "" for request in requests for _ in request.seeds]
        images = self._call_pipeline(prompts, negative_prompts, seeds, shape, on_step)
        grouped: list[list[Image.Image]] = []
        start = 0
        for request in requests:
            grouped.append(images[start : start + len(request.seeds)])
            start += len(request.seeds)
        return grouped

    def _shared_shape(self, requests: Sequence[ImageRequest]) -> _BatchShape:
        """Check the requests can share one call and return what they share."""
        first = requests[0]
        shape = _BatchShape(first.width, first.height, first.steps, float(first.guidance_scale))
        for request in requests:
            other = _BatchShape(request.width, request.height, request.steps, float(request.guidance_scale))
            if other != shape:
                raise ValueError(
                    f"requests in one batch must share size, steps and guidance: {shape} != {other}"
                )
            if not request.seeds:
                raise ValueError("every request needs at least one seed")
        multiple = self.pipe.vae_scale_factor * 2
        if shape.width <= 0 or shape.height <= 0 or shape.width % multiple or shape.height % multiple:
            raise ValueError(
                f"width and height must be positive multiples of {multiple}, got {shape.width}x{shape.height}"
            )
        if shape.steps < 1:
            raise ValueError(f"steps must be at least 1, got {shape.steps}")
        if shape.guidance_scale < 0:
            raise ValueError(f"guidance_scale must not be negative, got {shape.guidance_scale}")
        return shape

    def _call_pipeline(
        self,
        prompts: list[str],
        negative_prompts: list[str] | None,
        seeds: list[int],
        shape: _BatchShape,
        on_step: StepCallback | None,
    ) -> list[Image.Image]:
        """One pipeline call, one image per prompt; the hook for prompt caching, token budgets, OOM splits."""
        # One CPU generator per image: each image's noise is the same whatever batch or device it runs on.
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
        stopped: list[int] = []
        kwargs: dict[str, Any] = {}
        if on_step is not None:
            kwargs["callback_on_step_end"] = self._step_callback(on_step, stopped)
        output = self.pipe(
            # ZImagePipeline wraps a list prompt in the chat template IN PLACE: always hand it fresh lists,
            # or a retry with the same list object would be wrapped twice and silently change the image.
            prompt=list(prompts),
            negative_prompt=list(negative_prompts) if negative_prompts is not None else None,
            height=shape.height,
            width=shape.width,
            num_inference_steps=shape.steps,
            guidance_scale=shape.guidance_scale,
            num_images_per_prompt=1,
            generator=generators,
            output_type="pil",
            **kwargs,
        )
        if stopped:
            raise BatchInterrupted(stopped[0], shape.steps)
        return list(output.images)

    @staticmethod
    def _step_callback(on_step: StepCallback, stopped: list[int]) -> Callable[..., dict[str, Any]]:
        """Adapt on_step(step_done, total) to diffusers' callback_on_step_end; record where it stopped."""

        def callback(
            pipe: ZImagePipeline, index: int, timestep: Any, tensors: dict[str, Any]
        ) -> dict[str, Any]:
            step_done = index + 1
            if on_step(step_done, pipe.num_timesteps):
                # The pipeline skips every remaining step once its interrupt flag is set.
                pipe._interrupt = True
                stopped.append(step_done)
            return {}

        return callback
