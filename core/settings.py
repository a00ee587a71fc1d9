"""The one configuration class of the service: every setting, read from ``ZIMAGE_*`` environment variables."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_PLACEHOLDER_SECRETS = {"", "changeme", "zimage-dev-secret", "zimage-dev-link-secret"}
_MIN_LINK_SECRET_CHARS = 32


class Settings(BaseSettings):
    """Service configuration. Defaults run on a dev machine with local Postgres, Redis and SeaweedFS."""

    model_config = SettingsConfigDict(env_prefix="ZIMAGE_", env_file=None, extra="ignore")

    environment: Literal["development", "test", "production"] = "development"

    # --- Postgres (source of truth) ---
    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/zimage"
    db_pool_size: int = Field(10, ge=1, le=200)

    # --- Redis (Celery broker; delivery only) ---
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Every Redis key the service touches starts with this, so runs sharing a Redis never collide.
    redis_prefix: str = "zimage:"

    # --- S3-compatible storage ---
    s3_endpoint_url: str | None = "http://127.0.0.1:8333"
    # Endpoint written into presigned URLs (what clients can reach); defaults to s3_endpoint_url.
    s3_public_endpoint_url: str | None = None
    s3_bucket: str = "zimage-results"
    s3_region: str = "us-east-1"
    s3_access_key_id: str = "zimage"
    s3_secret_access_key: str = "zimage-dev-secret"
    presign_ttl_s: int = Field(3600, ge=60, le=7 * 24 * 3600)
    # Threads that encode and upload results; unset: 4 on a GPU worker, 1 on a CPU-only one, where every extra
    # thread takes CPU from inference itself (measured: 4 threads cost 20-30% of a 2-core worker's throughput).
    upload_threads: int | None = Field(None, ge=1, le=64)

    # --- models ---
    # A hub id or a local path; the default is the tiny random-weight checkpoint that `make demo` builds.
    turbo_model: str = "checkpoints/tiny/turbo"
    edit_model: str | None = None
    # Z-Image (Base), the undistilled model with classifier-free guidance; unset: not served (jobs naming
    # z-image-base are refused with 422). A worker consuming the ``base`` queue loads it.
    base_model: str | None = None
    # A label for the revision of the weights behind the model names (a hub revision, a checkpoint date): part of
    # the result-reuse key, so change it when the weights behind a name change.
    model_revision: str | None = None
    device: Literal["auto", "cuda", "cpu", "mps"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    warmup: bool = True
    compile_transformer: bool = False  # torch.compile the transformer (slow first batch, faster after)
    attention_backend: str | None = None  # e.g. "flash", "_flash_3", "sage", "native"; None: diffusers' default
    cpu_offload: bool = False  # model CPU offload for cards too small for the whole pipeline (CUDA only)
    embedding_cache_bytes: int = Field(512 << 20, ge=0)  # prompt-embedding LRU; 0 turns it off

    # --- LoRA adapters (POST /v1/adapters, the ``loras`` of a job) ---
    max_adapter_bytes: int = Field(2 << 30, ge=1024)  # a .safetensors file, streamed to S3
    max_adapter_rank: int = Field(128, ge=1, le=1024)
    # The transformer config adapters are checked against (a transformer/config.json, or a model folder holding
    # one). Unset: the Turbo model's own when it is a local folder, else Z-Image's published shape.
    adapter_base_config: str | None = None
    # An adapter given by URL is fetched under the image-URL rules (fetch_allow_hosts, fetch_max_redirects) with
    # this one deadline for the whole download (a 2 GiB file needs minutes).
    adapter_fetch_timeout_s: float = Field(600.0, gt=0, le=3600)
    # Worker caches: adapter weights loaded into the transformer (bytes on the accelerator) and their verified
    # files kept in host memory; at start a worker loads the adapters its queue used most in the last day.
    adapter_device_cache_bytes: int = Field(1 << 30, ge=0)
    adapter_host_cache_bytes: int = Field(4 << 30, ge=0)
    adapter_prewarm: int = Field(4, ge=0, le=64)

    # --- image inputs of edit jobs fetched from URLs ---
    # Hosts the fetcher may reach even when they resolve to private addresses ("name", "*.domain" or an IP).
    fetch_allow_hosts: list[str] = Field(default_factory=list)
    fetch_timeout_s: float = Field(10.0, gt=0, le=120)
    fetch_max_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    fetch_max_redirects: int = Field(3, ge=0, le=10)

    # --- webhooks (sent by the delivery process, worker/webhooks.py) ---
    # Hosts webhook URLs may name even when they resolve to private addresses ("name", "*.domain" or an IP); outside
    # production such a host may also be plain http (loopback receivers in tests and local runs).
    webhook_allow_hosts: list[str] = Field(default_factory=list)
    webhook_timeout_s: float = Field(10.0, gt=0, le=60)
    # Retries: attempt n waits uniform(0, min(max, base * 6**(n-1))) (exponential backoff, full jitter), until the
    # delivery is older than retry_for_s; then it is failed.
    webhook_retry_base_s: float = Field(5.0, gt=0)
    webhook_retry_max_s: float = Field(3600.0, gt=0)
    webhook_retry_for_s: float = Field(86400.0, ge=0)
    # After `zimage-admin webhook-secret rotate`, the previous secret also signs for this long.
    webhook_secret_grace_s: float = Field(86400.0, ge=0)
    # The delivery process is woken by Postgres NOTIFY when deliveries commit; it also looks for due retries this
    # often, and sends to at most this many endpoints at once (one delivery in flight per endpoint).
    webhook_poll_s: float = Field(1.0, gt=0, le=60)
    webhook_concurrency: int = Field(64, ge=1, le=1024)

    # --- batching ---
    # A cap on images per pipeline call; the token budget below is what normally bounds a batch.
    max_batch_images: int = Field(32, ge=1, le=64)
    # Image tokens (latent patches: (w/16)*(h/16)) one batch may hold; 1024x1024 is 4096 tokens.
    batch_token_budget: int = Field(8192, ge=256)
    # When a batch is not full and jobs of its group are arriving right now, wait this long to fill it.
    batch_wait_ms: int = Field(20, ge=0, le=50)
    # One wake-up message keeps claiming batches of its queue for this long (the next batch is claimed and
    # prepared while the current one runs); then the worker takes its next message.
    drain_s: float = Field(30.0, ge=0)

    # --- job lifecycle ---
    lease_s: int = Field(300, ge=5)
    max_attempts: int = Field(3, ge=1, le=20)
    sweep_interval_s: float = Field(2.0, gt=0, le=60)
    # A committed row the API failed to publish is re-published once it is this old.
    redispatch_after_s: float = Field(2.0, ge=0)
    progress_interval_s: float = Field(0.5, ge=0)
    # A batch may run base + per_image_step * images * steps seconds; past that its jobs fail with `timeout`.
    batch_timeout_base_s: float = Field(120.0, gt=0)
    batch_timeout_per_image_step_s: float = Field(5.0, ge=0)
    # SIGTERM lets the current batch finish for this long; then its jobs go back to the queue.
    shutdown_grace_s: float = Field(30.0, ge=0)
    # How long transient S3 / Postgres failures are retried (exponential backoff, jitter) before giving up.
    storage_retry_s: float = Field(60.0, ge=0)
    db_retry_s: float = Field(30.0, ge=0)
    # Redis redelivers an unacked message after this long; None: 4 leases, at least an hour.
    broker_visibility_timeout_s: int | None = Field(None, ge=1)
    # Queued jobs published this long ago are published again when the broker holds fewer messages than
    # there are such jobs (Redis restarted empty, or a message was lost).
    stale_dispatch_s: float = Field(30.0, gt=0)

    # --- fault injection (tests and drills only; refused in production) ---
    # A worker whose batch holds a job whose prompt contains this marker dies at once (os._exit): a poison job.
    fault_crash_marker: str | None = None
    # Extra seconds per denoising step, to make batches long enough to interrupt.
    fault_step_delay_s: float = Field(0.0, ge=0)
    # Pipeline calls of more images than this raise an out-of-memory error (0: every call does).
    fault_oom_above_images: int | None = Field(None, ge=0)

    # --- API ---
    api_base_url: str = "http://127.0.0.1:8000"
    # Coalesce concurrent submissions into one transaction and one Redis pipeline (off: a row per request).
    group_commit: bool = True
    max_body_bytes: int = Field(1 << 20, ge=1024)
    # Signs the short-lived gallery links (core/links.py) that let a browser open a batch without an API key.
    link_secret: str = "zimage-dev-link-secret"
    link_ttl_s: int = Field(3600, ge=60, le=7 * 24 * 3600)
    # Server-sent events: a keep-alive comment after this much silence; while Redis is down, a stream re-reads
    # its row this often instead.
    events_keepalive_s: float = Field(15.0, gt=0, le=300)
    events_poll_s: float = Field(2.0, gt=0, le=60)
    # Bulk submission: jobs per batch, and the body that carries them (JSON or NDJSON).
    max_batch_jobs: int = Field(10_000, ge=1, le=100_000)
    max_batch_body_bytes: int = Field(32 << 20, ge=1024)

    # --- rate limits and quotas per tenant: these defaults, or the tenant's own (`zimage-admin set-limits`) ---
    # 0 is no limit. Requests per second, counted in Redis across API processes (fixed one-second windows).
    rate_limit_rps: int = Field(0, ge=0)
    # Queued + running jobs, and images submitted per UTC day; counted by Postgres in the submit transaction.
    # A tenant's own max_batch_jobs may lower the one above for it.
    max_queued_jobs: int = Field(100_000, ge=0)
    max_images_per_day: int = Field(0, ge=0)
    # /readyz answers 503 while more jobs than this are queued, so a load balancer sheds load; 0: off.
    readyz_max_queue_depth: int = Field(0, ge=0)
    # A request's line and headers must arrive within header_timeout_s (else 408, closed) and stay under
    # max_header_bytes (else 431, closed): api/head_limits.py, uvicorn's --http api.head_limits:GuardedHttpTools.
    header_timeout_s: float = Field(10.0, gt=0, le=300)
    max_header_bytes: int = Field(64 << 10, ge=4096)
    max_header_value_bytes: int = Field(8 << 10, ge=256)  # one header's value (431 above)
    max_query_params: int = Field(256, ge=1)  # 400 above

    # --- observability ---
    # A worker marks its row seen this often; GET /v1/models calls a model available while a ready worker of its
    # queue was seen within three of these.
    worker_heartbeat_s: float = Field(10.0, gt=0, le=300)
    # Each worker process serves its Prometheus metrics on this port (0: none); the API serves GET /metrics.
    metrics_port: int = Field(9200, ge=0, le=65535)
    # The queue depth and oldest age (one Postgres query) are read again at most this often, however many scrapes.
    metrics_queue_refresh_s: float = Field(5.0, gt=0, le=300)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"  # text: for a human at a terminal
    # Prompts are user data: job log lines carry them only when this is on.
    log_prompts: bool = False

    @field_validator(
        "edit_model",
        "base_model",
        "adapter_base_config",
        "attention_backend",
        "s3_endpoint_url",
        "s3_public_endpoint_url",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        return None if v == "" else v

    @field_validator("redis_prefix")
    @classmethod
    def _prefix_shape(cls, v: str) -> str:
        if v and not v.endswith(":"):
            v += ":"
        return v

    @model_validator(mode="after")
    def _no_placeholder_secrets_in_production(self) -> Settings:
        if self.environment == "production" and self.s3_secret_access_key in _PLACEHOLDER_SECRETS:
            raise ValueError("ZIMAGE_S3_SECRET_ACCESS_KEY must be set to a real secret in production")
        weak_link = self.link_secret in _PLACEHOLDER_SECRETS or len(self.link_secret) < _MIN_LINK_SECRET_CHARS
        if self.environment == "production" and weak_link:
            raise ValueError(
                f"ZIMAGE_LINK_SECRET must be a real secret of at least {_MIN_LINK_SECRET_CHARS} characters in "
                "production (e.g. openssl rand -hex 32)"
            )
        faults = self.fault_crash_marker or self.fault_step_delay_s or self.fault_oom_above_images is not None
        if self.environment == "production" and faults:
            raise ValueError("fault injection settings (ZIMAGE_FAULT_*) are refused in production")
        return self

    @property
    def visibility_timeout_s(self) -> int:
        """Seconds before Redis redelivers an unacked message."""
        return self.broker_visibility_timeout_s or max(3600, self.lease_s * 4)

    def batch_timeout_s(self, images: int, steps: int) -> float:
        """The time limit of one batch, scaled by its work."""
        return self.batch_timeout_base_s + self.batch_timeout_per_image_step_s * images * steps

    def as_env(self) -> dict[str, str]:
        """These settings as ``ZIMAGE_*`` environment variables (to start another process with them)."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, bool):
                text = str(value).lower()
            elif isinstance(value, list | dict):
                text = json.dumps(value)  # how pydantic-settings reads a complex value back (an allow-list)
            else:
                text = str(value)
            env[f"ZIMAGE_{name.upper()}"] = text
        return env

    @property
    def presign_endpoint(self) -> str | None:
        """The S3 endpoint that presigned URLs name."""
        return self.s3_public_endpoint_url or self.s3_endpoint_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
