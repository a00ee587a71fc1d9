"""Streamed reading of the one ``file`` field of a multipart/form-data body, dropped at a byte cap: handed to a sink
as it arrives (an adapter, streamed on to S3), or kept whole (an image)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from core import errors

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

FILE_FIELD = "file"
# Room for the multipart framing around the file: boundaries, part headers, a few small form fields.
MULTIPART_OVERHEAD = 64 * 1024
MAX_PARTS = 16
MAX_TEXT_FIELD_BYTES = 4096  # a small text field kept beside the file (an adapter's name)


class FileSink(Protocol):
    """Where the ``file`` part's bytes go as they arrive."""

    def write(self, data: bytes) -> None:
        """The next bytes of the file (called from the parser: quick, no I/O)."""

    async def drain(self) -> None:
        """Called between network reads: the place to store what ``write`` collected (the body waits meanwhile)."""


@dataclass(frozen=True)
class Form:
    """What else a streamed form held: the file part's file name (the client's claim) and the text fields asked for."""

    filename: str | None
    fields: dict[str, str]


async def stream_file_field(
    request: Request,
    sink: FileSink,
    *,
    max_bytes: int,
    text_fields: Collection[str] = (),
    what: str = "the image",
) -> Form:
    """Hand the bytes of the multipart field ``file`` to ``sink`` as the body streams in, reading at most
    ``max_bytes`` plus framing, never more; other parts are skipped, except the small ``text_fields``."""
    content_type, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise errors.UnsupportedMediaType(
            f"send {what} as multipart/form-data with a '{FILE_FIELD}' field",
            [{"field": "Content-Type", "message": "must be multipart/form-data with a boundary"}],
        )
    limit = max_bytes + MULTIPART_OVERHEAD
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(max_bytes)
    reader = _FormReader(sink, max_bytes, text_fields)
    parser = MultipartParser(boundary, reader.callbacks())
    received = 0
    try:
        # The body is read as it streams and dropped at the cap, declared length or not (chunked uploads).
        async for piece in request.stream():
            received += len(piece)
            if received > limit:
                raise _too_large(max_bytes)
            parser.write(piece)
            await sink.drain()
        parser.finalize()
    except MultipartParseError as exc:
        raise errors.BadRequest(f"the body is not valid multipart/form-data ({exc})") from None
    return reader.result()


async def read_file_field(request: Request, *, max_bytes: int) -> bytes:
    """The bytes of the multipart field ``file``, reading at most ``max_bytes`` plus framing, never more."""
    sink = _Buffer()
    await stream_file_field(request, sink, max_bytes=max_bytes)
    return bytes(sink.data)


class _Buffer:
    """A sink that keeps the whole file (an image: at most 20 MiB)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data.extend(data)

    async def drain(self) -> None:
        return None


class _FormReader:
    """Multipart parser callbacks that hand the ``file`` part's bytes to a sink, keep the wanted text fields and
    skip every other part."""

    def __init__(self, sink: FileSink, max_bytes: int, text_fields: Collection[str]) -> None:
        self.sink = sink
        self.max_bytes = max_bytes
        self.text_fields = {name.encode(): name for name in text_fields}
        self.parts = 0
        self.files = 0
        self.file_bytes = 0
        self.filename: str | None = None
        self.fields: dict[str, str] = {}
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._current: str | None = None  # FILE_FIELD, a wanted text field's name, or None (skipped)
        self._text = bytearray()

    def callbacks(self) -> MultipartCallbacks:
        """The callback table MultipartParser takes."""
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def result(self) -> Form:
        """The form's file name and text fields; 422 when there is no ``file`` part."""
        if not self.files:
            raise _once_problem(FILE_FIELD, "is required")
        return Form(filename=self.filename, fields=dict(self.fields))

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise errors.ValidationFailed(
                f"at most {MAX_PARTS} multipart parts", [{"field": FILE_FIELD, "message": "too many parts"}]
            )
        self._disposition = b""
        self._current = None

    def _header_end(self) -> None:
        if bytes(self._header_name).strip().lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        # The name alone decides: the part's filename and declared Content-Type are the client's claims,
        # and the format is judged from the bytes.
        _, params = parse_options_header(self._disposition)
        name = params.get(b"name")
        if name == FILE_FIELD.encode():
            self.files += 1
            if self.files > 1:  # its bytes must not reach the sink after the first file's
                raise _once_problem(FILE_FIELD, "must be sent once")
            filename = params.get(b"filename")
            self.filename = filename.decode("utf-8", "replace") if filename is not None else None
            self._current = FILE_FIELD
        elif name in self.text_fields:
            field = self.text_fields[name]
            if field in self.fields:
                raise _once_problem(field, "must be sent once")
            self._current = field
            self._text.clear()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current is None:
            return
        if self._current == FILE_FIELD:
            self.file_bytes += end - start
            if self.file_bytes > self.max_bytes:
                raise _too_large(self.max_bytes)
            self.sink.write(data[start:end])
            return
        self._text.extend(data[start:end])
        if len(self._text) > MAX_TEXT_FIELD_BYTES:
            raise _field_problem(self._current, f"must be at most {MAX_TEXT_FIELD_BYTES} bytes")

    def _part_end(self) -> None:
        if self._current is not None and self._current != FILE_FIELD:
            try:
                self.fields[self._current] = self._text.decode("utf-8")
            except UnicodeDecodeError:
                raise _field_problem(self._current, "must be UTF-8 text") from None
        self._current = None


def _once_problem(field: str, problem: str) -> errors.ValidationFailed:
    return errors.ValidationFailed(f"the multipart field '{field}' {problem}", [{"field": field, "message": problem}])


def _field_problem(field: str, problem: str) -> errors.ValidationFailed:
    return errors.ValidationFailed(f"{field} {problem}", [{"field": field, "message": problem}])


def _too_large(max_bytes: int) -> errors.PayloadTooLarge:
    return errors.PayloadTooLarge(
        f"the file is over the upload limit of {max_bytes} bytes",
        [{"field": FILE_FIELD, "message": f"must be at most {max_bytes} bytes"}],
    )
