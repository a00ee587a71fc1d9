"""JSON for the hot paths: orjson (a job object in a twentieth of the standard library's time), falling back to the
standard library for what orjson refuses (an integer past 64 bits, which a job's metadata may hold).

The output is what Starlette's ``JSONResponse`` writes: compact, UTF-8, non-ASCII kept. Values reaching here were
validated (no NaN or infinity: ``core.schemas``).
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError: an integer it cannot hold, say
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
