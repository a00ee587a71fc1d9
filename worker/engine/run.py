"""Run one batch of compatible image requests: prepare (embeddings, noise) apart from run (the accelerator).

``prepare`` encodes prompts (cached, padded to the longest) and draws each image's noise from its own seeded CPU
generator; ``run`` denoises in as few pipeline calls as caption buckets allow, decodes in small chunks and splits
a call in halves when it runs out of memory. The worker calls ``prepare`` for the next batch in a thread while
``run`` has the accelerator.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

# The defining module, not `from diffusers import ...`: type checkers resolve the top-level name to a dummy.
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline
from PIL import Image

from core.errors import InvalidInput, OutOfMemory
from core.work import PIXELS_PER_TOKEN, image_tokens
from worker.engine.adapters import AdapterSlots, LoraUse, lora_key
from worker.engine.batching import caption_bucket, default_min_call_tokens, distinct, plan_calls
from worker.engine.decode import decode_latents
from worker.engine.embeddings import ENCODE_CHUNK, EmbeddingCache, PromptEncoder
from worker.engine.fast import FastMode
from worker.engine.oom import check_injected, run_in_halves
from worker.engine.options import EngineOptions
from worker.engine.pipelines import load_base, load_turbo
from worker.engine.progress import Progress, StepCallback

WARMUP_SIZE = 256  # the smallest size the service allows

RequestResult = list[Image.Image] | OutOfMemory


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
    loras: tuple[LoraUse, ...] = ()  # adapters and scales; none: the bare model
    acceleration: str = "none"  # "cache": fast mode (worker/engine/fast.py)


@dataclass(frozen=True)
class BatchShape:
    """What every request in one pipeline call must share."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    loras: tuple[tuple[str, float], ...] = ()  # the adapter set (names and scales)
    acceleration: str = "none"


@dataclass(frozen=True)
class PreparedImage:
    """One output image, ready for the accelerator."""

    request: int  # index of its request in the batch
    seed: int
    embedding: torch.Tensor  # caption tokens x hidden, on the execution device
    negative: torch.Tensor | None  # the negative prompt's embedding when guidance > 0
    latents: torch.Tensor  # (1, C, h, w) float32 noise on the CPU, from this image's own seeded generator
    bucket: int  # caption length as the transformer pads it (a multiple of 32)


@dataclass(frozen=True)
class PreparedBatch:
    """A validated batch with its prompt embeddings and noise: what ``Engine.run`` takes."""

    requests: tuple[ImageRequest, ...]
    shape: BatchShape | None  # None for an empty batch
    images: tuple[PreparedImage, ...]
    prepare_seconds: float = 0.0


class Engine:
    """Runs compatible image requests through one loaded pipeline, as few calls as possible."""

    def __init__(
        self,
        pipe: ZImagePipeline,
        *,
        model_id: str,
        options: EngineOptions | None = None,
        embedding_cache: EmbeddingCache | None = None,
        encoder: PromptEncoder | None = None,
        shared: dict[str, bool] | None = None,
    ) -> None:
        """Run ``pipe`` (already loaded and placed) with ``options``' tuning; ``embedding_cache`` may be shared.

        ``encoder``: another engine's prompt encoder, when ``pipe`` holds that engine's very tokenizer and text
        encoder (Base sharing Turbo's): one encoder, one lock, one cache identity for both. ``shared``: which
        components ``pipe`` took from another pipeline (reported, and kept out of this engine's memory count)."""
        options = options or EngineOptions(device=str(pipe._execution_device))
        self.pipe = pipe
        self.model_id = model_id
        self.options = options
        self.load_count = 0
        self.shared = dict(shared or {})
        self.busy_seconds = 0.0  # wall seconds inside run()'s accelerator work, synchronized on CUDA
        # Looked up once: the pipeline's property walks every module on each access.
        self._device: torch.device = pipe._execution_device
        self.min_call_tokens = (
            default_min_call_tokens(self._device.type) if options.min_call_tokens is None else options.min_call_tokens
        )
        # Whether captions of different buckets may share a (masked) call. In float32 a masked call gives each
        # image its single call's result (tests: within 1/255); in bf16 the masked attention kernel rounds
        # differently from the unmasked one (measured up to 5/255), so half precision keeps buckets apart.
        merge = options.merge_buckets
        self.merge_buckets = pipe.transformer.dtype == torch.float32 if merge is None else merge
        if embedding_cache is None and options.embedding_cache_bytes > 0:
            embedding_cache = EmbeddingCache(options.embedding_cache_bytes)
        self.embedding_cache = embedding_cache
        # Adapters live in the transformer: one set of slots per transformer, shared with the img2img and inpaint
        # pipelines built on the same modules.
        self.adapters = AdapterSlots.of(pipe.transformer, options.adapter_cache_bytes)
        # Fast mode: Cache-DiT on this transformer, on only while a fast batch runs.
        self.fast = FastMode.of(pipe.transformer)
        if encoder is not None and (
            encoder.text_encoder is not pipe.text_encoder or encoder.tokenizer is not pipe.tokenizer
        ):
            raise ValueError("a shared prompt encoder must hold this pipeline's own tokenizer and text encoder")
        text_lock = encoder.lock if encoder is not None else threading.Lock()
        # Padding to the longest prompt (and encoding prompts together) only where the embeddings stay identical
        # to the pipeline's: float32. In half precision each prompt is encoded alone at 512, as the pipeline does.
        exact_text = pipe.text_encoder.dtype == torch.float32
        longest = exact_text if options.pad_to_longest is None else options.pad_to_longest
        # The cache is keyed by the text encoder's identity (the checkpoint it came from), not the pipeline's: an
        # engine sharing another's text encoder shares its encoder, so a prompt one encoded serves both.
        self.encoder = encoder or PromptEncoder(
            pipe.tokenizer,
            pipe.text_encoder,
            # Embeddings depend on the weights, their dtype and where they ran; on the padding only in half
            # precision, where padding to the longest prompt can only be forced.
            identity=(model_id, str(pipe.text_encoder.dtype), str(self._device), longest and not exact_text),
            cache=embedding_cache,
            pad_to_longest=longest,
            chunk=ENCODE_CHUNK if exact_text or longest else 1,
            lock=text_lock,
        )
        # With CPU offload, the transformer's hook moves the text encoder off the GPU at every pass: encoding
        # must not overlap a run, so both take the same lock. Otherwise they may overlap freely.
        self._run_lock = text_lock if options.cpu_offload else threading.Lock()

    @classmethod
    def from_pretrained(cls, model: str, options: EngineOptions | None = None) -> Engine:
        """Load the Turbo pipeline from a hub id or local folder; ``options`` were checked when built."""
        options = options or EngineOptions()
        engine = cls(load_turbo(model, options), model_id=model, options=options)
        engine.load_count = 1
        return engine

    @classmethod
    def base_from_pretrained(cls, model: str, options: EngineOptions | None = None, *, turbo: Engine | None) -> Engine:
        """Load Z-Image Base from a hub id or local folder, holding ``turbo``'s text encoder, tokenizer and VAE
        objects where they match (then also its prompt encoder and embedding cache), else its own."""
        options = options or EngineOptions()
        pipe, shared = load_base(model, options, turbo.pipe if turbo is not None else None)
        encoder = turbo.encoder if turbo is not None and shared["text_encoder"] and shared["tokenizer"] else None
        cache = turbo.embedding_cache if turbo is not None else None
        engine = cls(pipe, model_id=model, options=options, embedding_cache=cache, encoder=encoder, shared=shared)
        engine.load_count = 1
        return engine

    def modules(self) -> list[torch.nn.Module]:
        """The pipeline's models (transformer, text encoder, VAE), for counting memory."""
        return [self.pipe.transformer, self.pipe.text_encoder, self.pipe.vae]

    @property
    def device(self) -> torch.device:
        """The device the pipeline runs on."""
        return self._device

    def warmup(self) -> None:
        """Run one tiny call so kernels, allocator and RoPE tables are ready before the first real batch."""
        request = ImageRequest("warmup", WARMUP_SIZE, WARMUP_SIZE, steps=1, guidance_scale=0.0, seeds=(0,))
        self.generate([request])

    def caption_bucket(self, prompt: str) -> int:
        """The caption length the transformer pads this prompt to (a multiple of 32): for batch planning."""
        return caption_bucket(self.encoder.caption_tokens(prompt))

    def generate(self, requests: Sequence[ImageRequest], on_step: StepCallback | None = None) -> list[RequestResult]:
        """Prepare and run a batch; per request, its images or an OutOfMemory marker (see ``run``)."""
        return self.run(self.prepare(requests), on_step)

    def prepare(self, requests: Sequence[ImageRequest]) -> PreparedBatch:
        """Validate a batch, encode its prompts (cached) and draw its noise; safe to call while ``run`` runs."""
        if not requests:
            return PreparedBatch((), None, ())
        if self._device.type == "cpu" and threading.current_thread() is not threading.main_thread():
            # Prepared in the background while run() computes on the same cores: one intra-op thread here (a
            # per-thread setting) keeps two OpenMP teams from fighting over the cores; measured on 2 cores, a
            # 2-thread prepare thread cost the running batch 30% of its speed.
            with _intra_op_threads(1):
                return self._prepare(requests)
        return self._prepare(requests)

    def _prepare(self, requests: Sequence[ImageRequest]) -> PreparedBatch:
        """prepare() proper."""
        started = time.perf_counter()
        shape = self._shared_shape(requests)
        prompts = distinct(request.prompt for request in requests)
        embeddings = dict(zip(prompts, self.encoder.encode(prompts, self._device), strict=True))
        negatives: dict[str, torch.Tensor] = {}
        # ZImagePipeline runs classifier-free guidance whenever guidance_scale > 0 (pos + s * (pos - neg)),
        # not only above 1, encoding "" as the negative: pass the requests' own negatives exactly then.
        if shape.guidance_scale > 0:
            texts = distinct(request.negative_prompt or "" for request in requests)
            negatives = dict(zip(texts, self.encoder.encode(texts, self._device), strict=True))
        latent_shape = self._latent_shape(shape)
        images = []
        for index, request in enumerate(requests):
            embedding = embeddings[request.prompt]
            negative = negatives.get(request.negative_prompt or "") if shape.guidance_scale > 0 else None
            for seed in request.seeds:
                # One CPU generator per image, drawn exactly as diffusers' randn_tensor draws for a generator
                # list: an image's noise is the same whatever batch, call or device it runs on.
                generator = torch.Generator(device="cpu").manual_seed(seed)
                latents = torch.randn(latent_shape, generator=generator, dtype=torch.float32)
                bucket = caption_bucket(embedding.shape[0])
                images.append(PreparedImage(index, seed, embedding, negative, latents, bucket))
        return PreparedBatch(tuple(requests), shape, tuple(images), time.perf_counter() - started)

    def run(self, prepared: PreparedBatch, on_step: StepCallback | None = None) -> list[RequestResult]:
        """Denoise and decode a prepared batch; returns, per request in order, its images or ``OutOfMemory``.

        A request whose image did not fit even alone gets an OutOfMemory marker (its other images are dropped);
        the other requests still get their images. ``on_step`` gets each request's steps done after every
        denoising step (see ``Progress``); returning True stops the batch with BatchInterrupted.
        """
        if prepared.shape is None:
            return []
        with self._run_lock:
            started = time.perf_counter()
            try:
                # The batch's adapters (loaded once, then a switch of a few attribute writes per layer), or none.
                self.adapters.activate(prepared.requests[0].loras)
                fast = prepared.shape.steps if prepared.shape.acceleration == "cache" else None
                # inference_mode: no version counters or view tracking on any op (2-5% on the tiny CPU model).
                with self.fast.active(fast), torch.inference_mode():
                    images, failed = self._run_calls(prepared, prepared.shape, on_step)
            finally:
                if self._device.type == "cuda":
                    torch.cuda.synchronize(self._device)
                self.busy_seconds += time.perf_counter() - started
        grouped: list[list[Image.Image]] = [[] for _ in prepared.requests]
        for i, item in enumerate(prepared.images):
            if item.request not in failed:
                grouped[item.request].append(images[i])
        return [failed[i] if i in failed else grouped[i] for i in range(len(grouped))]

    def _run_calls(
        self, prepared: PreparedBatch, shape: BatchShape, on_step: StepCallback | None
    ) -> tuple[dict[int, Image.Image], dict[int, OutOfMemory]]:
        """Run the batch's pipeline calls; returns images by image index and failures by request index."""
        # Caption buckets: one call per bucket needs no attention mask and no padding tokens, but only pays
        # when each call still fills the accelerator; small neighbouring buckets share a (masked) call. Either
        # way each image equals its single call: padding is masked out, and the per-caption padding to 32 is the
        # model's own (learned pad token, unmasked), the same in every batch.
        calls = plan_calls(
            [item.bucket for item in prepared.images],
            image_tokens(shape.width, shape.height),
            self.min_call_tokens if self.merge_buckets else 0,
            self.pipe.transformer.config.dim,
            merge=self.merge_buckets,
        )
        progress = Progress(on_step, [shape.steps] * len(prepared.requests), [item.request for item in prepared.images])
        images: dict[int, Image.Image] = {}
        failed: dict[int, OutOfMemory] = {}

        def run(indices: list[int]) -> list[Image.Image]:
            return self._denoise_and_decode(prepared, shape, indices, progress)

        for call in calls:
            images.update(
                run_in_halves(
                    call,
                    run,
                    request_of=lambda i: prepared.images[i].request,
                    failed=failed,
                    device=self._device,
                    what=f"{shape.width}x{shape.height}",
                )
            )
        return images, failed

    def _denoise_and_decode(
        self, prepared: PreparedBatch, shape: BatchShape, indices: list[int], progress: Progress
    ) -> list[Image.Image]:
        """One pipeline call on the given images, from their embeddings and noise; the VAE decode in chunks."""
        check_injected(len(indices), self.options.oom_above_images)
        items = [prepared.images[i] for i in indices]
        progress.begin(indices)
        kwargs: dict[str, Any] = {}
        if progress.on_step is not None:
            kwargs["callback_on_step_end"] = progress.callback
        guided = shape.guidance_scale > 0
        if shape.acceleration == "cache":
            self.fast.refresh(shape.steps)  # this call's own steps and mask, no residual of an earlier call
        output = self.pipe(
            # Fresh lists each call: the pipeline must never see (or rewrite) a list a retry would reuse.
            prompt=None,
            prompt_embeds=[item.embedding for item in items],
            negative_prompt_embeds=[item.negative for item in items] if guided else None,
            height=shape.height,
            width=shape.width,
            num_inference_steps=shape.steps,
            guidance_scale=shape.guidance_scale,
            num_images_per_prompt=1,
            latents=torch.cat([item.latents for item in items]).to(self._device),
            output_type="latent",
            **kwargs,
        )
        progress.raise_if_stopped()
        return decode_latents(self.pipe.vae, output.images, max_pixels=self.options.decode_pixels)

    def _shared_shape(self, requests: Sequence[ImageRequest]) -> BatchShape:
        """Check the requests can share one call and return what they share."""

        def shape_of(r: ImageRequest) -> BatchShape:
            return BatchShape(r.width, r.height, r.steps, float(r.guidance_scale), lora_key(r.loras), r.acceleration)

        shape = shape_of(requests[0])
        for request in requests:
            other = shape_of(request)
            if other != shape:
                raise InvalidInput(
                    f"requests in one batch must share size, steps, guidance, adapters and acceleration: "
                    f"{shape} != {other}"
                )
            if not request.seeds:
                raise InvalidInput("every request needs at least one seed")
        multiple = PIXELS_PER_TOKEN
        if shape.width <= 0 or shape.height <= 0 or shape.width % multiple or shape.height % multiple:
            raise InvalidInput(
                f"width and height must be positive multiples of {multiple}, got {shape.width}x{shape.height}"
            )
        if shape.steps < 1:
            raise InvalidInput(f"steps must be at least 1, got {shape.steps}")
        if shape.acceleration not in ("none", "cache"):
            raise InvalidInput(f"acceleration must be none or cache, got {shape.acceleration!r}")
        if shape.guidance_scale < 0:
            raise InvalidInput(f"guidance_scale must not be negative, got {shape.guidance_scale}")
        return shape

    def _latent_shape(self, shape: BatchShape) -> tuple[int, int, int, int]:
        """The noise shape of one image, as ZImagePipeline.prepare_latents computes it."""
        scale = self.pipe.vae_scale_factor * 2
        channels = self.pipe.transformer.config.in_channels
        return (1, channels, 2 * (shape.height // scale), 2 * (shape.width // scale))


@contextmanager
def _intra_op_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads in this thread (OpenMP and MKL settings are per thread)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
