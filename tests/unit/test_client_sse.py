"""Server-sent events in the SDK: decoding a ``text/event-stream``, and ``wait`` / ``wait_batch`` following
events, or polling when the service does not serve them or the stream drops (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from zimage_client import AsyncClient, Client, NotFound, PollBackoff, WaitTimeout, watch
from zimage_client.sse import ServerSentEvent, iter_events

FAST_POLL = PollBackoff(initial_s=0.001, factor=1.0, max_s=0.001)


def _decode(text: str) -> list[ServerSentEvent]:
    return list(iter_events(text.splitlines()))


def test_fields_comments_and_multiline_data() -> None:
    events = _decode(
        ": keep-alive\n\n"
        'id: 17\nevent: job\ndata: {"a":\ndata:  1}\n\n'
        "data:no space\nretry: 3000\n\n"
        "event: progress\nid\ndata\n\n"
    )
    assert events == [
        ServerSentEvent(event="job", data='{"a":\n 1}', id="17"),
        ServerSentEvent(event="message", data="no space", id="17", retry=3000),  # the last id carries on
        ServerSentEvent(event="progress", data="", id="", retry=3000),  # "id" alone resets it; "data" alone: ""
    ]
    assert events[0].json() == {"a": 1}
    assert events[1].json() is None


def test_an_event_is_dispatched_only_at_a_blank_line() -> None:
    assert _decode("data: 1\n\ndata: unfinished") == [ServerSentEvent(data="1")]
    assert _decode("event: job\n\n") == []  # no data: nothing to dispatch
    assert _decode("id: 1\0\ndata: x\n\n") == [ServerSentEvent(data="x")]  # an id with NUL is ignored


def test_crlf_and_cr_line_endings() -> None:
    events = list(iter_events(["data: a\r\n\r\ndata: b\r\rdata: c\n\n"]))
    assert [e.data for e in events] == ["a", "b", "c"]


def _sse(*events: tuple[str, str]) -> bytes:
    return "".join(f"event: {name}\ndata: {data}\n\n" for name, data in events).encode()


JOB_EVENTS = _sse(
    ("job", '{"object":"job","id":"job_1","status":"queued","outputs":[]}'),
    ("progress", '{"job_id":"job_1","status":"running","progress":{"step":3,"total":8}}'),
    ("job", '{"object":"job","id":"job_1","status":"succeeded","outputs":[{"index":0}]}'),
)


def _service(events: bytes | None, polls: Iterator[Any], *, status: int = 200) -> httpx.MockTransport:
    """A job and batch API: the events endpoint answers ``events`` (or ``status``), GETs take ``polls``."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            if events is None:
                return httpx.Response(status, json={"error": {"code": "x", "message": "x", "details": []}})
            return httpx.Response(200, content=events, headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=next(polls))

    return httpx.MockTransport(handler)


def test_wait_follows_job_events_to_the_end_without_polling() -> None:
    seen: list[tuple[object, object]] = []
    with Client("http://api", "k", transport=_service(JOB_EVENTS, iter([]))) as zc:
        job = zc.wait("job_1", on_update=lambda j: seen.append((j["status"], j.get("progress"))))
    assert job["status"] == "succeeded" and job["outputs"] == [{"index": 0}]
    assert seen == [("queued", None), ("running", {"step": 3, "total": 8}), ("succeeded", None)]


@pytest.mark.parametrize("status", [404, 405, 501])
def test_wait_polls_when_events_are_not_served(status: int) -> None:
    polls = iter([{"id": "job_1", "status": "queued"}, {"id": "job_1", "status": "running"},
                  {"id": "job_1", "status": "failed", "error": {"code": "timeout", "message": "…"}}])  # fmt: skip
    with Client("http://api", "k", poll=FAST_POLL, transport=_service(None, polls, status=status)) as zc:
        assert zc.wait("job_1")["status"] == "failed"


def test_wait_polls_on_after_the_stream_drops() -> None:
    dropped = _sse(("job", '{"object":"job","id":"job_1","status":"running"}'))  # ends before a terminal status
    polls = iter([{"id": "job_1", "status": "running"}, {"id": "job_1", "status": "succeeded", "outputs": []}])
    with Client("http://api", "k", poll=FAST_POLL, transport=_service(dropped, polls)) as zc:
        assert zc.wait("job_1")["status"] == "succeeded"


def test_a_connection_error_on_the_stream_falls_back_to_polling() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            raise httpx.RemoteProtocolError("peer closed connection", request=request)
        return httpx.Response(200, json={"id": "job_1", "status": "canceled"})

    with Client("http://api", "k", transport=httpx.MockTransport(handler)) as zc:
        assert zc.wait("job_1")["status"] == "canceled"


def test_an_unknown_job_is_not_found_whichever_path_is_taken() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "no job", "details": []}})

    with Client("http://api", "k", transport=httpx.MockTransport(handler)) as zc, pytest.raises(NotFound):
        zc.wait("job_nope")


def test_wait_times_out() -> None:
    polls = iter(lambda: {"id": "job_1", "status": "queued"}, None)
    client = Client("http://api", "k", poll=FAST_POLL, transport=_service(None, polls, status=404))
    with client as zc, pytest.raises(WaitTimeout):
        zc.wait("job_1", timeout=0.05)


BATCH_EVENTS = _sse(
    ("batch", '{"object":"batch","id":"bat_1","status":"running","counts":{"total":2,"succeeded":1}}'),
    ("batch", '{"object":"batch","id":"bat_1","status":"completed","counts":{"total":2,"succeeded":2}}'),
)


def test_wait_batch_follows_batch_events() -> None:
    seen: list[int] = []
    with Client("http://api", "k", transport=_service(BATCH_EVENTS, iter([]))) as zc:
        batch = zc.wait_batch("bat_1", on_update=lambda b: seen.append(b["counts"]["succeeded"]))
    assert batch["status"] == "completed" and seen == [1, 2]


def test_the_async_client_follows_events_and_falls_back_alike() -> None:
    async def run() -> tuple[str, str]:
        async with AsyncClient("http://api", "k", transport=_service(JOB_EVENTS, iter([]))) as zc:
            by_events = (await zc.wait("job_1"))["status"]
        polls = iter([{"id": "bat_1", "status": "running"}, {"id": "bat_1", "status": "completed"}])
        async with AsyncClient("http://api", "k", poll=FAST_POLL, transport=_service(None, polls, status=501)) as zc:
            by_polling = (await zc.wait_batch("bat_1"))["status"]
        return by_events, by_polling

    assert asyncio.run(run()) == ("succeeded", "completed")


def _keepalives_forever() -> Iterator[bytes]:
    while True:
        time.sleep(0.01)
        yield b": keep-alive\n\n"


def _silent_stream(job: dict[str, Any]) -> httpx.MockTransport:
    """An events stream that only ever sends keep-alives (its terminal event was lost); GET answers ``job``."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            return httpx.Response(200, content=_keepalives_forever(), headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=job)

    return httpx.MockTransport(handler)


def test_a_stream_of_only_keep_alives_is_checked_against_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "RECONCILE_S", 0.05)
    with Client("http://api", "k", transport=_silent_stream({"id": "job_1", "status": "succeeded"})) as zc:
        assert zc.wait("job_1", timeout=5)["status"] == "succeeded"


def test_the_timeout_holds_while_only_keep_alives_come() -> None:
    client = Client("http://api", "k", transport=_silent_stream({"id": "job_1", "status": "queued"}))
    started = time.monotonic()
    with client as zc, pytest.raises(WaitTimeout):
        zc.wait("job_1", timeout=0.2)
    assert time.monotonic() - started < 2
