"""``Client``: the synchronous SDK. Every call is built by ``calls``, retried by ``retry`` (429, 503 and dropped
connections, with the same Idempotency-Key on every try) and its errors mapped by ``errors``; ``AsyncClient``
is the same on asyncio.

    from zimage_client import Client

    with Client() as zc:                         # ZIMAGE_API_URL, ZIMAGE_API_KEY
        job = zc.wait(zc.submit(prompt="a red fox in the snow", seed=7)["id"])
        zc.download_outputs(job, "out/")
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from . import calls
from .calls import Call, FileSource
from .config import ClientConfig
from .errors import ServiceUnreachable
from .objects import Adapter, AdapterPage, Batch, Job, JobPage, ManifestLine, Output, Upload
from .retry import NO_RETRY, RETRY_EXCEPTIONS, RetryPolicy
from .sse import ServerSentEvent, SSEDecoder
from .transfer import AtomicWriter, extension, verified_bytes
from .watch import (
    EVENTS_NOT_SERVED,
    Deadline,
    PollBackoff,
    Quiet,
    apply_batch_event,
    apply_job_event,
    batch_finished,
    job_finished,
)

# A stream that ends this way is not an error: the wait goes on by polling.
STREAM_DROPPED: tuple[type[Exception], ...] = (*RETRY_EXCEPTIONS, ServiceUnreachable)


class Client:
    """A synchronous client of one service URL and API key.

    Args:
        base_url: the API, e.g. ``http://127.0.0.1:8000``; default ``$ZIMAGE_API_URL``.
        api_key: a tenant's key; default ``$ZIMAGE_API_KEY``.
        timeout: seconds (or an ``httpx.Timeout``) for one request.
        retry: how failed requests are retried (``RetryPolicy(attempts=1)``: never).
        poll: the delays between polls when a wait cannot use server-sent events.
        transport: an httpx transport, e.g. ``httpx.MockTransport`` in tests.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        retry: RetryPolicy | None = None,
        poll: PollBackoff | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.config = ClientConfig.resolve(base_url, api_key, timeout, retry)
        self.poll = poll or PollBackoff()
        self._http = httpx.Client(transport=transport, **self.config.api_kwargs())
        self._blob = httpx.Client(transport=transport, **self.config.blob_kwargs())
        self._events_served = True  # False once an events endpoint turned out not to exist on this service

    def close(self) -> None:
        """Close both connection pools."""
        self._http.close()
        self._blob.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sending ---------------------------------------------------------------------------------------------

    def _send(
        self,
        call: Call,
        *,
        stream: bool = False,
        timeout: httpx.Timeout | None = None,
        http: httpx.Client | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> httpx.Response:
        """Send ``call``, retrying as the policy says; the last answer (a streamed one still open)."""
        client = http or self._http
        policy = retry_policy or self.config.retry
        retry = 0
        while True:
            args = call.request_args()
            if timeout is not None:
                args["timeout"] = timeout
            request = client.build_request(call.method, call.path, **args)
            try:
                response = client.send(request, stream=stream)
            except RETRY_EXCEPTIONS as exc:
                delay = policy.delay(retry)
                if delay is None:
                    raise ServiceUnreachable(f"{call.method} {request.url}: {exc!r}") from exc
            else:
                delay = policy.delay_after_response(retry, response, call.keyed)
                if delay is None:
                    return response
                response.close()
            time.sleep(delay)
            retry += 1

    def _call(self, call: Call) -> Any:
        return calls.result(self._send(call))

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """Any API call, retried and error-mapped like the others; its JSON answer. Pass an Idempotency-Key
        header for a create call that must never happen twice."""
        return self._call(Call(method.upper(), path, params=params, json=json, headers=dict(headers or {})))

    # -- jobs ------------------------------------------------------------------------------------------------

    def submit(
        self, request: Mapping[str, Any] | None = None, /, *, idempotency_key: str | None = None, **fields: Any
    ) -> Job:
        """POST /v1/jobs: the queued job. ``request`` and ``fields`` together are the job request; a retried
        submit reuses one Idempotency-Key (a fresh uuid4 unless given), so it never makes two jobs."""
        return self._call(calls.submit({**(request or {}), **fields}, idempotency_key))

    def get(self, job_id: str) -> Job:
        """GET /v1/jobs/{id}."""
        return self._call(calls.get_job(job_id))

    def list_jobs(self, **params: Any) -> JobPage:
        """GET /v1/jobs: one page, newest first (``status``, ``batch_id``, ``limit``, ``cursor``)."""
        return self._call(calls.list_jobs(**params))

    def cancel(self, job_id: str) -> Job:
        """POST /v1/jobs/{id}/cancel: the job, now canceled (Conflict if it had already ended)."""
        return self._call(calls.cancel_job(job_id))

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_update: Callable[[Job], None] | None = None,
        events: bool = True,
    ) -> Job:
        """Follow a job until it is succeeded, failed or canceled; that job object. Server-sent events first;
        polling with backoff when the service does not serve them or the stream drops. ``on_update(job)`` at
        each change; WaitTimeout after ``timeout`` seconds."""
        deadline = Deadline(timeout, f"job {job_id}")
        job = Job(id=job_id)
        if events and self._events_served:
            with contextlib.closing(self._events(calls.job_events(job_id), deadline)) as stream:
                quiet = Quiet()
                for event in stream:
                    if event is None:  # a keep-alive or a line of an unfinished event
                        deadline.check()
                        if not quiet.due():
                            continue
                        job = self.get(job_id)  # only keep-alives for a while: read the job itself
                    else:
                        updated = apply_job_event(job, event.json())
                        if updated is None:
                            continue
                        quiet.heard()
                        job = updated
                    if job_finished(job) and job.get("object") != "job":
                        job = self.get(job_id)  # a bare state event: read the whole job (outputs, error)
                    if on_update is not None:
                        on_update(job)
                    if job_finished(job):
                        return job
                    deadline.check()
        return self._poll(lambda: self.get(job_id), job_finished, deadline, on_update)

    # -- batches ---------------------------------------------------------------------------------------------

    def submit_batch(
        self,
        jobs: Iterable[Mapping[str, Any]],
        *,
        defaults: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Batch:
        """POST /v1/batches (all or nothing): the batch. Retries reuse one Idempotency-Key, as ``submit``."""
        return self._call(calls.submit_batch(jobs, defaults, metadata, idempotency_key))

    def get_batch(self, batch_id: str) -> Batch:
        """GET /v1/batches/{id}: the batch with its counts."""
        return self._call(calls.get_batch(batch_id))

    def cancel_batch(self, batch_id: str) -> Batch:
        """POST /v1/batches/{id}/cancel: every job not yet terminal is canceled."""
        return self._call(calls.cancel_batch(batch_id))

    def wait_batch(
        self,
        batch_id: str,
        *,
        timeout: float | None = None,
        on_update: Callable[[Batch], None] | None = None,
        events: bool = True,
    ) -> Batch:
        """Follow a batch until nothing is left to run (``completed`` or ``canceled``); that batch. Events
        first, then polling, as ``wait``; ``on_update(batch)`` at each change of its counts."""
        deadline = Deadline(timeout, f"batch {batch_id}")
        batch = Batch(id=batch_id)
        if events and self._events_served:
            with contextlib.closing(self._events(calls.batch_events(batch_id), deadline)) as stream:
                quiet = Quiet()
                for event in stream:
                    if event is None:
                        deadline.check()
                        if not quiet.due():
                            continue
                        batch = self.get_batch(batch_id)
                    else:
                        quiet.heard()
                        batch = apply_batch_event(batch, event.json()) or self.get_batch(batch_id)
                    if on_update is not None:
                        on_update(batch)
                    if batch_finished(batch):
                        return batch
                    deadline.check()
        return self._poll(lambda: self.get_batch(batch_id), batch_finished, deadline, on_update)

    def iter_manifest(self, batch_id: str) -> Iterator[ManifestLine]:
        """GET /v1/batches/{id}/manifest: one job at a time, in submission order, as the NDJSON streams in."""
        with contextlib.closing(self._send(calls.manifest(batch_id), stream=True)) as response:
            if response.status_code >= 400:
                response.read()
                calls.check(response)
            for line in response.iter_lines():
                if line.strip():
                    yield json.loads(line)

    # -- files -----------------------------------------------------------------------------------------------

    def upload(self, file: FileSource, *, filename: str | None = None, content_type: str | None = None) -> Upload:
        """POST /v1/uploads: store an input image (a path, bytes or a binary file) for edit jobs."""
        return self._call(calls.upload(file, filename, content_type))

    def get_upload(self, upload_id: str) -> Upload:
        """GET /v1/uploads/{id}."""
        return self._call(calls.get_upload(upload_id))

    # -- adapters --------------------------------------------------------------------------------------------

    def create_adapter(
        self, file: FileSource | None = None, *, url: str | None = None, name: str | None = None
    ) -> Adapter:
        """POST /v1/adapters: a LoRA .safetensors file (a path, bytes or a binary file), or a URL the service
        fetches; checked against the served model before it is stored."""
        if (file is None) == (url is None):
            raise ValueError("give a file or a url")
        call = calls.create_adapter(file, name) if file is not None else calls.create_adapter_from_url(str(url), name)
        return self._call(call)

    def list_models(self) -> list[dict[str, Any]]:
        """GET /v1/models: each served model (``z-image-turbo``, ``z-image-base``, ``z-image-edit``) with its
        defaults, limits and ``available`` (a worker for it is up); name one in a job's ``model``."""
        return list(self._call(calls.list_models())["data"])

    def get_adapter(self, adapter_id: str) -> Adapter:
        """GET /v1/adapters/{id}."""
        return self._call(calls.get_adapter(adapter_id))

    def list_adapters(self, **params: Any) -> AdapterPage:
        """GET /v1/adapters (limit, cursor): newest first."""
        return self._call(calls.list_adapters(**params))

    def delete_adapter(self, adapter_id: str) -> None:
        """DELETE /v1/adapters/{id}; Conflict while queued or running jobs use it."""
        self._call(calls.delete_adapter(adapter_id))

    def download(self, output: Output, path: str | Path) -> Path:
        """Write one output image to ``path`` atomically, verified against its sha256 (ChecksumMismatch
        otherwise: nothing is written); retried like any call. Its presigned URL carries no API key."""
        path = Path(path)
        self._fetch(output, lambda chunks: _write(path, output, chunks))
        return path

    def read_output(self, output: Output) -> bytes:
        """The bytes of one output image, verified against its sha256."""
        return self._fetch(output, lambda chunks: verified_bytes(output, b"".join(chunks)))

    def download_outputs(self, job: Job, directory: str | Path) -> list[Path]:
        """Every image of a succeeded job into ``directory`` as ``<job id>-<index>.<ext>``; their paths."""
        folder = Path(directory)
        return [
            self.download(out, folder / f"{job['id']}-{out['index']}.{extension(out)}")
            for out in job.get("outputs", [])
        ]

    def _fetch(self, output: Output, sink: Callable[[Iterator[bytes]], Any]) -> Any:
        """Stream a presigned URL into ``sink``; a connection lost mid-body starts the download again."""
        call = Call("GET", output["url"])
        policy = self.config.retry
        retry = 0
        while True:
            with contextlib.closing(self._send(call, stream=True, http=self._blob)) as response:
                if response.status_code >= 400:
                    response.read()
                    calls.check(response)
                try:
                    return sink(response.iter_bytes())
                except RETRY_EXCEPTIONS as exc:
                    delay = policy.delay(retry)
                    if delay is None:
                        raise ServiceUnreachable(f"download of {output.get('key', 'an output')}: {exc!r}") from exc
            time.sleep(delay)
            retry += 1

    # -- following -------------------------------------------------------------------------------------------

    def _events(self, call: Call, deadline: Deadline) -> Generator[ServerSentEvent | None, None, None]:
        """Per line of an events stream, the event it completes or None (a keep-alive, a partial event: a chance
        to check the deadline); ends quietly (the caller then polls) when the service does not serve
        it, answers 429 / 5xx, or the connection drops (one try: polling has the retries). Auth and other client
        errors are raised."""
        timeout = calls.stream_timeout(self.config.timeout, deadline.remaining())
        try:
            with contextlib.closing(self._send(call, stream=True, timeout=timeout, retry_policy=NO_RETRY)) as response:
                status = response.status_code
                if status in EVENTS_NOT_SERVED - {404}:
                    self._events_served = False  # this service has no events: poll from now on
                    return
                if status in (404, 429) or status >= 500:
                    return  # the poll that follows raises NotFound for an unknown id, and retries 429 / 503
                if status >= 400:
                    response.read()
                    calls.check(response)
                if not calls.is_event_stream(response):
                    return
                decoder = SSEDecoder()
                for line in response.iter_lines():
                    yield decoder.decode(line)
        except STREAM_DROPPED:
            return

    def _poll(
        self,
        read: Callable[[], Mapping[str, Any]],
        finished: Callable[[Mapping[str, Any]], bool],
        deadline: Deadline,
        on_update: Callable[[Any], None] | None,
    ) -> Any:
        last: Mapping[str, Any] | None = None
        for delay in self.poll.delays():
            current = read()
            if on_update is not None and current != last:
                on_update(current)
            last = current
            if finished(current):
                return current
            deadline.check()
            time.sleep(deadline.clip(delay))
        raise AssertionError("unreachable")


def _write(path: Path, output: Output, chunks: Iterator[bytes]) -> None:
    with AtomicWriter(path, output.get("sha256")) as writer:
        for chunk in chunks:
            writer.write(chunk)
