"""An API process under test for the API benchmarks: its own database, Redis prefix and loopback SeaweedFS,
removed again afterwards."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

from core.admin import create_key, migrate
from core.db import drop_database
from core.settings import Settings
from deploy.seaweed import SeaweedServer
from deploy.stack import Stack, free_port


@dataclass(frozen=True)
class ApiUnderTest:
    """The running API, its settings, an API key of tenant ``tenant`` and a Redis client."""

    settings: Settings
    stack: Stack
    key: str
    tenant: str
    redis: redis.Redis

    @property
    def url(self) -> str:
        """The API's base URL on loopback."""
        return self.stack.api_url

    @property
    def pid(self) -> int:
        """The API process's id (for memory and CPU readings)."""
        return self.stack.pids()["api"]


@contextmanager
def api_under_test(work: Path, *, tenant: str = "bench") -> Iterator[ApiUnderTest]:
    """Start SeaweedFS and the API on a fresh database and Redis prefix; stop and remove them all afterwards."""
    database = f"postgresql+psycopg://postgres@127.0.0.1:5432/zimage_bench_{secrets.token_hex(3)}"
    prefix = f"bench-{secrets.token_hex(4)}:"
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    with SeaweedServer(work / "s3", access_key="bench", secret_key=secrets.token_urlsafe(16),
                       bucket="bench-results") as s3:  # fmt: skip
        settings = Settings(database_url=database, redis_prefix=prefix, s3_endpoint_url=s3.endpoint_url,
                            s3_bucket=s3.bucket, s3_access_key_id=s3.access_key,
                            s3_secret_access_key=s3.secret_key)  # fmt: skip
        migrate(settings)
        stack = Stack(settings, work / "stack", api_port=free_port(), s3_port=None)
        stack.run_dir.mkdir(parents=True, exist_ok=True)
        key = create_key(settings, tenant)
        stack.start_api()
        try:
            yield ApiUnderTest(settings, stack, key, tenant, client)
        finally:
            stack.stop()
            for k in client.scan_iter(f"{prefix}*"):
                client.delete(k)
            client.close()
            drop_database(database)
