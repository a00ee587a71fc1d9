"""A bulk submission as the API receives it: JSON (``defaults`` + ``jobs``) or NDJSON (one job a line), checked
whole. One bad job refuses the batch, and the refusal lists every bad job by index, so a client fixes them all
in one round.

``parse_batch`` checks the body's shape; each job is checked by ``BatchSubmission.check`` as the rows are
written, so validating 10 000 jobs overlaps with Postgres storing them (the transaction rolls back if any job is
bad, so nothing is half-written).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import HttpUrl, TypeAdapter, ValidationError

from core.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType, ValidationFailed
from core.schemas import JobRequest, error_details, metadata_problem

JSON_TYPES = ("application/json",)
NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl", "application/jsonlines")
_TOP_LEVEL = {"defaults", "jobs", "metadata", "webhook_url"}
MAX_DETAILS = 1000  # problems listed in one refusal; the message says how many there were
_URL: TypeAdapter[HttpUrl] = TypeAdapter(HttpUrl)


@dataclass(frozen=True)
class BatchSubmission:
    """A batch whose body parsed: its jobs as sent, the defaults under them, the batch's own metadata and the
    webhook called when it completes or is canceled (its shape checked; the submit checks where it points)."""

    items: list[Any]
    defaults: dict[str, Any]
    metadata: dict[str, Any]
    webhook_url: str | None = None

    def check(self, index: int) -> JobRequest | list[dict[str, Any]]:
        """Job ``index`` as a request with the defaults applied, or its problems (each naming ``index``)."""
        item = self.items[index]
        if not isinstance(item, dict):
            return [{"index": index, "field": "body", "message": "a job must be an object"}]
        try:
            return JobRequest.model_validate({**self.defaults, **item} if self.defaults else item)
        except ValidationError as exc:
            return error_details(exc, index=index)

    def requests(self) -> list[JobRequest]:
        """Every job as a request; ValidationFailed listing every problem of every job."""
        jobs: list[JobRequest] = []
        problems: list[dict[str, Any]] = []
        for index in range(len(self.items)):
            checked = self.check(index)
            if isinstance(checked, list):
                problems.extend(checked)
            else:
                jobs.append(checked)
        if problems:
            raise refusal(problems)
        return jobs


def refusal(problems: list[dict[str, Any]]) -> ValidationFailed:
    """The 422 of a batch with these problems: every bad index named, nothing created."""
    return ValidationFailed(_summary(problems), problems[:MAX_DETAILS])


def parse_batch(body: bytes, content_type: str, *, max_jobs: int) -> BatchSubmission:
    """Parse a batch body and check its shape; BadRequest for a body that is not JSON / NDJSON, PayloadTooLarge
    past ``max_jobs``, ValidationFailed for a bad top level. The jobs themselves are checked by ``check``."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media in NDJSON_TYPES:
        defaults: dict[str, Any] = {}
        metadata: dict[str, Any] = {}
        webhook_url = None
        items = _ndjson_lines(body)
    elif media in JSON_TYPES or not media:
        defaults, items, metadata, webhook_url = _json_body(body)
    else:
        raise UnsupportedMediaType(
            "send the batch as application/json or application/x-ndjson",
            [{"field": "Content-Type", "message": f"unsupported content type {media!r}"}],
        )
    if not items:
        raise ValidationFailed("a batch needs at least one job", [{"field": "jobs", "message": "must not be empty"}])
    if len(items) > max_jobs:
        raise PayloadTooLarge(
            f"a batch holds at most {max_jobs} jobs, this one has {len(items)}",
            [{"field": "jobs", "message": f"at most {max_jobs} jobs"}],
        )
    return BatchSubmission(items, defaults, metadata, webhook_url)


def _json_body(body: bytes) -> tuple[dict[str, Any], list[Any], dict[str, Any], str | None]:
    """``defaults``, ``jobs``, ``metadata`` and ``webhook_url`` of a JSON batch body."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ValidationFailed("a JSON batch is an object", [{"field": "body", "message": "must be an object"}])
    problems = [{"field": key, "message": "unknown field"} for key in data if key not in _TOP_LEVEL]
    defaults, items, metadata = data.get("defaults", {}), data.get("jobs"), data.get("metadata", {})
    if not isinstance(defaults, dict):
        problems.append({"field": "defaults", "message": "must be an object"})
    if not isinstance(items, list):
        problems.append({"field": "jobs", "message": "must be a list of job requests"})
    if not isinstance(metadata, dict):
        problems.append({"field": "metadata", "message": "must be an object"})
    elif (problem := metadata_problem(metadata)) is not None:
        problems.append({"field": "metadata", "message": problem})
    webhook_url = data.get("webhook_url")
    if webhook_url is not None:
        try:
            webhook_url = str(_URL.validate_python(webhook_url, strict=True))
        except ValidationError as exc:
            problems.append({"field": "webhook_url", "message": exc.errors(include_url=False)[0]["msg"]})
    if problems:
        raise ValidationFailed(_summary(problems), problems)
    return defaults, items, metadata, webhook_url  # type: ignore[return-value]


def _ndjson_lines(body: bytes) -> list[Any]:
    """One JSON value per non-blank line; BadRequest naming every line that is not JSON."""
    items: list[Any] = []
    bad: list[dict[str, Any]] = []
    for number, line in enumerate(body.splitlines()):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except (ValueError, UnicodeDecodeError):
            bad.append({"index": len(items) + len(bad), "field": "body", "message": f"line {number + 1} is not JSON"})
    if bad:
        raise BadRequest(f"{len(bad)} line(s) of the body are not valid JSON", bad[:MAX_DETAILS])
    return items


def _summary(problems: list[dict[str, Any]]) -> str:
    """One sentence naming how many jobs (or fields) are bad."""
    indexes = sorted({p["index"] for p in problems if "index" in p})
    if not indexes:
        return "invalid batch: " + ", ".join(p["field"] for p in problems)
    shown = ", ".join(str(i) for i in indexes[:20]) + (", ..." if len(indexes) > 20 else "")
    return f"invalid batch: {len(indexes)} job(s) refused (index {shown}); nothing was created"
