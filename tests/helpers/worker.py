"""Worker test helpers: an in-process worker context on its own Redis prefix, and fresh tenants."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine, insert

from core.ids import tenant_id as new_tenant_id
from core.models import tenants
from core.settings import Settings
from worker import process
from worker.process import WorkerContext


def in_process_worker(
    settings: Settings, queues: tuple[str, ...], label: str, **updates: Any
) -> Iterator[WorkerContext]:
    """Build a worker context in this process (the sweeper off) for ``queues``, yield it, close it; for module
    fixtures (``yield from in_process_worker(...)``)."""
    overrides = {"redis_prefix": f"{label}-{secrets.token_hex(3)}:", **updates}
    context = process.build_context(settings.model_copy(update=overrides), queues, run_sweeper=False)
    try:
        yield context
    finally:
        process.close_context()


def add_tenant(db: Engine, label: str) -> str:
    """A fresh tenant (jobs are then inserted straight into Postgres)."""
    tid = new_tenant_id()
    with db.begin() as conn:
        conn.execute(insert(tenants).values(id=tid, name=f"{label}-{tid}"))
    return tid
