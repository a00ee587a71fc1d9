"""The per-process worker context: the engine, database, S3 client and upload pool, built once at start."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import redis
from sqlalchemy import Engine, text

from core import storage
from core.db import make_engine
from core.settings import Settings
from core.sweeper import SweeperThread
from worker.engine import Engine as InferenceEngine

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """Everything a batch needs, shared by every task this process runs."""

    settings: Settings
    worker_id: str
    queues: tuple[str, ...]
    engine: InferenceEngine
    db: Engine
    s3: Any
    uploads: ThreadPoolExecutor
    sweeper: SweeperThread | None = None
    stats: dict[str, int] = field(default_factory=lambda: {"batches": 0, "jobs": 0})


_context: WorkerContext | None = None
_loads = 0  # pipeline loads in this process: must stay 1 however many jobs run
_shutdown_deadline: float | None = None  # monotonic time after which a running batch gives its jobs back


def request_shutdown(grace_s: float) -> None:
    """SIGTERM arrived: let the current batch finish within ``grace_s``, then stop it."""
    global _shutdown_deadline
    if _shutdown_deadline is None:
        _shutdown_deadline = time.monotonic() + grace_s
        log.warning("shutdown requested: the current batch has %.0f s to finish", grace_s)


def shutdown_overdue() -> bool:
    """Whether a requested shutdown's grace period is over."""
    return _shutdown_deadline is not None and time.monotonic() > _shutdown_deadline


def build_context(settings: Settings, queues: tuple[str, ...], *, run_sweeper: bool = True) -> WorkerContext:
    """Load the pipelines, warm them up, open connections, register the worker as ready."""
    global _context, _loads
    engine = InferenceEngine.from_pretrained(
        settings.turbo_model, device=settings.device, dtype=settings.dtype
    )
    _loads += 1
    if settings.warmup:
        engine.warmup()
    db = make_engine(settings, pool_size=2)
    s3 = storage.make_s3_client(settings)
    storage.ensure_bucket(s3, settings.s3_bucket)
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    ctx = WorkerContext(
        settings=settings,
        worker_id=worker_id,
        queues=queues,
        engine=engine,
        db=db,
        s3=s3,
        uploads=ThreadPoolExecutor(settings.upload_threads, thread_name_prefix="upload"),
    )
    with db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO workers (id, hostname, pid, queues, pipeline_loads, ready)"
                " VALUES (:id, :host, :pid, :queues, :loads, true)"
            ),
            {
                "id": worker_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "queues": ",".join(queues),
                "loads": _loads,
            },
        )
    if run_sweeper:
        ctx.sweeper = SweeperThread(db, redis.Redis.from_url(settings.redis_url, socket_timeout=5), settings)
        ctx.sweeper.start()
    _context = ctx
    log.info("worker %s ready: %s on %s", worker_id, settings.turbo_model, ",".join(queues))
    return ctx


def get_context() -> WorkerContext:
    """This process's context; it must have been built by the worker's start-up hook."""
    if _context is None:
        raise RuntimeError("worker context not built: the worker start-up hook did not run")
    return _context


def record_stats(ctx: WorkerContext, *, jobs: int) -> None:
    """Count a finished batch on the worker's row (and mark it seen)."""
    ctx.stats["batches"] += 1
    ctx.stats["jobs"] += jobs
    with ctx.db.begin() as conn:
        conn.execute(
            text(
                "UPDATE workers SET batches_run = :b, jobs_run = :j, pipeline_loads = :loads,"
                " last_seen_at = now() WHERE id = :id"
            ),
            {"b": ctx.stats["batches"], "j": ctx.stats["jobs"], "loads": _loads, "id": ctx.worker_id},
        )


def close_context() -> None:
    """Stop the sweeper and the upload pool, close connections (worker shutdown)."""
    global _context
    ctx, _context = _context, None
    if ctx is None:
        return
    if ctx.sweeper is not None:
        ctx.sweeper.stop()
    ctx.uploads.shutdown(wait=True)
    with ctx.db.begin() as conn:
        conn.execute(
            text("UPDATE workers SET ready = false, last_seen_at = now() WHERE id = :id"),
            {"id": ctx.worker_id},
        )
    ctx.db.dispose()
