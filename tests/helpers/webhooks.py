"""A webhook receiver on loopback (a threaded ``http.server``), a delivery process run in a thread, and jobs driven
to their end through the worker's own writes: what the webhook tests share."""

from __future__ import annotations

import asyncio
import http.server
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, select, update
from standardwebhooks import Webhook, WebhookVerificationError

from core import lifecycle
from core.lifecycle import ClaimedJob
from core.models import jobs, webhook_attempts, webhook_deliveries
from core.settings import Settings
from worker.webhooks import Deliverer

HANG = -1  # a scripted answer: accept the request, then say nothing until the client gives up


@dataclass
class Received:
    """One request the receiver got."""

    at: float  # time.time() when its body was read
    headers: dict[str, str]
    body: bytes
    verified_with: list[str] = field(default_factory=list)  # the receiver's secrets that verify it


class Receiver:
    """An HTTP server on 127.0.0.1 answering POSTs with scripted status codes (then ``default``); each request is
    kept, with which of ``secrets`` verify its signature (``standardwebhooks.Webhook(secret).verify``)."""

    def __init__(self, script: list[int] | None = None, *, default: int = 200, hang_s: float = 5.0) -> None:
        self.script = list(script or [])
        self.default = default
        self.hang_s = hang_s
        self.secrets: list[str] = []
        self.requests: list[Received] = []
        self.connections = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real receiver

            def setup(self) -> None:
                super().setup()
                with receiver._lock:
                    receiver.connections += 1

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                got = Received(time.time(), {k.lower(): v for k, v in self.headers.items()}, body)
                for secret in receiver.secrets:
                    try:
                        Webhook(secret).verify(body, got.headers)
                        got.verified_with.append(secret)
                    except WebhookVerificationError:
                        pass
                with receiver._lock:
                    receiver.requests.append(got)
                    code = receiver.script.pop(0) if receiver.script else receiver.default
                if code == HANG:
                    time.sleep(receiver.hang_s)
                    self.close_connection = True
                    return
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self._thread = threading.Thread(target=self.server.serve_forever, name="webhook-receiver", daemon=True)

    @property
    def url(self) -> str:
        """Where it listens."""
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def delivering(settings: Settings) -> Iterator[Deliverer]:
    """The delivery process's ``Deliverer``, run on its own event loop in a thread until the block ends."""
    loop = asyncio.new_event_loop()
    box: list[Deliverer] = []
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        box.append(Deliverer(settings))
        started.set()
        loop.run_until_complete(box[0].run())
        loop.close()

    thread = threading.Thread(target=run, name="webhook-deliverer", daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield box[0]
    finally:
        loop.call_soon_threadsafe(box[0].stop.set)
        thread.join(30)


def wait_for(check: Callable[[], Any], timeout_s: float = 20.0, every_s: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy; that value (AssertionError after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout_s} s: {check}")
        time.sleep(every_s)


def claim(db: Engine, job_id: str) -> ClaimedJob:
    """Claim one queued job as a worker does (moved to a queue of its own first, so nothing else is claimed)."""
    queue = f"hooks-{secrets.token_hex(4)}"
    with db.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == job_id).values(queue=queue))
    with db.connect() as conn:
        claimed = lifecycle.claim_batch(
            conn, queue=queue, worker_id="test-worker", lease_s=60, max_images=8, token_budget=10**6
        )
    assert [c.id for c in claimed] == [job_id]
    return claimed[0]


def succeed(db: Engine, job_id: str) -> ClaimedJob:
    """Claim the job and record its success with one output, through the worker's fenced write."""
    job = claim(db, job_id)
    output = {
        "index": 0,
        "key": f"results/{job.tenant_id}/{job.id}/0.png",
        "width": 256,
        "height": 256,
        "seed": job.request["seed"],
        "format": "png",
        "bytes": 1,
        "sha256": "0" * 64,
    }
    with db.connect() as conn:
        assert lifecycle.record_success(conn, job, outputs=[output], inference_ms=1, upload_ms=1)
    return job


def deliveries(db: Engine, **where: str) -> list[dict[str, Any]]:
    """The deliveries of a job (``job_id=``) or batch (``batch_id=``)."""
    query = select(webhook_deliveries).order_by(webhook_deliveries.c.created_at)
    for name, value in where.items():
        query = query.where(webhook_deliveries.c[name] == value)
    with db.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


def attempts(db: Engine, delivery_id: str) -> list[dict[str, Any]]:
    """A delivery's attempt rows, in order."""
    with db.connect() as conn:
        return [
            dict(r)
            for r in conn.execute(
                select(webhook_attempts)
                .where(webhook_attempts.c.delivery_id == delivery_id)
                .order_by(webhook_attempts.c.attempt)
            ).mappings()
        ]


def settled(db: Engine, delivery_id: str) -> dict[str, Any] | None:
    """The delivery once it succeeded or failed, else None."""
    with db.connect() as conn:
        row = conn.execute(select(webhook_deliveries).where(webhook_deliveries.c.id == delivery_id)).mappings().one()
    return dict(row) if row["status"] in ("succeeded", "failed") else None
