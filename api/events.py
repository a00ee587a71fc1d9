"""Server-sent events of jobs and batches: what a client sees change, pushed as it happens.

One ``EventHub`` per API process holds one Redis pub/sub connection, pattern-subscribed to every job and batch
channel, and hands each message to the streams of this process that listen to its channel (a dict lookup; no
stream polls anything). A stream subscribes first, then reads the row and sends it, then forwards what arrives,
dropping events no newer than what it sent: nothing is missed between the read and the subscription. Event ids
are the row's ``updated_at`` in microseconds (Postgres's clock), so ``Last-Event-ID`` resumes exactly. While the
hub cannot reach Redis, streams poll their row every few seconds instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from redis import asyncio as aioredis

from api.resources import Resources
from core.events import batch_channel, job_channel, micros
from core.status import TERMINAL, JobStatus

log = logging.getLogger(__name__)

_RECONNECT_S = 1.0
_QUEUE_SIZE = 256  # events a slow stream may fall behind by; past that it skips to the row's current state
_BATCH_COALESCE_S = 0.2  # a batch stream recounts at most this often while its jobs change


class EventHub:
    """Fans one Redis pattern subscription out to the streams of this process, by channel."""

    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self._redis = redis
        self._pattern = f"{prefix}events:*"
        self._listeners: dict[str, set[asyncio.Queue[dict[str, Any] | None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def start(self) -> None:
        """Start reading (in the app's event loop)."""
        self._task = asyncio.create_task(self._run(), name="event-hub")

    async def stop(self) -> None:
        """Stop reading and end every stream's wait."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for queues in self._listeners.values():
            for queue in queues:
                queue.put_nowait(None)

    @contextlib.contextmanager
    def listen(self, channel: str) -> Any:
        """A queue that receives the events of ``channel`` while the block runs (None: the hub stopped)."""
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(_QUEUE_SIZE)
        self._listeners.setdefault(channel, set()).add(queue)
        try:
            yield queue
        finally:
            queues = self._listeners.get(channel)
            if queues is not None:
                queues.discard(queue)
                if not queues:
                    del self._listeners[channel]

    @property
    def streams(self) -> int:
        """Streams listening in this process."""
        return sum(len(q) for q in self._listeners.values())

    async def _run(self) -> None:
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(self._pattern)
                self.connected.set()
                async for message in pubsub.listen():
                    self._dispatch(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: streams poll their rows until it is back
                if self.connected.is_set():
                    log.warning("event hub lost Redis (%s); streams poll until it is back", exc)
                self.connected.clear()
                await asyncio.sleep(_RECONNECT_S)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _dispatch(self, message: dict[str, Any]) -> None:
        channel = message.get("channel")
        if isinstance(channel, bytes):
            channel = channel.decode()
        queues = self._listeners.get(channel) if isinstance(channel, str) else None
        if not queues:
            return  # nobody in this process listens: not even parsed
        try:
            event = json.loads(message["data"])
        except (ValueError, TypeError):
            return
        for queue in queues:
            if queue.full():  # a stream that fell behind re-reads its row instead
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                queue.put_nowait({"resync": True})
            else:
                queue.put_nowait(event)


def sse(event: str, data: dict[str, Any], event_id: int | None = None) -> bytes:
    """One server-sent event."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n".encode()


KEEPALIVE = b": keep-alive\n\n"


async def _next(
    queue: asyncio.Queue[dict[str, Any] | None], hub: EventHub, *, keepalive_s: float, poll_s: float
) -> dict[str, Any] | None | str:
    """The next event, "keepalive" after ``keepalive_s`` of silence, or "poll" when Redis is down."""
    timeout = keepalive_s if hub.connected.is_set() else poll_s
    try:
        return await asyncio.wait_for(queue.get(), timeout)
    except TimeoutError:
        return "keepalive" if hub.connected.is_set() else "poll"


async def job_stream(
    res: Resources,
    *,
    job_id: str,
    last_event_id: int | None,
    read: Callable[[], Any],
    render: Callable[[Any], Any],
) -> AsyncIterator[bytes]:
    """A job's events until it is terminal: a ``job`` event (the whole job object) at the start and on every
    status change, ``progress`` events in between. ``read`` returns the job's row; ``render`` its job object."""
    hub: EventHub = res.events
    settings = res.settings
    with hub.listen(job_channel(settings.redis_prefix, job_id)) as queue:
        row = await read()
        sent = last_event_id or 0
        status = None
        while True:
            at = micros(row["updated_at"])
            if at > sent:
                yield sse("job", await render(row), at)
                sent = at
            status = row["status"]
            if JobStatus(status) in TERMINAL:
                return
            item = await _next(queue, hub, keepalive_s=settings.events_keepalive_s, poll_s=settings.events_poll_s)
            if item is None:
                return  # the hub stopped: the server is shutting down
            if item == "keepalive":
                yield KEEPALIVE
                continue
            if item == "poll" or not isinstance(item, dict) or item.get("resync"):
                row = await read()
                continue
            if item["at"] <= sent:
                continue  # older than what the client has
            if item["status"] == status == JobStatus.RUNNING and item["attempt"] == row["attempt"]:
                yield sse("progress", {k: item[k] for k in ("job_id", "status", "progress")}, item["at"])
                sent = item["at"]
                continue
            row = await read()  # a status change: send the whole job (outputs, error, timings)


async def batch_stream(
    res: Resources, *, batch_id: str, last_event_id: int | None, read: Callable[[], Any]
) -> AsyncIterator[bytes]:
    """A batch's ``batch`` events (its object with counts) until it is no longer running; ``read`` returns the
    batch object and the newest ``updated_at`` of its jobs (the event id)."""
    hub: EventHub = res.events
    settings = res.settings
    with hub.listen(batch_channel(settings.redis_prefix, batch_id)) as queue:
        sent = last_event_id or 0
        while True:
            view, newest = await read()
            at = max(micros(newest), 1) if newest is not None else 1
            if at > sent:
                yield sse("batch", view, at)
                sent = at
            if view["status"] != "running":
                return
            item = await _next(queue, hub, keepalive_s=settings.events_keepalive_s, poll_s=settings.events_poll_s)
            if item is None:
                return
            if item == "keepalive":
                yield KEEPALIVE
                continue
            # Jobs of a big batch change many times a second: recount once for all of them.
            await asyncio.sleep(_BATCH_COALESCE_S)
            while not queue.empty():
                if queue.get_nowait() is None:
                    return
