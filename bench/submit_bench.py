"""Submission throughput: single-job ``POST /v1/jobs`` from 32 concurrent clients (wrk) against the real API,
Postgres and Redis: a row per request, group commit, and group commit with the tenant's rate limit on (auth,
quotas and metrics are always on); then checks that every accepted job is in Postgres and Redis. Beside them, in
the same run, the reference: a trivial FastAPI app (``bench/trivial_app.py``: the same ``JobRequest``, validation
only) under the same load, before and after the others, so the API's rate is also stated as a ratio that survives
the drift of a shared machine.

    python -m bench.submit_bench [--duration 30] [--connections 32] [--out bench/results/submit.json]

Needs ``wrk`` (Debian package ``wrk``; ``make bench`` installs it).
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import text

from core.admin import create_key, set_limits
from core.db import drop_database, make_engine
from core.queue import broker_key
from core.settings import Settings
from deploy.seaweed import SeaweedServer
from deploy.stack import Stack, free_port

_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
wrk.body = '{"prompt": "a bulk asset, product shot on white", "width": 512, "height": 512}'
"""


def _latency_ms(output: str, percentile: str) -> float:
    """A percentile from wrk's --latency table, in ms."""
    match = re.search(rf"^\s+{percentile}%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
    if not match:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


@dataclass(frozen=True)
class Mode:
    """One row of the table."""

    name: str
    group_commit: bool = True
    rps: int | None = None  # the tenant's own rate limit (on, but above what wrk reaches: every request counted)
    reference: bool = False  # the trivial app instead of the API


QUOTA_JOBS = 100_000_000
REFERENCE = Mode("trivial app (reference)", reference=True)
MODES = [
    Mode("row per request", group_commit=False),
    Mode("group commit"),
    Mode("group commit + rate limit", rps=1_000_000),
]


def _wrk(script: Path, url: str, duration: int, connections: int) -> str:
    return subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def _figures(out: str, duration: int) -> dict[str, Any]:
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    refused = int(non2xx.group(1)) if non2xx else 0
    return {
        "requests": total,
        "accepted": total - refused,
        "refused": refused,
        "req_per_s": round(total / duration, 1),
        "p50_ms": _latency_ms(out, "50"),
        "p99_ms": _latency_ms(out, "99"),
    }


def run_reference(work: Path, *, duration: int, connections: int) -> dict[str, Any]:
    """The trivial app under the same wrk load, served by the same uvicorn options."""
    port = free_port()
    script = work / "reference.lua"
    script.write_text(_LUA % "none")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bench.trivial_app:app", "--host", "127.0.0.1", "--port", str(port),
         "--http", "api.head_limits:GuardedHttpTools", "--log-level", "warning", "--no-access-log"],
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the reference app did not start")
            time.sleep(0.2)
        time.sleep(1)
        out = _wrk(script, f"http://127.0.0.1:{port}/v1/jobs", duration, connections)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    return {"mode": REFERENCE.name, **_figures(out, duration), "all_accounted": True}


def run_mode(base: Settings, work: Path, mode: Mode, *, duration: int, connections: int) -> dict[str, Any]:
    """One wrk run against a fresh API process; the figures and the accounting of accepted jobs."""
    prefix = f"bench-{secrets.token_hex(4)}:"
    settings = base.model_copy(update={"group_commit": mode.group_commit, "redis_prefix": prefix})
    port = free_port()
    stack = Stack(settings, work / f"{prefix[:-1]}", api_port=port, s3_port=None)
    tenant = f"bench-{secrets.token_hex(4)}"
    key = create_key(settings, tenant)
    # The quotas are on in every row, set above what a run reaches (the default of 100 000 open jobs is within
    # 30 s of this load): every submit is counted, none refused.
    limits: dict[str, int | None] = {"max_queued_jobs": QUOTA_JOBS, "max_images_per_day": QUOTA_JOBS}
    if mode.rps is not None:
        limits["rate_limit_rps"] = mode.rps
    set_limits(settings, tenant, limits)
    script = work / "post.lua"
    script.write_text(_LUA % key)
    stack.run_dir.mkdir(parents=True, exist_ok=True)
    stack.start_api()
    try:
        time.sleep(1)
        out = _wrk(script, f"{stack.api_url}/v1/jobs", duration, connections)
        time.sleep(2)  # let the last publishes land
    finally:
        stack.stop()
    figures = _figures(out, duration)
    db = make_engine(settings, pool_size=1)
    with db.begin() as conn:
        rows = conn.execute(
            text("SELECT count(*), count(dispatched_at) FROM jobs j JOIN tenants t ON t.id = j.tenant_id"
                 " WHERE t.name = :t"), {"t": tenant},
        ).one()
        # The next mode runs with its own prefix: these queued rows must not look like its lost messages.
        conn.execute(text("DELETE FROM jobs"))
    db.dispose()
    broker = redis.Redis.from_url(settings.redis_url)
    in_redis = int(broker.llen(broker_key(prefix, "generate")))
    for k in broker.scan_iter(f"{prefix}*"):
        broker.delete(k)
    broker.close()
    accepted = figures["accepted"]
    return {
        "mode": mode.name,
        **figures,
        "in_postgres": rows[0],
        "dispatched": rows[1],
        "in_redis": in_redis,
        # wrk stops counting at the deadline; requests still in flight then may commit without being counted.
        "all_accounted": figures["refused"] == 0
        and rows[0] >= accepted
        and in_redis == rows[0]
        and rows[1] == rows[0],
    }


def main(argv: list[str] | None = None) -> int:
    """Run both modes, print the table, write JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.submit_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=30)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--out", default="bench/results/submit.json")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="zimage-submit-bench-"))
    database = f"postgresql+psycopg://postgres@127.0.0.1:5432/zimage_bench_{secrets.token_hex(3)}"
    from core.admin import migrate

    with SeaweedServer(work / "s3", access_key="bench", secret_key=secrets.token_urlsafe(16),
                       bucket="bench-results") as s3:
        base = Settings(database_url=database, s3_endpoint_url=s3.endpoint_url, s3_bucket=s3.bucket,
                        s3_access_key_id=s3.access_key, s3_secret_access_key=s3.secret_key)
        migrate(base)
        try:
            before = run_reference(work, duration=args.duration, connections=args.connections)
            results = [run_mode(base, work, mode, duration=args.duration, connections=args.connections)
                       for mode in MODES]
            after = run_reference(work, duration=args.duration, connections=args.connections)
        finally:
            drop_database(database)
    reference = round((before["req_per_s"] + after["req_per_s"]) / 2, 1)
    for r in results:
        r["of_reference"] = round(r["req_per_s"] / reference, 2)
    results[1]["speedup"] = round(results[1]["req_per_s"] / results[0]["req_per_s"], 2)
    print(f"POST /v1/jobs, {args.connections} connections, {args.duration} s, 1 uvicorn worker, this machine:")
    print(f"{'mode':<27} {'req/s':>8} {'x ref':>6} {'p50 ms':>8} {'p99 ms':>8} {'accepted':>9} {'in PG':>7} "
          f"{'in Redis':>9}")
    for r in [before, *results, after]:
        print(f"{r['mode']:<27} {r['req_per_s']:>8} {r.get('of_reference', 1.0):>6.2f} {r['p50_ms']:>8.1f} "
              f"{r['p99_ms']:>8.1f} {r['accepted']:>9} {r.get('in_postgres', '-'):>7} {r.get('in_redis', '-'):>9}")
    print(f"reference (mean of before and after): {reference} req/s; group commit / row per request: "
          f"{results[1]['speedup']}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps([before, *results, after], indent=1))
    return 0 if all(r["all_accounted"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
