"""The API reference (docs/api.md) as pydantic models: the job request with its field rules, the objects returned."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from core.catalog import MODELS, acceleration_problem, default_model
from core.work import PIXELS_PER_TOKEN

MAX_SEED = 2**63 - 1
MAX_METADATA_BYTES = 4096
MAX_METADATA_DEPTH = 32
MAX_SIDE = 2048


def _depth(value: Any, level: int = 1) -> int:
    """How deeply a JSON value nests (stops counting past the limit, so it never recurses far)."""
    if level > MAX_METADATA_DEPTH:
        return level
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return max((_depth(c, level + 1) for c in children), default=level)


def metadata_problem(value: dict[str, Any]) -> str | None:
    """Why ``value`` cannot be a job's or batch's metadata (too deep, not plain JSON, NUL, over 4 KiB), or None."""
    if not value:
        return None
    try:
        encoded = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:
        return "metadata must be plain JSON: NaN and Infinity are not allowed"
    except RecursionError:
        return f"metadata is nested deeper than {MAX_METADATA_DEPTH} levels"
    size = len(encoded.encode())
    if size > MAX_METADATA_BYTES:
        return f"metadata is {size} bytes as JSON; the limit is {MAX_METADATA_BYTES}"
    # Depth is at most the number of opening brackets: walk the value only when that bound is over the limit
    # (a batch checks 10 000 metadata objects; almost all are flat).
    if encoded.count("{") + encoded.count("[") > MAX_METADATA_DEPTH and _depth(value) > MAX_METADATA_DEPTH:
        return f"metadata is nested deeper than {MAX_METADATA_DEPTH} levels"
    if "\\u0000" in encoded:  # Postgres cannot store NUL in text or JSONB
        return "metadata must not contain NUL characters"
    return None


class _Strict(BaseModel):
    # strict: "1024" is not a width and true is not a seed; unknown fields are typos, not silently dropped.
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageRef(_Strict):
    """An input image: an upload of this tenant, or an https URL the service fetches."""

    upload_id: Annotated[str, StringConstraints(pattern=r"^upl_[0-9a-z]{10,64}$")] | None = None
    url: HttpUrl | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ImageRef:
        if (self.upload_id is None) == (self.url is None):
            raise ValueError("give exactly one of upload_id or url")
        if self.url is not None and self.url.scheme != "https":
            raise ValueError("url must be https")
        return self


class LoraRef(_Strict):
    """A LoRA adapter of the tenant (``POST /v1/adapters``) applied to a job, with its scale."""

    adapter_id: Annotated[str, StringConstraints(pattern=r"^lora_[0-9a-z]{10,64}$")]
    scale: float = Field(1.0, ge=0, le=2)


# The API document states what the prompt validators check, as far as a JSON Schema can: a character other than
# whitespace and no NUL (the limit of 4000 applies after trimming; the document's is the safe side of it).
_NO_NUL = r"^[^\x00]*$"
# JSON's \ud800-\udfff escapes decode to lone surrogates, which no UTF-8 text (nor Postgres) can hold.
_SURROGATE = re.compile("[\ud800-\udfff]")
_PROMPT_SCHEMA: dict[str, Any] = {"minLength": 1, "maxLength": 4000, "pattern": r"^[^\x00]*[^\s\x00][^\x00]*$"}


def _check_text(field: str, value: str) -> None:
    """Refuse what no stored text can hold: NUL (Postgres cannot), a lone surrogate (UTF-8 cannot)."""
    if "\x00" in value:
        raise ValueError(f"{field} must not contain NUL characters")
    if not value.isascii() and _SURROGATE.search(value):
        raise ValueError(f"{field} must be Unicode text: a lone surrogate (\\ud800-\\udfff) is not")


class JobRequest(_Strict):
    """A job request (POST /v1/jobs, and each line of a batch), exactly as API.md specifies it.

    ``loras`` is checked here for its shape (at most 3, each adapter once, scales 0-2, not on instruct edits);
    whether each adapter is the tenant's is the submit's check (``core.adapter_refs``, one query). ``webhook_url``
    is checked here for its shape only: whether its scheme and host may be called is the submit's check
    (``core.webhook_urls``, which knows the allow-list and resolves the name).
    """

    kind: Literal["generate", "edit"] = "generate"
    mode: Literal["instruct", "img2img", "inpaint"] | None = Field(None, validate_default=True)
    model: Literal["z-image-turbo", "z-image-base", "z-image-edit"] | None = Field(
        None,
        validate_default=True,
        description="The model that runs the job (GET /v1/models): z-image-turbo unless named; an instruct edit "
        "runs z-image-edit. Its defaults fill steps and guidance_scale.",
    )
    prompt: str = Field(json_schema_extra=_PROMPT_SCHEMA)
    negative_prompt: str | None = Field(None, max_length=4000, json_schema_extra={"pattern": _NO_NUL})
    width: int = Field(1024, ge=256, le=MAX_SIDE, multiple_of=PIXELS_PER_TOKEN)
    height: int = Field(1024, ge=256, le=MAX_SIDE, multiple_of=PIXELS_PER_TOKEN)
    steps: int | None = Field(None, ge=1, le=100)
    guidance_scale: float | None = Field(None, ge=0, le=20)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    num_images: int = Field(1, ge=1, le=8)
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_quality: int = Field(90, ge=1, le=100)
    input_images: list[ImageRef] = Field(default_factory=list, max_length=3, validate_default=True)
    mask: ImageRef | None = Field(None, validate_default=True)
    strength: float = Field(0.6, ge=0, le=1)
    priority: int = Field(5, ge=0, le=9)
    webhook_url: HttpUrl | None = Field(
        None,
        description="Called (a signed POST of the job object) when the job ends; https, a public address.",
    )
    metadata: dict[str, Any] = Field(default_factory=dict)
    loras: list[LoraRef] = Field(
        default_factory=list,
        max_length=3,
        description="LoRA adapters of this tenant with their scales, each at most once; generate jobs and "
        "img2img / inpaint edits (not instruct). Stored sorted by adapter_id.",
    )
    acceleration: Literal["none", "cache"] = Field(
        "none",
        description="none: the exact model; cache: fast mode (Cache-DiT reuses the transformer's middle blocks on "
        "fixed steps; a little detail for speed), generate jobs on z-image-turbo and z-image-base. Never shares a "
        "batch with exact jobs.",
    )
    reuse: bool = Field(
        False, description="Return the outputs of an identical earlier succeeded job of this tenant (seed required)."
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_length(cls, v: str) -> str:
        _check_text("prompt", v)
        v = v.strip()
        if not v:
            raise ValueError("prompt must not be empty")
        if len(v) > 4000:
            raise ValueError("prompt must be at most 4000 characters")
        return v

    @field_validator("negative_prompt")
    @classmethod
    def _no_nul(cls, v: str | None) -> str | None:
        if v is not None:
            _check_text("negative_prompt", v)
        return v

    @field_validator("loras")
    @classmethod
    def _adapters_for_mode(cls, v: list[LoraRef], info: ValidationInfo) -> list[LoraRef]:
        if v and info.data.get("kind") == "edit" and info.data.get("mode") == "instruct":
            raise ValueError("instruct edits take no adapters (the Omni edit model has none); use img2img or inpaint")
        model = info.data.get("model")
        if v and model is not None and not MODELS[model].loras:
            raise ValueError(f"{model} takes no adapters")
        seen: set[str] = set()
        for lora in v:
            if lora.adapter_id in seen:
                raise ValueError(f"adapter {lora.adapter_id} is named twice; give each adapter once")
            seen.add(lora.adapter_id)
        return v

    @field_validator("acceleration")
    @classmethod
    def _acceleration_for_model(cls, v: str, info: ValidationInfo) -> str:
        kind, mode = info.data.get("kind"), info.data.get("mode")
        model = info.data.get("model")
        if kind is None or (model is None and v != "none"):
            return v  # kind or model itself was refused
        problem = acceleration_problem(MODELS[model or default_model(kind, mode)], kind, v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, v: dict[str, Any]) -> dict[str, Any]:
        problem = metadata_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    @field_validator("num_images")
    @classmethod
    def _seeds_in_range(cls, v: int, info: ValidationInfo) -> int:
        seed = info.data.get("seed")
        if seed is not None and seed + v - 1 > MAX_SEED:
            # image i uses seed + i: every recorded seed must be one a client could submit again
            raise ValueError(f"seed + num_images - 1 must be at most {MAX_SEED}")
        return v

    @field_validator("mode")
    @classmethod
    def _mode_for_kind(cls, v: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("kind")
        if kind == "generate" and v is not None:
            raise ValueError("mode applies to edit jobs only")
        if kind == "edit" and v is None:
            return "instruct"
        return v

    @field_validator("input_images")
    @classmethod
    def _images_for_kind(cls, v: list[ImageRef], info: ValidationInfo) -> list[ImageRef]:
        kind, mode = info.data.get("kind"), info.data.get("mode")
        if kind == "generate" and v:
            raise ValueError("generate jobs take no input images")
        if kind == "edit":
            if not v:
                raise ValueError("edit jobs need 1 to 3 input images")
            if mode in ("img2img", "inpaint") and len(v) != 1:
                raise ValueError(f"{mode} takes exactly one input image")
        return v

    @field_validator("mask")
    @classmethod
    def _mask_for_mode(cls, v: ImageRef | None, info: ValidationInfo) -> ImageRef | None:
        kind, mode = info.data.get("kind"), info.data.get("mode")
        if v is None and kind == "edit" and mode == "inpaint":
            raise ValueError("inpaint needs a mask")
        if v is not None and not (kind == "edit" and mode == "inpaint"):
            raise ValueError("mask applies to edit jobs in inpaint mode only")
        return v

    @field_validator("model")
    @classmethod
    def _model_for_kind(cls, v: str | None, info: ValidationInfo) -> str | None:
        # One table (core.catalog) says what each model runs, its defaults and its limits.
        kind, mode = info.data.get("kind"), info.data.get("mode")
        if kind is None:
            return v  # kind itself was refused
        spec = MODELS[v or default_model(kind, mode)]
        if (kind, mode) not in spec.kinds:
            runs = " and ".join(f"{k} {m}" if m else k for k, m in spec.kinds)
            raise ValueError(f"{spec.name} runs {runs} jobs only")
        return spec.name

    @field_validator("steps", "guidance_scale")
    @classmethod
    def _within_model_limits(cls, v: float | None, info: ValidationInfo) -> float | None:
        model = info.data.get("model")
        if v is None or model is None:
            return v
        spec = MODELS[model]
        low, high = (spec.min_steps, spec.max_steps) if info.field_name == "steps" else spec.guidance_range
        if not low <= v <= high:
            raise ValueError(f"{info.field_name} must be from {low:g} to {high:g} for {model}")
        return v

    @model_validator(mode="after")
    def _model_defaults(self) -> JobRequest:
        spec = MODELS[self.model or default_model(self.kind, self.mode)]
        if self.steps is None:
            self.steps = spec.steps
        if self.guidance_scale is None:
            self.guidance_scale = spec.guidance_scale
        return self

    def normalized(self) -> dict[str, Any]:
        """The request with defaults filled in, as stored and echoed back (the seed as given)."""
        data = self.model_dump(mode="json")
        # Sorted: the same adapters in another order are the same request (hash, reuse key, group key).
        data["loras"].sort(key=lambda lora: lora["adapter_id"])
        # The kind's default model is left out: such a request is stored, hashed and echoed exactly as before
        # models could be named (idempotency keys and reuse keys of earlier jobs still match).
        if data.get("model") == default_model(self.kind, self.mode):
            data.pop("model")
        if data.get("acceleration") == "none":
            data.pop("acceleration")  # likewise: the exact model is what every earlier job ran
        if self.kind == "generate":
            for name in ("mode", "strength", "mask"):
                data.pop(name, None)
        elif self.mode == "instruct":
            data.pop("strength", None)
        return data


class Progress(BaseModel):
    """Denoising progress of a running job."""

    step: int
    total: int


class JobError(BaseModel):
    """Why a job failed."""

    code: str
    message: str


class Output(BaseModel):
    """One result image in S3."""

    index: int
    url: str
    url_expires_at: str
    key: str
    width: int
    height: int
    seed: int
    format: str
    bytes: int
    sha256: str


class Timings(BaseModel):
    """Where a job's time went, in milliseconds."""

    queued_ms: int | None = None
    inference_ms: int | None = None
    upload_ms: int | None = None
    total_ms: int | None = None


class JobObject(BaseModel):
    """The job object of API.md."""

    id: str
    object: Literal["job"] = "job"
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    kind: str
    request: dict[str, Any]
    batch_id: str | None
    priority: int
    attempts: int
    progress: Progress | None
    queue_position: int | None
    error: JobError | None
    outputs: list[Output]
    timings: Timings
    created_at: str
    started_at: str | None
    finished_at: str | None
    metadata: dict[str, Any]
    reused_from: str | None = None  # the earlier job whose outputs these are, for a reused job


class JobPage(BaseModel):
    """A page of jobs, newest first."""

    data: list[JobObject]
    next_cursor: str | None


class ErrorInfo(BaseModel):
    """The error of an error body."""

    code: str
    message: str
    details: list[dict[str, Any]] = Field(default_factory=list)


class ErrorBody(BaseModel):
    """Every error answer has this body."""

    error: ErrorInfo


def error_details(exc: ValidationError, *, index: int | None = None) -> list[dict[str, Any]]:
    """Each problem of a pydantic error as ``{"field", "message"[, "index"]}``, with the field's dotted path."""
    details = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"] if p != "body"]
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        item: dict[str, Any] = {"field": ".".join(loc) or "body", "message": message}
        if index is not None:
            item["index"] = index
        details.append(item)
    return details
