"""The queue's raw messages: Celery protocol v2, one task id each, grouped per broker list; no Redis needed
(tests/queue/test_redis.py pushes them into a real Redis and reads them back)."""

from __future__ import annotations

import base64
import json
import uuid

import pytest

from core import queue


def test_a_message_is_celery_protocol_v2() -> None:
    msg = json.loads(queue.celery_message("job_abc", "generate"))
    headers = msg["headers"]
    assert headers["task"] == "zimage.run_batch" == queue.TASK_RUN_BATCH
    assert headers["lang"] == "py"
    assert headers["id"] == headers["root_id"] == msg["properties"]["correlation_id"]
    assert headers["retries"] == 0
    assert msg["content-type"] == "application/json"
    assert msg["properties"]["body_encoding"] == "base64"
    assert msg["properties"]["delivery_info"] == {"exchange": "", "routing_key": "generate"}
    args, kwargs, embed = json.loads(base64.b64decode(msg["body"]))
    assert args == ["job_abc"]
    assert kwargs == {}
    assert set(embed) == {"callbacks", "errbacks", "chain", "chord"}


def test_every_message_has_its_own_task_id() -> None:
    ids = {json.loads(queue.celery_message("job_abc", "generate"))["headers"]["id"] for _ in range(100)}
    assert len(ids) == 100


def test_messages_are_grouped_per_broker_list() -> None:
    grouped = queue.messages_by_key("p:", [("job_1", "generate"), ("job_2", "edit"), ("job_3", "generate")])
    assert set(grouped) == {"p:generate", "p:edit"}
    assert len(grouped["p:generate"]) == 2 and len(grouped["p:edit"]) == 1
    assert queue.broker_key("p:", "edit") == "p:edit"


@pytest.mark.parametrize(("kind", "mode", "queue_name"), [("generate", None, "generate"), ("edit", "instruct", "edit")])
def test_both_queues_exist_for_the_workers(kind: str, mode: str | None, queue_name: str) -> None:
    assert queue.queue_for(kind, mode) == queue_name
    assert queue_name in queue.QUEUES


@pytest.mark.parametrize("job_id", ["job_01jd0abc", 'job_"quoted"\\', "job_ünï"])
def test_a_message_is_the_json_of_its_fields(job_id: str) -> None:
    """Messages of plain ids are filled into a template; every message must be exactly what encoding its fields
    gives (ids that need escaping are encoded in full)."""
    text = queue.celery_message(job_id, "edit")
    msg = json.loads(text)
    fields = queue._message(
        "edit",
        task_id=msg["headers"]["id"],
        delivery_tag=msg["properties"]["delivery_tag"],
        body=base64.b64encode(json.dumps([[job_id], {}, queue._EMBED]).encode()).decode(),
        argsrepr=repr([job_id]),
    )
    assert text == json.dumps(fields)


def test_task_ids_are_version_4_uuids() -> None:
    for _ in range(1000):
        task_id = json.loads(queue.celery_message("job_abc", "generate"))["headers"]["id"]
        parsed = uuid.UUID(task_id)
        assert str(parsed) == task_id
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
