"""Turning a validated job request into the row that is inserted: seed, group key, cost, request hash."""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

from core import ids
from core.catalog import default_model
from core.queue import queue_for
from core.reuse import reuse_key
from core.schemas import MAX_SEED, JobRequest
from core.work import image_tokens


def request_hash(normalized: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a normalized request (seed as the client gave it)."""
    canonical = json.dumps(normalized, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def group_key(req: JobRequest) -> str:
    """Jobs with equal keys can share one pipeline call: same model and mode, size, steps, guidance, adapters,
    acceleration. (Each model has its own queue; a model other than its kind's default is named in the key as well.)"""
    loras = ",".join(f"{lo.adapter_id}:{lo.scale:g}" for lo in sorted(req.loras, key=lambda lo: lo.adapter_id))
    parts = [
        req.kind,
        req.mode or "-",
        f"{req.width}x{req.height}",
        str(req.steps),
        f"{req.guidance_scale:g}",
    ]
    if req.mode in ("img2img", "inpaint"):
        parts.append(f"s{req.strength:g}")
    parts.append(loras)
    if req.model is not None and req.model != default_model(req.kind, req.mode):
        parts.append(req.model)
    if req.acceleration != "none":
        parts.append(req.acceleration)  # fast and exact jobs never share a batch
    return "|".join(parts)


def cost_tokens(req: JobRequest) -> int:
    """Image tokens the job adds to a batch (what bounds a batch on the accelerator): with classifier-free
    guidance (guidance_scale > 0, Base's default) every image runs twice per step, conditional and unconditional
    in one doubled batch, so it counts twice. The one rule: the claim's token budget and the tenants' fair-share
    clocks both read this."""
    passes = 2 if (req.guidance_scale or 0) > 0 else 1
    return image_tokens(req.width, req.height) * req.num_images * passes


def build_job_row(
    req: JobRequest,
    *,
    tenant_id: str,
    max_attempts: int,
    idempotency_key: str | None = None,
    batch_id: str | None = None,
    batch_index: int | None = None,
    model: str = "",
) -> dict[str, Any]:
    """The ``jobs`` row for a request: a new id, the seed chosen when the client left it out, routing keys.

    ``model`` (``core.reuse.model_identity``) names the weights that will run it: a job that opted into reuse
    gets its reuse key from it."""
    normalized = req.normalized()
    digest = request_hash(normalized) if idempotency_key is not None else None
    reuse = reuse_key(normalized, model) if req.reuse else None
    if normalized["seed"] is None:
        # Leave room for seed + num_images - 1 within the allowed range. A seed picks an image, it guards nothing:
        # ``random`` (re-seeded in every forked child), not a system call per job as ``secrets`` would make.
        normalized["seed"] = random.randrange(MAX_SEED - 8)
    return {
        "id": ids.job_id(),
        "tenant_id": tenant_id,
        "batch_id": batch_id,
        "batch_index": batch_index,
        "kind": req.kind,
        "queue": queue_for(req.kind, req.mode, req.model),
        "group_key": group_key(req),
        "cost_tokens": cost_tokens(req),
        "priority": req.priority,
        "request": normalized,
        "metadata": normalized["metadata"],
        "max_attempts": max_attempts,
        "idempotency_key": idempotency_key,
        "request_hash": digest,
        "reuse_key": reuse,
    }
