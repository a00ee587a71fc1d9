"""The per-process worker context: the engine, database, S3 client and upload pool, built once at start."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import redis
import torch
from sqlalchemy import Engine, text

from core import catalog, logs, storage
from core.db import make_engine
from core.settings import Settings
from core.sweeper import SweeperThread
from worker.adapters import AdapterStore
from worker.engine import EditEngine, EngineOptions
from worker.engine import Engine as InferenceEngine
from worker.engine.embeddings import CacheStats
from worker.results import Recorder

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """Everything a batch needs, shared by every task this process runs."""

    settings: Settings
    worker_id: str
    queues: tuple[str, ...]
    engine: InferenceEngine  # the first loaded: Turbo, or Base on a worker serving Base alone
    edit_engine: EditEngine | None  # on the Turbo modules and the Edit checkpoint; None without Turbo
    db: Engine
    s3: Any
    recorder: Recorder  # stores results and records how jobs end
    adapter_store: AdapterStore  # adapter files, fetched once and verified
    uploads: ThreadPoolExecutor
    # One thread that claims and prepares the next batch while the current one runs.
    prefetch: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="prefetch"))
    sweeper: SweeperThread | None = None
    heartbeat: Heartbeat | None = None
    started: float = field(default_factory=time.monotonic)
    busy_base: float = 0.0  # accelerator seconds spent before the worker was ready (warm-up)
    stats: dict[str, int] = field(default_factory=lambda: {"batches": 0, "jobs": 0, "images": 0})
    stats_lock: threading.Lock = field(default_factory=threading.Lock)
    # Every generate engine this worker loaded, by model name (core.catalog): Turbo and/or Base.
    engines: dict[str, InferenceEngine] = field(default_factory=dict)

    @property
    def busy_seconds(self) -> float:
        """Accelerator seconds of every engine."""
        return sum(engine.busy_seconds for engine in self.engines.values()) or self.engine.busy_seconds


class Heartbeat(threading.Thread):
    """Marks the worker's row seen every ``interval_s`` (GET /v1/models calls a model available while a ready
    worker of its queue was seen lately), whatever the worker is doing; a failed write is retried next time."""

    def __init__(self, db: Engine, worker_id: str, interval_s: float) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.db, self.worker_id, self.interval_s = db, worker_id, interval_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                with self.db.begin() as conn:
                    conn.execute(text("UPDATE workers SET last_seen_at = now() WHERE id = :id"), {"id": self.worker_id})
            except Exception as exc:  # Postgres away: the row ages, and the model reads unavailable meanwhile
                log.warning("worker heartbeat failed: %s", exc)

    def stop(self) -> None:
        """End the thread (worker shutdown)."""
        self._stop_event.set()
        self.join(timeout=5)


_context: WorkerContext | None = None
_loads = 0  # pipeline loads in this process: must stay 1 however many jobs run
_shutdown_deadline: float | None = None  # monotonic time after which a running batch gives its jobs back


def request_shutdown(grace_s: float) -> None:
    """SIGTERM arrived: let the current batch finish within ``grace_s``, then stop it."""
    global _shutdown_deadline
    if _shutdown_deadline is None:
        _shutdown_deadline = time.monotonic() + grace_s
        log.warning("shutdown requested: the current batch has %.0f s to finish", grace_s)


def shutdown_requested() -> bool:
    """Whether SIGTERM arrived: take no new batch."""
    return _shutdown_deadline is not None


def shutdown_overdue() -> bool:
    """Whether a requested shutdown's grace period is over."""
    return _shutdown_deadline is not None and time.monotonic() > _shutdown_deadline


def _yield_cpu() -> None:
    """Lower this thread's CPU priority: encoding and uploads must not slow the accelerator's feeder threads
    (on a CPU-only host they share the cores with inference itself)."""
    with contextlib.suppress(OSError):  # not permitted here: run at normal priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def upload_threads(settings: Settings, device: torch.device) -> int:
    """Encode + upload threads: the setting, or 4 beside an accelerator and 1 where inference runs on the CPU."""
    return settings.upload_threads or (1 if device.type == "cpu" else 4)


def engine_options(settings: Settings) -> EngineOptions:
    """The engine options the settings name (the one place they are read); checked when built."""
    return EngineOptions(
        device=settings.device,
        dtype=settings.dtype,
        compile_transformer=settings.compile_transformer,
        attention_backend=settings.attention_backend,
        cpu_offload=settings.cpu_offload,
        embedding_cache_bytes=settings.embedding_cache_bytes,
        adapter_cache_bytes=settings.adapter_device_cache_bytes,
        oom_above_images=settings.fault_oom_above_images,
    )


def load_engines(
    settings: Settings, queues: tuple[str, ...], options: EngineOptions
) -> tuple[dict[str, InferenceEngine], EditEngine | None]:
    """The models this worker's queues serve, each loaded once: Turbo for ``generate`` and ``edit`` (img2img and
    inpaint run on its modules, the Edit checkpoint shares its text encoder and VAE), Base for ``base`` (sharing
    Turbo's text encoder, tokenizer and VAE objects when they match, and then its prompt encoder and cache)."""
    engines: dict[str, InferenceEngine] = {}
    serve_base = "base" in queues and bool(settings.base_model)
    if "base" in queues and not settings.base_model:
        log.warning("the base queue is consumed but ZIMAGE_BASE_MODEL is unset: Base is not loaded")
    turbo = None
    if {"generate", "edit"} & set(queues) or not serve_base:
        turbo = engines[catalog.TURBO] = InferenceEngine.from_pretrained(settings.turbo_model, options)
    if serve_base:
        assert settings.base_model is not None
        engines[catalog.BASE] = InferenceEngine.base_from_pretrained(settings.base_model, options, turbo=turbo)
    edit_engine = None
    if turbo is not None:
        # img2img and inpaint reuse the Turbo modules; instruct loads the Edit checkpoint when this worker serves it.
        edit_model = settings.edit_model if "edit" in queues else None
        edit_engine = EditEngine(turbo.pipe, edit_model=edit_model, options=options)
    return engines, edit_engine


def build_context(settings: Settings, queues: tuple[str, ...], *, run_sweeper: bool = True) -> WorkerContext:
    """Load the pipelines, warm them up, open connections, register the worker as ready."""
    global _context, _loads
    options = engine_options(settings)
    engines, edit_engine = load_engines(settings, queues, options)
    engine = next(iter(engines.values()))
    _loads += 1
    if settings.warmup:
        for loaded in engines.values():
            loaded.warmup()
        if edit_engine is not None:
            edit_engine.warmup()
    db = make_engine(settings, pool_size=2)
    s3 = storage.make_s3_client(settings)
    storage.ensure_bucket(s3, settings.s3_bucket)
    adapter_store = AdapterStore(
        db=db,
        s3=s3,
        bucket=settings.s3_bucket,
        max_bytes=settings.adapter_host_cache_bytes,
        db_retry_s=settings.db_retry_s,
        storage_retry_s=settings.storage_retry_s,
    )
    for name, loaded in engines.items():  # each model's adapters into its own transformer, from its own queue
        queue = catalog.MODELS[name].queue
        if queue in queues:
            rewarm_adapters(loaded, adapter_store, (queue,), settings.adapter_prewarm)
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    logs.set_process_fields(worker=worker_id)
    ctx = WorkerContext(
        settings=settings,
        worker_id=worker_id,
        queues=queues,
        engine=engine,
        edit_engine=edit_engine,
        db=db,
        s3=s3,
        recorder=Recorder(
            db=db,
            s3=s3,
            bucket=settings.s3_bucket,
            db_retry_s=settings.db_retry_s,
            storage_retry_s=settings.storage_retry_s,
            model_id=engine.model_id,
            model_ids={name: loaded.model_id for name, loaded in engines.items()},
            redis=redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2),
            redis_prefix=settings.redis_prefix,
            log_prompts=settings.log_prompts,
        ),
        adapter_store=adapter_store,
        uploads=ThreadPoolExecutor(
            upload_threads(settings, engine.device), thread_name_prefix="upload", initializer=_yield_cpu
        ),
        busy_base=sum(loaded.busy_seconds for loaded in engines.values()),
        engines=engines,
    )
    with db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO workers (id, hostname, pid, queues, pipeline_loads, ready)"
                " VALUES (:id, :host, :pid, :queues, :loads, true)"
            ),
            {
                "id": worker_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "queues": ",".join(queues),
                "loads": _loads,
            },
        )
    ctx.heartbeat = Heartbeat(db, worker_id, settings.worker_heartbeat_s)
    ctx.heartbeat.start()
    if run_sweeper:
        ctx.sweeper = SweeperThread(db, redis.Redis.from_url(settings.redis_url, socket_timeout=5), settings)
        ctx.sweeper.start()
    _context = ctx
    models = ", ".join(f"{name}={loaded.model_id}" for name, loaded in engines.items())
    log.info("worker %s ready: %s on %s", worker_id, models, ",".join(queues))
    return ctx


def rewarm_adapters(engine: InferenceEngine, store: AdapterStore, queues: tuple[str, ...], count: int) -> list[str]:
    """Load the adapters this worker's queues used most in the last day, before the first batch; never fatal."""
    try:
        loaded = engine.adapters.preload(store.most_used(queues, count))
    except Exception as exc:  # a warm cache is an optimisation: the first batches load what they need
        log.warning("could not re-warm adapters: %s", exc)
        return []
    if loaded:
        log.info("re-warmed %d adapter(s): %s", len(loaded), ",".join(loaded))
    return loaded


def get_context() -> WorkerContext:
    """This process's context; it must have been built by the worker's start-up hook."""
    if _context is None:
        raise RuntimeError("worker context not built: the worker start-up hook did not run")
    return _context


def busy_fraction(ctx: WorkerContext) -> float:
    """Fraction of wall time since the worker was ready that the accelerator spent running batches."""
    wall = time.monotonic() - ctx.started
    return min(1.0, (ctx.busy_seconds - ctx.busy_base) / wall) if wall > 0 else 0.0


def cache_stats(ctx: WorkerContext) -> list[CacheStats]:
    """The counters of the prompt-embedding caches this worker's engines use (none when caching is off)."""
    # Engines sharing a text encoder share one cache: each cache is reported once.
    caches = {id(e.embedding_cache): e.embedding_cache for e in ctx.engines.values() if e.embedding_cache is not None}
    if not caches and ctx.engine.embedding_cache is not None:
        return [ctx.engine.embedding_cache.stats()]
    return [cache.stats() for cache in caches.values()]


def record_stats(ctx: WorkerContext, *, jobs: int, images: int) -> None:
    """Count a finished batch on the worker's row: jobs, images, accelerator-busy time (and mark it seen)."""
    with ctx.stats_lock:
        ctx.stats["batches"] += 1
        ctx.stats["jobs"] += jobs
        ctx.stats["images"] += images
        values = {
            "b": ctx.stats["batches"],
            "j": ctx.stats["jobs"],
            "i": ctx.stats["images"],
            "busy": ctx.busy_seconds - ctx.busy_base,
            "wall": time.monotonic() - ctx.started,
            "loads": _loads,
            "id": ctx.worker_id,
        }
    try:
        with ctx.db.begin() as conn:
            conn.execute(
                text(
                    "UPDATE workers SET batches_run = :b, jobs_run = :j, images_run = :i, busy_seconds = :busy,"
                    " wall_seconds = :wall, pipeline_loads = :loads, last_seen_at = now() WHERE id = :id"
                ),
                values,
            )
    except Exception as exc:  # statistics must never fail a batch
        log.warning("could not record worker stats: %s", exc)


def close_context() -> None:
    """Stop the sweeper and the upload pool, close connections (worker shutdown)."""
    global _context
    ctx, _context = _context, None
    if ctx is None:
        return
    if ctx.sweeper is not None:
        ctx.sweeper.stop()
    if ctx.heartbeat is not None:
        ctx.heartbeat.stop()
    ctx.prefetch.shutdown(wait=True)
    ctx.uploads.shutdown(wait=True)
    with ctx.db.begin() as conn:
        conn.execute(
            text("UPDATE workers SET ready = false, last_seen_at = now() WHERE id = :id"),
            {"id": ctx.worker_id},
        )
    ctx.db.dispose()
