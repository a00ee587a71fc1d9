"""A real API process (uvicorn with the head guard, on loopback) for the hostile-client tests."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from core.admin import create_key
from core.settings import Settings
from deploy.stack import Stack

HEADER_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class LiveApi:
    """The API under attack: its URL, port, process id and a tenant's key."""

    url: str
    port: int
    pid: int
    key: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    """A process's resident memory, MB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="package")
def live_api(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    """The API as a real process, with a short header timeout so the tests wait little."""
    port = _free_port()
    run = Stack(
        settings.model_copy(update={"header_timeout_s": HEADER_TIMEOUT_S}),
        tmp_path_factory.mktemp("hostile"),
        api_port=port,
        s3_port=None,
    )
    run.run_dir.mkdir(parents=True, exist_ok=True)
    run.start_api()
    try:
        yield LiveApi(run.api_url, port, run.pids()["api"], create_key(settings, "hostile"))
    finally:
        run.stop()
