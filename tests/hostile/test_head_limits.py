"""The request head's limits, on a real uvicorn process: a header value over its limit is 431, a head over its
cap is 431 and closed, a head not complete within the header timeout is 408 and closed (however it trickles in),
a connection that sends nothing is closed, and keep-alive between requests still works."""

from __future__ import annotations

import json
import select
import socket
import time

import httpx

from tests.helpers.api import auth
from tests.hostile.conftest import HEADER_TIMEOUT_S, LiveApi


def _connect(api: LiveApi) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", api.port), timeout=HEADER_TIMEOUT_S + 4)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (fails if it does not within the timeout)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _status_and_code(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)["error"]["code"]


def test_a_header_value_over_the_limit_is_431(live_api: LiveApi) -> None:
    with httpx.Client(base_url=live_api.url) as api:
        r = api.get("/v1/jobs", headers={**auth(live_api.key), "X-Big": "a" * 9000})
        assert r.status_code == 431
        assert r.json()["error"]["code"] == "headers_too_large"
        assert api.get("/v1/jobs", headers=auth(live_api.key)).status_code == 200


def test_a_head_over_the_cap_is_431_and_the_connection_closed(live_api: LiveApi) -> None:
    with _connect(live_api) as sock:
        sock.sendall(b"GET /v1/jobs HTTP/1.1\r\nHost: api\r\n")
        try:
            for i in range(100):  # 100 headers of 1 KB each, none too large alone, and no end
                sock.sendall(b"X-Filler-%d: %s\r\n" % (i, b"f" * 1000))
        except OSError:
            pass  # the server stopped listening: expected
        assert _status_and_code(_read_until_closed(sock)) == (431, "headers_too_large")


def test_half_sent_headers_are_answered_408_and_closed_within_the_timeout(live_api: LiveApi) -> None:
    with _connect(live_api) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /v1/jobs HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer ")
        answer = _read_until_closed(sock)
        took = time.monotonic() - start
    assert _status_and_code(answer) == (408, "request_timeout")
    assert HEADER_TIMEOUT_S - 0.1 < took < HEADER_TIMEOUT_S + 1.0


def test_a_trickled_head_is_cut_at_its_deadline_not_kept_alive_by_each_byte(live_api: LiveApi) -> None:
    with _connect(live_api) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /v1/jobs HTTP/1.1\r\n")
        answered = None
        while answered is None and time.monotonic() - start < 3 * HEADER_TIMEOUT_S:
            if select.select([sock], [], [], 0.2)[0]:  # a byte every 0.2 s until the server answers
                answered = time.monotonic() - start
            else:
                sock.sendall(b"X")
        answer = _read_until_closed(sock)
    assert _status_and_code(answer)[0] == 408
    assert answered is not None and answered < HEADER_TIMEOUT_S + 0.5


def test_a_connection_that_sends_nothing_is_closed(live_api: LiveApi) -> None:
    with _connect(live_api) as sock:
        start = time.monotonic()
        assert _read_until_closed(sock) == b""
        assert time.monotonic() - start < HEADER_TIMEOUT_S + 1.0


def test_keep_alive_outlasts_the_header_timeout_between_requests(live_api: LiveApi) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: api\r\n\r\n"
    with _connect(live_api) as sock:
        for _ in range(2):
            sock.sendall(request)
            answer = b""
            while not answer.endswith(b'{"status":"ok"}'):  # one whole answer, however the reads split it
                chunk = sock.recv(65536)
                assert chunk, "closed"
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200")
            time.sleep(HEADER_TIMEOUT_S + 0.5)  # idle longer than a head may take; uvicorn's keep-alive is 5 s


def test_thousands_of_query_parameters_are_400(live_api: LiveApi) -> None:
    query = "&".join(f"p{i}=1" for i in range(3000))
    with httpx.Client(base_url=live_api.url) as api:
        r = api.get(f"/v1/jobs?{query}", headers=auth(live_api.key))
        assert r.status_code == 400
        assert r.json()["error"]["details"] == [{"field": "query", "message": "more than 256 query parameters"}]


def test_a_nul_in_the_url_is_a_clear_error_not_a_500(live_api: LiveApi) -> None:
    with httpx.Client(base_url=live_api.url, headers=auth(live_api.key)) as api:
        assert api.get("/v1/jobs/job_%00x").status_code == 404  # no id holds one
        r = api.get("/v1/jobs", params={"batch_id": "bat_\x00"})
        assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "batch_id"
    # a gallery token with one is malformed, answered like any malformed token: as an unknown batch
    assert httpx.get(f"{live_api.url}/v1/batches/bat_x/gallery", params={"token": "a\x00.b"}).status_code == 404
