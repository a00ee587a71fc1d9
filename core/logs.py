"""Structured logs: one JSON object per line, carrying who and what a line is about.

Fields of every line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, the process's own fields
(``service``; a worker adds ``worker``), then those of the current context: ``request_id`` in the API, and for a
line about one job ``job_id``, ``batch_id``, ``tenant``, ``attempt`` (``bind``, set where the API handles a job
and where the worker settles one); fields passed with ``extra=`` follow, and ``exception`` holds a traceback.
Prompts are never added unless ``log_prompts`` is on (``job_fields``).

``configure`` installs the handler on the root logger at process start (the API's lifespan, the worker's start
hook), never at import.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

_context: ContextVar[Mapping[str, Any]] = ContextVar("zimage_log_context", default=MappingProxyType({}))
_process: dict[str, Any] = {}  # fields every line of this process carries (service, worker id)

# Attributes every LogRecord has: what is not among them came from ``extra=``.
_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: the fixed fields, the process's, the context's, then ``extra``."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_process,
            **_context.get(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


class _Ours(logging.StreamHandler):
    """The handler ``configure`` installs (found again and replaced by a second call)."""


def configure(*, level: str = "INFO", fmt: str = "json", stream: Any = None, **process: Any) -> None:
    """Log to ``stream`` (stderr) from the root logger at ``level``, as JSON lines (``fmt="json"``) or plain text;
    ``process`` fields (``service="api"``) go on every line. Idempotent; other handlers stay (a test's capture)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _Ours)]:
        root.removeHandler(handler)
    handler = _Ours(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    _process.clear()
    _process.update(process)
    # Uvicorn's loggers write text through their own handlers: send them through ours instead.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        server = logging.getLogger(name)
        server.handlers.clear()
        server.propagate = True


def set_process_fields(**fields: Any) -> None:
    """Add fields every line of this process carries from now on (a worker's id, once it has one)."""
    _process.update(fields)


@contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every line logged in this context (this thread or task) until the block ends."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def set_fields(**fields: Any) -> None:
    """Add ``fields`` to the current context for the rest of it (a request's task, once its job is known)."""
    _context.set({**_context.get(), **fields})


def job_fields(
    *, job_id: str, tenant: str, attempt: int, batch_id: str | None, prompt: str | None = None, log_prompts: bool
) -> dict[str, Any]:
    """The fields of a line about one job; the prompt only when ``log_prompts`` allows it."""
    fields: dict[str, Any] = {"job_id": job_id, "batch_id": batch_id, "tenant": tenant, "attempt": attempt}
    if log_prompts and prompt is not None:
        fields["prompt"] = prompt
    return fields
