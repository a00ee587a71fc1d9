"""Celery tasks and the worker's start-up and shutdown hooks. Thin: each calls one function."""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from core import logs
from core.queue import TASK_RUN_BATCH
from core.settings import get_settings
from worker import metrics, process
from worker.app import app
from worker.runner import run_queue

log = logging.getLogger(__name__)

_metrics: metrics.MetricsServer | None = None


@app.task(name=TASK_RUN_BATCH, bind=True)
def run_batch(self: Any, job_id: str) -> dict[str, int]:
    """Wake-up for ``job_id``: run batches of this queue, oldest and most urgent first, for up to ``drain_s``.

    The message only says "there is work"; which jobs run is decided by the claim in Postgres, so a message
    whose job is already claimed, finished or canceled costs one empty claim and is acked.
    """
    queue = (self.request.delivery_info or {}).get("routing_key") or "generate"
    return run_queue(process.get_context(), queue).as_dict()


def _queues() -> tuple[str, ...]:
    """The queues this worker consumes (``--queues``), read from the running app."""
    names = list(app.amqp.queues.consume_from or app.amqp.queues)
    return tuple(sorted(str(n) for n in names)) or ("generate",)


@signals.setup_logging.connect
def _configure_logging(**_: Any) -> None:
    """JSON log lines from the worker's start (a receiver here keeps Celery from installing its own handler)."""
    settings = get_settings()
    logs.configure(level=settings.log_level, fmt=settings.log_format, service="worker")


@signals.worker_process_init.connect
def _load_pipelines(**_: Any) -> None:
    """Load the pipelines once per process that runs tasks, before it consumes a message; then serve metrics.

    The solo pool sends this signal from the worker process itself; prefork sends it in each child (CUDA state
    cannot cross a fork, so a parent must never load).
    """
    global _metrics
    settings = get_settings()
    ctx = process.build_context(settings, _queues())
    _metrics = metrics.serve(
        settings.metrics_port, busy=lambda: process.busy_fraction(ctx), caches=lambda: process.cache_stats(ctx)
    )


@signals.worker_shutting_down.connect
def _start_grace(**_: Any) -> None:
    """SIGTERM: finish the current batch within the grace period, or give its jobs back to the queue."""
    process.request_shutdown(get_settings().shutdown_grace_s)


@signals.worker_shutdown.connect
def _close(**_: Any) -> None:
    """Release connections, threads and the metrics port when the worker stops."""
    global _metrics
    if _metrics is not None:
        _metrics.stop()
        _metrics = None
    process.close_context()
