"""The raw messages LPUSHed into Redis (this run's real Redis) are real Celery tasks: kombu and Celery read them
back unchanged."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator

import pytest
import redis
from celery.worker.request import Request
from kombu import Connection

from core import queue
from core.settings import Settings
from tests.fixtures.services import REDIS_URL
from worker.app import create_celery


@pytest.fixture
def prefix(redis_prefix: str, redis_client: redis.Redis) -> Iterator[str]:
    """A Redis key prefix of this test alone (under the run's prefix), emptied afterwards."""
    p = f"{redis_prefix}queue-{secrets.token_hex(4)}:"
    yield p
    keys = list(redis_client.scan_iter(f"{p}*"))
    if keys:
        redis_client.delete(*keys)


def _worker_celery(prefix: str):
    """The workers' Celery app (their exact broker settings) for ``prefix``, with a stand-in run_batch task."""
    app = create_celery(Settings(redis_url=REDIS_URL, redis_prefix=prefix))
    ran: list[str] = []

    @app.task(name=queue.TASK_RUN_BATCH)
    def run_batch(job_id: str) -> str:
        ran.append(job_id)
        return job_id

    return app, ran


def test_publish_pushes_onto_the_prefixed_lists(redis_client: redis.Redis, prefix: str) -> None:
    count = queue.publish(redis_client, prefix, [("job_1", "generate"), ("job_2", "generate"), ("job_3", "edit")])
    assert count == 3
    assert queue.queue_depth(redis_client, prefix, "generate") == 2
    assert queue.queue_depth(redis_client, prefix, "edit") == 1
    assert redis_client.llen(f"{prefix}generate") == 2


def test_publish_of_nothing_is_a_no_op(redis_client: redis.Redis, prefix: str) -> None:
    assert queue.publish(redis_client, prefix, []) == 0
    assert list(redis_client.scan_iter(f"{prefix}*")) == []


def test_kombu_reads_the_published_messages_in_order(redis_client: redis.Redis, prefix: str) -> None:
    queue.publish(redis_client, prefix, [("job_first", "generate"), ("job_second", "generate")])
    queue.publish(redis_client, prefix, [("job_third", "generate"), ("job_edit", "edit")])
    with Connection(REDIS_URL, transport_options={"global_keyprefix": prefix}) as conn:
        received = []
        generate = conn.SimpleQueue("generate")
        try:
            for _ in range(3):
                message = generate.get(timeout=2)
                assert message.headers["task"] == "zimage.run_batch"
                assert message.content_type == "application/json"
                assert message.delivery_info["routing_key"] == "generate"
                args, kwargs, _ = message.payload
                received.append(args)
                message.ack()
            assert redis_client.llen(f"{prefix}generate") == 0  # all three consumed, nothing left behind
        finally:
            generate.close()
        edit = conn.SimpleQueue("edit")
        try:
            message = edit.get(timeout=2)
            assert message.payload[0] == ["job_edit"]
            message.ack()
        finally:
            edit.close()
    assert received == [["job_first"], ["job_second"], ["job_third"]]  # first published, first delivered


def test_the_worker_celery_app_turns_a_message_into_a_run_batch_call(redis_client: redis.Redis, prefix: str) -> None:
    app, ran = _worker_celery(prefix)
    queue.publish(redis_client, prefix, [("job_0123456789", "generate")])
    with app.connection_for_read() as conn:
        q = conn.SimpleQueue("generate")
        try:
            message = q.get(timeout=2)
            request = Request(message, app=app, task=app.tasks[queue.TASK_RUN_BATCH])
            assert request.task_name == "zimage.run_batch"
            assert request.args == ["job_0123456789"]
            assert request.kwargs == {}
            assert request.delivery_info["routing_key"] == "generate"
            assert request.id == message.headers["id"]
            request.execute()  # Celery's own tracer runs the task with the decoded arguments
            message.ack()
        finally:
            q.close()
    assert ran == ["job_0123456789"]


@pytest.mark.parametrize(
    "pairs",
    [
        [("job_async", "edit"), ("job_async2", "generate")],  # two lists: a pipeline
        [("job_async", "edit"), ("job_async3", "edit")],  # one list: one command
    ],
)
def test_publish_async_writes_the_same_messages(prefix: str, pairs: list[tuple[str, str]]) -> None:
    from redis import asyncio as aioredis

    async def go() -> int:
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            return await queue.publish_async(client, prefix, pairs)
        finally:
            await client.aclose()

    assert asyncio.run(go()) == 2
    with Connection(REDIS_URL, transport_options={"global_keyprefix": prefix}) as conn:
        q = conn.SimpleQueue("edit")
        try:
            for job_id, queue_name in pairs:
                if queue_name != "edit":
                    continue
                message = q.get(timeout=2)
                assert message.headers["task"] == "zimage.run_batch"
                assert message.payload[0] == [job_id]
                message.ack()
        finally:
            q.close()
