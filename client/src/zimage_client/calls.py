"""Every API call as data: method, path, body and headers, built once per logical call and sent as many times as
its retries need (so an Idempotency-Key made here is the same on every try). The sync and async clients share
these builders; they differ only in how they send."""

from __future__ import annotations

import mimetypes
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import httpx

from .errors import error_for
from .retry import parse_retry_after

# A file to upload: a path, the bytes themselves, or an open binary file.
FileSource = str | Path | bytes | IO[bytes]


@dataclass(frozen=True)
class Call:
    """One logical API call."""

    method: str
    path: str
    params: Mapping[str, Any] | None = None
    json: Any = None
    files: Mapping[str, tuple[str, bytes, str]] | None = None
    data: Mapping[str, str] | None = None  # form fields sent with ``files``
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def keyed(self) -> bool:
        """Whether the call carries an Idempotency-Key (so a retry can never do the work twice)."""
        return "Idempotency-Key" in self.headers

    def request_args(self) -> dict[str, Any]:
        """Keyword arguments for ``httpx.Client.build_request``."""
        args: dict[str, Any] = {"headers": dict(self.headers)}
        if self.params:
            args["params"] = {k: v for k, v in self.params.items() if v is not None}
        if self.json is not None:
            args["json"] = self.json
        if self.files is not None:
            args["files"] = dict(self.files)
        if self.data is not None:
            args["data"] = dict(self.data)
        return args


def new_idempotency_key() -> str:
    """A fresh key for one logical create call (uuid4)."""
    return str(uuid.uuid4())


def _id(value: str) -> str:
    if not value or "/" in value:
        raise ValueError(f"not an id: {value!r}")
    return quote(value, safe="")


def _keyed(idempotency_key: str | None) -> dict[str, str]:
    return {"Idempotency-Key": idempotency_key or new_idempotency_key()}


def submit(request: Mapping[str, Any], idempotency_key: str | None = None) -> Call:
    """POST /v1/jobs."""
    return Call("POST", "/v1/jobs", json=dict(request), headers=_keyed(idempotency_key))


def get_job(job_id: str) -> Call:
    """GET /v1/jobs/{id}."""
    return Call("GET", f"/v1/jobs/{_id(job_id)}")


def list_jobs(**params: Any) -> Call:
    """GET /v1/jobs (status, batch_id, limit, cursor)."""
    return Call("GET", "/v1/jobs", params=params)


def cancel_job(job_id: str) -> Call:
    """POST /v1/jobs/{id}/cancel."""
    return Call("POST", f"/v1/jobs/{_id(job_id)}/cancel")


def job_events(job_id: str) -> Call:
    """GET /v1/jobs/{id}/events (server-sent events)."""
    return Call("GET", f"/v1/jobs/{_id(job_id)}/events", headers={"Accept": "text/event-stream"})


def submit_batch(
    jobs: Iterable[Mapping[str, Any]],
    defaults: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> Call:
    """POST /v1/batches (JSON shape)."""
    body = {"defaults": dict(defaults or {}), "jobs": [dict(j) for j in jobs], "metadata": dict(metadata or {})}
    return Call("POST", "/v1/batches", json=body, headers=_keyed(idempotency_key))


def get_batch(batch_id: str) -> Call:
    """GET /v1/batches/{id}."""
    return Call("GET", f"/v1/batches/{_id(batch_id)}")


def cancel_batch(batch_id: str) -> Call:
    """POST /v1/batches/{id}/cancel."""
    return Call("POST", f"/v1/batches/{_id(batch_id)}/cancel")


def batch_events(batch_id: str) -> Call:
    """GET /v1/batches/{id}/events (server-sent events)."""
    return Call("GET", f"/v1/batches/{_id(batch_id)}/events", headers={"Accept": "text/event-stream"})


def manifest(batch_id: str) -> Call:
    """GET /v1/batches/{id}/manifest (NDJSON)."""
    return Call("GET", f"/v1/batches/{_id(batch_id)}/manifest", headers={"Accept": "application/x-ndjson"})


def get_upload(upload_id: str) -> Call:
    """GET /v1/uploads/{id}."""
    return Call("GET", f"/v1/uploads/{_id(upload_id)}")


def _file(file: FileSource, filename: str | None, default: str) -> tuple[bytes, str]:
    """A file's bytes and name, read into memory once so that a retry can send them again."""
    if isinstance(file, bytes):
        return file, filename or default
    if isinstance(file, str | Path):
        path = Path(file)
        return path.read_bytes(), filename or path.name
    return file.read(), filename or Path(str(getattr(file, "name", default))).name


def upload(file: FileSource, filename: str | None = None, content_type: str | None = None) -> Call:
    """POST /v1/uploads (an image of at most 20 MiB)."""
    data, name = _file(file, filename, "image")
    kind = content_type or mimetypes.guess_type(name)[0] or "application/octet-stream"
    return Call("POST", "/v1/uploads", files={"file": (name, data, kind)})


def create_adapter(file: FileSource, name: str | None = None, filename: str | None = None) -> Call:
    """POST /v1/adapters with a .safetensors LoRA file (read into memory: the server takes up to 2 GiB)."""
    data, file_name = _file(file, filename, "adapter.safetensors")
    form = {"name": name} if name else None
    return Call("POST", "/v1/adapters", files={"file": (file_name, data, "application/octet-stream")}, data=form)


def create_adapter_from_url(url: str, name: str | None = None) -> Call:
    """POST /v1/adapters with ``{"url"}``: the service fetches the file itself."""
    body = {"url": url, **({"name": name} if name else {})}
    return Call("POST", "/v1/adapters", json=body)


def list_models() -> Call:
    """GET /v1/models: the served models, their defaults and limits, and whether a worker for each is up."""
    return Call("GET", "/v1/models")


def get_adapter(adapter_id: str) -> Call:
    """GET /v1/adapters/{id}."""
    return Call("GET", f"/v1/adapters/{_id(adapter_id)}")


def list_adapters(**params: Any) -> Call:
    """GET /v1/adapters (limit, cursor)."""
    return Call("GET", "/v1/adapters", params=params)


def delete_adapter(adapter_id: str) -> Call:
    """DELETE /v1/adapters/{id} (409 while queued or running jobs use it)."""
    return Call("DELETE", f"/v1/adapters/{_id(adapter_id)}")


def check(response: httpx.Response) -> None:
    """Raise the SDK error an answer means (its body must have been read); nothing for a success."""
    if response.status_code >= 400:
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        raise error_for(response.status_code, response.content, retry_after)


def result(response: httpx.Response) -> Any:
    """The JSON of a successful answer (None for 204 No Content); the mapped error otherwise."""
    check(response)
    return None if response.status_code == 204 else response.json()


def is_event_stream(response: httpx.Response) -> bool:
    """Whether an answer is a ``text/event-stream``."""
    return response.headers.get("content-type", "").split(";")[0].strip() == "text/event-stream"


def stream_timeout(base: httpx.Timeout, remaining: float | None) -> httpx.Timeout:
    """The timeout of a long-lived stream: the server sends a keep-alive every 15 s, so 45 s of silence means a
    dead connection; never longer than what is left of the caller's own deadline."""
    read = EVENT_SILENCE_S if remaining is None else max(1.0, min(EVENT_SILENCE_S, remaining + 1.0))
    return httpx.Timeout(base.connect, connect=base.connect, read=read, write=base.write, pool=base.pool)


EVENT_SILENCE_S = 45.0
