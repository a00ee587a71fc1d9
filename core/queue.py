"""Delivery of job ids to the workers' Celery queues in Redis, and the queue names of each job kind.

Messages are written in Celery's task protocol v2 straight into the broker's Redis lists (what kombu's Redis
transport does for the default exchange), in one pipelined round trip for any number of jobs: publishing
10 000 jobs through ``apply_async`` one by one costs seconds, this costs one ``LPUSH`` per queue.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from collections.abc import Iterable, Mapping

from core.catalog import spec_for

TASK_RUN_BATCH = "zimage.run_batch"
# One queue per model family (core.catalog): Turbo (generate, img2img, inpaint), the Edit model, Base.
QUEUES = ("generate", "edit", "base")
_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"


def queue_for(kind: str, mode: str | None, model: str | None = None) -> str:
    """The Celery queue (model family) that serves a job: its model's (``core.catalog``); a job naming no model
    runs the Edit checkpoint for instruct edits, else Turbo."""
    return spec_for(model, kind, mode).queue


def broker_key(prefix: str, queue: str) -> str:
    """The Redis list kombu reads ``queue`` from (priority 0 lives under the bare queue name)."""
    return f"{prefix}{queue}"


def celery_message(job_id: str, queue: str) -> str:
    """One Celery protocol-v2 message asking a worker to run the batch that starts with ``job_id``."""
    task_id = str(uuid.uuid4())
    body = json.dumps([[job_id], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    return json.dumps(
        {
            "body": base64.b64encode(body.encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "py",
                "task": TASK_RUN_BATCH,
                "id": task_id,
                "shadow": None,
                "eta": None,
                "expires": None,
                "group": None,
                "group_index": None,
                "retries": 0,
                "timelimit": [None, None],
                "root_id": task_id,
                "parent_id": None,
                "argsrepr": repr([job_id]),
                "kwargsrepr": "{}",
                "origin": _ORIGIN,
                "ignore_result": True,
                "replaced_task_nesting": 0,
                "stamped_headers": None,
                "stamps": {},
            },
            "properties": {
                "correlation_id": task_id,
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )


def messages_by_key(prefix: str, jobs: Iterable[tuple[str, str]]) -> Mapping[str, list[str]]:
    """Group ``(job_id, queue)`` pairs into the messages to push onto each broker list."""
    out: dict[str, list[str]] = {}
    for job_id, queue in jobs:
        out.setdefault(broker_key(prefix, queue), []).append(celery_message(job_id, queue))
    return out


def publish(redis_client, prefix: str, jobs: Iterable[tuple[str, str]]) -> int:
    """Publish ``(job_id, queue)`` pairs with a synchronous Redis client in one round trip; returns the count."""
    grouped = messages_by_key(prefix, jobs)
    with redis_client.pipeline(transaction=False) as pipe:
        for key, msgs in grouped.items():
            pipe.lpush(key, *msgs)
        pipe.execute()
    return sum(len(m) for m in grouped.values())


async def publish_async(redis_client, prefix: str, jobs: Iterable[tuple[str, str]]) -> int:
    """Publish ``(job_id, queue)`` pairs with an asyncio Redis client in one round trip; returns the count."""
    grouped = messages_by_key(prefix, jobs)
    async with redis_client.pipeline(transaction=False) as pipe:
        for key, msgs in grouped.items():
            pipe.lpush(key, *msgs)
        await pipe.execute()
    return sum(len(m) for m in grouped.values())


def queue_depth(redis_client, prefix: str, queue: str) -> int:
    """Messages waiting in a queue's broker list (the autoscaling signal)."""
    return int(redis_client.llen(broker_key(prefix, queue)))
