"""Memory under hostile bodies: a flood of 600 KB invalid-JSON bodies must not leave the API process bigger.

Before ``api/memory.py`` the process grew from ~150 MB to 1.4-1.65 GB after a few hundred and stayed there: the
collector, tuned for latency, let the parse errors' reference cycles (which hold each body twice) pile up, and
glibc kept the freed blocks.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.helpers.api import auth
from tests.hostile.conftest import LiveApi, rss_mb

BODIES = 300


@pytest.mark.parametrize(
    "bad",
    [
        b'{"prompt": "' + b"a" * 600_000 + b'", ',  # truncated JSON, ASCII
        ('{"prompt": "' + "\u96ea" * 200_000 + '", ').encode(),  # truncated JSON, decoded as 2 bytes per character
    ],
    ids=["ascii", "cjk"],
)
def test_memory_returns_to_its_start_after_a_flood_of_invalid_json(live_api: LiveApi, bad: bytes) -> None:
    headers = {**auth(live_api.key), "Content-Type": "application/json"}
    with httpx.Client(base_url=live_api.url, timeout=30) as api:
        for i in range(30):  # warm: the code paths, caches and pools that a long-lived process has anyway
            assert api.post("/v1/jobs", json={"prompt": f"warm {i}"}, headers=headers).status_code == 202
            assert api.post("/v1/jobs", content=b"{nope", headers=headers).status_code == 400
        time.sleep(0.3)
        start = peak = rss_mb(live_api.pid)
        for i in range(BODIES):
            assert api.post("/v1/jobs", content=bad, headers=headers).status_code == 400
            if i % 25 == 0:
                peak = max(peak, rss_mb(live_api.pid))
        assert api.get("/v1/jobs", headers=headers).status_code == 200
        time.sleep(0.5)
        end = rss_mb(live_api.pid)
    print(f"\nRSS start {start:.0f} MB, peak {peak:.0f} MB, after {end:.0f} MB ({BODIES} bodies of {len(bad)} bytes)")
    assert end - start < 50, f"RSS grew from {start:.0f} to {end:.0f} MB"
    assert peak - start < 200, f"RSS peaked at {peak:.0f} MB (from {start:.0f})"
