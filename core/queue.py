"""Delivery of job ids to the workers' Celery queues in Redis, and the queue names of each job kind.

Messages are written in Celery's task protocol v2 straight into the broker's Redis lists (what kombu's Redis
transport does for the default exchange), in one pipelined round trip for any number of jobs: publishing
10 000 jobs through ``apply_async`` one by one costs seconds, this costs one ``LPUSH`` per queue.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import random
import re
import socket
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


_UUID_RANDOM = ~(0xF000 << 64 | 0xC000 << 48)  # all but the version and variant bits
_UUID4 = 0x4000 << 64 | 0x8000 << 48  # version 4, RFC 4122 variant


def _uuid() -> str:
    """A random UUID (version 4) for a message's task id and delivery tag: they must differ between messages, not
    be secret, so ``random`` draws them (re-seeded in every forked child) instead of ``uuid4``'s system call per
    id, a twentieth of the API's CPU under a bulk load (py-spy)."""
    h = "%032x" % (random.getrandbits(128) & _UUID_RANDOM | _UUID4)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _message(queue: str, *, task_id: str, delivery_tag: str, body: str, argsrepr: str) -> dict[str, object]:
    """A Celery protocol-v2 message, as a dict."""
    return {
        "body": body,
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
            "argsrepr": argsrepr,
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
            "delivery_tag": delivery_tag,
        },
    }


_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_ARGS_TAIL = json.dumps([{}, _EMBED])[1:]  # what follows the job id's list in the arguments' JSON


def _body(job_id: str, *, plain: bool = False) -> str:
    """The task's arguments (the job id), base64 as the message carries them; ``plain``: the id needs no
    escaping."""
    args = f'[["{job_id}"], {_ARGS_TAIL}' if plain else json.dumps([[job_id], {}, _EMBED])
    return base64.b64encode(args.encode()).decode()


# Job ids (core.ids) need no JSON escaping: their messages are filled into a template made once per queue, the
# message's JSON encoded once instead of twice per job (with the task id, a sixth of the API's CPU per submit).
_PLAIN_ID = re.compile(r"[0-9A-Za-z_]+")
_HOLE = re.compile(r"\\u0000(\w+)\\u0000")  # where json.dumps put a "\0name\0" placeholder


@functools.cache
def _template(queue: str) -> tuple[str, ...]:
    """The JSON of a message of ``queue`` cut at its variable parts: text, name, text, name, ..., text."""
    holes = {name: f"\0{name}\0" for name in ("task_id", "delivery_tag", "body", "argsrepr")}
    return tuple(_HOLE.split(json.dumps(_message(queue, **holes))))


def celery_message(job_id: str, queue: str) -> str:
    """One Celery protocol-v2 message asking a worker to run the batch that starts with ``job_id``."""
    plain = _PLAIN_ID.fullmatch(job_id) is not None
    body = _body(job_id, plain=plain)
    values = {"task_id": _uuid(), "delivery_tag": _uuid(), "body": body, "argsrepr": repr([job_id])}
    if not plain:
        return json.dumps(_message(queue, **values))
    parts = _template(queue)
    return "".join(part if i % 2 == 0 else values[part] for i, part in enumerate(parts))


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
    if len(grouped) == 1:  # one list (a group of one model's jobs, the common case): one command, no pipeline
        [(key, msgs)] = grouped.items()
        await redis_client.lpush(key, *msgs)
        return len(msgs)
    async with redis_client.pipeline(transaction=False) as pipe:
        for key, msgs in grouped.items():
            pipe.lpush(key, *msgs)
        await pipe.execute()
    return sum(len(m) for m in grouped.values())


def queue_depth(redis_client, prefix: str, queue: str) -> int:
    """Messages waiting in a queue's broker list (the autoscaling signal)."""
    return int(redis_client.llen(broker_key(prefix, queue)))
