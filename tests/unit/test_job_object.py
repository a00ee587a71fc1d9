"""The job object reads only the columns it names (``core.job_object.COLUMNS``): the group commit fetches just
those for each 202, so a column read but not named would be missing there."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import pytest

from core.job_object import COLUMNS, job_object
from core.models import jobs


class _Only(Mapping[str, Any]):
    """A row that refuses every column but ``COLUMNS``."""

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    def __getitem__(self, key: str) -> Any:
        if key not in COLUMNS:
            raise AssertionError(f"job_object read {key!r}, which COLUMNS does not name")
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(COLUMNS)

    def __len__(self) -> int:
        return len(COLUMNS)


@pytest.mark.parametrize("status", ["queued", "running", "succeeded", "failed", "canceled"])
def test_job_object_reads_only_the_columns_it_names(status: str) -> None:
    now = datetime.now(UTC)
    row = {c.name: None for c in jobs.columns} | {
        "id": "job_x", "status": status, "kind": "generate", "request": {"prompt": "p"}, "priority": 5,
        "attempt": 1, "progress_step": 1, "progress_total": 8, "error_code": "x", "error_message": "y",
        "outputs": [{"key": "results/a.png"}], "timings": {}, "created_at": now, "metadata": {},
    }  # fmt: skip
    presign = lambda key: (f"http://s3/{key}", now)  # noqa: E731
    read = job_object(_Only(row), presign=presign, queue_position=3)
    assert read == job_object(row, presign=presign, queue_position=3)
    assert set(COLUMNS) <= {c.name for c in jobs.columns}
