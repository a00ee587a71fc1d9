"""Run edit requests: img2img and inpaint on the Turbo modules, instruction edits on an Omni/Edit checkpoint.

img2img and inpaint build ``ZImageImg2ImgPipeline`` / ``ZImageInpaintPipeline`` around the very module objects
of the loaded Turbo pipeline, so they cost no memory. ``instruct`` runs ``ZImageOmniPipeline`` from the edit
checkpoint; it takes Turbo's text encoder and VAE instead of loading copies when the checkpoint's configs and
a sample of its weights match Turbo's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline
from diffusers.pipelines.z_image.pipeline_z_image_img2img import ZImageImg2ImgPipeline
from diffusers.pipelines.z_image.pipeline_z_image_inpaint import ZImageInpaintPipeline
from diffusers.pipelines.z_image.pipeline_z_image_omni import ZImageOmniPipeline
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from PIL import Image, ImageOps

from core.errors import InvalidInput, OutOfMemory
from core.work import PIXELS_PER_TOKEN, denoising_steps
from worker.engine.adapters import AdapterSlots, LoraUse, lora_key
from worker.engine.decode import decode_latents
from worker.engine.oom import check_injected, run_in_halves
from worker.engine.options import EngineOptions
from worker.engine.progress import Progress, StepCallback
from worker.engine.sharing import SHAREABLE, reusable

log = logging.getLogger(__name__)

EditMode = Literal["instruct", "img2img", "inpaint"]
EditResult = list[Image.Image] | OutOfMemory

MAX_CONDITION_IMAGES = 3
# ZImageOmniPipeline refuses condition images under 64 px a side or beyond 8:1 (Flux2ImageProcessor
# .check_image_input): such inputs are cropped to 8:1 and scaled up to 64 px here instead of failing the job.
MIN_CONDITION_SIDE = 64
MAX_CONDITION_ASPECT = 8
# ZImageOmniPipeline.prepare_image_latents calls ``vae.encode(image.bfloat16())``: its VAE must be bf16.
OMNI_VAE_DTYPE = torch.bfloat16


@dataclass(frozen=True, eq=False)
class EditRequest:
    """One edit job's worth of images: every image shares the inputs; image i uses seeds[i].

    ``images`` are RGB condition images (1-3 for instruct, exactly 1 for img2img and inpaint); ``mask`` is the
    inpaint mask, white where the image is repainted and black where it is kept. ``strength`` (img2img and
    inpaint) is the share of the denoising schedule that runs: 0 keeps the input, 1 repaints from pure noise.
    """

    mode: EditMode
    prompt: str
    images: tuple[Image.Image, ...]
    mask: Image.Image | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    strength: float
    seeds: tuple[int, ...]
    negative_prompt: str | None = None
    loras: tuple[LoraUse, ...] = ()  # adapters on the Turbo transformer (img2img and inpaint only)


@dataclass(frozen=True)
class _Call:
    """One pipeline call: which requests it serves and how many denoising steps it runs."""

    mode: EditMode
    indices: tuple[int, ...]
    steps: int


class EditEngine:
    """Runs edit requests on pipelines that share the loaded Turbo pipeline's modules.

    ``turbo_pipe`` may be None on a worker that serves instruct edits only: img2img and inpaint are then
    unavailable and the edit model loads every component from its own checkpoint.
    """

    def __init__(
        self,
        turbo_pipe: ZImagePipeline | None,
        *,
        edit_model: str | None = None,
        options: EngineOptions | None = None,
    ) -> None:
        """Edit with ``turbo_pipe``'s modules and/or the edit checkpoint ``edit_model``, placed as ``options`` say
        (the options the Turbo pipeline was loaded with)."""
        if turbo_pipe is None and not edit_model:
            raise ValueError("an EditEngine needs the Turbo pipeline, an edit model, or both")
        self.options = options or EngineOptions()
        self.turbo = turbo_pipe
        self.device = self.options.torch_device
        self.dtype = self.options.torch_dtype
        self.edit_model = edit_model
        # The Turbo transformer's adapter slots: the generate engine's own, so both see what is loaded in it.
        self.adapters: AdapterSlots | None = None
        if turbo_pipe is not None:
            self.adapters = AdapterSlots.of(turbo_pipe.transformer, self.options.adapter_cache_bytes)
        self.img2img: ZImageImg2ImgPipeline | None = None
        self.inpaint: ZImageInpaintPipeline | None = None
        if turbo_pipe is not None:
            self.img2img = ZImageImg2ImgPipeline(**_turbo_components(turbo_pipe))
            self.inpaint = ZImageInpaintPipeline(**_turbo_components(turbo_pipe))
            for pipe in (self.img2img, self.inpaint):
                pipe.set_progress_bar_config(disable=True)
        self.omni: ZImageOmniPipeline | None = None
        # Which Omni components are Turbo's own objects ({"text_encoder": True, "vae": False}, ...).
        self.shared: dict[str, bool] = {}
        if edit_model:
            self.omni, self.shared = load_omni(edit_model, turbo_pipe, device=self.device, dtype=self.dtype)

    @property
    def modes(self) -> frozenset[str]:
        """The edit modes this engine can run."""
        modes = {"img2img", "inpaint"} if self.turbo is not None else set()
        return frozenset(modes | ({"instruct"} if self.omni is not None else set()))

    def warmup(self) -> None:
        """Run one tiny call per loaded edit pipeline so the first real batch does not pay for setup."""
        gray = Image.new("RGB", (256, 256), (128, 128, 128))
        requests = []
        if self.turbo is not None:
            requests.append(EditRequest("img2img", "warmup", (gray,), None, 256, 256, 1, 0.0, 1.0, (0,)))
        if self.omni is not None:
            requests.append(EditRequest("instruct", "warmup", (gray,), None, 256, 256, 1, 0.0, 1.0, (0,)))
        self.edit(requests)

    def edit(self, requests: Sequence[EditRequest], on_step: StepCallback | None = None) -> list[EditResult]:
        """Run every request, batching compatible ones into one call; per request, its images or OutOfMemory.

        A call that runs out of memory runs again in halves, down to single images; a request whose image does
        not fit alone gets OutOfMemory and the others still get their images. ``on_step`` gets each request's
        steps done after every denoising step (see ``Progress``); returning True stops the batch with
        BatchInterrupted.
        """
        if not requests:
            return []
        for request in requests:
            self._check(request)
        calls = _plan(requests)
        # Image i of the batch: its request and seed, requests in order.
        items = [(index, seed) for index, request in enumerate(requests) for seed in request.seeds]
        totals = [r.steps if r.mode == "instruct" else denoising_steps(r.steps, r.strength) for r in requests]
        progress = Progress(on_step, totals, [index for index, _ in items])
        first_image: dict[int, int] = {}
        for image, (index, _) in enumerate(items):
            first_image.setdefault(index, image)
        images: dict[int, Image.Image] = {}
        failed: dict[int, OutOfMemory] = {}
        for call in calls:
            members = [first_image[index] + k for index in call.indices for k in range(len(requests[index].seeds))]
            if call.steps == 0:
                # strength rounds to no denoising step (diffusers refuses that call): the input comes back.
                for image in members:
                    r = requests[items[image][0]]
                    images[image] = _fit(r.images[0], r.width, r.height)
                continue
            first = requests[call.indices[0]]

            def run(chosen: list[int], mode: EditMode = call.mode) -> list[Image.Image]:
                picked = [(requests[items[i][0]], items[i][1]) for i in chosen]
                check_injected(len(chosen), self.options.oom_above_images)
                progress.begin(chosen)
                if mode == "instruct":
                    return self._instruct(picked, progress)
                return self._repaint(mode, picked, progress)

            images.update(
                run_in_halves(
                    members,
                    run,
                    request_of=lambda i: items[i][0],
                    failed=failed,
                    device=self.device,
                    what=f"{first.width}x{first.height} {first.mode}",
                )
            )
        grouped: list[list[Image.Image]] = [[] for _ in requests]
        for image, (index, _) in enumerate(items):
            if index not in failed:
                grouped[index].append(images[image])
        return [failed.get(index, images_of) for index, images_of in enumerate(grouped)]

    def _check(self, request: EditRequest) -> None:
        """Refuse a request no pipeline call can serve, before any call runs."""
        multiple = PIXELS_PER_TOKEN
        if request.width <= 0 or request.height <= 0 or request.width % multiple or request.height % multiple:
            raise InvalidInput(f"width and height must be positive multiples of {multiple}")
        if not request.seeds:
            raise InvalidInput("every request needs at least one seed")
        if request.steps < 1:
            raise InvalidInput(f"steps must be at least 1, got {request.steps}")
        if request.guidance_scale < 0:
            raise InvalidInput(f"guidance_scale must not be negative, got {request.guidance_scale}")
        if request.mode == "instruct":
            if not 1 <= len(request.images) <= MAX_CONDITION_IMAGES:
                raise InvalidInput(f"instruct takes 1 to {MAX_CONDITION_IMAGES} images, got {len(request.images)}")
            if self.omni is None:
                raise InvalidInput("instruct edits need an edit model: set ZIMAGE_EDIT_MODEL")
            if request.loras:
                raise InvalidInput("instruct edits take no adapters: adapters apply to the Turbo transformer")
        elif request.mode in ("img2img", "inpaint"):
            if self.img2img is None:
                raise InvalidInput(f"{request.mode} edits need the Turbo pipeline on this worker")
            if len(request.images) != 1:
                raise InvalidInput(f"{request.mode} takes exactly one image, got {len(request.images)}")
            if not 0.0 <= request.strength <= 1.0:
                raise InvalidInput(f"strength must be in [0, 1], got {request.strength}")
            if (request.mode == "inpaint") != (request.mask is not None):
                raise InvalidInput("inpaint needs a mask, and only inpaint takes one")
        else:
            raise InvalidInput(f"unknown edit mode {request.mode!r}")

    def _repaint(self, mode: EditMode, items: list[tuple[EditRequest, int]], progress: Progress) -> list[Image.Image]:
        """One img2img or inpaint call for images whose requests share mode, size, steps, strength, guidance."""
        first = items[0][0]
        pipe = self.inpaint if mode == "inpaint" else self.img2img
        assert pipe is not None and self.adapters is not None  # _check refused img2img / inpaint without Turbo
        self.adapters.activate(first.loras)
        # The pipelines encode the image at its own size and noise latents of the requested size: they must
        # agree, so every image is fitted (scaled and centre-cropped, never stretched) to the output size.
        # Each output image gets its own copy of its request's inputs, so the batch is one tensor.
        kwargs: dict[str, Any] = {"image": [_fit(r.images[0], r.width, r.height) for r, _ in items]}
        if mode == "inpaint":
            kwargs["mask_image"] = [_fit_mask(r.mask, r.width, r.height) for r, _ in items]
        return self._call(pipe, items, progress, strength=first.strength, **kwargs)

    def _instruct(self, items: list[tuple[EditRequest, int]], progress: Progress) -> list[Image.Image]:
        """One ZImageOmniPipeline call for images of one request; they share its condition images."""
        # ZImageOmniPipeline takes ONE list of condition images per call and copies it to every batch item,
        # so requests with different images cannot share a call: one call per job, whose num_images (one
        # generator each) do run as one batch.
        assert self.omni is not None
        images = [_condition_image(image) for image in items[0][0].images]
        return self._call(self.omni, items, progress, image=images)

    def _call(
        self, pipe: Any, items: list[tuple[EditRequest, int]], progress: Progress, **inputs: Any
    ) -> list[Image.Image]:
        """Call ``pipe`` once: one prompt and one CPU generator per output image (request, seed)."""
        first = items[0][0]
        prompts = [r.prompt for r, _ in items]
        negatives = None
        # Like ZImagePipeline, these run classifier-free guidance whenever guidance_scale > 0.
        if first.guidance_scale > 0:
            negatives = [r.negative_prompt or "" for r, _ in items]
        # One CPU generator per image: each image's noise is the same whatever batch or device it runs on.
        generators = [torch.Generator(device="cpu").manual_seed(seed) for _, seed in items]
        output = pipe(
            # The pipelines rewrite list prompts in place (chat template): always hand them fresh lists.
            prompt=list(prompts),
            negative_prompt=list(negatives) if negatives is not None else None,
            height=first.height,
            width=first.width,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale,
            num_images_per_prompt=1,
            generator=generators,
            # Latents out, decoded by decode_latents as the generate path does: one image per call in bf16 (a
            # batched bf16 decode rounds differently from a single one), small chunks in float32; that also
            # bounds the decoder's activation memory, the peak of a large batch.
            output_type="latent",
            callback_on_step_end=progress.callback,
            **inputs,
        )
        progress.raise_if_stopped()
        return decode_latents(pipe.vae, output.images)


def _plan(requests: Sequence[EditRequest]) -> list[_Call]:
    """Group requests into pipeline calls, in order of first appearance."""
    members: dict[tuple[Any, ...], list[int]] = {}
    for index, request in enumerate(requests):
        if request.mode == "instruct":
            key: tuple[Any, ...] = ("instruct", index)
        else:
            # What one img2img / inpaint call shares: the latents' shape, the schedule and the guidance.
            strength, guidance = float(request.strength), float(request.guidance_scale)
            shape = (request.width, request.height, request.steps, strength, guidance, lora_key(request.loras))
            key = (request.mode, *shape)
        members.setdefault(key, []).append(index)
    calls = []
    for indices in members.values():
        first = requests[indices[0]]
        steps = first.steps if first.mode == "instruct" else denoising_steps(first.steps, first.strength)
        calls.append(_Call(first.mode, tuple(indices), steps))
    return calls


def _turbo_components(turbo: ZImagePipeline) -> dict[str, Any]:
    """Turbo's modules as constructor arguments, with a scheduler of the edit pipeline's own."""
    # The modules are the same objects (no memory); the scheduler holds per-call state (timesteps, begin
    # index) and costs nothing, so each pipeline gets its own rather than sharing Turbo's.
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(turbo.scheduler.config)
    return {**turbo.components, "scheduler": scheduler}


def _fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` as RGB at exactly width x height: scaled to cover, then centre-cropped."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    if image.size == (width, height):
        return image.copy()
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)


def _fit_mask(mask: Image.Image | None, width: int, height: int) -> Image.Image:
    """The mask as grayscale, fitted exactly like its image (nearest: a mask stays a mask)."""
    assert mask is not None
    mask = mask if mask.mode == "L" else mask.convert("L")
    if mask.size == (width, height):
        return mask.copy()
    return ImageOps.fit(mask, (width, height), method=Image.Resampling.NEAREST)


def _condition_image(image: Image.Image) -> Image.Image:
    """An instruct condition image as RGB, centre-cropped to at most 8:1 and scaled up to 64 px a side."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    width, height = image.size
    if max(width, height) > MAX_CONDITION_ASPECT * min(width, height):
        short = min(width, height)
        long = int(short * MAX_CONDITION_ASPECT)
        size = (long, short) if width > height else (short, long)
        image = ImageOps.fit(image, size, method=Image.Resampling.LANCZOS)
        width, height = image.size
    if min(width, height) < MIN_CONDITION_SIDE:
        scale = MIN_CONDITION_SIDE / min(width, height)
        image = image.resize((round(width * scale), round(height * scale)), Image.Resampling.LANCZOS)
    return image


def load_omni(
    model: str, turbo: ZImagePipeline | None, *, device: torch.device, dtype: torch.dtype
) -> tuple[ZImageOmniPipeline, dict[str, bool]]:
    """Load ZImageOmniPipeline from ``model`` (hub id or folder), reusing Turbo's text encoder and VAE if equal."""
    folder = Path(model) if Path(model).is_dir() else Path(ZImageOmniPipeline.download(model))
    needs = {"text_encoder": dtype, "vae": OMNI_VAE_DTYPE}
    reuse = reusable(turbo, folder, needs, what="edit model") if turbo is not None else {}
    pipe = ZImageOmniPipeline.from_pretrained(folder, dtype={"default": dtype, "vae": OMNI_VAE_DTYPE}, **reuse)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    shared = {name: turbo is not None and getattr(pipe, name) is getattr(turbo, name) for name in SHAREABLE}
    log.info("loaded edit model %s; shared with Turbo: %s", model, shared)
    return pipe, shared
