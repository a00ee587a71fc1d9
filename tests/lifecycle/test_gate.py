"""The state machine is the only gate: every real status write path, driven against Postgres from every
status, changes a row exactly when ``TRANSITIONS`` allows the move, and a worker's write only under its own
attempt. The table itself is not restated here: the tests ask it (``can_move``) what each write may do."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Connection, Engine, insert, select, text
from sqlalchemy.dialects import postgresql

from core import lifecycle
from core.ids import tenant_id as new_tenant_id
from core.lifecycle import ClaimedJob
from core.models import jobs, tenants
from core.schemas import JobRequest
from core.settings import Settings
from core.status import HELD, ErrorCode, JobStatus, can_move
from core.submission import build_job_row
from core.sweeper import sweep_once
from core.transition import transition

ROOT = Path(__file__).resolve().parents[2]
ATTEMPT = 2  # every job starts at this attempt; the fence of a stale worker is ATTEMPT - 1


@pytest.fixture(scope="module")
def tenant(db: Engine) -> str:
    """A tenant of this module's jobs."""
    tid = new_tenant_id()
    with db.begin() as conn:
        conn.execute(insert(tenants).values(id=tid, name=f"gate-{tid}"))
    return tid


def job_in(db: Engine, tenant: str, status: JobStatus, *, queue: str, lease_s: float = 300) -> ClaimedJob:
    """A job row put straight into ``status`` (attempt ATTEMPT, a lease ``lease_s`` from now, dispatched)."""
    req = JobRequest.model_validate({"prompt": "gate", "width": 256, "height": 256, "seed": 1, "steps": 4})
    row = build_job_row(req, tenant_id=tenant, max_attempts=5)
    with db.begin() as conn:
        conn.execute(
            insert(jobs).values(
                **{**row, "queue": queue},
                status=status.value,
                attempt=ATTEMPT,
                worker_id="someone",
                started_at=text("clock_timestamp()"),
                lease_expires_at=text(f"clock_timestamp() + interval '{lease_s} seconds'"),
                dispatched_at=text("clock_timestamp()"),
            )
        )
    return ClaimedJob(row["id"], tenant, ATTEMPT, 5, "generate", row["request"])


def state(db: Engine, job_id: str) -> dict[str, Any]:
    """A job's row as it is now."""
    with db.connect() as conn:
        return dict(conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().one())


def stale(job: ClaimedJob) -> ClaimedJob:
    """The same job as an earlier attempt's worker holds it."""
    return ClaimedJob(job.id, job.tenant_id, job.attempt - 1, job.max_attempts, job.kind, job.request)


def on(db: Engine, write: Callable[[Connection], Any]) -> Any:
    with db.connect() as conn:
        return write(conn)


# Each worker write path, by the status it moves a held job to.
FENCED: dict[str, tuple[JobStatus, Callable[[Connection, ClaimedJob], Any]]] = {
    "heartbeat": (JobStatus.RUNNING, lambda c, j: lifecycle.heartbeat(c, [j], steps=[3], lease_s=60)),
    "renew_leases": (JobStatus.RUNNING, lambda c, j: lifecycle.renew_leases(c, [j], lease_s=60)),
    "record_success": (
        JobStatus.SUCCEEDED,
        lambda c, j: lifecycle.record_success(c, j, outputs=[{"index": 0}], inference_ms=5, upload_ms=6),
    ),
    "record_failure": (
        JobStatus.FAILED,
        lambda c, j: lifecycle.record_failure(c, j, code=ErrorCode.INTERNAL_ERROR, message="boom"),
    ),
    "release": (JobStatus.QUEUED, lambda c, j: lifecycle.release(c, j)),
}
CASES = [(name, status) for name in FENCED for status in JobStatus]


@pytest.mark.parametrize(("path", "start"), CASES, ids=[f"{p}-from-{s}" for p, s in CASES])
def test_a_worker_write_changes_the_row_only_where_the_table_allows(
    db: Engine, tenant: str, path: str, start: JobStatus
) -> None:
    to, write = FENCED[path]
    job = job_in(db, tenant, start, queue=f"gate-{secrets.token_hex(3)}")
    before = state(db, job.id)
    on(db, lambda conn: write(conn, job))
    after = state(db, job.id)
    # A worker's write applies only to a job it holds, and only where the table allows the move from there.
    allowed = start == HELD and can_move(start, to)
    assert (after["updated_at"] != before["updated_at"]) is allowed
    assert after["status"] == (to.value if allowed else start.value)


@pytest.mark.parametrize("path", list(FENCED))
def test_a_stale_attempt_changes_nothing(db: Engine, tenant: str, path: str) -> None:
    _, write = FENCED[path]
    job = job_in(db, tenant, JobStatus.RUNNING, queue=f"gate-{secrets.token_hex(3)}")
    before = state(db, job.id)
    on(db, lambda conn: write(conn, stale(job)))
    assert state(db, job.id) == before


def test_what_entering_a_status_sets_comes_from_the_gate(db: Engine, tenant: str) -> None:
    queue = f"gate-{secrets.token_hex(3)}"
    done, failed, back, held = (job_in(db, tenant, JobStatus.RUNNING, queue=queue) for _ in range(4))
    on(db, lambda c: FENCED["record_success"][1](c, done))
    on(db, lambda c: FENCED["record_failure"][1](c, failed))
    on(db, lambda c: FENCED["release"][1](c, back))
    on(db, lambda c: FENCED["heartbeat"][1](c, held))
    for ended in (state(db, done.id), state(db, failed.id)):
        assert ended["finished_at"] is not None and ended["lease_expires_at"] is None
        assert ended["progress_step"] is None and ended["progress_total"] is None
        assert {"queued_ms", "total_ms"} <= set(ended["timings"])
    assert state(db, done.id)["timings"]["inference_ms"] == 5
    assert state(db, done.id)["outputs"] == [{"index": 0}]
    assert (state(db, failed.id)["error_code"], state(db, failed.id)["error_message"]) == ("internal_error", "boom")
    requeued = state(db, back.id)
    assert requeued["worker_id"] is None and requeued["dispatched_at"] is None and requeued["lease_expires_at"] is None
    assert state(db, held.id)["progress_step"] == 3


@pytest.mark.parametrize("start", list(JobStatus))
def test_a_claim_takes_only_what_the_table_lets_become_running(db: Engine, tenant: str, start: JobStatus) -> None:
    queue = f"gate-{secrets.token_hex(3)}"
    job = job_in(db, tenant, start, queue=queue)
    claimed = on(
        db,
        lambda conn: lifecycle.claim_batch(
            conn, queue=queue, worker_id="w", lease_s=60, max_images=4, token_budget=10**6
        ),
    )
    # Unfenced, nothing "moves" to the status it is in: only the queued job may be claimed.
    allowed = can_move(start, JobStatus.RUNNING) and start != JobStatus.RUNNING
    assert [c.id for c in claimed] == ([job.id] if allowed else [])
    after = state(db, job.id)
    assert after["attempt"] == ATTEMPT + (1 if allowed else 0)
    if allowed:
        assert (after["status"], after["progress_step"], after["progress_total"]) == ("running", 0, 4)


@pytest.mark.parametrize("start", list(JobStatus))
def test_the_sweeper_moves_an_expired_lease_only_where_the_table_allows(
    db: Engine, tenant: str, settings: Settings, redis_client: redis.Redis, start: JobStatus
) -> None:
    requeued = job_in(db, tenant, start, queue=f"gate-{secrets.token_hex(3)}", lease_s=-5)
    spent = job_in(db, tenant, start, queue=f"gate-{secrets.token_hex(3)}", lease_s=-5)
    with db.begin() as conn:  # the second job has used every attempt it had
        conn.execute(jobs.update().where(jobs.c.id == spent.id).values(max_attempts=ATTEMPT))
    before = state(db, requeued.id), state(db, spent.id)
    sweep_once(db, redis_client, settings)
    to_queue, to_failed = state(db, requeued.id), state(db, spent.id)
    # Only a held job's lease can run out; the table decides where the sweeper may take it.
    if start == HELD:
        assert can_move(start, JobStatus.QUEUED) and can_move(start, JobStatus.FAILED)
        assert to_queue["status"] == "queued" and to_queue["worker_id"] is None
        assert (to_failed["status"], to_failed["error_code"]) == ("failed", "max_attempts_exceeded")
    else:
        assert (to_queue, to_failed) == before


# --- the gate itself ---------------------------------------------------------------------------------------


def _sources(statement: Any) -> set[str]:
    """The statuses a move's UPDATE lets it move from."""
    sql = str(statement.update.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
    found = re.search(r"jobs\.status IN \(([^)]*)\)", sql)
    assert found, sql
    return {s.strip().strip("'") for s in found.group(1).split(",")}


@pytest.mark.parametrize("to", list(JobStatus))
def test_the_gate_builds_each_where_from_the_table(to: JobStatus) -> None:
    unfenced = {s.value for s in JobStatus if can_move(s, to) and s != to}
    if unfenced:
        assert _sources(transition(to, where=[jobs.c.id == "x"])) == unfenced
    else:
        with pytest.raises(ValueError):
            transition(to, where=[jobs.c.id == "x"])
    held = ClaimedJob("x", "t", 1, 3, "generate", {})
    if can_move(HELD, to):
        assert _sources(transition(to, fence=[held])) == {HELD.value}
    else:
        with pytest.raises(ValueError):
            transition(to, fence=[held])


def test_the_gate_refuses_an_unbounded_write_and_columns_it_owns() -> None:
    with pytest.raises(ValueError, match="which jobs"):
        transition(JobStatus.CANCELED)
    with pytest.raises(ValueError, match="status"):
        transition(JobStatus.CANCELED, where=[jobs.c.id == "x"], values={"status": "queued"})
    with pytest.raises(ValueError, match="does not move"):
        transition(JobStatus.FAILED, from_=JobStatus.SUCCEEDED, where=[jobs.c.id == "x"])
    with pytest.raises(ValueError, match="finished_at"):
        transition(JobStatus.FAILED, where=[jobs.c.id == "x"], values={"finished_at": None})


def test_no_module_writes_a_status_but_the_gate() -> None:
    # SQL that sets the status column, or Core .values(status=...), anywhere in the product but the gate.
    pattern = re.compile(
        r"(?is)\bUPDATE\s+jobs\s+SET\b(?:(?!\bWHERE\b).)*?\bstatus\s*="  # SQL text
        r"|update\(jobs\)(?:(?!update\().){0,400}?\.values\([^)]*\bstatus\s*="  # SQLAlchemy Core
    )
    offenders = []
    for package in ("api", "core", "worker"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.relative_to(ROOT).as_posix() == "core/transition.py":
                continue
            if pattern.search(path.read_text()):
                offenders.append(path.relative_to(ROOT).as_posix())
    assert offenders == []
    # The probe does see a hand-written status write.
    assert pattern.search("x = text(\"UPDATE jobs SET progress_step = 1, status = 'failed' WHERE id = :id\")")
    assert pattern.search("update(jobs).where(jobs.c.id == i).values(status='failed')")
    assert not pattern.search("update(batches).values(status='canceled')")
    assert not pattern.search("UPDATE jobs SET dispatched_at = now() WHERE status = 'queued'")
