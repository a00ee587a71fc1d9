"""The whole service on the CPU with the tiny checkpoint: API + Redis + Postgres + one worker + SeaweedFS, on
the same workloads as ``bench.engine_bench``, side by side with the naive ``pipe(...)`` loop; and the service's
own overhead per job (submit → succeeded, minus inference) measured one job at a time.

The naive loop runs in this process on a slice of each workload just before and just after the service runs
the whole workload (the service idle meanwhile), so both see the same machine: on a shared 2-core VM the speed
of the cores drifts by tens of percent within minutes, and a ratio across separate runs would measure that.

    python -m bench.service_bench [--out bench/results/service.json]
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from bench import report, workloads
from bench.engine_bench import DEFAULT_CHECKPOINT, Timing, load_pipe, run_naive
from client import ZImageClient
from core.admin import create_key, migrate
from core.db import drop_database, make_engine
from core.settings import Settings
from deploy.seaweed import SeaweedServer
from deploy.stack import Stack, free_port
from deploy.tiny_checkpoint import ensure_tiny_turbo
from worker.engine import ImageRequest

COLUMNS = ["workload", "jobs", "images", "seconds", "images/s", "s/image", "naive images/s", "x naive"]
POLL_S = 0.05  # how often the bench asks Postgres whether the jobs are done (its own load on the 2 cores)


def as_api(job: ImageRequest) -> dict[str, Any]:
    """An engine request as the API request a client would send."""
    return {"prompt": job.prompt, "width": job.width, "height": job.height, "steps": job.steps,
            "guidance_scale": job.guidance_scale, "seed": job.seeds[0], "num_images": len(job.seeds)}


def _wait_terminal(db: Engine, tenant: str, n: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with db.connect() as conn:
            done = conn.execute(text(
                "SELECT count(*) FROM jobs j JOIN tenants t ON t.id = j.tenant_id"
                " WHERE t.name = :t AND j.status IN ('succeeded', 'failed', 'canceled')"), {"t": tenant}).scalar()
        if done == n:
            return
        time.sleep(POLL_S)
    raise TimeoutError(f"{n} jobs not finished after {timeout_s} s")


def run_workload(stack: Stack, db: Engine, name: str, jobs: list[ImageRequest]) -> dict[str, Any]:
    """Submit every job at once, wait for all; throughput from the first submit to the last success."""
    tenant = f"bench-{secrets.token_hex(4)}"
    key = create_key(stack.settings, tenant)
    started = time.monotonic()
    # Eight clients at once, as a bulk pipeline submits (their requests share group commits).
    with ZImageClient(stack.api_url, key) as client, ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda job: client.submit(as_api(job)), jobs))
    _wait_terminal(db, tenant, len(jobs), 900)
    seconds = time.monotonic() - started
    with db.connect() as conn:
        row = conn.execute(text(
            "SELECT count(*) FILTER (WHERE status = 'succeeded'),"
            " coalesce(sum((request->>'num_images')::int), 0)"
            " FROM jobs j JOIN tenants t ON t.id = j.tenant_id WHERE t.name = :t"), {"t": tenant}).one()
    assert row[0] == len(jobs), f"{name}: only {row[0]} of {len(jobs)} jobs succeeded"
    return {"workload": name, "jobs": len(jobs), "images": row[1], "seconds": round(seconds, 2),
            "images/s": round(row[1] / seconds, 2), "s/image": round(seconds / row[1], 3)}


def with_naive(row: dict[str, Any], before: Timing, after: Timing) -> dict[str, Any]:
    """The service row with the naive rate around it (both slices together) and the ratio."""
    images, seconds = before.images + after.images, before.seconds + after.seconds
    naive = images / seconds
    return {**row, "naive images/s": round(naive, 2), "x naive": round(row["images/s"] / naive, 2)}


def overhead(stack: Stack, db: Engine, n: int = 20) -> dict[str, float]:
    """Jobs one at a time: server-side (finished − created) − inference, in ms."""
    tenant = f"bench-{secrets.token_hex(4)}"
    key = create_key(stack.settings, tenant)
    ids = []
    with ZImageClient(stack.api_url, key) as client:
        for i in range(n):
            ids.append(client.submit({"prompt": f"overhead probe {i}", "width": 256, "height": 256, "seed": i})["id"])
            _wait_terminal(db, tenant, i + 1, 60)
    with db.connect() as conn:
        rows = conn.execute(text(
            "SELECT (extract(epoch FROM finished_at - created_at) * 1000)::float AS total,"
            " (timings->>'inference_ms')::float AS inference, (timings->>'upload_ms')::float AS upload,"
            " (timings->>'queued_ms')::float AS queued FROM jobs WHERE id = ANY(:ids)"), {"ids": ids}).all()
    over = sorted(r.total - r.inference for r in rows)
    return {
        "jobs": n,
        "overhead_p50_ms": round(statistics.median(over), 1),
        "overhead_p90_ms": round(over[int(0.9 * (n - 1))], 1),
        "queued_p50_ms": round(statistics.median(r.queued for r in rows), 1),
        "upload_p50_ms": round(statistics.median(r.upload for r in rows), 1),
        "inference_p50_ms": round(statistics.median(r.inference for r in rows), 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the service on each workload; print the table; write JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.service_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/service.json"))
    parser.add_argument("--jobs", type=int, default=200)
    # The engine bench's 120 jobs at 512² (200 there would not fit `make bench` in its 5 minutes on 2 cores).
    parser.add_argument("--jobs-512", type=int, default=120)
    parser.add_argument("--seeds", type=int, default=64)
    parser.add_argument("--naive-share", type=int, default=6, help="the naive loop runs 1/N of each workload, twice")
    args = parser.parse_args(argv)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="zimage-service-bench-"))
    checkpoint = ensure_tiny_turbo(DEFAULT_CHECKPOINT)
    pipe = load_pipe(checkpoint)
    database = f"postgresql+psycopg://postgres@127.0.0.1:5432/zimage_bench_{secrets.token_hex(3)}"
    plans = [
        ("256² mixed", workloads.mixed(args.jobs, 256)),
        ("512² mixed", workloads.mixed(args.jobs_512, 512, seed=1)),
        ("256² one prompt", workloads.one_prompt(args.seeds, 256)),
    ]
    with SeaweedServer(work / "s3", access_key="bench", secret_key=secrets.token_urlsafe(16),
                       bucket="bench-results") as s3:
        settings = Settings(
            database_url=database, redis_prefix=f"bench-{secrets.token_hex(3)}:", turbo_model=str(checkpoint),
            s3_endpoint_url=s3.endpoint_url, s3_bucket=s3.bucket, s3_access_key_id=s3.access_key,
            s3_secret_access_key=s3.secret_key, device="cpu", dtype="float32",
        )
        migrate(settings)
        port = free_port()
        stack = Stack(settings, work / "stack", api_port=port, s3_port=None, worker_queues="generate")
        db = make_engine(settings, pool_size=1)
        try:
            stack.start()
            rows = []
            for name, jobs in plans:
                part = max(4, len(jobs) // args.naive_share)
                # Untimed: each side's first call at this size (allocator, RoPE tables), as bench.engine_bench does.
                run_naive(jobs[:1], pipe)
                run_workload(stack, db, f"{name} (warm-up)", jobs[:1])
                before = run_naive(jobs[:part], pipe)
                row = run_workload(stack, db, name, jobs)
                rows.append(with_naive(row, before, run_naive(jobs[-part:], pipe)))
                print(f"service {name}: {row['images/s']} images/s ({rows[-1]['x naive']}x naive)", file=sys.stderr,
                      flush=True)
            probe = overhead(stack, db)
        finally:
            stack.stop()
            db.dispose()
            drop_database(database)
    print(report.table(rows, COLUMNS))
    print(f"service overhead per job (one at a time, {probe['jobs']} jobs): p50 {probe['overhead_p50_ms']} ms, "
          f"p90 {probe['overhead_p90_ms']} ms (queued {probe['queued_p50_ms']}, upload {probe['upload_p50_ms']})")
    ratio = rows[0]["x naive"]
    print(f"goal whole service >= 1.3x naive at 256²: {ratio}x ({'met' if ratio >= 1.3 else 'NOT met'}); "
          f"goal overhead p50 <= 25 ms: {probe['overhead_p50_ms']} ms "
          f"({'met' if probe['overhead_p50_ms'] <= 25 else 'NOT met'}); {time.monotonic() - started:.0f} s in all")
    report.write_json(args.out, {
        "bench": "service", "environment": report.environment(), "rows": rows, "overhead": probe,
        "goals": {"service_over_naive_256": {"target": 1.3, "measured": ratio},
                  "overhead_p50_ms": {"target": 25, "measured": probe["overhead_p50_ms"]}},
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
