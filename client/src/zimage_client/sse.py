"""Server-sent events (``text/event-stream``) decoded from lines, as the WHATWG HTML standard describes: fields
``event``, ``data`` (lines joined by newlines), ``id`` and ``retry``; comment lines (``:``) ignored; an event
dispatched at each blank line, an unfinished one at the end of the stream dropped."""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ServerSentEvent:
    """One dispatched event."""

    event: str = "message"
    data: str = ""
    id: str | None = None  # the last event id seen so far (what a reconnect sends as Last-Event-ID)
    retry: int | None = None  # milliseconds, if the server set a reconnection time

    def json(self) -> Any:
        """The data parsed as JSON (None if it is not JSON)."""
        try:
            return json.loads(self.data)
        except ValueError:
            return None


class SSEDecoder:
    """Feed lines (without their line ending) one at a time; a blank line returns the event it completes."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self._last_id: str | None = None
        self._retry: int | None = None

    def decode(self, line: str) -> ServerSentEvent | None:
        """Take one line; the completed event at a blank line, else None."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return ServerSentEvent(event=event or "message", data="\n".join(data), id=self._last_id, retry=self._retry)


def _split(chunk: str) -> list[str]:
    # httpx's iter_lines already splits on \r\n, \r and \n; a caller feeding raw text may not have.
    return chunk.splitlines() or [""]


def iter_events(lines: Iterable[str]) -> Iterator[ServerSentEvent]:
    """The events of a stream of lines."""
    decoder = SSEDecoder()
    for chunk in lines:
        for line in _split(chunk):
            event = decoder.decode(line)
            if event is not None:
                yield event


async def aiter_events(lines: AsyncIterable[str]) -> AsyncIterator[ServerSentEvent]:
    """The events of an async stream of lines."""
    decoder = SSEDecoder()
    async for chunk in lines:
        for line in _split(chunk):
            event = decoder.decode(line)
            if event is not None:
                yield event
