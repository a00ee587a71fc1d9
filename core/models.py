"""Postgres tables: tenants (and their usage), API keys, batches, uploads, adapters, jobs, workers and webhook
deliveries (SQLAlchemy 2 declarative)."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    SmallInteger,
    String,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from core.status import JobStatus

_JOB_STATUSES = ", ".join(f"'{s.value}'" for s in JobStatus)


class Base(DeclarativeBase):
    """Declarative base of every table."""


def _now() -> Any:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class Tenant(Base):
    """A customer; owns API keys, jobs, batches and uploads."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False, unique=True)
    # Signs the tenant's webhooks (``whsec_…``, made on first use). After a rotation the previous secret signs too
    # until the grace period after ``webhook_secret_rotated_at`` ends (core/webhook_secrets.py).
    webhook_secret: Mapped[str | None] = mapped_column(String(100))
    webhook_secret_previous: Mapped[str | None] = mapped_column(String(100))
    webhook_secret_rotated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Overrides of the settings' request rate and quotas (core/quotas.py): NULL takes the default, 0 is no limit.
    rate_limit_rps: Mapped[int | None] = mapped_column(Integer)
    max_queued_jobs: Mapped[int | None] = mapped_column(Integer)
    max_batch_jobs: Mapped[int | None] = mapped_column(Integer)
    max_images_per_day: Mapped[int | None] = mapped_column(Integer)
    # Fair share: the tenant's share of the accelerators relative to others, and its virtual clock (image tokens
    # served divided by weight); a claim serves the queued tenant with the smallest clock first.
    weight: Mapped[float] = mapped_column(Float, nullable=False, server_default="1")
    vclock: Mapped[float] = mapped_column(Float, nullable=False, server_default="0")
    created_at: Mapped[datetime] = _now()

    __table_args__ = (
        CheckConstraint("weight > 0", name="ck_tenants_weight"),
        CheckConstraint(
            "rate_limit_rps >= 0 AND max_queued_jobs >= 0 AND max_batch_jobs >= 0 AND max_images_per_day >= 0",
            name="ck_tenants_limits",
        ),
    )


class TenantUsage(Base):
    """What a tenant's quotas are checked against (core/quotas.py): its images of the current UTC day, and the
    jobs it submitted since its open (queued + running) jobs were last counted, so that most submits need no
    count. The row is also the lock that orders one tenant's concurrent submits."""

    __tablename__ = "tenant_usage"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    day: Mapped[date] = mapped_column(Date, nullable=False, server_default=text("(now() AT TIME ZONE 'UTC')::date"))
    images: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    submitted: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    # The last count of open jobs, and ``submitted`` then: open now <= open_at_check + submitted since.
    open_at_check: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    submitted_at_check: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    checked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class QueueCount(Base):
    """A change to a tenant's queued jobs in one queue at one priority, appended by triggers on ``jobs``
    (migration 0008) in the transaction that made it: the key's count is the sum of its rows, which the sweeper
    folds into one now and then (``core.queue_counts``). A submit reads its queue position here instead of
    counting the queue."""

    __tablename__ = "queue_counts"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), nullable=False)
    queue: Mapped[str] = mapped_column(String(32), nullable=False)
    priority: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    queued: Mapped[int] = mapped_column(BigInteger, nullable=False)

    __table_args__ = (Index("ix_queue_counts_key", "tenant_id", "queue", "priority"),)


class ApiKey(Base):
    """An API key: only its SHA-256 hash and a short prefix (for people to recognise it) are stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False)
    prefix: Mapped[str] = mapped_column(String(16), nullable=False)
    key_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    created_at: Mapped[datetime] = _now()
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Batch(Base):
    """A bulk submission of many jobs that share defaults."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default="running")
    total: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    # Jobs of the batch not yet terminal: each terminal move lowers it in the gate's statement, and the move that
    # brings it to 0 writes the batch's webhook delivery (core/webhook_outbox.py).
    open_jobs: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    metadata_: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    webhook_url: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = _now()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_batches_tenant_id", "tenant_id", "id"),
        Index(
            "uq_batches_idempotency",
            "tenant_id",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
    )


class Upload(Base):
    """An input image a tenant uploaded for edit jobs; the original lives in S3."""

    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False)
    key: Mapped[str] = mapped_column(Text, nullable=False)
    width: Mapped[int] = mapped_column(Integer, nullable=False)
    height: Mapped[int] = mapped_column(Integer, nullable=False)
    format: Mapped[str] = mapped_column(String(8), nullable=False)
    bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = _now()

    __table_args__ = (Index("ix_uploads_tenant_id", "tenant_id", "id"),)


class Adapter(Base):
    """A LoRA adapter a tenant uploaded, checked against the served transformer; the file lives in S3."""

    __tablename__ = "adapters"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    key: Mapped[str] = mapped_column(Text, nullable=False)
    bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    rank: Mapped[int] = mapped_column(Integer, nullable=False)
    target_modules: Mapped[list[str]] = mapped_column(JSONB, nullable=False)
    created_at: Mapped[datetime] = _now()

    __table_args__ = (Index("ix_adapters_tenant_id", "tenant_id", "id"),)


class Job(Base):
    """One generate or edit request: its normalized request, where it is in its life, and its results."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False)
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    batch_index: Mapped[int | None] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    # The Celery queue (model family) that serves this job.
    queue: Mapped[str] = mapped_column(String(32), nullable=False)
    # Jobs with equal group keys can share one pipeline call (same model, mode, size, steps, guidance).
    group_key: Mapped[str] = mapped_column(Text, nullable=False)
    # Image tokens this job adds to a batch: (width/16) * (height/16) * num_images.
    cost_tokens: Mapped[int] = mapped_column(Integer, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default=JobStatus.QUEUED.value)
    priority: Mapped[int] = mapped_column(SmallInteger, nullable=False, server_default="5")
    request: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    metadata_: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    # Attempt number of the current (or last) claim: the fencing token of every worker write.
    attempt: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    max_attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="3")
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    worker_id: Mapped[str | None] = mapped_column(String(200))
    progress_step: Mapped[int | None] = mapped_column(Integer)
    progress_total: Mapped[int | None] = mapped_column(Integer)
    error_code: Mapped[str | None] = mapped_column(String(40))
    error_message: Mapped[str | None] = mapped_column(Text)
    outputs: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, nullable=False, server_default=text("'[]'::jsonb"))
    timings: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    # Result reuse: the hash of what decides the images (model, prompt, size, steps, seed, ...) for jobs that
    # opted in; a job that reused another's outputs names it.
    reuse_key: Mapped[str | None] = mapped_column(String(64))
    reused_from: Mapped[str | None] = mapped_column(String(40))
    # Set once the job id is known to be in Redis; NULL rows are re-published by the sweeper (outbox).
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )

    __table_args__ = (
        CheckConstraint(f"status IN ({_JOB_STATUSES})", name="ck_jobs_status"),
        CheckConstraint("priority BETWEEN 0 AND 9", name="ck_jobs_priority"),
        # The claim query: queued jobs of one queue, highest priority first, then oldest.
        Index(
            "ix_jobs_claim",
            "queue",
            text("priority DESC"),
            "created_at",
            postgresql_where=text("status = 'queued'"),
        ),
        # The fair-share claim: the tenants with queued jobs in a queue, each one's jobs in claim order.
        Index(
            "ix_jobs_claim_tenant",
            "queue",
            "tenant_id",
            text("priority DESC"),
            "created_at",
            postgresql_where=text("status = 'queued'"),
        ),
        # The sweeper: expired leases, and committed rows never published.
        Index("ix_jobs_lease", "lease_expires_at", postgresql_where=text("status = 'running'")),
        Index(
            "ix_jobs_undispatched",
            "created_at",
            postgresql_where=text("dispatched_at IS NULL AND status = 'queued'"),
        ),
        # Per-tenant listing, newest first (ids sort by creation time).
        Index("ix_jobs_tenant_id", "tenant_id", text("id DESC")),
        Index("ix_jobs_tenant_status", "tenant_id", "status", text("id DESC")),
        Index("ix_jobs_batch", "batch_id", "id", postgresql_where=text("batch_id IS NOT NULL")),
        # A batch's jobs in submission order: its manifest and gallery.
        Index("ix_jobs_batch_index", "batch_id", "batch_index", postgresql_where=text("batch_id IS NOT NULL")),
        Index(
            "ix_jobs_reuse",
            "tenant_id",
            "reuse_key",
            postgresql_where=text("reuse_key IS NOT NULL AND status = 'succeeded'"),
        ),
        Index(
            "uq_jobs_idempotency",
            "tenant_id",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
    )


class Worker(Base):
    """A worker process: when it loaded its pipelines, how many times, and when it was last seen."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(200), nullable=False)
    pid: Mapped[int] = mapped_column(Integer, nullable=False)
    queues: Mapped[str] = mapped_column(Text, nullable=False)
    pipeline_loads: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    batches_run: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    jobs_run: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    images_run: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    # Seconds the accelerator spent running batches, and wall seconds since the worker was ready.
    busy_seconds: Mapped[float] = mapped_column(Float, nullable=False, server_default="0")
    wall_seconds: Mapped[float] = mapped_column(Float, nullable=False, server_default="0")
    ready: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    started_at: Mapped[datetime] = _now()
    last_seen_at: Mapped[datetime] = _now()


_DELIVERY_STATUSES = "'pending', 'delivering', 'succeeded', 'failed'"
_UNSETTLED = text("status IN ('pending', 'delivering')")


class WebhookDelivery(Base):
    """One webhook owed to a tenant (the outbox): written in the transaction of the job's terminal move (or of the
    move that finished its batch), sent by the delivery process (``worker/webhooks.py``) until it succeeds or its
    retry window ends. ``next_attempt_at`` is also the lease of a ``delivering`` row."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(
        String(40), primary_key=True, server_default=text("'whd_' || replace(gen_random_uuid()::text, '-', '')")
    )
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(Text, nullable=False)
    # What the delivery is about ({"object", "id", ...}); the body itself is rendered fresh at each attempt.
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint(f"status IN ({_DELIVERY_STATUSES})", name="ck_webhook_deliveries_status"),
        CheckConstraint("(job_id IS NULL) <> (batch_id IS NULL)", name="ck_webhook_deliveries_subject"),
        # The delivery process: what is due, and what is due per endpoint.
        Index("ix_webhook_deliveries_due", "next_attempt_at", postgresql_where=_UNSETTLED),
        Index("ix_webhook_deliveries_url_due", "url", "next_attempt_at", postgresql_where=_UNSETTLED),
        Index("ix_webhook_deliveries_job", "job_id", postgresql_where=text("job_id IS NOT NULL")),
        Index("uq_webhook_deliveries_batch", "batch_id", unique=True, postgresql_where=text("batch_id IS NOT NULL")),
        Index("ix_webhook_deliveries_tenant", "tenant_id"),
    )


class WebhookAttempt(Base):
    """One try of a delivery: when it started, the HTTP status or the error, how long it took."""

    __tablename__ = "webhook_attempts"

    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    latency_ms: Mapped[int] = mapped_column(Integer, nullable=False)


# Core tables, for the statements that read better without the ORM (claims, group commits, sweeps).
jobs = cast(Table, Job.__table__)
tenants = cast(Table, Tenant.__table__)
api_keys = cast(Table, ApiKey.__table__)
tenant_usage = cast(Table, TenantUsage.__table__)
queue_counts = cast(Table, QueueCount.__table__)
batches = cast(Table, Batch.__table__)
uploads = cast(Table, Upload.__table__)
adapters = cast(Table, Adapter.__table__)
workers = cast(Table, Worker.__table__)
webhook_deliveries = cast(Table, WebhookDelivery.__table__)
webhook_attempts = cast(Table, WebhookAttempt.__table__)
