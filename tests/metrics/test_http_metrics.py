"""HTTP metrics and request ids on a small app (no service): routes are labelled by template, never by raw path or
an invented method, and every answer carries its request id."""

from __future__ import annotations

import secrets

from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from api.http_metrics import UNMATCHED, HttpMetrics
from api.request_ids import RequestIds


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/things/{thing_id}")
    async def thing(thing_id: str) -> dict[str, str]:
        return {"id": thing_id}

    app.add_middleware(HttpMetrics)
    app.add_middleware(RequestIds)
    return app


def _count(method: str, route: str, status: str) -> float:
    labels = {"method": method, "route": route, "status": status}
    return REGISTRY.get_sample_value("zimage_http_requests_total", labels) or 0.0


def test_requests_are_counted_by_route_template_and_status() -> None:
    before = _count("GET", "/things/{thing_id}", "200")
    unmatched = _count("GET", UNMATCHED, "404")
    with TestClient(_app()) as client:
        ids = [secrets.token_hex(4) for _ in range(3)]
        for thing_id in ids:
            assert client.get(f"/things/{thing_id}").status_code == 200
        assert client.get(f"/nowhere/{ids[0]}").status_code == 404
    assert _count("GET", "/things/{thing_id}", "200") == before + 3
    assert _count("GET", UNMATCHED, "404") == unmatched + 1
    scrape = REGISTRY.get_sample_value(
        "zimage_http_request_duration_seconds_count", {"method": "GET", "route": "/things/{thing_id}"}
    )
    assert scrape is not None and scrape >= 3
    assert not any(i in str(s.labels) for m in REGISTRY.collect() for s in m.samples for i in ids)


def test_an_invented_method_is_counted_as_other() -> None:
    before = _count("other", "/things/{thing_id}", "405")
    with TestClient(_app()) as client:
        assert client.request("BREW", "/things/x").status_code == 405
    assert _count("other", "/things/{thing_id}", "405") == before + 1


def test_every_answer_carries_its_request_id() -> None:
    with TestClient(_app()) as client:
        kept = client.get("/things/x", headers={"X-Request-ID": "abc.DEF_1-2"})
        replaced = client.get("/nowhere", headers={"X-Request-ID": "bad id!"})
        made = client.get("/things/y")
    assert kept.headers["x-request-id"] == "abc.DEF_1-2"
    assert replaced.status_code == 404 and len(replaced.headers["x-request-id"]) == 32
    assert len(made.headers["x-request-id"]) == 32 and made.headers["x-request-id"] != replaced.headers["x-request-id"]
