"""Bulk submission: a 10 000-job ``POST /v1/batches`` against the real API, Postgres and Redis, beside a plain
reference in the same run (the same rows by one COPY in one transaction plus one pipelined publish, no HTTP and no
validation), so the ratio survives this machine's drift. Then the batch's manifest: its time and the API
process's peak memory while streaming it.

    python -m bench.batch_bench [--jobs 10000] [--rounds 3] [--out bench/results/batch.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
from sqlalchemy import text

from bench.api_stack import api_under_test
from core import ids
from core.db import make_engine
from core.queue import broker_key, publish
from core.schemas import JobRequest
from core.settings import Settings
from core.submission import build_job_row

_COLUMNS = "id, tenant_id, batch_id, batch_index, kind, queue, group_key, cost_tokens, priority, request, metadata," \
    " max_attempts, dispatched_at"


def batch_body(n: int) -> dict[str, Any]:
    """A bulk pipeline's batch: n product prompts at 768x768, 4 seeds each, a little metadata per job."""
    return {
        "defaults": {"width": 768, "height": 768, "num_images": 4},
        "jobs": [{"prompt": f"product shot of item {i}, studio light, white background", "seed": i * 4,
                  "metadata": {"sku": f"SKU-{i:05d}"}} for i in range(n)],
    }  # fmt: skip


def reference(settings: Settings, tenant_id: str, body: dict[str, Any], client: redis.Redis) -> float:
    """Seconds for the plain way: build the rows, one COPY in one transaction, one pipelined publish."""
    started = time.perf_counter()
    batch_id = ids.batch_id()
    reqs = [JobRequest.model_validate({**body["defaults"], **job}) for job in body["jobs"]]
    rows = [build_job_row(r, tenant_id=tenant_id, max_attempts=3, batch_id=None, batch_index=i)
            for i, r in enumerate(reqs)]  # fmt: skip
    url = settings.database_url.replace("postgresql+psycopg://", "postgresql://")
    now = datetime.now(UTC)
    with psycopg.connect(url) as conn, conn.cursor() as cur, cur.copy(f"COPY jobs ({_COLUMNS}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row((row["id"], row["tenant_id"], None, row["batch_index"], row["kind"], row["queue"],
                            row["group_key"], row["cost_tokens"], row["priority"], json.dumps(row["request"]),
                            json.dumps(row["metadata"]), row["max_attempts"], now))  # fmt: skip
    publish(client, settings.redis_prefix, [(row["id"], row["queue"]) for row in rows])
    del batch_id
    return time.perf_counter() - started


def fresh(settings: Settings, client: redis.Redis, prefix: str) -> None:
    """Empty the job tables and this run's Redis keys, so rounds do not grow each other's indexes."""
    db = make_engine(settings, pool_size=1)
    with db.begin() as conn:
        conn.execute(text("TRUNCATE jobs CASCADE"))
        conn.execute(text("DELETE FROM batches"))
    with db.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE jobs"))
    db.dispose()
    for k in client.scan_iter(f"{prefix}*"):
        client.delete(k)


def service(api: httpx.Client, body: bytes, client: redis.Redis, broker: str) -> tuple[float, float, str]:
    """Seconds to the 202, seconds until every job is in Redis, and the batch id."""
    before = client.llen(broker)
    started = time.perf_counter()
    answer = api.post("/v1/batches", content=body, headers={"Content-Type": "application/json"})
    accepted = time.perf_counter() - started
    answer.raise_for_status()
    n = answer.json()["counts"]["total"]
    deadline = time.monotonic() + 60
    while client.llen(broker) - before < n and time.monotonic() < deadline:
        time.sleep(0.005)
    return accepted, time.perf_counter() - started, answer.json()["id"]


class PeakRss:
    """Samples a process's resident memory every 5 ms while running."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.start = pid, 0, _rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss(self.pid))


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def manifest(api: httpx.Client, settings: Settings, batch_id: str, pid: int) -> dict[str, Any]:
    """Mark the batch's jobs succeeded with 4 outputs each (as the workers would), then stream its manifest."""
    db = make_engine(settings, pool_size=1)
    with db.begin() as conn:
        conn.execute(text(
            "UPDATE jobs SET status = 'succeeded', finished_at = now(), outputs = (SELECT jsonb_agg(jsonb_build_object("
            "'index', i, 'key', 'results/t/' || id || '/' || i || '.png', 'width', 768, 'height', 768,"
            " 'seed', i, 'format', 'png', 'bytes', 1000000, 'sha256', md5(id) || md5(id)))"
            " FROM generate_series(0, 3) i) WHERE batch_id = :b"), {"b": batch_id})  # fmt: skip
    db.dispose()
    with PeakRss(pid) as rss:
        started = time.perf_counter()
        lines = 0
        size = 0
        with api.stream("GET", f"/v1/batches/{batch_id}/manifest") as answer:
            answer.raise_for_status()
            for line in answer.iter_lines():
                lines += 1
                size += len(line)
        seconds = time.perf_counter() - started
    return {"lines": lines, "mib": round(size / 2**20, 1), "seconds": round(seconds, 2),
            "api_rss_before_mib": round(rss.start / 2**20), "api_rss_peak_mib": round(rss.peak / 2**20),
            "api_rss_growth_mib": round((rss.peak - rss.start) / 2**20, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the reference and the service side by side, then the manifest; print the table, write JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.batch_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench/results/batch.json")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="zimage-batch-bench-"))
    body = batch_body(args.jobs)
    raw = json.dumps(body).encode()
    with api_under_test(work) as under:
        settings, client, prefix = under.settings, under.redis, under.settings.redis_prefix
        broker = broker_key(prefix, "generate")
        db = make_engine(settings, pool_size=1)
        with db.connect() as conn:
            tenant_id = conn.execute(text("SELECT id FROM tenants WHERE name = :t"), {"t": under.tenant}).scalar_one()
        db.dispose()
        with httpx.Client(base_url=under.url, headers={"Authorization": f"Bearer {under.key}"}, timeout=120) as api:
            service(api, json.dumps(batch_body(200)).encode(), client, broker)  # warm the process up
            refs, accepts, alls, batch_id = [], [], [], ""
            for _ in range(args.rounds):
                fresh(settings, client, prefix)  # each side of each round starts from the same empty tables
                refs.append(reference(settings, tenant_id, body, client))
                fresh(settings, client, prefix)
                accepted, everything, batch_id = service(api, raw, client, broker)
                accepts.append(accepted)
                alls.append(everything)
            shown = manifest(api, settings, batch_id, under.pid)
    result = {
        "jobs": args.jobs,
        "body_mib": round(len(raw) / 2**20, 2),
        "reference_s": round(statistics.median(refs), 3),
        "accept_s": round(statistics.median(accepts), 3),
        "all_in_redis_s": round(statistics.median(alls), 3),
        "rounds": {"reference": [round(x, 3) for x in refs], "accept": [round(x, 3) for x in accepts],
                   "all_in_redis": [round(x, 3) for x in alls]},  # fmt: skip
        "manifest": shown,
    }
    result["accept_vs_reference"] = round(result["accept_s"] / result["reference_s"], 2)
    print(f"{args.jobs}-job batch ({result['body_mib']} MiB JSON), median of {args.rounds}, this machine:")
    print(f"  reference (COPY + one pipelined publish, no HTTP): {result['reference_s']:.3f} s")
    print(f"  POST /v1/batches to the 202:                       {result['accept_s']:.3f} s"
          f"  ({result['accept_vs_reference']}x the reference)")  # fmt: skip
    print(f"  ... until every job is in Redis:                   {result['all_in_redis_s']:.3f} s")
    print(f"  manifest: {shown['lines']} lines, {shown['mib']} MiB in {shown['seconds']} s; API RSS "
          f"{shown['api_rss_before_mib']} -> peak {shown['api_rss_peak_mib']} MiB")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
