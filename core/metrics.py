"""Every Prometheus metric of the service, defined once so the API, the worker and the sweeper share names.

The objects live in prometheus-client's default registry; each process exposes what it counted itself: the API
on ``GET /metrics``, each worker on its own port (``worker/metrics.py``). A process shows every family (at zero
or without samples when it never counts it): dashboards and alerts need no per-process name list.

Queue depth and oldest age come from Postgres, not from counters: see ``core/queue_stats.py``. Collectors that
read another object's state (the worker's busy ratio, the embedding cache) are registered by the process that
owns the object.

``zimage_jobs_total`` counts terminal moves where they happen (worker success and failure, sweeper give-up, API
cancel and batch cancel, reuse) rather than a gauge of jobs by status: a count by status would scan every
finished job the table keeps, and ``rate()`` of a counter is the jobs/s a dashboard wants.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Submit -> finish: seconds for a lone job on an idle GPU, hours for a batch's tail behind a backlog.
_LATENCY_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
# Seconds of accelerator per image: ~0.05 s for small sizes on an H100, tens of seconds on a CPU.
_PER_IMAGE_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 30, 60)
_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# --- jobs (API, worker, sweeper) ---
JOBS = Counter("zimage_jobs", "Jobs that reached a terminal status, by status and error code", ["status", "error_code"])
JOB_LATENCY = Histogram(
    "zimage_job_latency_seconds", "Submit to finish of jobs a worker recorded (succeeded or failed)",
    buckets=_LATENCY_BUCKETS,
)  # fmt: skip
REUSE_HITS = Counter("zimage_reuse_hits", "Jobs answered from an identical earlier job's outputs (no model run)")

# --- worker ---
INFERENCE_PER_IMAGE = Histogram(
    "zimage_inference_seconds_per_image", "A batch's inference seconds divided by its images, by image size",
    ["resolution"], buckets=_PER_IMAGE_BUCKETS,
)  # fmt: skip
BATCH_SIZE = Histogram("zimage_batch_size_images", "Images per batch a worker ran", buckets=_BATCH_SIZE_BUCKETS)
BUSY_RATIO = Gauge("zimage_accelerator_busy_ratio", "Fraction of wall time since the worker was ready that batches ran")
GPU_SECONDS = Counter(
    "zimage_gpu_seconds", "Inference seconds attributed to each tenant by its share of a batch's images", ["tenant"]
)

# --- rate limits (API) ---
RATE_LIMITED = Counter("zimage_rate_limited", "Requests refused with 429, by reason", ["reason"])
RATE_LIMITER_FAILOPEN = Counter(
    "zimage_rate_limiter_failopen", "Requests let through because the rate limiter could not be asked"
)

# --- sweeper (API and workers: whichever holds the lock counts) ---
SWEEPER_ACTIONS = Counter(
    "zimage_sweeper_actions", "Jobs the sweeper moved or published, by action (requeued, failed, published)",
    ["action"],
)  # fmt: skip

# --- HTTP (API) ---
HTTP_REQUESTS = Counter(
    "zimage_http_requests", "HTTP requests answered, by method, route template and status",
    ["method", "route", "status"],
)  # fmt: skip
HTTP_LATENCY = Histogram(
    "zimage_http_request_duration_seconds", "Seconds from a request's arrival to its response's start, by route",
    ["method", "route"], buckets=_HTTP_BUCKETS,
)  # fmt: skip


def count_ends(status: str, n: int = 1, error_code: str | None = None) -> None:
    """Count ``n`` jobs that reached terminal ``status`` (with ``error_code`` when failed)."""
    if n > 0:
        JOBS.labels(status, error_code or "").inc(n)
