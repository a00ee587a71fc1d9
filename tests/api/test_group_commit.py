"""Group commit: a group's rows go in with one statement that also counts their queue positions; the positions
must be exactly those ``api.jobs.queue_positions`` counts once the rows are in."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, text

from api.jobs import queue_positions
from api.submit import _insert_group
from core.db import driver_connection, make_async_engine
from core.schemas import JobRequest
from core.settings import Settings
from core.submission import build_job_row


def _tenant_id(db: Engine, key_maker: Callable[..., str], name: str) -> str:
    key_maker(name)
    with db.connect() as conn:
        return conn.execute(text("SELECT id FROM tenants WHERE name = :n"), {"n": name}).scalar_one()


def test_a_groups_positions_are_those_counted_after_it(
    settings: Settings, new_key: Callable[..., str], db: Engine, run_id: str
) -> None:
    tenants = [_tenant_id(db, new_key, f"group-{run_id}-{n}") for n in ("a", "b")]

    def rows(n: int, offset: int) -> list[tuple[dict[str, Any], Any]]:
        return [
            (
                build_job_row(
                    JobRequest(prompt=f"p{i}", priority=(i * 7) % 10, width=256 + 16 * (i % 3)),
                    tenant_id=tenants[i % 2],
                    max_attempts=3,
                ),
                None,
            )
            for i in range(offset, offset + n)
        ]

    async def scenario() -> tuple[dict[str, int], dict[str, int]]:
        engine = make_async_engine(settings)
        try:
            async with engine.connect() as conn:
                await _insert_group(await driver_connection(conn), rows(15, 0))  # already queued when the group arrives
                await conn.commit()
                by_id, positions, _ = await _insert_group(await driver_connection(conn), rows(25, 100))
                counted = await queue_positions(conn, list(by_id.values()))
                await conn.rollback()
                return positions, counted
        finally:
            await engine.dispose()

    positions, counted = asyncio.run(scenario())
    assert positions == counted
    assert len(set(positions.values())) > 5  # mixed priorities, tenants and queues: not a trivial case
