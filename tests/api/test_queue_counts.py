"""The queued-job counters (``queue_counts``, kept by triggers on ``jobs``): equal to counting the queue after
every kind of statement that changes it, folded by ``compact`` without changing a sum, appended without locks
(so a tenant's concurrent submits never wait for each other there), and what queue positions are read from."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, text

from api import jobs as job_ops
from api.jobs import queue_positions
from api.submit import _insert_group
from core import queue_counts
from core.db import driver_connection, make_async_engine
from core.schemas import JobRequest
from core.settings import Settings
from core.submission import build_job_row

_COUNTED = text(
    "SELECT queue, priority, count(*) FROM jobs WHERE status = 'queued' AND tenant_id = :t GROUP BY 1, 2"
)
_KEPT = text(
    "SELECT queue, priority, sum(queued) FROM queue_counts WHERE tenant_id = :t GROUP BY 1, 2 HAVING sum(queued) <> 0"
)


def _tenant(db: Engine, new_key: Callable[..., str], name: str) -> str:
    new_key(name)
    with db.connect() as conn:
        return conn.execute(text("SELECT id FROM tenants WHERE name = :n"), {"n": name}).scalar_one()


def _rows(tenant: str, n: int, *, offset: int = 0) -> list[dict[str, Any]]:
    return [
        build_job_row(
            JobRequest(prompt=f"p{i}", priority=(i * 7) % 10, width=256 + 16 * (i % 3)),
            tenant_id=tenant,
            max_attempts=3,
        )
        for i in range(offset, offset + n)
    ]


def _insert(settings: Settings, rows: list[dict[str, Any]]) -> None:
    async def go() -> None:
        engine = make_async_engine(settings)
        try:
            async with engine.connect() as conn:
                await _insert_group(await driver_connection(conn), [(r, None) for r in rows])
                await conn.commit()
        finally:
            await engine.dispose()

    asyncio.run(go())


def _agree(db: Engine, tenant: str) -> dict[tuple[str, int], int]:
    with db.connect() as conn:
        counted = {(q, p): n for q, p, n in conn.execute(_COUNTED, {"t": tenant})}
        kept = {(q, p): int(n) for q, p, n in conn.execute(_KEPT, {"t": tenant})}
    assert kept == counted
    return counted


def test_the_counters_follow_every_change_to_the_queue(
    settings: Settings, new_key: Callable[..., str], db: Engine, run_id: str
) -> None:
    tenant = _tenant(db, new_key, f"counts-{run_id}")
    _insert(settings, _rows(tenant, 30))  # a group commit's statement
    assert sum(_agree(db, tenant).values()) == 30
    with db.begin() as conn:  # the worker's claim, a cancel, a retry back to the queue, a priority change
        ids = [r[0] for r in conn.execute(text("SELECT id FROM jobs WHERE tenant_id = :t ORDER BY id"), {"t": tenant})]
        conn.execute(text("UPDATE jobs SET status = 'running', attempt = 1 WHERE id = ANY(:ids)"), {"ids": ids[:8]})
        conn.execute(text("UPDATE jobs SET status = 'canceled' WHERE id = ANY(:ids)"), {"ids": ids[8:11]})
        conn.execute(text("UPDATE jobs SET status = 'queued' WHERE id = ANY(:ids)"), {"ids": ids[:2]})
        conn.execute(text("UPDATE jobs SET priority = 9 WHERE id = ANY(:ids)"), {"ids": ids[12:16]})
        conn.execute(text("UPDATE jobs SET progress_step = 1 WHERE id = ANY(:ids)"), {"ids": ids[2:8]})  # no move
    assert sum(_agree(db, tenant).values()) == 30 - 8 - 3 + 2
    with db.begin() as conn:
        conn.execute(text("DELETE FROM jobs WHERE id = ANY(:ids)"), {"ids": ids[20:25]})
    assert sum(_agree(db, tenant).values()) == 30 - 8 - 3 + 2 - 5
    # A COPY (how a bulk batch goes in) appends like an INSERT.
    copied = "COPY jobs (id, tenant_id, kind, queue, group_key, cost_tokens, priority, request) FROM STDIN"
    with db.begin() as conn:
        driver = conn.connection.driver_connection
        assert driver is not None
        with driver.cursor() as cursor, cursor.copy(copied) as copy:
            for i in range(3):
                copy.write_row([f"job_copy_{run_id}_{i}", tenant, "generate", "generate", "g", 1, 3, '{"p": 1}'])
    assert sum(_agree(db, tenant).values()) == 30 - 8 - 3 + 2 - 5 + 3

    with db.begin() as conn:
        before = conn.execute(text("SELECT count(*) FROM queue_counts WHERE tenant_id = :t"), {"t": tenant}).scalar()
        queue_counts.compact(conn)
        after = conn.execute(
            text("SELECT count(*) FROM queue_counts WHERE tenant_id = :t GROUP BY queue, priority HAVING count(*) > 1"),
            {"t": tenant},
        ).all()
    assert before > len(_agree(db, tenant))  # there was something to fold
    assert after == []  # one row per key now, and the same sums
    _agree(db, tenant)


def test_a_tenants_submits_do_not_wait_on_each_others_counters(
    settings: Settings, new_key: Callable[..., str], db: Engine, run_id: str
) -> None:
    """A first submit holds its transaction open (its rows inserted, its counters appended); a second one of the
    same tenant, at the same priority, goes in and commits meanwhile. With counters updated in place it would
    wait for the first's commit (here: time out)."""
    tenant = _tenant(db, new_key, f"counts-nolock-{run_id}")
    row = _rows(tenant, 1)[0]
    first_in = threading.Event()
    second_done = threading.Event()
    errors: list[BaseException] = []

    def first() -> None:
        try:
            with db.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO jobs (id, tenant_id, kind, queue, group_key, cost_tokens, priority, request, "
                        "max_attempts) VALUES (:id, :t, 'generate', 'generate', 'g', 1, 5, '{}', 3)"
                    ),
                    {"id": row["id"] + "a", "t": tenant},
                )
                first_in.set()
                second_done.wait(10)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert first_in.wait(10)
        with db.begin() as conn:
            conn.execute(text("SET LOCAL lock_timeout = '2s'"))
            conn.execute(
                text(
                    "INSERT INTO jobs (id, tenant_id, kind, queue, group_key, cost_tokens, priority, request, "
                    "max_attempts) VALUES (:id, :t, 'generate', 'generate', 'g', 1, 5, '{}', 3)"
                ),
                {"id": row["id"] + "b", "t": tenant},
            )
            queue_counts.compact(conn)  # nor does folding wait on a change still uncommitted
    finally:
        second_done.set()
        thread.join(10)
    assert not errors
    assert _agree(db, tenant) == {("generate", 5): 2}


@pytest.mark.parametrize("cap", [1000, 2])
def test_queue_positions_read_from_the_counters_equal_counting_the_queue(
    settings: Settings, new_key: Callable[..., str], db: Engine, run_id: str, cap: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Near the tail (the jobs behind it counted) and, with a tiny cap, deep inside (those ahead counted)."""
    monkeypatch.setattr(job_ops, "_BEHIND_CAP", cap)
    tenant = _tenant(db, new_key, f"counts-place-{run_id}-{cap}")
    _insert(settings, _rows(tenant, 40))
    _insert(settings, _rows(tenant, 20, offset=40))
    counted_ahead = text(
        "SELECT j.id, (SELECT count(*) FROM jobs o WHERE o.status = 'queued' AND o.tenant_id = j.tenant_id "
        "AND o.queue = j.queue AND (o.priority > j.priority OR (o.priority = j.priority "
        "AND (o.created_at, o.id) < (j.created_at, j.id)))) FROM jobs j WHERE j.tenant_id = :t"
    )
    with db.connect() as conn:
        expected = {i: n for i, n in conn.execute(counted_ahead, {"t": tenant})}

    async def read() -> dict[str, int]:
        engine = make_async_engine(settings)
        try:
            async with engine.connect() as conn:
                rows = (await conn.execute(text("SELECT * FROM jobs WHERE tenant_id = :t"), {"t": tenant})).mappings()
                positions = {}
                for r in list(rows):
                    positions.update(await queue_positions(conn, [r]))  # one by one, as a GET reads them
                return positions
        finally:
            await engine.dispose()

    assert asyncio.run(read()) == expected
    assert len(set(expected.values())) > 20
