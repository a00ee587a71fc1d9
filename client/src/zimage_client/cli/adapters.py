"""``zimage adapters``: upload, list, show and delete LoRA adapters; ``--lora ID[:SCALE]`` names them in jobs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from .options import connection, err, out

app = typer.Typer(help="LoRA adapters: upload once, then name them in jobs with --lora.", no_args_is_help=True)

Lora = Annotated[
    list[str] | None,
    typer.Option("--lora", help="An adapter to apply, ID or ID:SCALE (scale 0-2, default 1); up to 3."),
]


def parse_loras(values: list[str] | None) -> list[dict[str, Any]]:
    """``--lora`` values as the job field ``loras``."""
    loras = []
    for value in values or []:
        adapter_id, colon, scale = value.partition(":")
        try:
            loras.append({"adapter_id": adapter_id, "scale": float(scale) if colon else 1.0})
        except ValueError:
            raise typer.BadParameter(f"{value!r}: the scale after ':' must be a number", param_hint="--lora") from None
    return loras


@app.command()
def upload(
    ctx: typer.Context,
    file: Annotated[Path | None, typer.Argument(help="A LoRA .safetensors file.")] = None,
    url: Annotated[str | None, typer.Option(help="Or an https URL the service fetches.")] = None,
    name: Annotated[str | None, typer.Option(help="A name to know it by (default: the file name).")] = None,
) -> None:
    """Upload an adapter; it is checked against the served model. Prints its id (stdout)."""
    if (file is None) == (url is None):
        raise typer.BadParameter("give a FILE or --url")
    if file is not None and not file.is_file():
        raise typer.BadParameter(f"no such file: {file}")
    with connection(ctx).client() as client:
        adapter = client.create_adapter(file, url=url, name=name)
    err.print(
        f"{adapter['name']}: rank {adapter['rank']}, {len(adapter['target_modules'])} layers, {adapter['bytes']} bytes"
    )
    out.print(adapter["id"])


@app.command("list")
def list_(ctx: typer.Context, limit: Annotated[int, typer.Option(help="At most this many (≤ 100).")] = 100) -> None:
    """This tenant's adapters, newest first: id, rank, bytes, name."""
    with connection(ctx).client() as client:
        page = client.list_adapters(limit=limit)
    for adapter in page["data"]:
        out.print(f"{adapter['id']}\t{adapter['rank']}\t{adapter['bytes']}\t{adapter['name']}")


@app.command()
def show(ctx: typer.Context, adapter_id: Annotated[str, typer.Argument(help="lora_…")]) -> None:
    """One adapter as JSON."""
    with connection(ctx).client() as client:
        out.print_json(json.dumps(client.get_adapter(adapter_id)))


@app.command()
def delete(ctx: typer.Context, adapter_id: Annotated[str, typer.Argument(help="lora_…")]) -> None:
    """Delete an adapter (refused while queued or running jobs use it)."""
    with connection(ctx).client() as client:
        client.delete_adapter(adapter_id)
    err.print(f"deleted {adapter_id}")
