"""``AsyncClient``: ``Client`` on asyncio. The same calls, retries, error mapping and waiting rules (shared in
``calls``, ``retry``, ``errors`` and ``watch``); only sending and sleeping are awaited.

    async with AsyncClient() as zc:
        job = await zc.wait((await zc.submit(prompt="a red fox in the snow"))["id"])
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx

from . import calls
from .calls import Call, FileSource
from .client import STREAM_DROPPED
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


class AsyncClient:
    """An asyncio client of one service URL and API key; arguments as ``Client``'s."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        retry: RetryPolicy | None = None,
        poll: PollBackoff | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = ClientConfig.resolve(base_url, api_key, timeout, retry)
        self.poll = poll or PollBackoff()
        self._http = httpx.AsyncClient(transport=transport, **self.config.api_kwargs())
        self._blob = httpx.AsyncClient(transport=transport, **self.config.blob_kwargs())
        self._events_served = True

    async def aclose(self) -> None:
        """Close both connection pools."""
        await self._http.aclose()
        await self._blob.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- sending ---------------------------------------------------------------------------------------------

    async def _send(
        self,
        call: Call,
        *,
        stream: bool = False,
        timeout: httpx.Timeout | None = None,
        http: httpx.AsyncClient | None = None,
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
                response = await client.send(request, stream=stream)
            except RETRY_EXCEPTIONS as exc:
                delay = policy.delay(retry)
                if delay is None:
                    raise ServiceUnreachable(f"{call.method} {request.url}: {exc!r}") from exc
            else:
                delay = policy.delay_after_response(retry, response, call.keyed)
                if delay is None:
                    return response
                await response.aclose()
            await asyncio.sleep(delay)
            retry += 1

    async def _call(self, call: Call) -> Any:
        return calls.result(await self._send(call))

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """Any API call, retried and error-mapped like the others; its JSON answer (see ``Client.request``)."""
        return await self._call(Call(method.upper(), path, params=params, json=json, headers=dict(headers or {})))

    # -- jobs ------------------------------------------------------------------------------------------------

    async def submit(
        self, request: Mapping[str, Any] | None = None, /, *, idempotency_key: str | None = None, **fields: Any
    ) -> Job:
        """POST /v1/jobs: the queued job; retries reuse one Idempotency-Key (see ``Client.submit``)."""
        return await self._call(calls.submit({**(request or {}), **fields}, idempotency_key))

    async def get(self, job_id: str) -> Job:
        """GET /v1/jobs/{id}."""
        return await self._call(calls.get_job(job_id))

    async def list_jobs(self, **params: Any) -> JobPage:
        """GET /v1/jobs: one page, newest first."""
        return await self._call(calls.list_jobs(**params))

    async def cancel(self, job_id: str) -> Job:
        """POST /v1/jobs/{id}/cancel."""
        return await self._call(calls.cancel_job(job_id))

    async def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_update: Callable[[Job], None] | None = None,
        events: bool = True,
    ) -> Job:
        """Follow a job to its end: events first, then polling (see ``Client.wait``)."""
        deadline = Deadline(timeout, f"job {job_id}")
        job = Job(id=job_id)
        if events and self._events_served:
            async with contextlib.aclosing(self._events(calls.job_events(job_id), deadline)) as stream:
                quiet = Quiet()
                async for event in stream:
                    if event is None:  # a keep-alive or a line of an unfinished event
                        deadline.check()
                        if not quiet.due():
                            continue
                        job = await self.get(job_id)  # only keep-alives for a while: read the job itself
                    else:
                        updated = apply_job_event(job, event.json())
                        if updated is None:
                            continue
                        quiet.heard()
                        job = updated
                    if job_finished(job) and job.get("object") != "job":
                        job = await self.get(job_id)
                    if on_update is not None:
                        on_update(job)
                    if job_finished(job):
                        return job
                    deadline.check()
        return await self._poll(lambda: self.get(job_id), job_finished, deadline, on_update)

    # -- batches ---------------------------------------------------------------------------------------------

    async def submit_batch(
        self,
        jobs: Iterable[Mapping[str, Any]],
        *,
        defaults: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Batch:
        """POST /v1/batches (all or nothing); retries reuse one Idempotency-Key."""
        return await self._call(calls.submit_batch(jobs, defaults, metadata, idempotency_key))

    async def get_batch(self, batch_id: str) -> Batch:
        """GET /v1/batches/{id}."""
        return await self._call(calls.get_batch(batch_id))

    async def cancel_batch(self, batch_id: str) -> Batch:
        """POST /v1/batches/{id}/cancel."""
        return await self._call(calls.cancel_batch(batch_id))

    async def wait_batch(
        self,
        batch_id: str,
        *,
        timeout: float | None = None,
        on_update: Callable[[Batch], None] | None = None,
        events: bool = True,
    ) -> Batch:
        """Follow a batch until nothing is left to run: events first, then polling (see ``Client.wait_batch``)."""
        deadline = Deadline(timeout, f"batch {batch_id}")
        batch = Batch(id=batch_id)
        if events and self._events_served:
            async with contextlib.aclosing(self._events(calls.batch_events(batch_id), deadline)) as stream:
                quiet = Quiet()
                async for event in stream:
                    if event is None:
                        deadline.check()
                        if not quiet.due():
                            continue
                        batch = await self.get_batch(batch_id)
                    else:
                        quiet.heard()
                        batch = apply_batch_event(batch, event.json()) or await self.get_batch(batch_id)
                    if on_update is not None:
                        on_update(batch)
                    if batch_finished(batch):
                        return batch
                    deadline.check()
        return await self._poll(lambda: self.get_batch(batch_id), batch_finished, deadline, on_update)

    async def iter_manifest(self, batch_id: str) -> AsyncIterator[ManifestLine]:
        """GET /v1/batches/{id}/manifest: one job at a time, in submission order, as the NDJSON streams in."""
        response = await self._send(calls.manifest(batch_id), stream=True)
        try:
            if response.status_code >= 400:
                await response.aread()
                calls.check(response)
            async for line in response.aiter_lines():
                if line.strip():
                    yield json.loads(line)
        finally:
            await response.aclose()

    # -- files -----------------------------------------------------------------------------------------------

    async def upload(self, file: FileSource, *, filename: str | None = None, content_type: str | None = None) -> Upload:
        """POST /v1/uploads: store an input image for edit jobs."""
        return await self._call(calls.upload(file, filename, content_type))

    async def get_upload(self, upload_id: str) -> Upload:
        """GET /v1/uploads/{id}."""
        return await self._call(calls.get_upload(upload_id))

    # -- adapters --------------------------------------------------------------------------------------------

    async def create_adapter(
        self, file: FileSource | None = None, *, url: str | None = None, name: str | None = None
    ) -> Adapter:
        """POST /v1/adapters: a LoRA .safetensors file (a path, bytes or a binary file), or a URL the service
        fetches; checked against the served model before it is stored."""
        if (file is None) == (url is None):
            raise ValueError("give a file or a url")
        call = calls.create_adapter(file, name) if file is not None else calls.create_adapter_from_url(str(url), name)
        return await self._call(call)

    async def list_models(self) -> list[dict[str, Any]]:
        """GET /v1/models: each served model with its defaults, limits and ``available``."""
        return list((await self._call(calls.list_models()))["data"])

    async def get_adapter(self, adapter_id: str) -> Adapter:
        """GET /v1/adapters/{id}."""
        return await self._call(calls.get_adapter(adapter_id))

    async def list_adapters(self, **params: Any) -> AdapterPage:
        """GET /v1/adapters (limit, cursor): newest first."""
        return await self._call(calls.list_adapters(**params))

    async def delete_adapter(self, adapter_id: str) -> None:
        """DELETE /v1/adapters/{id}; Conflict while queued or running jobs use it."""
        await self._call(calls.delete_adapter(adapter_id))

    async def download(self, output: Output, path: str | Path) -> Path:
        """Write one output image to ``path`` atomically, verified against its sha256."""
        path = Path(path)

        async def write(response: httpx.Response) -> None:
            with AtomicWriter(path, output.get("sha256")) as writer:
                async for chunk in response.aiter_bytes():
                    writer.write(chunk)

        await self._fetch(output, write)
        return path

    async def read_output(self, output: Output) -> bytes:
        """The bytes of one output image, verified against its sha256."""

        async def read(response: httpx.Response) -> bytes:
            return verified_bytes(output, await response.aread())

        data: bytes = await self._fetch(output, read)
        return data

    async def download_outputs(self, job: Job, directory: str | Path) -> list[Path]:
        """Every image of a succeeded job into ``directory`` as ``<job id>-<index>.<ext>``; their paths."""
        folder = Path(directory)
        return [
            await self.download(out, folder / f"{job['id']}-{out['index']}.{extension(out)}")
            for out in job.get("outputs", [])
        ]

    async def _fetch(self, output: Output, sink: Callable[[httpx.Response], Awaitable[Any]]) -> Any:
        """Stream a presigned URL into ``sink``; a connection lost mid-body starts the download again."""
        call = Call("GET", output["url"])
        policy = self.config.retry
        retry = 0
        while True:
            response = await self._send(call, stream=True, http=self._blob)
            try:
                if response.status_code >= 400:
                    await response.aread()
                    calls.check(response)
                return await sink(response)
            except RETRY_EXCEPTIONS as exc:
                delay = policy.delay(retry)
                if delay is None:
                    raise ServiceUnreachable(f"download of {output.get('key', 'an output')}: {exc!r}") from exc
            finally:
                await response.aclose()
            await asyncio.sleep(delay)
            retry += 1

    # -- following -------------------------------------------------------------------------------------------

    async def _events(self, call: Call, deadline: Deadline) -> AsyncGenerator[ServerSentEvent | None, None]:
        """Per line of an events stream, the event it completes or None; ends quietly when not served, on 429 /
        5xx, or when it drops."""
        timeout = calls.stream_timeout(self.config.timeout, deadline.remaining())
        try:
            response = await self._send(call, stream=True, timeout=timeout, retry_policy=NO_RETRY)
        except STREAM_DROPPED:
            return
        try:
            status = response.status_code
            if status in EVENTS_NOT_SERVED - {404}:
                self._events_served = False
                return
            if status in (404, 429) or status >= 500:
                return
            if status >= 400:
                await response.aread()
                calls.check(response)
            if not calls.is_event_stream(response):
                return
            decoder = SSEDecoder()
            async for line in response.aiter_lines():
                yield decoder.decode(line)
        except STREAM_DROPPED:
            return
        finally:
            await response.aclose()

    async def _poll(
        self,
        read: Callable[[], Awaitable[Mapping[str, Any]]],
        finished: Callable[[Mapping[str, Any]], bool],
        deadline: Deadline,
        on_update: Callable[[Any], None] | None,
    ) -> Any:
        last: Mapping[str, Any] | None = None
        for delay in self.poll.delays():
            current = await read()
            if on_update is not None and current != last:
                on_update(current)
            last = current
            if finished(current):
                return current
            deadline.check()
            await asyncio.sleep(deadline.clip(delay))
        raise AssertionError("unreachable")
