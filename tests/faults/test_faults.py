"""Fault injection on real processes and services: whatever happens to a worker, Redis, Postgres or S3, every
job ends terminal exactly once, no object is missing or extra, and no job stays running past its lease plus
one sweep. Each scenario adds a row to the fault table printed at the end of the run."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import redis
from sqlalchemy import Engine, text

from client import ApiError
from core import queue
from tests.faults.harness import Cluster, Row, jobs

pytestmark = pytest.mark.faults

# A lease may be overdue by one sweep interval, plus the time a sweep takes on a loaded 2-core machine.
OVERDUE_SLACK_S = 3.0


def assert_clean(row: Row, cluster: Cluster, *, succeeded: int, failed: dict[str, int] | None = None) -> None:
    """Nothing lost, nothing duplicated, nothing hung, and the expected ends."""
    assert row.lost == 0, row
    assert row.duplicated == 0, row
    assert row.succeeded == succeeded, row
    assert row.failed == (failed or {}), row
    assert row.max_overdue_s <= cluster.settings.sweep_interval_s + OVERDUE_SLACK_S, row


def attempts(db: Engine, ids: list[str]) -> dict[str, int]:
    """Each job's attempt count."""
    with db.connect() as conn:
        rows = conn.execute(text("SELECT id, attempt FROM jobs WHERE id = ANY(:ids)"), {"ids": ids}).all()
    return {r.id: r.attempt for r in rows}


def test_kill_9_worker_mid_batch_then_a_new_worker(cluster_for, record_row, db) -> None:  # type: ignore[no-untyped-def]
    with cluster_for() as c:
        ids = c.submit(jobs(12))
        first = c.start_worker()
        assert c.wait_running(ids)
        c.kill(first)  # SIGKILL to the worker's whole process group: parent and any child
        c.start_worker()
        assert c.wait_terminal(ids, 150)
        row = c.audit("kill -9 worker mid-batch", ids)
    record_row(row)
    assert_clean(row, c, succeeded=12)
    assert max(attempts(db, ids).values()) == 2  # the killed batch ran again, once


@pytest.mark.parametrize("grace_s", [30.0, 0.5], ids=["batch-finishes", "grace-over"])
def test_sigterm_during_a_batch(cluster_for, record_row, db, grace_s: float) -> None:  # type: ignore[no-untyped-def]
    with cluster_for(shutdown_grace_s=grace_s) as c:
        ids = c.submit(jobs(8))
        first = c.start_worker()
        assert c.wait_running(ids)
        c.signal(first, signal.SIGTERM)
        assert c.wait_until(lambda: not c.alive(first), 60), "the worker did not stop on SIGTERM"
        assert c.stack.procs[first].returncode == 0
        # Nothing is left running by a worker that stopped: its batch finished or went back to the queue.
        assert "running" not in c.statuses(ids).values()
        after_stop = list(c.statuses(ids).values())
        c.start_worker()
        assert c.wait_terminal(ids, 150)
        row = c.audit(f"SIGTERM mid-batch, grace {grace_s:g} s", ids)
    record_row(row)
    assert_clean(row, c, succeeded=8)
    if grace_s >= 30:
        assert after_stop.count("succeeded") >= 1  # the batch in flight was finished, not dropped
    else:
        assert max(attempts(db, ids).values()) == 2  # the interrupted batch was given back and re-run


def test_redis_killed_and_restarted_empty(cluster_for, record_row, fault_redis) -> None:  # type: ignore[no-untyped-def]
    with cluster_for() as c:
        c.start_worker()
        ids = c.submit(jobs(16))
        assert c.wait_running(ids)
        fault_redis.kill()  # every queued message is gone
        time.sleep(2)
        fault_redis.start()
        assert c.wait_terminal(ids, 150)
        row = c.audit("Redis killed, restarted empty", ids)
    record_row(row)
    assert_clean(row, c, succeeded=16)


def _terminate_backends(db: Engine, times: int, every_s: float) -> None:
    for _ in range(times):
        with db.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
            conn.commit()
        time.sleep(every_s)


def test_postgres_connections_dropped_during_batch_and_submit(cluster_for, record_row, db) -> None:  # type: ignore[no-untyped-def]
    with cluster_for() as c:
        c.start_worker()
        ids = c.submit(jobs(8, prefix="before"))
        assert c.wait_running(ids)
        refused = []
        terminator = threading.Thread(target=_terminate_backends, args=(db, 6, 0.7))
        terminator.start()
        with c.client() as client:
            for request in jobs(16, prefix="during"):
                try:
                    ids.append(client.submit(request)["id"])
                except ApiError as exc:  # a submit may be refused (503), never half-written
                    assert exc.status == 503 and exc.code == "unavailable", exc
                    refused.append(request)
                time.sleep(0.2)
        terminator.join()
        assert c.wait_terminal(ids, 150)
        row = c.audit("Postgres backends terminated", ids)
        row.notes.append(f"{len(refused)} submits refused with 503")
    record_row(row)
    assert_clean(row, c, succeeded=len(ids))


def test_s3_down_for_10_s_during_uploads(cluster_for, record_row, fault_s3) -> None:  # type: ignore[no-untyped-def]
    with cluster_for(fault_step_delay_s=0.05) as c:
        c.start_worker()
        ids = c.submit(jobs(12))
        assert c.wait_running(ids)
        fault_s3.stop()
        time.sleep(10)
        fault_s3.start()
        assert c.wait_terminal(ids, 150)
        row = c.audit("S3 down 10 s during uploads", ids)
    record_row(row)
    assert_clean(row, c, succeeded=12)


def test_same_message_delivered_twice_at_once(cluster_for, record_row, db) -> None:  # type: ignore[no-untyped-def]
    with cluster_for() as c:
        ids = c.submit(jobs(12))
        broker = redis.Redis.from_url(c.settings.redis_url)
        # Every job's wake-up is now in the queue three times, for two workers at once.
        queue.publish(broker, c.settings.redis_prefix, [(i, "generate") for i in ids] * 2)
        broker.close()
        c.start_worker()
        c.start_worker()
        assert c.wait_terminal(ids, 150)
        row = c.audit("same message delivered 3x, 2 workers", ids)
    record_row(row)
    assert_clean(row, c, succeeded=12)
    assert set(attempts(db, ids).values()) == {1}  # claimed once each, whatever the deliveries


def test_batch_outlives_the_visibility_timeout(cluster_for, record_row, db) -> None:  # type: ignore[no-untyped-def]
    with cluster_for(broker_visibility_timeout_s=2, fault_step_delay_s=0.5) as c:
        ids = c.submit(jobs(8))
        c.start_worker()
        c.start_worker()
        assert c.wait_terminal(ids, 150)
        row = c.audit("batch outlives visibility timeout (2 s)", ids)
    record_row(row)
    assert_clean(row, c, succeeded=8)
    assert set(attempts(db, ids).values()) == {1}


def test_poison_job_among_good_ones(cluster_for, record_row, db) -> None:  # type: ignore[no-untyped-def]
    with cluster_for(fault_crash_marker="POISON", max_attempts=3) as c:
        ids = c.submit(jobs(8))
        poison = c.submit([{"prompt": "a POISON pill", "width": 256, "height": 256, "seed": 1}])
        ids += poison
        workers = [c.start_worker()]
        deadline = time.monotonic() + 150
        # A supervisor (systemd, Kubernetes) restarts a worker that died; the job must stop killing them.
        while not c.wait_terminal(ids, 0.5) and time.monotonic() < deadline:
            if not c.alive(workers[-1]):
                workers.append(c.start_worker())
        assert c.wait_terminal(ids, 1)
        row = c.audit("poison job (crashes its worker) among 8", ids)
    record_row(row)
    assert_clean(row, c, succeeded=8, failed={"max_attempts_exceeded": 1})
    assert attempts(db, poison)[poison[0]] == 3
    assert len(workers) >= 3
