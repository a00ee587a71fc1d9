"""The worker's Prometheus side: what it observes per batch and per settled job, and the HTTP endpoint each worker
process serves its registry on (``metrics_port``), started by the worker's start-up hook.

The engine never imports prometheus: the embedding cache's own counters are read by a collector at scrape time.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from prometheus_client import REGISTRY, disable_created_metrics, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from core import metrics
from core.lifecycle import ClaimedJob
from worker.engine.embeddings import CacheStats

log = logging.getLogger(__name__)


def batch_ran(jobs: Sequence[ClaimedJob], inference_s: float) -> None:
    """Observe a batch the accelerator ran: its size, seconds per image, and each tenant's share of the time."""
    images = Counter[str]()
    for job in jobs:
        images[job.tenant_id] += job.request["num_images"]
    total = sum(images.values())
    if not total:
        return
    metrics.BATCH_SIZE.observe(total)
    r = jobs[0].request  # a batch is one group: one size
    metrics.INFERENCE_PER_IMAGE.labels(f"{r.get('width')}x{r.get('height')}").observe(inference_s / total)
    for tenant, n in images.items():
        metrics.GPU_SECONDS.labels(tenant).inc(inference_s * n / total)


def job_ended(job: ClaimedJob, status: str, error_code: str | None = None) -> None:
    """Count a job this worker recorded as succeeded or failed, and observe its submit-to-finish latency."""
    metrics.count_ends(status, 1, error_code)
    if job.created_at is not None:
        metrics.JOB_LATENCY.observe(max(0.0, (datetime.now(UTC) - job.created_at).total_seconds()))


class EmbeddingCacheCollector(Collector):
    """``zimage_embedding_cache_hits_total`` / ``_misses_total``, read from the caches' own counters."""

    def __init__(self, stats: Callable[[], Sequence[CacheStats]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        """The summed counters of every cache the worker's engines use, read now."""
        found = self.stats()
        yield CounterMetricFamily(
            "zimage_embedding_cache_hits", "Prompt embeddings found in the cache", value=sum(s.hits for s in found)
        )
        yield CounterMetricFamily(
            "zimage_embedding_cache_misses", "Prompt embeddings encoded (not in the cache)",
            value=sum(s.misses for s in found),
        )  # fmt: skip


class MetricsServer:
    """The worker's metrics endpoint and the collectors it registered; ``stop`` undoes both."""

    def __init__(self, server: Any, collector: Collector) -> None:
        self.server = server
        self.collector = collector
        self.port = int(server.server_port)

    def stop(self) -> None:
        """Close the port and unregister the collectors."""
        self.server.shutdown()
        self.server.server_close()
        REGISTRY.unregister(self.collector)
        metrics.BUSY_RATIO.set_function(lambda: 0.0)


def serve(port: int, *, busy: Callable[[], float], caches: Callable[[], Sequence[CacheStats]]) -> MetricsServer | None:
    """Serve this process's registry on ``port`` (all interfaces; 0: no endpoint), with the busy ratio and the
    embedding caches read at scrape time. A port already taken is logged, not fatal: metrics never stop a GPU."""
    if port == 0:
        return None
    disable_created_metrics()  # a `_created` series per counter doubles the scrape for nothing
    metrics.BUSY_RATIO.set_function(busy)
    collector = EmbeddingCacheCollector(caches)
    REGISTRY.register(collector)
    try:
        server, _ = start_http_server(port)
    except OSError as exc:
        REGISTRY.unregister(collector)
        log.warning("metrics not served: port %d: %s", port, exc)
        return None
    log.info("metrics on port %d", port)
    return MetricsServer(server, collector)
