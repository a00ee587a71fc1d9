"""The fault-injection harness: a cluster of real processes (API, workers, its own Redis and SeaweedFS) and an
audit of Postgres and S3 that counts every job's end: terminal exactly once, no object missing or extra."""

from __future__ import annotations

import secrets
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from client import ZImageClient
from core import storage
from core.admin import create_key
from core.settings import Settings
from deploy.stack import Stack, free_port, stop_group


class RedisServer:
    """A Redis of the fault suite's own (nothing on disk), so that killing it harms no other test."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.log = log_dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The redis:// URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (empty) on the same port and wait for PONG."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        """SIGKILL: every queued message is gone."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@dataclass
class Row:
    """One line of the fault table."""

    scenario: str
    jobs: int
    succeeded: int
    failed: dict[str, int]
    lost: int
    duplicated: int
    max_running_s: float
    max_overdue_s: float
    notes: list[str] = field(default_factory=list)


class Cluster:
    """One scenario's service: the API and workers as processes, on the given settings."""

    def __init__(self, settings: Settings, run_dir: Path, db: Engine) -> None:
        self.settings = settings
        self.db = db
        port = free_port()
        self.stack = Stack(
            settings.model_copy(update={"api_base_url": f"http://127.0.0.1:{port}"}),
            run_dir,
            api_port=port,
            s3_port=None,
        )
        self.tenant = f"faults-{secrets.token_hex(4)}"
        self.key = ""
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch, daemon=True)
        self._workers = 0

    def __enter__(self) -> Cluster:
        self.stack.start_api()
        self.stack.start_webhooks()  # as in production: jobs that end owe their webhooks whatever the fault
        self.key = create_key(self.settings, self.tenant)
        self._monitor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._monitor.join(5)
        self.stack.stop(grace_s=10)

    def client(self) -> ZImageClient:
        """A client of this scenario's tenant."""
        return ZImageClient(self.stack.api_url, self.key)

    def start_worker(self, **overrides: Any) -> str:
        """Start a worker (optionally with other settings) and wait until it is ready; returns its name."""
        self._workers += 1
        name = f"worker{self._workers}"
        if overrides:
            base = self.stack.settings
            self.stack.settings = base.model_copy(update=overrides)
            try:
                self.stack.start_worker(name=name)
            finally:
                self.stack.settings = base
        else:
            self.stack.start_worker(name=name)
        return name

    def signal(self, name: str, sig: signal.Signals) -> None:
        """Send ``sig`` to a part's whole process group (for a worker: the parent and any child)."""
        import os

        os.killpg(self.stack.procs[name].pid, sig)

    def kill(self, name: str) -> None:
        """``kill -9`` a part's process group and reap it."""
        proc = self.stack.procs.pop(name)
        stop_group(proc.pid, 0, proc)

    def alive(self, name: str) -> bool:
        """Whether a part is still running."""
        proc = self.stack.procs.get(name)
        return proc is not None and proc.poll() is None

    def submit(self, requests: list[dict[str, Any]]) -> list[str]:
        """Submit jobs through the API; the ids of the accepted ones."""
        with self.client() as c:
            return [c.submit(r)["id"] for r in requests]

    def statuses(self, ids: list[str]) -> dict[str, str]:
        """Each job's status straight from Postgres."""
        with self.db.connect() as conn:
            rows = conn.execute(text("SELECT id, status FROM jobs WHERE id = ANY(:ids)"), {"ids": ids}).all()
        return {r.id: r.status for r in rows}

    def wait_until(self, predicate, timeout_s: float, poll_s: float = 0.1) -> bool:  # type: ignore[no-untyped-def]
        """Poll ``predicate`` until true or ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(poll_s)
        return False

    def wait_running(self, ids: list[str], timeout_s: float = 60) -> bool:
        """Wait until some job is running with at least one step done (a batch is mid-flight)."""

        def mid_batch() -> bool:
            with self.db.connect() as conn:
                return bool(
                    conn.execute(
                        text("SELECT 1 FROM jobs WHERE id = ANY(:ids) AND status = 'running' AND progress_step >= 1"),
                        {"ids": ids},
                    ).scalar()
                )

        return self.wait_until(mid_batch, timeout_s)

    def wait_terminal(self, ids: list[str], timeout_s: float = 120) -> bool:
        """Wait until every job is terminal."""
        terminal = {"succeeded", "failed", "canceled"}
        return self.wait_until(
            lambda: set(self.statuses(ids).values()) <= terminal and len(self.statuses(ids)) == len(ids),
            timeout_s,
            poll_s=0.25,
        )

    def _watch(self) -> None:
        """Sample how long running jobs have run and how far past their lease they are."""
        while not self._stop.wait(0.2):
            try:
                with self.db.connect() as conn:
                    row = conn.execute(
                        text(
                            "SELECT max(extract(epoch FROM clock_timestamp() - started_at)),"
                            " max(extract(epoch FROM clock_timestamp() - lease_expires_at))"
                            " FROM jobs j JOIN tenants t ON t.id = j.tenant_id"
                            " WHERE t.name = :t AND j.status = 'running'"
                        ),
                        {"t": self.tenant},
                    ).one()
                self._samples.append((float(row[0] or 0), float(row[1] or 0)))
            except Exception:
                pass

    def audit(self, scenario: str, ids: list[str]) -> Row:
        """Count every job's end in Postgres and compare each job's S3 objects with its recorded outputs."""
        with self.db.connect() as conn:
            rows = (
                conn.execute(
                    text("SELECT id, tenant_id, status, error_code, outputs, request FROM jobs WHERE id = ANY(:ids)"),
                    {"ids": ids},
                )
                .mappings()
                .all()
            )
        s3 = storage.make_s3_client(self.settings)
        lost = duplicated = 0
        failed: Counter[str] = Counter()
        succeeded = 0
        for r in rows:
            listing = s3.list_objects_v2(Bucket=self.settings.s3_bucket, Prefix=f"results/{r['tenant_id']}/{r['id']}/")
            objects = {o["Key"] for o in listing.get("Contents", [])}
            recorded = {o["key"] for o in r["outputs"]}
            if r["status"] == "succeeded":
                succeeded += 1
                intact = len(recorded) == r["request"]["num_images"] and recorded <= objects
                if not intact or any(self._sha(s3, o["key"]) != o["sha256"] for o in r["outputs"]):
                    lost += 1
            elif r["status"] == "failed":
                failed[r["error_code"]] += 1
            elif r["status"] not in ("canceled",):
                lost += 1  # not terminal: lost or hung
            duplicated += len(objects - recorded)
        lost += len(ids) - len(rows)
        return Row(
            scenario=scenario,
            jobs=len(ids),
            succeeded=succeeded,
            failed=dict(failed),
            lost=lost,
            duplicated=duplicated,
            max_running_s=round(max((s[0] for s in self._samples), default=0.0), 1),
            max_overdue_s=round(max((s[1] for s in self._samples), default=0.0), 1),
        )

    def _sha(self, s3: Any, key: str) -> str:
        return storage.object_sha256(s3, self.settings.s3_bucket, key)


def jobs(n: int, *, prefix: str = "fault", **extra: Any) -> list[dict[str, Any]]:
    """``n`` small generate requests with distinct prompts and seeds."""
    return [{"prompt": f"{prefix} job {i}", "width": 256, "height": 256, "seed": 100 + i, **extra} for i in range(n)]


def format_table(rows: list[Row]) -> str:
    """The fault table as text."""
    head = [
        "scenario",
        "jobs",
        "succeeded",
        "failed (by code)",
        "lost",
        "duplicated",
        "max running s",
        "max past lease s",
    ]
    lines = [
        [
            r.scenario,
            str(r.jobs),
            str(r.succeeded),
            ", ".join(f"{k}={v}" for k, v in sorted(r.failed.items())) or "-",
            str(r.lost),
            str(r.duplicated),
            f"{r.max_running_s:.1f}",
            f"{r.max_overdue_s:.1f}",
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*ln) for ln in lines])
