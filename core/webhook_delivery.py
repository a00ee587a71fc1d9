"""Sending webhook deliveries: claim what is due, one delivery in flight per endpoint; render the body fresh; POST it
signed to the checked address; record the attempt and the retry, or the end.

The statements are plain SQL (``text``), run by the delivery process (``worker/webhooks.py``) on its own
connections. ``next_attempt_at`` is the due time of a ``pending`` delivery and the lease of a ``delivering``
one: a delivery whose process died is due again once its lease runs out (it may then be sent twice, which the
receiver recognises by its ``webhook-id``).

Claims are serialised by an advisory lock, so two delivery processes never take two deliveries of one URL at
once; the URL's next delivery is claimed by the statement that records the last one, so a healthy endpoint is
fed without waiting for the next claim round.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from core import webhook_secrets
from core.batch_object import batch_object, counts_query, tally
from core.errors import ValidationFailed
from core.fetch import pinned
from core.job_object import Presigner, job_object
from core.models import batches, jobs
from core.settings import Settings
from core.webhook_urls import webhook_address

CLAIM_LOCK = 0x5A574844  # "ZWHD": serialises claims across delivery processes
MAX_ERROR_CHARS = 500
MAX_ANSWER_BYTES = 64 * 1024  # read (and drop) this much of an answer so the connection can be reused
USER_AGENT = "zimage-webhooks/1"

_UNSETTLED = "w.status IN ('pending', 'delivering')"
_RETURNED = """
    w.id, w.tenant_id, w.job_id, w.batch_id, w.url, w.attempts,
    t.webhook_secret, t.webhook_secret_previous, t.webhook_secret_rotated_at
"""

# The oldest due delivery of each endpoint that has none in flight (a ``delivering`` row within its lease), the
# endpoints longest waiting first. Rows another claimer or recorder holds are skipped, never waited for.
CLAIM = text(
    f"""
WITH due AS (
    SELECT w.url, min(w.next_attempt_at) AS first_due FROM webhook_deliveries w
    WHERE {_UNSETTLED} AND w.next_attempt_at <= clock_timestamp()
    GROUP BY w.url
), free AS (
    SELECT due.url FROM due
    WHERE due.url <> ALL(CAST(:inflight AS text[]))
      AND NOT EXISTS (
          SELECT 1 FROM webhook_deliveries b
          WHERE b.url = due.url AND b.status = 'delivering' AND b.next_attempt_at > clock_timestamp()
      )
    ORDER BY due.first_due
    LIMIT :limit
), picked AS (
    SELECT d.id FROM free CROSS JOIN LATERAL (
        SELECT w.id FROM webhook_deliveries w
        WHERE w.url = free.url AND {_UNSETTLED} AND w.next_attempt_at <= clock_timestamp()
        ORDER BY w.next_attempt_at, w.id
        LIMIT 1
        FOR UPDATE SKIP LOCKED
    ) d
)
UPDATE webhook_deliveries w
SET status = 'delivering', next_attempt_at = clock_timestamp() + make_interval(secs => :lease_s)
FROM picked, tenants t
WHERE w.id = picked.id AND t.id = w.tenant_id
RETURNING {_RETURNED}
"""
)

# Record one attempt (fenced: only while this process still holds the delivery at the attempt count it claimed),
# and, after a success, claim the same endpoint's next due delivery in the same statement.
RECORD = text(
    f"""
WITH done AS (
    UPDATE webhook_deliveries w SET
        status = CASE
            WHEN :ok THEN 'succeeded'
            WHEN :permanent THEN 'failed'
            WHEN w.created_at + make_interval(secs => :retry_for_s)
                 < clock_timestamp() + make_interval(secs => :delay_s) THEN 'failed'
            ELSE 'pending' END,
        attempts = w.attempts + 1,
        next_attempt_at = clock_timestamp() + make_interval(secs => :delay_s),
        last_status_code = :status_code,
        last_error = :error,
        delivered_at = CASE WHEN :ok THEN clock_timestamp() END
    WHERE w.id = :id AND w.status = 'delivering' AND w.attempts = :attempts
    RETURNING w.id, w.attempts, w.status
), tried AS (
    INSERT INTO webhook_attempts (delivery_id, attempt, started_at, status_code, error, latency_ms)
    SELECT done.id, done.attempts, :started_at, :status_code, :error, :latency_ms FROM done
), nxt AS (
    SELECT w.id FROM webhook_deliveries w
    WHERE :claim_next AND EXISTS (SELECT 1 FROM done)
      AND w.url = :url AND w.status = 'pending' AND w.next_attempt_at <= clock_timestamp() AND w.id <> :id
    ORDER BY w.next_attempt_at, w.id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
UPDATE webhook_deliveries w
SET status = 'delivering', next_attempt_at = clock_timestamp() + make_interval(secs => :lease_s)
FROM nxt, tenants t
WHERE w.id = nxt.id AND t.id = w.tenant_id
RETURNING {_RETURNED}
"""
)


@dataclass(frozen=True)
class Claimed:
    """A delivery this process holds (``attempts`` as claimed fences its record), with its tenant's secrets."""

    id: str
    tenant_id: str
    job_id: str | None
    batch_id: str | None
    url: str
    attempts: int
    secret: str | None
    previous: str | None
    rotated_at: datetime | None

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Claimed:
        """A claimed delivery from a row of ``CLAIM`` or ``RECORD``."""
        return cls(
            id=row["id"],
            tenant_id=row["tenant_id"],
            job_id=row["job_id"],
            batch_id=row["batch_id"],
            url=row["url"],
            attempts=row["attempts"],
            secret=row["webhook_secret"],
            previous=row["webhook_secret_previous"],
            rotated_at=row["webhook_secret_rotated_at"],
        )


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to: the HTTP status or the error, when it started and how long it took."""

    started_at: datetime
    latency_ms: int
    status_code: int | None = None
    error: str | None = None
    permanent: bool = False  # no retry: the URL may not be called (SSRF) or the subject is gone

    @property
    def ok(self) -> bool:
        """A 2xx answer: the receiver took it."""
        return self.status_code is not None and 200 <= self.status_code < 300


def retry_delay(settings: Settings, attempt: int) -> float:
    """Seconds before the retry that follows attempt number ``attempt`` (1-based): exponential backoff with full
    jitter, uniform in [0, min(max, base * 6**(attempt-1))] (5 s, 30 s, 3 min, 18 min, then the 1 h cap)."""
    ceiling = min(settings.webhook_retry_max_s, settings.webhook_retry_base_s * 6 ** min(attempt - 1, 30))
    return random.uniform(0, ceiling)


def lease_s(settings: Settings) -> float:
    """How long a claim holds a delivery: one attempt's deadline and room to render and record it."""
    return settings.webhook_timeout_s + 30.0


def record_params(settings: Settings, d: Claimed, outcome: Outcome, *, claim_next: bool) -> dict[str, Any]:
    """The parameters of ``RECORD`` for one attempt's outcome."""
    return {
        "id": d.id,
        "url": d.url,
        "attempts": d.attempts,
        "ok": outcome.ok,
        "permanent": outcome.permanent,
        "retry_for_s": settings.webhook_retry_for_s,
        "delay_s": 0.0 if outcome.ok or outcome.permanent else retry_delay(settings, d.attempts + 1),
        "status_code": outcome.status_code,
        "error": outcome.error[:MAX_ERROR_CHARS] if outcome.error else None,
        "started_at": outcome.started_at,
        "latency_ms": outcome.latency_ms,
        "claim_next": claim_next,
        "lease_s": lease_s(settings),
    }


async def render(conn: AsyncConnection, settings: Settings, presign: Presigner, d: Claimed) -> bytes | None:
    """The body of a delivery, built now from its row (fresh presigned URLs): the job object, or the batch object.
    None when the job or batch no longer exists."""
    row: Any
    if d.job_id is not None:
        row = (await conn.execute(select(jobs).where(jobs.c.id == d.job_id))).mappings().first()
        body = None if row is None else job_object(row, presign=presign)
    else:
        row = (await conn.execute(select(batches).where(batches.c.id == d.batch_id))).mappings().first()
        body = None
        if row is not None:
            counts, finished = tally(await conn.execute(counts_query(row["id"])))
            body = batch_object(settings, row, counts, finished_at=finished)
    await conn.rollback()
    if body is None:
        return None
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


async def send(
    http: httpx.AsyncClient, settings: Settings, d: Claimed, keys: webhook_secrets.SigningKeys, body: bytes
) -> Outcome:
    """One attempt: check the URL again (resolve, every address public unless allow-listed), POST the signed body
    to the checked address with the name kept in Host and TLS SNI, follow no redirect, give up at the timeout."""
    started_at = datetime.now(UTC)
    clock = time.perf_counter()

    def took() -> int:
        return round((time.perf_counter() - clock) * 1000)

    try:
        url, address = await _checked(d.url, settings)
    except ValidationFailed as exc:
        # Refused before any connection: the URL points (now) where the service must not go. No retry.
        return Outcome(started_at, took(), error=f"refused: {exc.message}", permanent=True)
    target, host, extensions = pinned(url, address)
    payload = body.decode()
    headers = {
        **webhook_secrets.headers(keys, d.id, payload),
        **host,
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
    }
    request = http.build_request(
        "POST",
        target,
        content=body,
        headers=headers,
        timeout=httpx.Timeout(settings.webhook_timeout_s),
        extensions=extensions,
    )
    try:
        # One deadline for the whole attempt: a receiver that drips its answer meets it too.
        async with asyncio.timeout(settings.webhook_timeout_s):
            response = await http.send(request, stream=True)
            try:
                read = 0
                async for piece in response.aiter_raw():
                    read += len(piece)
                    if read > MAX_ANSWER_BYTES:
                        break
            finally:
                await response.aclose()
    except (TimeoutError, httpx.TimeoutException):
        return Outcome(started_at, took(), error=f"timeout: no answer within {settings.webhook_timeout_s:g} s")
    except httpx.HTTPError as exc:
        return Outcome(started_at, took(), error=f"{type(exc).__name__}: {exc}".rstrip(": "))
    return Outcome(started_at, took(), status_code=response.status_code)


async def _checked(url: str, settings: Settings) -> tuple[httpx.URL, str]:
    """The URL and its checked address; a name is resolved in a thread, an IP literal needs no lookup."""
    try:
        host = httpx.URL(url).raw_host.decode("ascii", "replace")
    except (httpx.InvalidURL, TypeError, ValueError):
        host = ""  # webhook_address refuses it with its reason
    if not host or _is_literal(host):
        return webhook_address(url, settings)
    return await asyncio.to_thread(webhook_address, url, settings)


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True
