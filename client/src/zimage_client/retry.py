"""When to try a request again, and how long to wait first: exponential backoff with full jitter, or the
server's ``Retry-After`` when it sent one. Shared by the sync and async clients, which only sleep differently."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

# Answers worth another try: the service said so (429, 503); nothing else is retried.
RETRY_STATUSES = frozenset({429, 503})

# Failures to connect or to read an answer; the request may or may not have reached the server, which is why
# every create call carries an Idempotency-Key that its retries reuse.
RETRY_EXCEPTIONS: tuple[type[Exception], ...] = (httpx.TransportError,)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or an HTTP date); None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry.

    Args:
        attempts: tries in all, the first included (1: never retry).
        base_s: the first backoff's ceiling; each further try doubles it.
        cap_s: no backoff ceiling grows past this.
        max_retry_after_s: a longer ``Retry-After`` is not waited for: the error is raised instead.
    """

    attempts: int = 5
    base_s: float = 0.5
    cap_s: float = 20.0
    max_retry_after_s: float = 120.0
    rng: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def backoff(self, retry: int) -> float:
        """Full jitter: a uniform delay in [0, min(cap, base * 2**retry)) before retry number ``retry`` (0-based)."""
        return self.rng() * min(self.cap_s, self.base_s * 2**retry)

    def delay(self, retry: int, retry_after: float | None = None) -> float | None:
        """The wait before retry ``retry`` (0-based), or None when no try is left or the server asks too much."""
        if retry + 1 >= self.attempts:
            return None
        if retry_after is not None:
            return retry_after if retry_after <= self.max_retry_after_s else None
        return self.backoff(retry)

    def delay_after_response(self, retry: int, response: httpx.Response, keyed: bool) -> float | None:
        """The wait before trying again after ``response``, or None when it is final (success or a real error).

        A 409 is retried only for a call with an Idempotency-Key: it means the first try of that same call is
        still being written on the server, and the next try will answer with its result.
        """
        status = response.status_code
        if status in RETRY_STATUSES or (keyed and status == 409):
            return self.delay(retry, parse_retry_after(response.headers.get("retry-after")))
        return None


NO_RETRY = RetryPolicy(attempts=1)
