"""Result reuse: a job that opts in (``"reuse": true``) and names its seed returns the outputs of an identical
earlier job of the same tenant that succeeded, without running the model.

Identical means the same reuse key: a hash of the model that would run it (name and revision) and of every
request field that decides the images (prompt, negative prompt, size, steps, guidance, seed, number of images,
format and quality, edit mode, strength and inputs, adapters, fast mode). Priority, metadata and webhooks do not. A job
without a seed is never reused: its images are meant to be new.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Select, Update, select
from sqlalchemy.orm import aliased

from core.catalog import default_model, weights_of
from core.models import jobs
from core.settings import Settings
from core.status import JobStatus
from core.transition import transition

# The request fields that decide a job's images.
IDENTITY_FIELDS = (
    "kind",
    "mode",
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "seed",
    "num_images",
    "output_format",
    "output_quality",
    "strength",
    "input_images",
    "mask",
    "loras",
)


def model_identity(settings: Settings, kind: str, mode: str | None, model: str | None = None) -> str:
    """The model that runs a job (its ``model``, else its kind's default), as the weights the settings name and
    their revision: part of the reuse key. Turbo's and Edit's read as they always did (earlier keys still match);
    any other model's is prefixed with its name, so two models never share a key even on the same weights."""
    name = model or default_model(kind, mode)
    identity = f"{weights_of(settings, name) or ''}@{settings.model_revision or ''}"
    return identity if name == default_model(kind, mode) else f"{name}={identity}"


def reuse_key(normalized: Mapping[str, Any], model: str) -> str | None:
    """The reuse key of a normalized request (seed as the client gave it), or None when it may not be reused."""
    if not normalized.get("reuse") or normalized.get("seed") is None:
        return None
    identity = {name: normalized.get(name) for name in IDENTITY_FIELDS}
    if normalized.get("acceleration", "none") != "none":
        # Only when fast: exact jobs (which store none) keep the keys they always had.
        identity["acceleration"] = normalized["acceleration"]
    canonical = json.dumps({"model": model, **identity}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def reuse_earlier(tenant_id: str, *, where: Sequence[ColumnElement[bool]]) -> Update | Select[Any]:
    """The gate's move of the queued jobs matching ``where`` whose reuse key already succeeded for the tenant:
    straight to succeeded, with the newest such job's outputs and its id in ``reused_from`` (and the webhooks the
    move owes, like every terminal move). RETURNING their ids."""
    done = aliased(jobs, name="done")
    earlier = (
        select(done.c.reuse_key, done.c.id, done.c.outputs)
        .where(
            done.c.tenant_id == tenant_id,
            done.c.status == JobStatus.SUCCEEDED.value,
            done.c.reuse_key.is_not(None),
        )
        .distinct(done.c.reuse_key)
        .order_by(done.c.reuse_key, done.c.finished_at.desc())
        .subquery("earlier")
    )
    return transition(
        JobStatus.SUCCEEDED,
        from_=JobStatus.QUEUED,
        where=[*where, jobs.c.tenant_id == tenant_id, jobs.c.reuse_key == earlier.c.reuse_key],
        values={"outputs": earlier.c.outputs, "reused_from": earlier.c.id},
    ).returning(jobs.c.id)
