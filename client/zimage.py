"""``ZImageClient``: the repository's first client, kept for the callers written against it (tests, benches).

New code uses the SDK, ``zimage_client.Client`` (``client/src/zimage_client``). This adapter runs on it, so
requests and error mapping are the SDK's, but it keeps its old behaviour exactly: no retries, no automatic
Idempotency-Key, ``wait`` and ``wait_batch`` poll at a fixed interval and raise ``TimeoutError``, ``download``
returns bytes (now verified against the output's sha256).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from zimage_client import Client, RetryPolicy, ZImageError

TERMINAL = {"succeeded", "failed", "canceled"}

# The error every call raises: the SDK's root, with ``status``, ``code``, ``message`` and ``details``.
ApiError = ZImageError


class ZImageClient:
    """A client bound to one API URL and key."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30.0) -> None:
        self._client = Client(base_url, api_key, timeout=timeout, retry=RetryPolicy(attempts=1))

    def close(self) -> None:
        """Close the connection pools."""
        self._client.close()

    def __enter__(self) -> ZImageClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, request: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        """POST /v1/jobs; the queued job object."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return dict(self._client.request("POST", "/v1/jobs", json=request, headers=headers))

    def upload(self, data: bytes, filename: str = "image.png", content_type: str = "image/png") -> dict[str, Any]:
        """POST /v1/uploads (an input image for edit jobs); the upload object."""
        return dict(self._client.upload(data, filename=filename, content_type=content_type))

    def get(self, job_id: str) -> dict[str, Any]:
        """GET /v1/jobs/{id}."""
        return dict(self._client.get(job_id))

    def cancel(self, job_id: str) -> dict[str, Any]:
        """POST /v1/jobs/{id}/cancel."""
        return dict(self._client.cancel(job_id))

    def list(self, **params: Any) -> dict[str, Any]:
        """GET /v1/jobs with filters (status, batch_id, limit, cursor)."""
        return dict(self._client.list_jobs(**params))

    def wait(
        self, job_ids: Iterable[str], *, timeout_s: float = 600.0, poll_s: float = 0.25, on_update: Any = None
    ) -> dict[str, dict[str, Any]]:
        """Poll until every job is terminal (or raise TimeoutError); ``on_update(jobs)`` after each round."""
        pending = list(job_ids)
        done: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} job(s) not finished after {timeout_s:.0f} s")
            current = {job_id: self.get(job_id) for job_id in pending}
            done.update({k: v for k, v in current.items() if v["status"] in TERMINAL})
            pending = [k for k, v in current.items() if v["status"] not in TERMINAL]
            if on_update is not None:
                on_update({**done, **current})
            if pending:
                time.sleep(poll_s)
        return done

    def submit_batch(
        self,
        jobs: Sequence[dict[str, Any]],
        *,
        defaults: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """POST /v1/batches (all or nothing); the batch object."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = {"defaults": defaults or {}, "jobs": list(jobs), "metadata": metadata or {}}
        return dict(self._client.request("POST", "/v1/batches", json=body, headers=headers))

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        """GET /v1/batches/{id}: the batch with its counts."""
        return dict(self._client.get_batch(batch_id))

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        """POST /v1/batches/{id}/cancel: every job not yet terminal is canceled."""
        return dict(self._client.cancel_batch(batch_id))

    def wait_batch(
        self, batch_id: str, *, timeout_s: float = 900.0, poll_s: float = 0.5, on_update: Any = None
    ) -> dict[str, Any]:
        """Poll until the batch is no longer running (or raise TimeoutError); ``on_update(batch)`` each round."""
        deadline = time.monotonic() + timeout_s
        while True:
            batch = self.get_batch(batch_id)
            if on_update is not None:
                on_update(batch)
            if batch["status"] != "running":
                return batch
            if time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} still running after {timeout_s:.0f} s")
            time.sleep(poll_s)

    def iter_manifest(self, batch_id: str) -> Iterator[dict[str, Any]]:
        """GET /v1/batches/{id}/manifest, one job at a time as it streams."""
        for line in self._client.iter_manifest(batch_id):
            yield dict(line)

    def download(self, output: dict[str, Any]) -> bytes:
        """The bytes of one output image, through its presigned URL, checked against its sha256."""
        return self._client.read_output(output)
