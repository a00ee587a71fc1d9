"""The SDK's retries: Retry-After parsing, full-jitter backoff, and a retried create call that reuses its
Idempotency-Key (httpx.MockTransport: no service)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from zimage_client import (
    Client,
    Conflict,
    NotFound,
    RetryPolicy,
    ServiceUnreachable,
    Unavailable,
    ValidationError,
)
from zimage_client.errors import Unauthorized, error_for
from zimage_client.retry import parse_retry_after

NOW = datetime(2026, 11, 26, 6, 0, 0, tzinfo=UTC)
FAST = RetryPolicy(attempts=4, base_s=0.001, cap_s=0.002)


def test_retry_after_in_seconds() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(" 0 ") == 0.0


def test_retry_after_as_an_http_date() -> None:
    assert parse_retry_after(format_datetime(NOW + timedelta(seconds=30), usegmt=True), NOW) == 30.0
    assert parse_retry_after(format_datetime(NOW - timedelta(seconds=30), usegmt=True), NOW) == 0.0


@pytest.mark.parametrize("value", [None, "", "soon", "-1", "1.5e3", "Mon, 99 Foo 2026"])
def test_a_missing_or_bad_retry_after_is_none(value: str | None) -> None:
    assert parse_retry_after(value, NOW) is None


def test_full_jitter_stays_under_a_doubling_capped_ceiling() -> None:
    top = RetryPolicy(base_s=0.5, cap_s=4.0, rng=lambda: 0.999999)
    bottom = RetryPolicy(base_s=0.5, cap_s=4.0, rng=lambda: 0.0)
    assert [round(top.backoff(n), 3) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert {bottom.backoff(n) for n in range(6)} == {0.0}


def test_delay_honours_retry_after_and_gives_up() -> None:
    policy = RetryPolicy(attempts=3, max_retry_after_s=60, rng=lambda: 0.5)
    assert policy.delay(0, retry_after=7) == 7
    assert policy.delay(0, retry_after=61) is None  # longer than we are willing to wait: raise instead
    assert policy.delay(1) == 0.5  # 0.5 * min(20, 0.5 * 2)
    assert policy.delay(2) is None  # third try was the last
    assert RetryPolicy(attempts=1).delay(0) is None


def _error(status: int, code: str, retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after else {}
    body = {"error": {"code": code, "message": f"{code}!", "details": [{"field": "width", "message": "bad"}]}}
    return httpx.Response(status, json=body, headers=headers)


def test_an_error_body_becomes_its_class() -> None:
    err = error_for(422, _error(422, "validation_error").content)
    assert isinstance(err, ValidationError)
    assert (err.status, err.code, err.message, err.details) == (422, "validation_error", "validation_error!", [
        {"field": "width", "message": "bad"}
    ])  # fmt: skip
    assert isinstance(error_for(401, b'{"error": {"code": "unauthorized", "message": "no"}}'), Unauthorized)
    assert isinstance(error_for(404, b"<html>not json</html>"), NotFound)  # a proxy's page: by status


def test_a_503_after_the_job_was_made_is_retried_with_the_same_key() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Idempotency-Key"])
        if len(seen) == 1:
            return _error(503, "unavailable", retry_after="0")
        return httpx.Response(200, json={"id": "job_1", "status": "queued", "request": json.loads(request.content)})

    with Client("http://api", "k", retry=FAST, transport=httpx.MockTransport(handler)) as zc:
        job = zc.submit(prompt="a fox", seed=1)
    assert job["id"] == "job_1" and job["request"] == {"prompt": "a fox", "seed": 1}
    assert len(seen) == 2 and seen[0] == seen[1]


def test_each_logical_submit_gets_its_own_key() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Idempotency-Key"])
        return httpx.Response(202, json={"id": f"job_{len(seen)}", "status": "queued"})

    with Client("http://api", "k", transport=httpx.MockTransport(handler)) as zc:
        zc.submit(prompt="a")
        zc.submit(prompt="b")
        zc.submit_batch([{"prompt": "c"}], idempotency_key="mine")
    assert len(set(seen)) == 3 and seen[2] == "mine"


def test_connection_errors_are_retried_then_reported_as_unreachable() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("refused", request=request)

    client = Client("http://api", "k", retry=FAST, transport=httpx.MockTransport(handler))
    with client as zc, pytest.raises(ServiceUnreachable) as info:
        zc.get("job_1")
    assert calls == 4
    assert isinstance(info.value, Unavailable)  # one except clause catches both


def test_a_lasting_503_is_raised_with_its_retry_after() -> None:
    transport = httpx.MockTransport(lambda request: _error(503, "unavailable", retry_after="0"))
    with Client("http://api", "k", retry=FAST, transport=transport) as zc, pytest.raises(Unavailable) as info:
        zc.get_batch("bat_1")
    assert info.value.status == 503 and info.value.retry_after == 0


def test_a_422_is_never_retried() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return _error(422, "validation_error")

    client = Client("http://api", "k", retry=FAST, transport=httpx.MockTransport(handler))
    with client as zc, pytest.raises(ValidationError):
        zc.submit(prompt="")
    assert calls == 1


def test_a_409_is_retried_only_for_a_keyed_call() -> None:
    answers = iter([_error(409, "conflict"), httpx.Response(200, json={"id": "job_1", "status": "queued"})])
    with Client("http://api", "k", retry=FAST, transport=httpx.MockTransport(lambda r: next(answers))) as zc:
        assert zc.submit(prompt="x")["id"] == "job_1"  # the first try with this key was still being written
    transport = httpx.MockTransport(lambda request: _error(409, "conflict"))
    with Client("http://api", "k", retry=FAST, transport=transport) as zc, pytest.raises(Conflict):
        zc.cancel("job_1")  # a cancel's 409 means the job had already ended: final
