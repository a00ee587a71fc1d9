"""The Celery application of the GPU workers and the settings that make its delivery fit the job model.

Start a worker with ``celery -A worker.app worker --pool solo --concurrency 1 --queues generate``: one
process per GPU; its pipelines are loaded once, before it consumes its first message.
"""

from __future__ import annotations

import os

# Read once, when torch loads its OpenMP runtime, so it must be set before torch is imported: between parallel
# regions the inference threads sleep instead of spinning for a while. Spinning threads starve the encode/upload
# thread and Postgres, Redis and S3 calls on a CPU worker (measured on 2 cores: one-job overhead 36 → 28 ms).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from celery import Celery  # noqa: E402
from kombu import Queue  # noqa: E402

from core.queue import QUEUES  # noqa: E402
from core.settings import Settings, get_settings  # noqa: E402


def create_celery(settings: Settings) -> Celery:
    """A Celery app wired to the broker and key prefix of ``settings`` (it connects only when used)."""
    app = Celery("zimage", broker=settings.redis_url, include=["worker.tasks"])
    # Redis hands an unacked message to another worker after this long: it must outlast the longest task, or
    # a slow batch is delivered twice (harmless, the claim fences it, but wasteful).
    visibility_timeout = settings.visibility_timeout_s
    app.conf.update(
        broker_transport_options={
            "global_keyprefix": settings.redis_prefix,  # runs sharing one Redis never see each other's queues
            "visibility_timeout": visibility_timeout,  # above the time limit below, so no double delivery
        },
        broker_connection_retry_on_startup=True,  # a worker started before Redis waits for it
        task_queues=[Queue(name, routing_key=name) for name in QUEUES],
        task_default_queue="generate",
        task_acks_late=True,  # ack after the batch ran: a crash mid-batch redelivers the wake-up
        task_reject_on_worker_lost=True,  # a killed child requeues its message instead of acking it
        worker_prefetch_multiplier=1,  # take one message at a time; batches are formed in Postgres
        worker_cancel_long_running_tasks_on_connection_loss=True,  # the message is redelivered anyway
        task_ignore_result=True,  # status lives in Postgres; no result backend
        # A hung task is killed before Redis would redeliver its message; the batch's own time limit (scaled by
        # its work, see runner) normally stops it much earlier and fails its jobs with `timeout`.
        task_time_limit=max(60, visibility_timeout - 60),
        task_soft_time_limit=max(30, visibility_timeout - 120),
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


app = create_celery(get_settings())
