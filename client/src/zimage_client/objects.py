"""The API's objects as typed dictionaries: what the service sends is what you get (plain JSON, no copying),
with names an editor and mypy can check. Fields are as in the service's API reference."""

from __future__ import annotations

from typing import Any, TypedDict


class Output(TypedDict, total=False):
    """One image of a succeeded job."""

    index: int
    url: str  # presigned GET, valid until url_expires_at
    url_expires_at: str
    key: str
    width: int
    height: int
    seed: int
    format: str
    bytes: int
    sha256: str


class JobError(TypedDict):
    """Why a job failed."""

    code: str
    message: str


class Progress(TypedDict):
    """Denoising steps done while a job runs."""

    step: int
    total: int


class Job(TypedDict, total=False):
    """A job object (``GET /v1/jobs/{id}``)."""

    id: str
    object: str
    status: str  # queued | running | succeeded | failed | canceled
    kind: str
    request: dict[str, Any]
    batch_id: str | None
    priority: int
    attempts: int
    progress: Progress | None
    queue_position: int | None
    error: JobError | None
    outputs: list[Output]
    timings: dict[str, int]
    created_at: str
    started_at: str | None
    finished_at: str | None
    metadata: dict[str, Any]
    reused_from: str | None


class Counts(TypedDict):
    """A batch's jobs by status."""

    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    canceled: int


class Batch(TypedDict, total=False):
    """A batch object (``GET /v1/batches/{id}``)."""

    id: str
    object: str
    status: str  # running | completed | canceled
    counts: Counts
    created_at: str
    finished_at: str | None
    metadata: dict[str, Any]
    gallery_url: str


class ManifestLine(TypedDict, total=False):
    """One job of a batch's manifest, in submission order."""

    index: int
    job_id: str
    status: str
    terminal: bool
    prompt: str
    seed: int
    metadata: dict[str, Any]
    error: JobError | None
    outputs: list[Output]


class Upload(TypedDict, total=False):
    """An upload object (``POST /v1/uploads``)."""

    id: str
    object: str
    width: int
    height: int
    format: str
    bytes: int
    sha256: str
    created_at: str


class Adapter(TypedDict, total=False):
    """A LoRA adapter object (``POST /v1/adapters``)."""

    id: str
    object: str
    name: str
    bytes: int
    sha256: str
    rank: int
    target_modules: list[str]
    created_at: str


class AdapterPage(TypedDict):
    """A page of ``GET /v1/adapters``."""

    data: list[Adapter]
    next_cursor: str | None


class JobPage(TypedDict):
    """A page of ``GET /v1/jobs``."""

    data: list[Job]
    next_cursor: str | None
