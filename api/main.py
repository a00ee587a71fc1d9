"""The FastAPI application: ``create_app()`` builds it; its lifespan opens and closes every connection."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI
from prometheus_client import REGISTRY, disable_created_metrics
from redis import asyncio as aioredis
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import errors, fast_submit
from api.auth import KeyCache
from api.events import EventHub
from api.head_limits import HeadLimit
from api.http_metrics import HttpMetrics
from api.memory import BodyMemory, return_freed_memory
from api.multipart import MULTIPART_OVERHEAD
from api.rate_limit import RateLimit, RateLimiter
from api.request_ids import RequestIds
from api.resources import Resources
from api.routes import adapters, batches, events, health, jobs, models, uploads, webhooks
from api.routes import metrics as metrics_route
from api.routes.gallery import router as gallery_router
from api.routes.health import QueueDepth
from api.submit import GroupCommitter
from core import logs, storage
from core.db import make_async_engine, make_engine
from core.errors import PayloadTooLarge
from core.images import MAX_IMAGE_BYTES
from core.presign import Presigner
from core.queue_stats import QueueStats, QueueStatsCollector
from core.settings import Settings, get_settings
from core.sweeper import SweeperThread

log = logging.getLogger(__name__)

_GC_GEN0_THRESHOLD = 100_000  # allocations between young collections (CPython's default: 700 or 2000)

# A Redis that does not answer must not hold a submit for long: the outbox covers the outage.
_REDIS_CONNECT_TIMEOUT_S, _REDIS_TIMEOUT_S = 1.0, 2.0


class BodyLimit:
    """Refuses a body over the limit (413): at once when its declared length is, else as soon as the bytes
    streamed in (a chunked body) pass it, before any more is read."""

    def __init__(self, app: ASGIApp, max_bytes: int, per_path: dict[str, tuple[int, str]] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.per_path = per_path or {}  # path -> (limit, the field a 413 names)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, field = self.per_path.get(scope["path"], (self.max_bytes, "body"))
        message = f"the body is over {limit} bytes"
        details = [{"field": field, "message": message}]
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                response = errors.error_response(413, "payload_too_large", message, details)
                await response(scope, receive, send)
                return
        received = 0
        too_large = False

        async def limited() -> Message:
            nonlocal received, too_large
            chunk = await receive()
            if chunk["type"] == "http.request":
                received += len(chunk.get("body", b""))
                if received > limit:
                    too_large = True
                    raise PayloadTooLarge(message, details)
            return chunk

        async def answer(event: Message) -> None:
            # Whatever the app made of the aborted read (FastAPI calls it a parse error), the answer is a 413.
            if not too_large:
                await send(event)
            elif event["type"] == "http.response.start":
                response = errors.error_response(413, "payload_too_large", message, details)
                await response(scope, receive, send)

        await self.app(scope, limited, answer)


def presigner_for(settings: Settings) -> Presigner | None:
    """The local URL signer for the endpoint clients reach; None for AWS's default endpoint (boto3 signs)."""
    if settings.presign_endpoint is None:
        return None
    return Presigner(
        settings.presign_endpoint,
        region=settings.s3_region,
        access_key_id=settings.s3_access_key_id,
        secret_access_key=settings.s3_secret_access_key,
        bucket=settings.s3_bucket,
    )


def create_app(settings: Settings | None = None, *, run_sweeper: bool = True) -> FastAPI:
    """The API application for ``settings`` (default: from the environment)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logs.configure(level=settings.log_level, fmt=settings.log_format, service="api")
        disable_created_metrics()  # a `_created` series per counter doubles the scrape for nothing
        db = make_async_engine(settings)
        res = Resources(
            settings=settings,
            db=db,
            redis=aioredis.Redis.from_url(
                settings.redis_url, socket_connect_timeout=_REDIS_CONNECT_TIMEOUT_S, socket_timeout=_REDIS_TIMEOUT_S
            ),
            # readiness must answer fast: one attempt, short timeouts
            s3=storage.make_s3_client(settings, timeout_s=2.0, attempts=1),
            s3_presign=storage.make_s3_client(settings, public=True),
            s3_data=storage.make_s3_client(settings),
            keys=KeyCache(db),
            presigner=presigner_for(settings),
        )
        if run_sweeper:
            res.sync_db = make_engine(settings, pool_size=1)
            res.sweeper = SweeperThread(
                res.sync_db, redis.Redis.from_url(
                    settings.redis_url, socket_connect_timeout=_REDIS_CONNECT_TIMEOUT_S, socket_timeout=_REDIS_TIMEOUT_S
                ), settings
            )
            res.sweeper.start()
        res.submitter = GroupCommitter(res)
        res.submitter.start()
        res.events = EventHub(
            aioredis.Redis.from_url(settings.redis_url, socket_connect_timeout=_REDIS_CONNECT_TIMEOUT_S),
            settings.redis_prefix,
        )
        res.events.start()
        res.keys.start(settings.redis_url, settings.redis_prefix)
        res.limiter = RateLimiter(settings.redis_url, settings.redis_prefix)
        if settings.readyz_max_queue_depth:
            res.queue_depth = QueueDepth(settings.readyz_max_queue_depth)
        res.queue_stats = QueueStats(settings.metrics_queue_refresh_s)
        queue_collector = QueueStatsCollector(res.queue_stats)
        registered = True
        try:
            REGISTRY.register(queue_collector)
        except ValueError:  # another app of this process (tests run two) already serves the queue figures
            registered = False
        app.state.resources = res
        # The objects built at start live as long as the process: keep the collector from rescanning them, and
        # collect young objects less often. Measured: p99 of POST /v1/jobs under load 176 ms -> 49 ms.
        gc.freeze()
        gc.set_threshold(_GC_GEN0_THRESHOLD, 50, 1000)
        return_freed_memory()  # with BodyMemory below: large bodies do not pile up (api/memory.py)
        try:
            yield
        finally:
            if registered:
                REGISTRY.unregister(queue_collector)
            await res.events.stop()
            await res.keys.stop()
            await res.limiter.close()
            await res.submitter.stop()
            if res.background:  # a batch still being published: let it finish (or fail to the sweeper)
                await asyncio.gather(*res.background, return_exceptions=True)
            if res.sweeper is not None:
                res.sweeper.stop()
            if res.sync_db is not None:
                res.sync_db.dispose()
            await res.redis.aclose()
            await db.dispose()

    app = FastAPI(
        title="Z-Image job service",
        version="1",
        summary="Asynchronous text-to-image and edit jobs on Z-Image, with results in S3.",
        lifespan=lifespan,
    )
    errors.install(app)
    app.include_router(health.router)
    app.include_router(metrics_route.router)
    app.include_router(jobs.router)
    app.include_router(batches.router)
    app.include_router(events.router)
    app.include_router(gallery_router)
    app.include_router(uploads.router)
    app.include_router(adapters.router)
    app.include_router(webhooks.router)
    app.include_router(models.router)
    fast_submit.install(app)  # after the route it stands in front of
    # Uploads carry images up to 20 MiB and adapters up to max_adapter_bytes (their routes stream with their own
    # hard caps; an adapter's bytes go on to S3 as they arrive); JSON bodies stay small.
    upload_limit = MAX_IMAGE_BYTES + MULTIPART_OVERHEAD
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.max_body_bytes,
        per_path={
            "/v1/uploads": (upload_limit, "file"),
            "/v1/adapters": (settings.max_adapter_bytes + MULTIPART_OVERHEAD, "file"),
            "/v1/batches": (settings.max_batch_body_bytes, "body"),
        },
    )
    app.add_middleware(BodyMemory)
    app.add_middleware(RateLimit)  # outside the body limit: a refused request is answered before its body is read
    app.add_middleware(
        HeadLimit, max_value_bytes=settings.max_header_value_bytes, max_query_params=settings.max_query_params
    )
    # Outermost: a request refused by the body limit is still counted and still gets its id.
    app.add_middleware(HttpMetrics)
    app.add_middleware(RequestIds)

    return app
