"""``ZImageClient``: submit jobs and batches, poll them to the end, read manifests, download images (httpx, sync)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import httpx

TERMINAL = {"succeeded", "failed", "canceled"}


class ApiError(Exception):
    """The API answered with an error body; ``status`` and ``code`` say which."""

    def __init__(self, status: int, code: str, message: str, details: list[Any]) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.details = details


class ZImageClient:
    """A client bound to one API URL and key."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30.0) -> None:
        self._http = httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> ZImageClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _json(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                err = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                err = {"code": "http_error", "message": response.text[:200], "details": []}
            raise ApiError(response.status_code, err["code"], err["message"], err.get("details", []))
        return response.json()

    def submit(self, request: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        """POST /v1/jobs; the queued job object."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json(self._http.post("/v1/jobs", json=request, headers=headers))

    def upload(self, data: bytes, filename: str = "image.png", content_type: str = "image/png") -> dict[str, Any]:
        """POST /v1/uploads (an input image for edit jobs); the upload object."""
        files = {"file": (filename, data, content_type)}
        return self._json(self._http.post("/v1/uploads", files=files))

    def get(self, job_id: str) -> dict[str, Any]:
        """GET /v1/jobs/{id}."""
        return self._json(self._http.get(f"/v1/jobs/{job_id}"))

    def cancel(self, job_id: str) -> dict[str, Any]:
        """POST /v1/jobs/{id}/cancel."""
        return self._json(self._http.post(f"/v1/jobs/{job_id}/cancel"))

    def list(self, **params: Any) -> dict[str, Any]:
        """GET /v1/jobs with filters (status, batch_id, limit, cursor)."""
        return self._json(self._http.get("/v1/jobs", params=params))

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
        return self._json(self._http.post("/v1/batches", json=body, headers=headers))

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        """GET /v1/batches/{id}: the batch with its counts."""
        return self._json(self._http.get(f"/v1/batches/{batch_id}"))

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        """POST /v1/batches/{id}/cancel: every job not yet terminal is canceled."""
        return self._json(self._http.post(f"/v1/batches/{batch_id}/cancel"))

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
        with self._http.stream("GET", f"/v1/batches/{batch_id}/manifest") as response:
            if response.status_code >= 400:
                response.read()
                self._json(response)
            for line in response.iter_lines():
                if line:
                    yield json.loads(line)

    def download(self, output: dict[str, Any]) -> bytes:
        """The bytes of one output image, through its presigned URL."""
        response = httpx.get(output["url"], timeout=60)
        response.raise_for_status()
        return response.content
