"""``zimage webhooks verify``: check that a webhook request really comes from the service (Standard Webhooks
signature), from its body and headers or from a saved raw HTTP request."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import InvalidWebhook
from ..webhooks import verify_webhook
from . import exit_codes
from .options import err, out

app = typer.Typer(help="Webhook helpers.", no_args_is_help=True)


def parse_request(raw: bytes) -> tuple[dict[str, str], bytes]:
    """Headers and body of a saved HTTP request (an optional request line, headers, a blank line, the body)."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        head, found, body = raw.partition(sep)
        if found:
            break
    else:
        head, body = raw, b""
    headers: dict[str, str] = {}
    for line in head.decode("utf-8", "replace").splitlines():
        name, colon, value = line.partition(":")
        if colon and " " not in name.strip():
            headers[name.strip().lower()] = value.strip()
    return headers, body


def _read(path: Path) -> bytes:
    try:
        return sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc.strerror}") from exc


@app.command()
def verify(
    secret: Annotated[str, typer.Option(envvar="ZIMAGE_WEBHOOK_SECRET", help="The endpoint's whsec_… secret.")],
    body: Annotated[Path | None, typer.Option(help="The request body as received ('-': stdin).")] = None,
    header: Annotated[
        list[str] | None, typer.Option("--header", "-H", help="'name: value', repeated (webhook-id, …).")
    ] = None,
    request: Annotated[
        Path | None, typer.Option(help="A saved raw HTTP request (headers, blank line, body) instead.")
    ] = None,
    check_timestamp: Annotated[
        bool,
        typer.Option("--check-timestamp/--no-check-timestamp", help="Refuse a timestamp over 5 min from now."),
    ] = True,
) -> None:
    """Verify a webhook's signature; print its payload (stdout) if genuine, exit 1 if not."""
    if (request is None) == (body is None):
        raise typer.BadParameter("give either --request FILE, or --body FILE with --header lines")
    if request is not None:
        headers, data = parse_request(_read(request))
    else:
        assert body is not None
        data, headers = _read(body), {}
        for line in header or []:
            name, colon, value = line.partition(":")
            if not colon:
                raise typer.BadParameter(f"{line!r} is not 'name: value'", param_hint="--header")
            headers[name.strip().lower()] = value.strip()
    try:
        payload = verify_webhook(secret, data, headers, check_timestamp=check_timestamp)
    except InvalidWebhook as exc:
        err.print(f"[red]not genuine[/]: {exc.message}")
        raise typer.Exit(exit_codes.FAILED) from None
    err.print(f"[green]valid[/]: webhook-id {headers['webhook-id']}, timestamp {headers['webhook-timestamp']}")
    out.print(json.dumps(payload, indent=2, ensure_ascii=False))
