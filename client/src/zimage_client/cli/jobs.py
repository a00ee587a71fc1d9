"""``zimage generate``, ``edit``, ``status`` and ``cancel``: one job (or batch) at a time."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from ..client import Client
from ..objects import Job
from . import exit_codes
from .adapters import Lora, parse_loras
from .options import connection, err, out, parse_size
from .progress import JobProgress

Size = Annotated[str | None, typer.Option("--size", "-s", help="WIDTHxHEIGHT, multiples of 16 (256-2048).")]
Count = Annotated[int, typer.Option("--num-images", "-n", help="Images of this prompt (1-8), seeds seed..seed+n-1.")]
Seed = Annotated[int | None, typer.Option(help="Seed of the first image (default: the service picks one).")]
Steps = Annotated[int | None, typer.Option(help="Denoising steps (default: the model's).")]
OutDir = Annotated[Path, typer.Option("--out", "-o", help="Where the images go, as <job id>-<index>.<ext>.")]
NoWait = Annotated[bool, typer.Option("--no-wait", help="Print the job id and return at once.")]
Timeout = Annotated[float | None, typer.Option(help="Give up waiting after this many seconds (exit 5).")]


class Format(StrEnum):
    """Output file formats."""

    png = "png"
    jpeg = "jpeg"
    webp = "webp"


class Mode(StrEnum):
    """Edit modes."""

    instruct = "instruct"
    img2img = "img2img"
    inpaint = "inpaint"


def _run(client: Client, request: dict[str, Any], folder: Path, no_wait: bool, timeout: float | None) -> None:
    """Submit, follow with a bar, download; exit 1 if the job did not succeed."""
    job = client.submit({k: v for k, v in request.items() if v is not None})
    if no_wait:
        out.print(job["id"])
        return
    err.print(f"submitted {job['id']}")
    with JobProgress(err, job["id"]) as bar:
        done = client.wait(job["id"], timeout=timeout, on_update=bar.update)
    _finish(client, done, folder)


def _finish(client: Client, job: Job, folder: Path) -> None:
    if job["status"] != "succeeded":
        error = job.get("error") or {"code": job["status"], "message": ""}
        err.print(f"[red]{job['id']} {job['status']}[/]: {error['code']} {error['message']}".rstrip())
        raise typer.Exit(exit_codes.FAILED)
    for path in client.download_outputs(job, folder):
        out.print(str(path))
    timings = job.get("timings") or {}
    err.print(f"{job['id']} succeeded in {timings.get('total_ms', '?')} ms")


def generate(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="What to draw (English or Chinese).")],
    size: Size = "1024x1024",
    num_images: Count = 1,
    seed: Seed = None,
    steps: Steps = None,
    guidance: Annotated[
        float | None, typer.Option(help="Guidance scale (default: the model's; Turbo 0, Base 4).")
    ] = None,
    negative: Annotated[str | None, typer.Option(help="Negative prompt (needs guidance > 0).")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="Image file format.")] = Format.png,
    priority: Annotated[int | None, typer.Option(help="0-9, higher first.")] = None,
    lora: Lora = None,
    model: Annotated[
        str | None, typer.Option(help="z-image-turbo (default) or z-image-base; `zimage models` lists them.")
    ] = None,
    out_dir: OutDir = Path("."),
    no_wait: NoWait = False,
    timeout: Timeout = None,
) -> None:
    """Generate images from a text prompt, wait for them, and download them (paths on stdout)."""
    width, height = parse_size(size or "1024x1024")
    request = {
        "prompt": prompt,
        "width": width,
        "height": height,
        "num_images": num_images,
        "seed": seed,
        "steps": steps,
        "guidance_scale": guidance,
        "negative_prompt": negative,
        "output_format": fmt.value,
        "priority": priority,
        "loras": parse_loras(lora),
        "model": model,
    }
    with connection(ctx).client() as client:
        _run(client, request, out_dir, no_wait, timeout)


def models(ctx: typer.Context) -> None:
    """The models this service serves: id, whether a worker is up, default steps and guidance, what it is for."""
    with connection(ctx).client() as client:
        for m in client.list_models():
            defaults = m["defaults"]
            up = "available" if m["available"] else "no worker up"
            print(
                f"{m['id']}\t{up}\t{defaults['steps']} steps\tguidance {defaults['guidance_scale']:g}\t{m['purpose']}"
            )


def _edit_size(width: int, height: int) -> tuple[int, int]:
    """An input image's size as an output size the service takes: multiples of 16 within 256-2048."""

    def fit(side: int) -> int:
        return min(2048, max(256, round(side / 16) * 16))

    return fit(width), fit(height)


def edit(
    ctx: typer.Context,
    image: Annotated[Path, typer.Argument(help="The image to edit (PNG, JPEG or WEBP); uploaded first.")],
    instruction: Annotated[str, typer.Argument(help="What to change (instruct) or what to draw (img2img, inpaint).")],
    mode: Annotated[
        Mode,
        typer.Option(
            help="instruct: an Edit checkpoint follows the instruction; img2img: redraw "
            "the whole image; inpaint: redraw where --mask is white."
        ),
    ] = Mode.instruct,
    mask: Annotated[Path | None, typer.Option(help="Inpaint mask, same size as IMAGE: white repaints.")] = None,
    strength: Annotated[
        float | None, typer.Option(help="img2img / inpaint: how far the input is noised (0-1).")
    ] = None,
    size: Size = None,
    num_images: Count = 1,
    seed: Seed = None,
    steps: Steps = None,
    lora: Lora = None,
    out_dir: OutDir = Path("."),
    no_wait: NoWait = False,
    timeout: Timeout = None,
) -> None:
    """Edit an image: upload it (and its mask), run the edit, download the results (paths on stdout)."""
    if (mode is Mode.inpaint) != (mask is not None):
        raise typer.BadParameter("--mask goes with --mode inpaint, and inpaint needs one", param_hint="--mask")
    if strength is not None and mode is Mode.instruct:
        raise typer.BadParameter("--strength applies to img2img and inpaint", param_hint="--strength")
    for path in (image, mask):
        if path is not None and not path.is_file():
            raise typer.BadParameter(f"no such file: {path}")
    with connection(ctx).client() as client:
        upload = client.upload(image)
        width, height = parse_size(size) if size else _edit_size(upload["width"], upload["height"])
        request: dict[str, Any] = {
            "kind": "edit",
            "mode": mode.value,
            "prompt": instruction,
            "input_images": [{"upload_id": upload["id"]}],
            "width": width,
            "height": height,
            "num_images": num_images,
            "seed": seed,
            "steps": steps,
            "strength": strength,
            "loras": parse_loras(lora),
        }
        if mask is not None:
            request["mask"] = {"upload_id": client.upload(mask)["id"]}
        _run(client, request, out_dir, no_wait, timeout)


def status(
    ctx: typer.Context,
    id_: Annotated[str, typer.Argument(metavar="ID", help="A job (job_…), batch (bat_…) or upload (upl_…) id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole object as JSON.")] = False,
) -> None:
    """Show a job, batch or upload (chosen by the id's prefix). Exit 1 if the job failed or was canceled, or
    if any job of the batch did."""
    with connection(ctx).client() as client:
        if id_.startswith("job_"):
            obj: Any = client.get(id_)
            failed = obj["status"] in ("failed", "canceled")
            line = f"{obj['id']} {obj['status']}"
            if obj.get("progress"):
                line += f" step {obj['progress']['step']}/{obj['progress']['total']}"
            if obj.get("error"):
                line += f": {obj['error']['code']} {obj['error']['message']}"
            line += "".join(f"\n  {o['index']}: {o['url']}" for o in obj.get("outputs", []))
        elif id_.startswith("bat_"):
            obj = client.get_batch(id_)
            c = obj["counts"]
            failed = bool(c["failed"] or c["canceled"])
            line = (
                f"{obj['id']} {obj['status']}: {c['succeeded']} succeeded, {c['failed']} failed, "
                f"{c['canceled']} canceled, {c['running']} running, {c['queued']} queued of {c['total']}"
            )
            if obj.get("gallery_url"):
                line += f"\n  gallery: {client.config.base_url}{obj['gallery_url']}"
        elif id_.startswith("upl_"):
            obj = client.get_upload(id_)
            failed = False
            line = f"{obj['id']} {obj['format']} {obj['width']}x{obj['height']} {obj['bytes']} bytes"
        else:
            raise typer.BadParameter("an id starts with job_, bat_ or upl_", param_hint="ID")
    out.print(json.dumps(obj, indent=2, ensure_ascii=False) if as_json else line)
    if failed:
        raise typer.Exit(exit_codes.FAILED)


def cancel(
    ctx: typer.Context,
    id_: Annotated[str, typer.Argument(metavar="ID", help="A job (job_…) or batch (bat_…) id.")],
) -> None:
    """Cancel a job, or every job of a batch not yet finished. Exit 1 if there was nothing left to cancel."""
    with connection(ctx).client() as client:
        if id_.startswith("job_"):
            obj: Any = client.cancel(id_)
        elif id_.startswith("bat_"):
            obj = client.cancel_batch(id_)
        else:
            raise typer.BadParameter("an id starts with job_ or bat_", param_hint="ID")
    out.print(f"{obj['id']} {obj['status']}")
