"""Webhook test fixtures: settings that let webhooks reach loopback over http with quick retries, and the app."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core.admin import create_key, webhook_secret
from core.settings import Settings


@pytest.fixture(scope="module")
def hook_settings(settings: Settings) -> Settings:
    """The run's settings, with webhooks allowed to loopback receivers, short timeouts and quick retries."""
    return settings.model_copy(
        update={
            "webhook_allow_hosts": ["127.0.0.1", "localhost"],
            "webhook_timeout_s": 1.0,
            "webhook_retry_base_s": 0.05,
            "webhook_retry_max_s": 0.3,
            "webhook_poll_s": 0.1,
        }
    )


@pytest.fixture(scope="module")
def client(hook_settings: Settings) -> Iterator[TestClient]:
    """The app on those settings (sweeper off)."""
    with TestClient(create_app(hook_settings, run_sweeper=False)) as c:
        yield c


@pytest.fixture
def tenant(hook_settings: Settings) -> Callable[[], tuple[str, str, str]]:
    """Make a tenant: ``(name, api key, webhook secret)``."""

    def make() -> tuple[str, str, str]:
        name = f"hooks-{secrets.token_hex(4)}"
        key = create_key(hook_settings, name)
        secret = webhook_secret(hook_settings, name, rotate=False)
        assert secret is not None and secret.startswith("whsec_")
        return name, key, secret

    return make
