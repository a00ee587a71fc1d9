"""The Grafana dashboard plots only what the service exports: every metric name in its PromQL is in a real scrape
of the API's ``GET /metrics`` or a worker's metrics port, after a job ran and another was canceled; and those
scrapes hold the samples the job left."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from core.queue import QUEUES
from deploy.stack import Stack
from tests.metrics.conftest import Traffic

pytestmark = pytest.mark.e2e

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "zimage.json"

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
# Suffixes the text exposition adds to a family's name, by type.
Scrape = tuple[set[str], list[Sample]]  # the names a scrape exposes, and its samples
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers outside strings, label matchers, ranges and
    grouping clauses that are neither a function call nor a keyword."""
    rest = _GROUPING.sub(" ", _RANGES.sub(" ", _MATCHERS.sub(" ", _STRINGS.sub(" ", expr))))
    names = set()
    for match in _NAME.finditer(rest):
        follows = rest[match.end() :].lstrip()
        if match.group() not in _KEYWORDS and not follows.startswith("(") and not match.group()[0].isdigit():
            names.add(match.group())
    return names


def test_the_extraction_reads_names_not_labels_functions_or_ranges() -> None:
    expr = 'histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{route="/x", b=~"y"}[$__rate_interval])))'
    assert metric_names(expr) == {"a_bucket"}
    assert metric_names("sum(rate(a_total[5m])) / (sum(rate(b_total[5m])) + c)") == {"a_total", "b_total", "c"}


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard's panels (rows' nested panels included)."""
    panels = list(json.loads(DASHBOARD.read_text())["panels"])
    exprs = []
    while panels:
        panel = panels.pop()
        panels += panel.get("panels", [])
        exprs += [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
    return exprs


def scrape(url: str) -> Scrape:
    """The names a scrape exposes (each sample's, and each family's with its type's suffixes, samples or not)
    and its samples."""
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    names: set[str] = set()
    samples: list[Sample] = []
    for family in text_string_to_metric_families(response.text):
        names.add(family.name)
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ()))
        names.update(s.name for s in family.samples)
        samples += family.samples
    return names, samples


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


@pytest.fixture(scope="module")
def api_scrape(stack: Stack, traffic: Traffic) -> Scrape:
    return scrape(f"{stack.api_url}/metrics")


@pytest.fixture(scope="module")
def worker_scrape(stack: Stack, traffic: Traffic) -> tuple[set[str], list[Sample]]:
    port = stack.metrics_ports["worker"]
    assert port, "the stack gave its worker no metrics port"
    return scrape(f"http://127.0.0.1:{port}/metrics")


def test_every_metric_the_dashboard_plots_is_exported(api_scrape: Scrape, worker_scrape: Scrape) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 14, "the dashboard lost panels: the check would prove little"
    wanted = set().union(*(metric_names(e) for e in exprs))
    assert {"zimage_queue_depth", "zimage_job_latency_seconds_bucket", "zimage_gpu_seconds_total"} <= wanted
    exported = api_scrape[0] | worker_scrape[0]
    assert sorted(wanted - exported) == []


def test_the_api_scrape_holds_the_queue_the_requests_and_the_cancel(api_scrape: Scrape, traffic: Traffic) -> None:
    _, samples = api_scrape
    depth = [s for s in samples if s.name == "zimage_queue_depth"]
    assert {(s.labels["queue"], s.labels["priority"]) for s in depth} == {
        (q, str(p)) for q in QUEUES for p in range(10)
    }, "every queue and priority is reported, empty ones at 0"
    assert any(s.name == "zimage_queue_oldest_age_seconds" for s in samples)
    assert value(samples, "zimage_jobs_total", status="canceled") >= 1
    assert value(samples, "zimage_http_requests_total", method="POST", route="/v1/jobs", status="202") >= 2
    cancel_route = "/v1/jobs/{job_id}/cancel"
    assert value(samples, "zimage_http_requests_total", method="POST", route=cancel_route, status="200") >= 1
    assert value(samples, "zimage_http_request_duration_seconds_count", route="/v1/jobs/{job_id}") >= 1
    assert not any(traffic.done_job["id"] in str(s.labels) for s in samples), "ids never become labels"


def test_the_worker_scrape_holds_what_the_job_left(worker_scrape: Scrape, traffic: Traffic) -> None:
    _, samples = worker_scrape
    assert value(samples, "zimage_jobs_total", status="succeeded") >= 1
    assert value(samples, "zimage_job_latency_seconds_count") >= 1
    assert value(samples, "zimage_inference_seconds_per_image_count", resolution="256x256") >= 1
    assert value(samples, "zimage_batch_size_images_count") >= 1
    assert value(samples, "zimage_gpu_seconds_total", tenant=traffic.tenant) > 0
    assert value(samples, "zimage_embedding_cache_misses_total") >= 1
    assert 0 < value(samples, "zimage_accelerator_busy_ratio") <= 1
    assert not any(s.name.endswith("_created") for s in samples), "no _created series"
