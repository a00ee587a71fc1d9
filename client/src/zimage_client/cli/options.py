"""What every command shares: the connection options (``--api-url``, ``--api-key``, from ``ZIMAGE_API_URL`` and
``ZIMAGE_API_KEY``), the client they make, the two consoles, and parsing of ``WxH`` sizes."""

from __future__ import annotations

from dataclasses import dataclass

import typer
from rich.console import Console

from ..client import Client
from ..watch import PollBackoff

out = Console(highlight=False, soft_wrap=True)  # results a script may read: ids, paths, JSON
err = Console(stderr=True, highlight=False)  # progress, messages, errors

# Polls a little more often than the SDK's default: a person is watching the bar.
CLI_POLL = PollBackoff(initial_s=0.25, factor=1.5, max_s=2.0)


@dataclass(frozen=True)
class Connection:
    """The service the command talks to."""

    api_url: str | None
    api_key: str | None
    timeout: float

    def client(self) -> Client:
        """A client of this service (ConfigError when the URL or key is missing)."""
        return Client(self.api_url, self.api_key, timeout=self.timeout, poll=CLI_POLL)


def connection(ctx: typer.Context) -> Connection:
    """The connection options of the current invocation."""
    obj = ctx.find_root().obj
    assert isinstance(obj, Connection)
    return obj


def parse_size(value: str) -> tuple[int, int]:
    """``1024x768`` as (1024, 768); BadParameter otherwise."""
    width, sep, height = value.lower().replace("×", "x").partition("x")
    if not sep or not width.strip().isdigit() or not height.strip().isdigit():
        raise typer.BadParameter(f"{value!r} is not WIDTHxHEIGHT, e.g. 1024x1024")
    return int(width), int(height)
