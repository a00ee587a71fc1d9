"""Fault-suite fixtures: its own Redis and SeaweedFS (killed and restarted by the scenarios), per-scenario
settings with short leases, and the fault table printed at the end of the run."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from core.settings import Settings
from deploy.seaweed import SeaweedServer, pick_ports
from tests.faults.harness import Cluster, RedisServer, Row, format_table

ROWS: list[Row] = []
TABLE_FILE = Path(__file__).resolve().parents[2] / ".run" / "fault-table.txt"


@pytest.fixture(scope="session")
def fault_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis of the suite's own."""
    server = RedisServer(tmp_path_factory.mktemp("fault-redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def fault_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A SeaweedFS of the suite's own, on a fixed S3 port so that it can be restarted in place."""
    server = SeaweedServer(
        tmp_path_factory.mktemp("fault-s3"),
        access_key="fault",
        secret_key=secrets.token_urlsafe(16),
        bucket=f"faults-{secrets.token_hex(4)}",
        # Fixed for its restarts, and picked where its gRPC twin (+10000) is a valid free port too.
        s3_port=pick_ports().s3,
    )
    with server:
        yield server


@pytest.fixture
def cluster_for(settings: Settings, fault_redis: RedisServer, fault_s3: SeaweedServer, db: Engine, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Make a scenario's cluster: ``with cluster_for(**setting_overrides) as c: ...``."""

    def make(**overrides: Any) -> Cluster:
        base = settings.model_copy(
            update={
                "redis_url": fault_redis.url,
                "redis_prefix": f"faults-{secrets.token_hex(4)}:",
                "s3_endpoint_url": fault_s3.endpoint_url,
                "s3_public_endpoint_url": fault_s3.endpoint_url,
                "s3_bucket": fault_s3.bucket,
                "s3_access_key_id": fault_s3.access_key,
                "s3_secret_access_key": fault_s3.secret_key,
                "lease_s": 5,
                "sweep_interval_s": 0.5,
                "redispatch_after_s": 1.0,
                "stale_dispatch_s": 3.0,
                "progress_interval_s": 0.2,
                "fault_step_delay_s": 0.15,
                "storage_retry_s": 45.0,
                "db_retry_s": 30.0,
                "warmup": False,
                **overrides,
            }
        )
        return Cluster(base, tmp_path, db)

    return make


@pytest.fixture
def record_row():  # type: ignore[no-untyped-def]
    """Add a row to the fault table."""
    return ROWS.append


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the fault table (and keep it in .run/fault-table.txt)."""
    if not ROWS:
        return
    table = format_table(ROWS)
    terminalreporter.write_sep("=", "fault injection")
    terminalreporter.write_line(table)
    TABLE_FILE.parent.mkdir(exist_ok=True)
    TABLE_FILE.write_text(table + "\n")
    TABLE_FILE.with_suffix(".json").write_text(json.dumps([r.__dict__ for r in ROWS], indent=1))
