"""Where a client connects and how: the one place the SDK reads the environment (``ZIMAGE_API_URL``,
``ZIMAGE_API_KEY``, as ``make up`` writes them to ``.run/env``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import httpx

from .retry import RetryPolicy

ENV_URL = "ZIMAGE_API_URL"
ENV_KEY = "ZIMAGE_API_KEY"
VERSION = "0.1.0"


class ConfigError(ValueError):
    """No API URL or key: neither passed nor in the environment."""


@dataclass(frozen=True)
class ClientConfig:
    """A client's connection settings, resolved."""

    base_url: str
    api_key: str
    timeout: httpx.Timeout = field(default_factory=lambda: httpx.Timeout(30.0, connect=10.0))
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    @classmethod
    def resolve(
        cls,
        base_url: str | None,
        api_key: str | None,
        timeout: float | httpx.Timeout | None,
        retry: RetryPolicy | None,
    ) -> ClientConfig:
        """Fill what was not passed from the environment; ConfigError if the URL or key is still missing."""
        url = base_url or os.environ.get(ENV_URL)
        key = api_key or os.environ.get(ENV_KEY)
        if not url:
            raise ConfigError(f"no API URL: pass base_url or set {ENV_URL} (`. .run/env` after `make up`)")
        if not key:
            raise ConfigError(f"no API key: pass api_key or set {ENV_KEY} (`. .run/env` after `make up`)")
        if timeout is None:
            timeout = httpx.Timeout(30.0, connect=10.0)
        elif not isinstance(timeout, httpx.Timeout):
            timeout = httpx.Timeout(timeout)
        return cls(url.rstrip("/"), key, timeout, retry or RetryPolicy())

    def api_kwargs(self) -> dict[str, Any]:
        """Arguments of the httpx client that talks to the API (the key goes only there)."""
        return {
            "base_url": self.base_url,
            "headers": {"Authorization": f"Bearer {self.api_key}", "User-Agent": f"zimage-client/{VERSION}"},
            "timeout": self.timeout,
        }

    def blob_kwargs(self) -> dict[str, Any]:
        """Arguments of the httpx client that fetches presigned URLs: no API key, ever (they point at S3)."""
        return {"timeout": httpx.Timeout(120.0, connect=10.0), "headers": {"User-Agent": f"zimage-client/{VERSION}"}}
