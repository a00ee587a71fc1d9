"""``zimage-webhooks`` (``python -m worker.webhooks``): the webhook delivery process.

A CPU-only asyncio process, apart from the GPU workers and the API: neither ever sends a webhook, so a slow or
hanging receiver costs them nothing. It loads no torch and no Celery (only ``core``, httpx and the database).

- **Woken promptly**: it LISTENs on ``zimage_webhooks``, which a trigger NOTIFYs when deliveries commit (the
  gate writes them in the terminal move's own statement); it also looks every ``ZIMAGE_WEBHOOK_POLL_S`` for
  retries that came due.
- **One delivery in flight per endpoint** (URL): a claim takes the oldest due delivery of each endpoint that has
  none in flight; an endpoint that answered 2xx gets its next due delivery claimed by the statement recording
  the last one, on the same keep-alive connection. At most ``ZIMAGE_WEBHOOK_CONCURRENCY`` endpoints at once.
- **Each attempt**: the body rendered now (fresh presigned URLs), signed (Standard Webhooks), the URL checked
  again (resolve, every address public unless allow-listed, connect to that address with the name kept in Host
  and TLS SNI), POSTed with a timeout and no redirects; an attempt row records the status code or the error and
  the latency. Non-2xx and timeouts are retried with backoff and full jitter for ``ZIMAGE_WEBHOOK_RETRY_FOR_S``,
  then the delivery is failed; a URL refused by the check fails at once, without connecting.
- Its sessions commit with ``synchronous_commit=off``: a crash may lose the last attempts' records, which only
  means sending those again (delivery is at least once; receivers deduplicate by ``webhook-id``).

Any number may run: claims are serialised by an advisory lock, and rows held elsewhere are skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import certifi
import httpx
import psycopg
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from core import storage, webhook_secrets
from core.presign import Presigner
from core.settings import Settings, get_settings
from core.webhook_delivery import CLAIM, CLAIM_LOCK, RECORD, Claimed, Outcome, lease_s, record_params, render, send

log = logging.getLogger("zimage.webhooks")

CHANNEL = "zimage_webhooks"
READY = "webhook delivery ready"  # logged once listening: deploy/stack.py waits for it
_RECORD_TRIES = 5


def presigner(settings: Settings) -> Callable[[str], tuple[str, datetime]]:
    """Presigned GET URLs for the job objects it sends: signed locally, or by boto3 for AWS's default endpoint."""
    if settings.presign_endpoint is not None:
        signer = Presigner(
            settings.presign_endpoint,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=settings.s3_secret_access_key,
            bucket=settings.s3_bucket,
        )
        return lambda key: signer.url(key, settings.presign_ttl_s)
    client = storage.make_s3_client(settings, public=True)
    return lambda key: storage.presign_get(client, settings.s3_bucket, key, settings.presign_ttl_s)


class Deliverer:
    """Claims due deliveries and runs one task per endpoint that has work, until ``stop`` is set."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db: AsyncEngine = create_async_engine(
            settings.database_url,
            pool_size=min(settings.webhook_concurrency, 16) + 2,
            max_overflow=settings.webhook_concurrency,
            pool_pre_ping=True,
            connect_args={
                "connect_timeout": 5,
                "options": "-c statement_timeout=30000 -c synchronous_commit=off",
            },
        )
        self.presign = presigner(settings)
        self.tls = ssl.create_default_context(cafile=certifi.where())
        self.wake = asyncio.Event()
        self.stop = asyncio.Event()
        self.inflight: dict[str, asyncio.Task[None]] = {}  # endpoint URL -> its task

    async def run(self) -> None:
        """Deliver until ``stop`` is set, then let the attempts in flight finish (up to one timeout)."""
        listener = asyncio.create_task(self._listen(), name="webhooks-listen")
        try:
            while not self.stop.is_set():
                self.wake.clear()
                try:
                    await self.claim_round()
                except Exception as exc:  # Postgres away: the next round tries again
                    log.warning("claim failed: %s", exc)
                await self._sleep()
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            if self.inflight:
                await asyncio.wait(list(self.inflight.values()), timeout=self.settings.webhook_timeout_s + 5)
            for task in self.inflight.values():
                task.cancel()
            await self.db.dispose()

    async def _sleep(self) -> None:
        """Until a NOTIFY, a finished endpoint task, ``stop``, or the poll interval."""
        waits = [asyncio.ensure_future(self.wake.wait()), asyncio.ensure_future(self.stop.wait())]
        try:
            await asyncio.wait(waits, timeout=self.settings.webhook_poll_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def claim_round(self) -> int:
        """Claim the oldest due delivery of each free endpoint (as many as there are free slots) and start a task
        for each; how many were claimed."""
        room = self.settings.webhook_concurrency - len(self.inflight)
        if room <= 0:
            return 0
        async with self.db.connect() as conn:
            if not await conn.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": CLAIM_LOCK}):
                await conn.rollback()  # another process is claiming right now; it will be our turn next round
                self.wake.set()
                return 0
            rows = (
                (
                    await conn.execute(
                        CLAIM, {"inflight": list(self.inflight), "limit": room, "lease_s": lease_s(self.settings)}
                    )
                )
                .mappings()
                .all()
            )
            await conn.commit()
        for row in rows:
            claimed = Claimed.from_row(row)
            task = asyncio.create_task(self._endpoint(claimed), name=f"webhook {claimed.url}")
            self.inflight[claimed.url] = task
        return len(rows)

    async def _endpoint(self, first: Claimed) -> None:
        """Send an endpoint's deliveries one after another over one client (its connections serve only this URL,
        so a TLS session is never shared between names), while it keeps answering 2xx and has some due."""
        try:
            async with httpx.AsyncClient(
                trust_env=False,  # no proxy from the environment: it would resolve names itself
                follow_redirects=False,
                verify=self.tls,
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            ) as http:
                current: Claimed | None = first
                while current is not None:
                    outcome = await self._attempt(http, current)
                    current = await self._record(current, outcome, claim_next=outcome.ok and not self.stop.is_set())
        except Exception:
            log.exception("webhook delivery to %s failed", first.url)
        finally:
            self.inflight.pop(first.url, None)
            self.wake.set()  # a slot is free

    async def _attempt(self, http: httpx.AsyncClient, d: Claimed) -> Outcome:
        """Render, sign and send one delivery."""
        keys = await self._keys(d)
        async with self.db.connect() as conn:
            body = await render(conn, self.settings, self.presign, d)
        if body is None:
            return Outcome(datetime.now(UTC), 0, error="the job or batch no longer exists", permanent=True)
        outcome = await send(http, self.settings, d, keys, body)
        if outcome.ok:
            log.debug("delivered %s to %s (%d, %d ms)", d.id, d.url, outcome.status_code, outcome.latency_ms)
        else:
            log.info("delivery %s to %s failed: %s", d.id, d.url, outcome.error or outcome.status_code)
        return outcome

    async def _keys(self, d: Claimed) -> webhook_secrets.SigningKeys:
        """The tenant's signing secrets (one made now for a tenant that had none)."""
        secret = d.secret
        if secret is None:
            async with self.db.connect() as conn:
                await conn.execute(webhook_secrets.fill_missing(d.tenant_id))
                secret = await conn.scalar(
                    text("SELECT webhook_secret FROM tenants WHERE id = :id"), {"id": d.tenant_id}
                )
                await conn.commit()
        return webhook_secrets.keys_from_row(
            str(secret), d.previous, d.rotated_at, grace_s=self.settings.webhook_secret_grace_s
        )

    async def _record(self, d: Claimed, outcome: Outcome, *, claim_next: bool) -> Claimed | None:
        """Record the attempt (and the retry or the end); the endpoint's next delivery when one was claimed."""
        params: dict[str, Any] = record_params(self.settings, d, outcome, claim_next=claim_next)
        for attempt in range(_RECORD_TRIES):
            try:
                async with self.db.connect() as conn:
                    row = (await conn.execute(RECORD, params)).mappings().first()
                    await conn.commit()
                return None if row is None else Claimed.from_row(row)
            except Exception as exc:  # Postgres away: the lease brings the delivery back if this never lands
                log.warning("recording delivery %s failed (%s); try %d", d.id, exc, attempt + 1)
                await asyncio.sleep(min(2.0**attempt, 10.0))
        return None

    async def _listen(self) -> None:
        """Set ``wake`` on each NOTIFY; reconnect after a lost connection (the poll covers the gap)."""
        url = make_url(self.settings.database_url).set(drivername="postgresql")
        conninfo = url.render_as_string(hide_password=False)
        ready = False
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    if not ready:
                        log.info(READY)
                        ready = True
                    self.wake.set()  # whatever was committed while not listening
                    async for _ in conn.notifies():
                        self.wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("LISTEN %s lost (%s); polling until it is back", CHANNEL, exc)
                await asyncio.sleep(1.0)


async def serve(settings: Settings) -> None:
    """Run a ``Deliverer`` until SIGTERM or SIGINT."""
    deliverer = Deliverer(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, deliverer.stop.set)
    await deliverer.run()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``zimage-webhooks`` / ``python -m worker.webhooks``."""
    parser = argparse.ArgumentParser(prog="zimage-webhooks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request; the attempts table has them all
    asyncio.run(serve(get_settings()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
