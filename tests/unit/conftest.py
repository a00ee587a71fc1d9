"""Unit tests need no service: no Postgres, Redis or S3, no tiny checkpoint, no server of the suite.

The guard: a unit test that uses any fixture of tests/fixtures (the run's database, Redis prefix and client,
SeaweedFS, the settings that point at them, the tiny checkpoints), directly or through another fixture, fails
at setup before that fixture starts anything; such a test belongs in the folder of its area (tests/api,
tests/queue, ...). And the service URLs of the environment point at a closed loopback port, so a default
``Settings()`` reaches nothing. A loopback server the test starts itself (tests/unit/test_fetch.py) is fine.
"""

from __future__ import annotations

import pytest

SHARED_FIXTURES = "tests.fixtures."
NOWHERE = "127.0.0.1:9"  # the discard port: nothing listens there


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Fail a unit test that needs a fixture of tests/fixtures, before any fixture is set up."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return
    services = sorted(
        name
        for name, defs in info.name2fixturedefs.items()
        if any(getattr(d.func, "__module__", "").startswith(SHARED_FIXTURES) for d in defs)
    )
    if services:
        pytest.fail(
            f"unit tests need no service, but this one uses {', '.join(services)} (from tests/fixtures); "
            "move it to the folder of its area (tests/api, tests/queue, ...)",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def no_service_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the default Postgres, Redis and S3 URLs at a closed port."""
    monkeypatch.setenv("ZIMAGE_DATABASE_URL", f"postgresql+psycopg://postgres@{NOWHERE}/none")
    monkeypatch.setenv("ZIMAGE_REDIS_URL", f"redis://{NOWHERE}/0")
    monkeypatch.setenv("ZIMAGE_S3_ENDPOINT_URL", f"http://{NOWHERE}")
