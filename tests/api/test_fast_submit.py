"""``POST /v1/jobs``'s fast endpoint (api/fast_submit.py): it serves the plain case itself, hands everything else to
the FastAPI route with the body intact, and what it answers is what the route answers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from starlette.types import Receive, Scope, Send

from api.fast_submit import FastSubmit
from api.main import create_app
from core.settings import Settings

BODY = {"prompt": "a lighthouse at dusk, fast path", "width": 512, "height": 512, "seed": 7, "metadata": {"n": 1}}


@pytest.fixture(scope="module")
def served(settings: Settings) -> Iterator[tuple[TestClient, list[bytes]]]:
    """A client, and the bodies the FastAPI route was handed (the fast endpoint's fallbacks), in order."""
    app = create_app(settings, run_sweeper=False)
    fast = next(r.app for r in app.router.routes if isinstance(getattr(r, "app", None), FastSubmit))
    route, handed = fast.fallback, []

    async def counted(scope: Scope, receive: Receive, send: Send) -> None:
        async def recorded() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                handed.append(message.get("body", b""))
            return message

        await route(scope, recorded, send)

    fast.fallback = counted
    with TestClient(app) as client:
        yield client, handed


def _post(client: TestClient, key: str, body: bytes, **headers: str) -> Any:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", **headers}
    return client.post("/v1/jobs", content=body, headers=headers)


def _counted(status: int) -> float:
    labels = {"method": "POST", "route": "/v1/jobs", "status": str(status)}
    return REGISTRY.get_sample_value("zimage_http_requests_total", labels) or 0.0


def test_the_plain_case_is_served_without_the_route(served: tuple[TestClient, list[bytes]], key: str) -> None:
    client, handed = served
    before, counted = len(handed), _counted(202)
    response = _post(client, key, json.dumps(BODY).encode())
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
    assert len(handed) == before
    assert _counted(202) == counted + 1  # labelled with the route's template, as FastAPI's routing would


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        (b"{not json", {}, 400, "bad_request"),
        (b"", {}, 400, "bad_request"),
        (b"[1, 2]", {}, 422, "validation_error"),
        (b"[" * 100_000 + b"]" * 100_000, {}, 400, "bad_request"),  # too deep to parse
        (b'{"prompt": "p", "metadata": ' + b'{"a": ' * 900 + b"1" + b"}" * 901, {}, 422, "validation_error"),
        (json.dumps({**BODY, "width": 500}).encode(), {}, 422, "validation_error"),
        (json.dumps({**BODY, "colour": "red"}).encode(), {}, 422, "validation_error"),
        (json.dumps(BODY).encode(), {"Content-Type": "text/plain"}, 422, "validation_error"),
        (json.dumps(BODY).encode(), {"Idempotency-Key": ""}, 422, "validation_error"),
        (json.dumps(BODY).encode(), {"Idempotency-Key": "fast-path-replay"}, 202, None),
        (json.dumps(BODY).encode(), {"Content-Type": "application/merge-patch+json"}, 202, None),
    ],
)
def test_everything_else_reaches_the_route_with_its_body(
    served: tuple[TestClient, list[bytes]],
    key: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    code: str | None,
) -> None:
    client, handed = served
    before, counted = len(handed), _counted(status)
    response = _post(client, key, body, **headers)
    assert response.status_code == status, response.text
    assert _counted(status) == counted + 1
    if code is not None:
        assert response.json()["error"]["code"] == code
    assert handed[before:] == [body]  # handed over once, every byte of it


def test_an_unknown_key_is_refused_before_either(served: tuple[TestClient, list[bytes]]) -> None:
    client, handed = served
    before = len(handed)
    response = _post(client, "zimg_unknown", json.dumps(BODY).encode())
    assert response.status_code == 401
    assert len(handed) == before


def test_both_answer_the_same_job(served: tuple[TestClient, list[bytes]], key: str) -> None:
    """The same request through the fast endpoint and through the route: the same answer but for the job's own id
    and time, and the second one place further back in the queue."""
    client, handed = served
    fast = _post(client, key, json.dumps(BODY).encode())
    routed = _post(client, key, json.dumps(BODY).encode(), **{"Content-Type": "application/merge-patch+json"})
    assert len(handed) >= 1
    assert fast.status_code == routed.status_code == 202
    a, b = fast.json(), routed.json()
    assert b["queue_position"] == a["queue_position"] + 1
    for job in (a, b):
        for own in ("id", "created_at", "queue_position"):
            job.pop(own)
    assert a == b
    assert set(fast.headers) == set(routed.headers)


def test_what_orjson_cannot_write_is_still_answered(served: tuple[TestClient, list[bytes]], key: str) -> None:
    """An integer past 64 bits in metadata: orjson refuses it, the standard library writes it (core/fastjson.py)."""
    client, _ = served
    big = 123456789012345678901234567890
    response = _post(client, key, json.dumps({**BODY, "metadata": {"big": big, "name": "海"}}).encode())
    assert response.status_code == 202, response.text
    assert response.json()["metadata"] == {"big": big, "name": "海"}
    assert client.get(response.headers["location"], headers={"Authorization": f"Bearer {key}"}).json()["metadata"][
        "big"
    ] == big


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_lone_surrogate_is_refused_not_stored(served: tuple[TestClient, list[bytes]], key: str, field: str) -> None:
    """JSON's \\ud800 decodes to a lone surrogate, which neither UTF-8 nor Postgres can hold: 422, naming the
    field (it was an internal error when the insert met it)."""
    client, _ = served
    body = json.dumps({**BODY, field: "a \ud800 lighthouse"})  # written as the escape \ud800
    assert "\\ud800" in body
    response = _post(client, key, body.encode())
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["field"] == field
