"""What lets ``zimage batch`` resume: a small JSON file in the download folder (``.zimage-batch.json``) that maps
the input file's SHA-256 to the batch made from it. The Idempotency-Key is recorded *before* the batch is
submitted and the batch id right after, so a run stopped at any point (Ctrl-C, a crash, a lost connection)
re-attaches to the same batch when run again: with its id, or by submitting again under the same key, which
the service answers with the batch it already made."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

STATE_FILE = ".zimage-batch.json"


@dataclass(frozen=True)
class BatchRecord:
    """One input file's batch on one service."""

    input_sha256: str
    input_name: str
    api_url: str
    idempotency_key: str
    defaults: dict[str, Any]
    batch_id: str | None = None

    def matches(self, api_url: str, defaults: dict[str, Any]) -> bool:
        """Whether a new run with these settings is the same logical batch."""
        return self.api_url == api_url and self.defaults == defaults


class ResumeState:
    """The batch records of one folder."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / STATE_FILE

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"version": 1, "batches": {}}
        except ValueError as exc:
            raise ValueError(f"{self.path} is not valid JSON; delete it to start afresh") from exc
        if not isinstance(data, dict) or not isinstance(data.get("batches"), dict):
            raise ValueError(f"{self.path} is not a zimage batch record; delete it to start afresh")
        return data

    def get(self, input_sha256: str) -> BatchRecord | None:
        """The record of an input file, if any."""
        raw = self._load()["batches"].get(input_sha256)
        if not isinstance(raw, dict):
            return None
        try:
            return BatchRecord(**raw)
        except TypeError:
            return None

    def put(self, record: BatchRecord) -> None:
        """Save a record (atomically: the file is either the old one or the new one)."""
        data = self._load()
        data["batches"][record.input_sha256] = asdict(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f"{STATE_FILE}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
