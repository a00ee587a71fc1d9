"""Retrying transient failures with exponential backoff and full jitter; permanent failures pass through."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import psycopg
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from core.errors import Transient

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """How long to keep retrying: delay i is uniform in [0, min(cap_s, base_s * 2**i)], for ``deadline_s``."""

    base_s: float = 0.2
    cap_s: float = 5.0
    deadline_s: float = 60.0

    def delay(self, attempt: int) -> float:
        """The sleep before retry number ``attempt`` (0-based), with full jitter."""
        return random.uniform(0, min(self.cap_s, self.base_s * 2**attempt))


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same call later may succeed: lost database connections, S3 5xx and timeouts."""
    if isinstance(exc, Transient):
        return True
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    # The driver's own errors reach here where a statement runs on the raw connection (the group insert).
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return True
    if isinstance(exc, DBAPIError):
        return bool(exc.connection_invalidated)
    return isinstance(exc, ConnectionError | TimeoutError)


def retrying(fn: Callable[[], T], *, backoff: Backoff = Backoff(), what: str = "call") -> T:
    """Call ``fn`` until it succeeds, retrying transient errors until the backoff deadline; re-raise the rest."""
    deadline = time.monotonic() + backoff.deadline_s
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() >= deadline:
                raise
            pause = min(backoff.delay(attempt), max(0.0, deadline - time.monotonic()))
            log.warning("%s failed (%s: %s); retry %d in %.2f s", what, type(exc).__name__, exc, attempt + 1, pause)
            time.sleep(pause)
            attempt += 1


def db_call(db: Engine, fn: Callable[[Connection], T], *, deadline_s: float, what: str) -> T:
    """Run ``fn`` on a fresh connection of ``db``, retrying lost connections with backoff for ``deadline_s``."""

    def attempt() -> T:
        with db.connect() as conn:
            return fn(conn)

    return retrying(attempt, backoff=Backoff(deadline_s=deadline_s), what=what)
