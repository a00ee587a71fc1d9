"""API test fixtures: the real app (real Postgres, Redis, S3) behind Starlette's TestClient."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core.settings import Settings


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    """A client of the app, its lifespan run (the sweeper off: tests drive it themselves)."""
    with TestClient(create_app(settings, run_sweeper=False)) as c:
        yield c


@pytest.fixture
def key(new_key) -> str:  # type: ignore[no-untyped-def]
    """An API key of a fresh tenant."""
    return new_key()
