"""Structured logs: JSON lines with the request id in the API and the job's fields wherever a job is handled; the
client's X-Request-ID is kept when sane and echoed; prompts stay out of the logs unless ``log_prompts`` is on."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pytest

from api.request_ids import request_id
from core import logs
from deploy.stack import Stack
from tests.metrics.conftest import Traffic, log_path


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects among a log's lines (a worker's log also holds Celery's banner)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture
def captured() -> Any:
    """The JSON lines logged in the test, as ``configure`` writes them (restored afterwards)."""
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    logs.configure(level="INFO", stream=stream, service="test")
    yield lambda: json_lines(stream.getvalue())
    for handler in [h for h in root.handlers if isinstance(h, logs._Ours)]:
        root.removeHandler(handler)
    root.setLevel(level)


def test_a_line_carries_the_process_the_context_and_the_extra_fields(captured: Any) -> None:
    log = logging.getLogger("zimage.test")
    with logs.bind(request_id="r1", job_id="j1"):
        log.info("about %s", "j1", extra={"images": 2})
    log.warning("after")
    first, second = captured()
    assert first["message"] == "about j1" and first["level"] == "INFO" and first["logger"] == "zimage.test"
    assert (first["service"], first["request_id"], first["job_id"], first["images"]) == ("test", "r1", "j1", 2)
    assert first["ts"].endswith("+00:00")
    assert "request_id" not in second and second["service"] == "test", "the context ends with its block"


def test_an_exception_is_one_line_with_its_traceback(captured: Any) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("zimage.test").exception("failed")
    (line,) = captured()
    assert "RuntimeError: boom" in line["exception"]


def test_job_fields_hold_the_prompt_only_when_allowed() -> None:
    base: dict[str, Any] = {"job_id": "j", "tenant": "t", "attempt": 1, "batch_id": None, "prompt": "secret"}
    assert "prompt" not in logs.job_fields(**base, log_prompts=False)
    assert logs.job_fields(**base, log_prompts=True)["prompt"] == "secret"


@pytest.mark.parametrize("offered", [b"abc-123_X.y", b"a" * 128])
def test_a_sane_request_id_is_kept(offered: bytes) -> None:
    assert request_id(offered) == offered.decode()


@pytest.mark.parametrize("offered", [None, b"", b"a" * 129, b"has space", b"new\nline", b"caf\xc3\xa9", b"a{b}"])
def test_any_other_request_id_is_replaced(offered: bytes | None) -> None:
    made = request_id(offered)
    assert made != (offered or b"").decode(errors="replace") and len(made) == 32
    assert request_id(offered) != made, "a new one each time"


@pytest.mark.e2e
def test_the_api_logs_json_lines_with_the_request_id_and_the_job(stack: Stack, traffic: Traffic) -> None:
    assert traffic.echoed_id == traffic.request_id
    text = log_path(stack, "api").read_text()
    lines = json_lines(text)
    assert lines, "the API wrote no JSON line"
    (canceled,) = [x for x in lines if x["message"] == "job canceled" and x.get("request_id") == traffic.request_id]
    job = traffic.canceled_job
    assert (canceled["job_id"], canceled["tenant"], canceled["attempt"]) == (job["id"], traffic.tenant, job["attempts"])
    assert "batch_id" in canceled and canceled["service"] == "api"
    assert traffic.prompt not in text


@pytest.mark.e2e
def test_the_worker_logs_json_lines_with_each_jobs_fields(stack: Stack, traffic: Traffic) -> None:
    text = log_path(stack, "worker").read_text()
    about = [x for x in json_lines(text) if x.get("job_id") == traffic.done_job["id"]]
    messages = [x["message"] for x in about]
    assert any(m.startswith("job running in a batch of") for m in messages) and "job succeeded" in messages
    for line in about:
        assert line["tenant"] == traffic.tenant and line["attempt"] == 1 and line["batch_id"] is None
        assert line["worker"].count(":") == 2 and line["service"] == "worker"
    assert traffic.prompt not in text
