"""Per-process resources of the API, built in the lifespan and closed at shutdown."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from redis import asyncio as aioredis
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from api.auth import KeyCache
from core import storage
from core.presign import Presigner
from core.queue_stats import QueueStats
from core.settings import Settings
from core.sweeper import SweeperThread


@dataclass
class Resources:
    """What every request may use: settings, the database, Redis, a presigning S3 client, the key cache."""

    settings: Settings
    db: AsyncEngine
    redis: aioredis.Redis
    s3: Any  # readiness probe: one attempt, short timeouts
    s3_presign: Any  # presigned URLs: the endpoint clients reach
    s3_data: Any  # uploads: retries and timeouts fit for 20 MiB
    keys: KeyCache
    sync_db: Engine | None = None
    sweeper: SweeperThread | None = None
    submitter: Any = None  # api.submit.GroupCommitter, started in the lifespan
    # monotonic time before which publishing is skipped (Redis just failed); the sweeper catches up.
    redis_down_until: float = 0.0
    # Fans Redis pub/sub out to the server-sent-event streams (api.events.EventHub), started in the lifespan.
    events: Any = None
    # The queue figures GET /metrics serves, read from Postgres at most every metrics_queue_refresh_s.
    queue_stats: QueueStats | None = None
    # Each tenant's requests per second (api.rate_limit.RateLimiter), and the cached queue depth /readyz sheds on
    # (api.routes.health.QueueDepth); both built in the lifespan.
    limiter: Any = None
    queue_depth: Any = None
    # Work that outlives its request (a batch's publish); awaited at shutdown.
    background: set[asyncio.Task[None]] = field(default_factory=set)

    # Signs GET URLs locally (17x boto3's presigning); None where the endpoint is AWS's default (boto3 signs).
    presigner: Presigner | None = None

    def presign(self, key: str) -> tuple[str, datetime]:
        """A presigned GET URL for a result key and when it expires (a local computation, no I/O)."""
        if self.presigner is not None:
            return self.presigner.url(key, self.settings.presign_ttl_s)
        return storage.presign_get(self.s3_presign, self.settings.s3_bucket, key, self.settings.presign_ttl_s)
