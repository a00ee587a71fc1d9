"""The Z-Image models a job may name, in one table: what each is for, where it runs, its defaults and limits.

A job's ``model`` picks one (``z-image-turbo`` unless it says otherwise; an instruct edit runs ``z-image-edit``).
Each model family has its own queue (``core.queue``), so operators scale each on its own depth, and the setting
that names its weights (a hub id or a local folder): a model whose setting is unset is not served here, and a
job naming it is refused with 422. ``GET /v1/models`` lists the served ones with these defaults and limits.

Where the numbers come from: Turbo is distilled for 8 steps without classifier-free guidance (its model card and
diffusers' ``ZImagePipeline`` example: ``num_inference_steps=8``-9, ``guidance_scale=0.0``). Base is the
undistilled model: it needs CFG (diffusers' ``ZImagePipeline.__call__`` defaults are 50 steps and guidance 5.0;
the model card recommends 28-50 steps and guidance 3-5), so its defaults here are 28 steps and guidance 4.0,
and a negative prompt steers it. The Edit (Omni) model runs instruction edits with Turbo's schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TURBO = "z-image-turbo"
BASE = "z-image-base"
EDIT = "z-image-edit"

# A job's "acceleration": "none" runs the exact model; "cache" is fast mode (Cache-DiT with a static step mask,
# worker/engine/fast.py), offered for text-to-image on the models marked ``fast``.
ACCELERATIONS = ("none", "cache")


@dataclass(frozen=True)
class ModelSpec:
    """One model: its queue, the setting naming its weights, the jobs it runs, defaults and allowed ranges."""

    name: str
    queue: str  # the Celery queue (model family) its jobs go to
    setting: str  # the Settings field (ZIMAGE_<NAME>) that names its weights; unset: not served
    purpose: str
    kinds: tuple[tuple[str, str | None], ...]  # the (kind, mode) pairs it runs
    steps: int  # default denoising steps
    min_steps: int
    max_steps: int
    guidance_scale: float  # default; > 0 runs classifier-free guidance (two passes per step)
    min_guidance: float
    max_guidance: float
    negative_prompt: bool  # whether a negative prompt steers it at its default guidance
    loras: bool  # whether jobs for it may name LoRA adapters
    fast: bool = False  # whether its generate jobs may opt into fast mode ("acceleration": "cache")

    @property
    def guidance_range(self) -> tuple[float, float]:
        """The guidance scales a job for this model may ask for."""
        return (self.min_guidance, self.max_guidance)

    def describe(self) -> dict[str, Any]:
        """The model's entry of ``GET /v1/models`` (without ``available``, which only the database knows)."""
        return {
            "id": self.name,
            "object": "model",
            "purpose": self.purpose,
            "queue": self.queue,
            "kinds": [f"{kind}/{mode}" if mode else kind for kind, mode in self.kinds],
            "defaults": {"steps": self.steps, "guidance_scale": self.guidance_scale},
            "limits": {
                "steps": [self.min_steps, self.max_steps],
                "guidance_scale": [self.min_guidance, self.max_guidance],
            },
            "negative_prompt": self.negative_prompt,
            "loras": self.loras,
            "accelerations": list(ACCELERATIONS) if self.fast else ["none"],
        }


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name=TURBO,
            queue="generate",
            setting="turbo_model",
            purpose="distilled: 8 steps without guidance, the fast default; also runs img2img and inpaint",
            kinds=(("generate", None), ("edit", "img2img"), ("edit", "inpaint")),
            steps=8,
            min_steps=1,
            max_steps=100,
            guidance_scale=0.0,
            min_guidance=0.0,
            max_guidance=20.0,
            negative_prompt=False,  # read only when a job sets guidance_scale > 0
            loras=True,
            fast=True,
        ),
        ModelSpec(
            name=BASE,
            queue="base",
            setting="base_model",
            purpose="undistilled foundation: classifier-free guidance and negative prompts, more steps; "
            "the model fine-tunes and LoRAs are trained on",
            kinds=(("generate", None),),
            steps=28,
            min_steps=1,
            max_steps=100,
            guidance_scale=4.0,
            min_guidance=0.0,
            max_guidance=20.0,
            negative_prompt=True,
            loras=True,
            fast=True,
        ),
        ModelSpec(
            name=EDIT,
            queue="edit",
            setting="edit_model",
            purpose="instruction edits of 1-3 input images (the Omni / Edit checkpoint)",
            kinds=(("edit", "instruct"),),
            steps=8,
            min_steps=1,
            max_steps=100,
            guidance_scale=0.0,
            min_guidance=0.0,
            max_guidance=20.0,
            negative_prompt=False,
            loras=False,
        ),
    )
}


def default_model(kind: str, mode: str | None) -> str:
    """The model a job of this kind runs when it names none: the Edit model for instruct edits, else Turbo."""
    return EDIT if kind == "edit" and mode == "instruct" else TURBO


def spec_for(model: str | None, kind: str, mode: str | None) -> ModelSpec:
    """The table row of a job's model (its default when it names none)."""
    return MODELS[model or default_model(kind, mode)]


def weights_of(settings: Any, model: str) -> str | None:
    """What the settings name as ``model``'s weights (a hub id or folder), or None when it is not served."""
    value = getattr(settings, MODELS[model].setting)
    return str(value) if value else None


def served(settings: Any) -> list[ModelSpec]:
    """The models this deployment serves (their weights are named), in table order."""
    return [spec for spec in MODELS.values() if weights_of(settings, spec.name)]


def acceleration_problem(spec: ModelSpec, kind: str, acceleration: str) -> str | None:
    """Why a job cannot run with ``acceleration`` (fast mode is for text to image on the ``fast`` models), or None."""
    if acceleration == "none":
        return None
    if not spec.fast:
        return f"{spec.name} has no fast mode"
    if kind != "generate":
        return "fast mode (acceleration: cache) is for generate jobs only"
    return None


def unserved(settings: Any, model: str | None) -> str | None:
    """Why a job for ``model`` cannot be accepted here (no setting names its weights), or None."""
    if model is None or weights_of(settings, model):
        return None
    return f"{model} is not served here: ZIMAGE_{MODELS[model].setting.upper()} is unset"
