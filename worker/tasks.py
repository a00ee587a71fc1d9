"""Celery tasks and the worker's start-up and shutdown hooks. Thin: each calls one function."""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from core.queue import TASK_RUN_BATCH
from core.settings import get_settings
from worker import process
from worker.app import app
from worker.runner import run_queue

log = logging.getLogger(__name__)


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


@signals.worker_process_init.connect
def _load_pipelines(**_: Any) -> None:
    """Load the pipelines once per process that runs tasks, before it consumes a message.

    The solo pool sends this signal from the worker process itself; prefork sends it in each child (CUDA state
    cannot cross a fork, so a parent must never load).
    """
    process.build_context(get_settings(), _queues())


@signals.worker_shutting_down.connect
def _start_grace(**_: Any) -> None:
    """SIGTERM: finish the current batch within the grace period, or give its jobs back to the queue."""
    process.request_shutdown(get_settings().shutdown_grace_s)


@signals.worker_shutdown.connect
def _close(**_: Any) -> None:
    """Release connections and threads when the worker stops."""
    process.close_context()
