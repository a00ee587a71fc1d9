"""Live events at scale: 1 000 open server-sent-event streams against the real API, Postgres and Redis while a
batch runs, and what they cost.

The batch's jobs are moved by the worker's own code (``core.lifecycle`` claims, heartbeats and successes, then
``core.events.publish``), run from this process without a model, so the two cores measure the API and not
inference. Figures: the API's memory and CPU with the streams open and idle; the delay from each write's commit
to its event reaching its stream (p50 / p99); single-job submissions (``wrk``, 32 connections) with and without
the streams open.

    python -m bench.events_bench [--streams 1000] [--out bench/results/events.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import text

from bench.api_stack import api_under_test
from core import events, lifecycle
from core.db import make_engine
from core.settings import Settings

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
wrk.body = '{"prompt": "a bulk asset, product shot on white", "width": 512, "height": 512}'
"""


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def submit_rate(url: str, key: str, work: Path, seconds: int) -> dict[str, float]:
    """req/s and p99 of POST /v1/jobs from 32 connections (wrk)."""
    script = work / "post.lua"
    script.write_text(_LUA % key)
    out = subprocess.run(
        ["wrk", "-t2", "-c32", f"-d{seconds}s", "--latency", "-s", str(script), f"{url}/v1/jobs"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    value = float(p99.group(1)) if p99 else float("nan")
    unit = p99.group(2) if p99 else "ms"
    p99_ms = value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
    return {"req_per_s": round(total / seconds, 1), "p99_ms": round(p99_ms, 1)}


class Streams:
    """N open event streams, one per job, recording when each event arrives."""

    def __init__(self, url: str, key: str, job_ids: list[str]) -> None:
        self.url, self.key, self.job_ids = url, key, job_ids
        self.arrived: dict[tuple[str, int], float] = {}  # (job, step or -1 for the end) -> time.time()
        self.opened = 0
        self.ended = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def open(self) -> None:
        limits = httpx.Limits(max_connections=len(self.job_ids) + 10, max_keepalive_connections=0)
        self.client = httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"},
                                        timeout=httpx.Timeout(10.0, read=None), limits=limits)  # fmt: skip
        for job_id in self.job_ids:
            self._tasks.append(asyncio.create_task(self._one(job_id)))
            await asyncio.sleep(0.002)  # open at about 500 a second
        while self.opened < len(self.job_ids):
            await asyncio.sleep(0.05)

    async def _one(self, job_id: str) -> None:
        async with self.client.stream("GET", f"/v1/jobs/{job_id}/events") as answer:
            self.opened += 1
            kind = None
            async for line in answer.aiter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    now = time.time()
                    if kind == "progress":
                        self.arrived[(job_id, data["progress"]["step"])] = now
                    elif data.get("status") == "succeeded":
                        self.arrived[(job_id, -1)] = now
        self.ended += 1

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.aclose()


def drive(settings: Settings, client: redis.Redis, queue: str, rate: float) -> dict[tuple[str, int], float]:
    """Run the batch's jobs as a worker's writes would, ``rate`` jobs a second: claim 8, 2 progress writes,
    success; each write's commit time by (job, step), -1 for the end."""
    db = make_engine(settings, pool_size=2)
    committed: dict[tuple[str, int], float] = {}
    per = 8
    while True:
        found: list[events.JobEvent] = []
        with db.connect() as conn:
            held = lifecycle.claim_batch(conn, queue=queue, worker_id="bench", lease_s=60, max_images=per,
                                         token_budget=10**9, events=found)  # fmt: skip
        if not held:
            break
        events.publish(client, settings.redis_prefix, found)
        started = time.monotonic()
        for step in (1, 2):
            found = []
            with db.connect() as conn:
                lifecycle.heartbeat(conn, held, steps=[step] * len(held), lease_s=60, events=found)
            at = time.time()
            events.publish(client, settings.redis_prefix, found)
            committed.update({(j.id, step): at for j in held})
        for job in held:
            found = []
            with db.connect() as conn:
                lifecycle.record_success(conn, job, outputs=[], inference_ms=1, upload_ms=1, events=found)
            committed[(job.id, -1)] = time.time()
            events.publish(client, settings.redis_prefix, found)
        pause = per / rate - (time.monotonic() - started)
        if pause > 0:
            time.sleep(pause)
    db.dispose()
    return committed


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"streams": args.streams}
    with api_under_test(work) as under:
        settings, client, key, pid = under.settings, under.redis, under.key, under.pid
        url = under.url
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}) as api:
            body = {"defaults": {"width": 256, "height": 256, "steps": 2},
                    "jobs": [{"prompt": f"stream {i}", "seed": i} for i in range(args.streams)]}  # fmt: skip
            batch = (await api.post("/v1/batches", json=body, timeout=60)).json()
        db = make_engine(settings, pool_size=1)
        with db.begin() as conn:  # the batch runs in its own queue, so wrk's jobs never mix in
            conn.execute(text("UPDATE jobs SET queue = 'events-bench' WHERE batch_id = :b"), {"b": batch["id"]})
            query = text("SELECT id FROM jobs WHERE batch_id = :b ORDER BY batch_index")
            job_ids = [r[0] for r in conn.execute(query, {"b": batch["id"]})]
        db.dispose()
        time.sleep(1)
        result["submit_without_streams"] = submit_rate(url, key, work, args.wrk_s)
        rss_before = _rss_mib(pid)
        streams = Streams(url, key, job_ids)
        await streams.open()
        await asyncio.sleep(2)
        rss_open = _rss_mib(pid)
        cpu0, wall0 = _cpu_s(pid), time.monotonic()
        await asyncio.sleep(args.idle_s)
        idle_cpu = (_cpu_s(pid) - cpu0) / (time.monotonic() - wall0)
        loop = asyncio.get_running_loop()
        result["submit_with_streams"] = await loop.run_in_executor(
            None, submit_rate, url, key, work, args.wrk_s
        )
        committed = await loop.run_in_executor(None, drive, settings, client, "events-bench", args.rate)
        deadline = time.monotonic() + 30
        while streams.ended < len(job_ids) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        # Each event a stream received, against the commit of the write it reports (a stream that was sent a
        # newer state first drops the older events: those are not counted, nor missing).
        delays = [(streams.arrived[k] - at) * 1000 for k, at in committed.items() if k in streams.arrived]
        ended = sum(1 for j in job_ids if (j, -1) in streams.arrived)
        await streams.close()
    delays.sort()
    result.update(
        api_rss_mib={"before": round(rss_before), "streams_open": round(rss_open),
                     "cost": round(rss_open - rss_before, 1)},  # fmt: skip
        api_idle_cpu_core_fraction=round(idle_cpu, 4),
        events={"writes": len(committed), "received": len(delays), "final_states_received": ended,
                "p50_ms": round(statistics.median(delays), 1),
                "p99_ms": round(delays[int(len(delays) * 0.99) - 1], 1), "max_ms": round(delays[-1], 1)},  # fmt: skip
        streams_ended=streams.ended,
    )
    without = result["submit_without_streams"]["req_per_s"]
    result["submit_loss"] = round(1 - result["submit_with_streams"]["req_per_s"] / without, 3)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the figures, write JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.events_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0, help="jobs finishing per second")
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--wrk-s", type=int, default=10)
    parser.add_argument("--out", default="bench/results/events.json")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install -y wrk")
        return 2
    work = Path(tempfile.mkdtemp(prefix="zimage-events-bench-"))
    result = asyncio.run(run(args, work))
    e = result["events"]
    print(f"{result['streams']} open event streams, this 2-core machine:")
    print(f"  API memory: {result['api_rss_mib']['before']} -> {result['api_rss_mib']['streams_open']} MiB "
          f"(+{result['api_rss_mib']['cost']} MiB); idle CPU {result['api_idle_cpu_core_fraction'] * 100:.1f}% "
          "of a core")  # fmt: skip
    print(f"  events: {e['received']} received for {e['writes']} writes, every job's final state: "
          f"{e['final_states_received']}/{result['streams']}; commit -> client p50 {e['p50_ms']} ms, "
          f"p99 {e['p99_ms']} ms, max {e['max_ms']} ms ({args.rate:.0f} jobs/s finishing)")  # fmt: skip
    print(f"  submits: {result['submit_without_streams']} without streams, "
          f"{result['submit_with_streams']} with them open "
          f"(loss {result['submit_loss'] * 100:.1f}%)")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
