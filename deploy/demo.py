"""``make demo``: start the stack on the embedded defaults, submit English and Chinese prompts as one batch
through the SDK (``zimage_client``), follow it with a live progress bar (server-sent events), save its manifest
and download every image (written atomically, checked against its sha256) into ``demo-output/`` with an offline
``index.html``, edit the first image in every mode, print a summary and the gallery link, and stop everything it
started (also on Ctrl-C). A tiny LoRA adapter (made with peft on the tiny checkpoint) is uploaded first, and the
first prompts run twice in the batch, bare and with the adapter, side by side in the gallery; the first prompt also
runs on Z-Image Base (CFG, a negative prompt, Base's 28 steps) right beside its Turbo image.
"""

from __future__ import annotations

import html
import io
import json
import shutil
import signal
import socket
import statistics
import sys
import time
from typing import Any

from PIL import Image, ImageDraw
from rich.console import Console

from core.admin import create_key
from deploy.seaweed import pick_ports
from deploy.stack import ROOT, Stack, dev_settings
from deploy.tiny_adapter import build_tiny_adapter
from zimage_client import Batch, Client, Job, ZImageError
from zimage_client.cli.progress import BatchProgress

OUT = ROOT / "demo-output"
STYLED = 4  # the first prompts also run with the demo adapter, each right after its bare twin

PROMPTS = [
    ("a red fox in fresh snow at dawn, telephoto, soft light", 256, 256),
    ("一名穿著紅色漢服的年輕中國女子", 256, 256),
    ("a lighthouse on a cliff during a storm, oil painting", 384, 256),
    ("一只在竹林里吃竹子的大熊猫，水墨画风格", 256, 384),
    ("isometric cutaway of a tiny coffee shop, 3d render", 256, 256),
    ("夜晚的上海外滩，霓虹灯倒映在黄浦江上", 384, 256),
    ("macro photo of a dew drop on a green leaf", 256, 256),
    ("a vintage robot reading a newspaper in a cafe", 256, 384),
    ("雪山下的藏族村庄，清晨的阳光", 256, 256),
    ("a bowl of ramen with steam rising, food photography", 512, 512),
    ("watercolor map of an imaginary archipelago", 384, 256),
    ("一杯冒着热气的龙井茶，放在木桌上", 256, 256),
    ("an astronaut riding a horse on the moon, cinematic", 256, 384),
    ("a cozy reading nook with rain on the window", 256, 256),
    ("敦煌壁画风格的飞天仙女", 384, 256),
    ("a paper boat floating on a puddle after rain", 256, 256),
    ("neon sign that says OPEN above a noodle bar", 256, 256),
    ("秋天的故宫，红墙黄叶", 256, 384),
]


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _port(preferred: int) -> int:
    """``preferred`` when free on loopback, else any free port."""
    for candidate in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free port")


def _edits(client: Client, source_job: Job) -> list[Job]:
    """Upload one generated image and edit it in every mode this stack serves."""
    if source_job["status"] != "succeeded":
        return []
    source = client.read_output(source_job["outputs"][0])
    upload = client.upload(source, filename="source.png")
    width, height = upload["width"], upload["height"]
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=255)
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    mask_upload = client.upload(buf.getvalue(), filename="mask.png")
    base = {"kind": "edit", "width": width, "height": height, "seed": 77, "input_images": [{"upload_id": upload["id"]}]}
    requests = [
        {**base, "mode": "img2img", "prompt": "the same scene as a watercolor painting", "strength": 0.6},
        {**base, "mode": "inpaint", "prompt": "a full moon", "mask": {"upload_id": mask_upload["id"]}},
        {**base, "mode": "instruct", "prompt": "把背景换成下雨的纽约街道"},
    ]
    submitted = []
    for request in requests:
        try:
            submitted.append(client.submit(request))
        except ZImageError as exc:  # instruct needs an Edit checkpoint; a stack without one says so
            print(f"  {request['mode']}: {exc}")
    return submitted


def _gallery(entries: list[dict[str, Any]]) -> str:
    cards = []
    for e in entries:
        img = f'<img src="{html.escape(e["file"])}" loading="lazy">' if e.get("file") else "<div>no image</div>"
        cards.append(
            f"<figure>{img}<figcaption><b>{html.escape(e['prompt'])}</b><br>"
            f"{e['width']}×{e['height']} · seed {e['seed']} · {html.escape(e['status'])} · "
            f"{e['latency_ms']} ms</figcaption></figure>"
        )
    return (
        "<!doctype html><meta charset=utf-8><title>Z-Image demo</title>"
        "<style>body{font:14px system-ui;margin:2em}main{display:grid;"
        "grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:1em}"
        "img{width:100%;image-rendering:pixelated;border-radius:4px}figure{margin:0}</style>"
        "<h1>Z-Image demo</h1><p>Tiny random-weight checkpoint: the images are noise, every code path is real."
        f"</p><main>{''.join(cards)}</main>"
    )


def run() -> int:
    """Run the demo; returns the process exit code."""
    run_dir = ROOT / ".run" / "demo"
    # SeaweedFS also takes port + 10000 for gRPC: when 8333 is busy, let its own picker choose a valid pair.
    api_port, s3_port = _port(8000), 8333 if _free(8333) and _free(18333) else pick_ports().s3
    settings = dev_settings(run_dir, s3_port=s3_port, api_port=api_port)
    stack = Stack(settings, run_dir, api_port=api_port, s3_port=s3_port)
    print(f"starting SeaweedFS (:{s3_port}), the API (:{api_port}) and a worker ({settings.turbo_model}) ...")
    started = time.monotonic()
    try:
        stack.start()
        print(f"stack ready in {time.monotonic() - started:.1f} s; logs in {run_dir / 'logs'}")
        key = create_key(settings, "demo")
        style = build_tiny_adapter(settings.turbo_model, run_dir / "demo-style.safetensors", seed=7)
        with Client(stack.api_url, key) as client:
            adapter = client.create_adapter(style, name="demo-style")
            print(f"uploaded adapter {adapter['name']} ({adapter['id']}): rank {adapter['rank']} on"
                  f" {len(adapter['target_modules'])} layers, checked against the served transformer")  # fmt: skip
            return _submit_and_collect(client, stack.api_url, adapter["id"], base=bool(settings.base_model))
    finally:
        print("stopping the stack ...")
        stack.stop()
        print("stopped.")


def _batch_jobs(adapter_id: str, *, base: bool = False) -> list[dict[str, Any]]:
    """One job per prompt; the first ``STYLED`` prompts again with the adapter, right after their bare twin; with
    ``base``, the first prompt also on Z-Image Base (its defaults: CFG, 28 steps), beside its Turbo image."""
    jobs = []
    for i, (prompt, width, height) in enumerate(PROMPTS):
        job = {"prompt": prompt, "width": width, "height": height, "seed": 1000 + i, "metadata": {"demo_index": i}}
        jobs.append(job)
        if base and i == 0:
            on_base = {"model": "z-image-base", "negative_prompt": "blurry, low quality"}
            jobs.append({**job, **on_base, "metadata": {"demo_index": i, "model": "z-image-base"}})
        if i < STYLED:
            lora = [{"adapter_id": adapter_id, "scale": 1.0}]
            jobs.append({**job, "loras": lora, "metadata": {"demo_index": i, "adapter": "demo-style"}})
    return jobs


def _submit_and_collect(client: Client, api_url: str, adapter_id: str, *, base: bool = False) -> int:
    t0 = time.monotonic()
    batch = client.submit_batch(_batch_jobs(adapter_id, base=base), metadata={"demo": "make demo"})
    print(f"submitted {batch['counts']['total']} jobs as one batch ({batch['id']}) in {time.monotonic() - t0:.2f} s")
    print(f"  live gallery while the demo runs: {api_url}{batch['gallery_url']}")
    with BatchProgress(Console(stderr=True), batch["id"], images_per_job=1) as bar:
        bar.update(batch)
        done: Batch = client.wait_batch(batch["id"], timeout=900, on_update=bar.update)
    wall = time.monotonic() - t0

    shutil.rmtree(OUT, ignore_errors=True)  # the demo's own folder: this run's images only
    OUT.mkdir()
    manifest = list(client.iter_manifest(batch["id"]))
    (OUT / "manifest.ndjson").write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in manifest))
    first_job = client.get(manifest[0]["job_id"])
    edits = _edits(client, first_job)
    finished: dict[str, Job] = {}
    if edits:
        print(f"editing the first image: {', '.join(e['request']['mode'] for e in edits)}")
        finished.update({e["id"]: client.wait(e["id"], timeout=900) for e in edits})

    entries, latencies, images = [], [], 0
    jobs = [client.get(line["job_id"]) for line in manifest] + [finished[e["id"]] for e in edits]
    for job in jobs:
        req = job["request"]
        label = f"[{req['mode']}] " if req.get("mode") else ""
        label += "[adapter demo-style] " if req.get("loras") else ""
        if req.get("model"):  # named only when it is not the kind's default (Turbo): the Base twin
            label += f"[{req['model']}, guidance {req['guidance_scale']:g}, {req['steps']} steps] "
        entry = {
            "prompt": label + req["prompt"],
            "width": req["width"],
            "height": req["height"],
            "seed": req["seed"],
            "status": job["status"],
            "latency_ms": job["timings"].get("total_ms"),
        }
        for out in job["outputs"]:
            name = f"{job['id']}-{out['index']}.{out['key'].rsplit('.', 1)[1]}"
            client.download(out, OUT / name)  # ChecksumMismatch (nothing written) unless it matches its sha256
            entry["file"] = name
            images += req["kind"] == "generate"
        if job["status"] == "succeeded":
            latencies.append(job["timings"]["total_ms"])
        entries.append(entry)
    (OUT / "index.html").write_text(_gallery(entries), encoding="utf-8")

    ok = sum(1 for e in entries if e["status"] == "succeeded")
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else latencies * 19
    print("\nsummary")
    print(f"  batch       {done['id']}: {done['status']}, {done['counts']['succeeded']} of {done['counts']['total']}"
          " succeeded")  # fmt: skip
    print(f"  jobs        {len(jobs)} in all (edits included), {ok} succeeded, {len(jobs) - ok} not")
    print(f"  images      {images} in {wall:.1f} s = {images / wall:.2f} images/s (batch submit to last image)")
    if latencies:
        print(f"  latency     p50 {statistics.median(latencies):.0f} ms, p95 {q[18]:.0f} ms (submit → succeeded)")
    print(f"  manifest    {OUT / 'manifest.ndjson'} (one line per job: status, seed, sha256, outputs)")
    print(f"  gallery     {OUT / 'index.html'} (offline copy; the live one stops with the stack)")
    return 0 if ok == len(jobs) else 1


def main() -> int:
    """Entry point: Ctrl-C and SIGTERM stop the stack cleanly."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        return run()
    except KeyboardInterrupt:
        print("interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
