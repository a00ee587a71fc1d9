"""Streamed reading of the one ``file`` field of a multipart/form-data body, dropped at a byte cap."""

from __future__ import annotations

from typing import TYPE_CHECKING

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


async def read_file_field(request: Request, *, max_bytes: int) -> bytes:
    """The bytes of the multipart field ``file``, reading at most ``max_bytes`` plus framing, never more."""
    content_type, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise errors.UnsupportedMediaType(
            "send the image as multipart/form-data with a 'file' field",
            [{"field": "Content-Type", "message": "must be multipart/form-data with a boundary"}],
        )
    limit = max_bytes + MULTIPART_OVERHEAD
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(max_bytes)
    collector = _FileCollector(max_bytes)
    parser = MultipartParser(boundary, collector.callbacks())
    received = 0
    try:
        # The body is read as it streams and dropped at the cap, declared length or not (chunked uploads).
        async for piece in request.stream():
            received += len(piece)
            if received > limit:
                raise _too_large(max_bytes)
            parser.write(piece)
        parser.finalize()
    except MultipartParseError as exc:
        raise errors.BadRequest(f"the body is not valid multipart/form-data ({exc})") from None
    return collector.result()


class _FileCollector:
    """Multipart parser callbacks that keep the ``file`` part's bytes and skip every other part."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.files: list[bytearray] = []
        self.parts = 0
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._current: bytearray | None = None

    def callbacks(self) -> MultipartCallbacks:
        """The callback table MultipartParser takes."""
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
        }

    def result(self) -> bytes:
        """The file's bytes; 422 when there is no ``file`` part or more than one."""
        if len(self.files) != 1:
            problem = "is required" if not self.files else "must be sent once"
            raise errors.ValidationFailed(
                f"the multipart field '{FILE_FIELD}' {problem}", [{"field": FILE_FIELD, "message": problem}]
            )
        return bytes(self.files[0])

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
        if params.get(b"name") == FILE_FIELD.encode():
            self._current = bytearray()
            self.files.append(self._current)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current is None:
            return
        self._current.extend(data[start:end])
        if len(self._current) > self.max_bytes:
            raise _too_large(self.max_bytes)


def _too_large(max_bytes: int) -> errors.PayloadTooLarge:
    return errors.PayloadTooLarge(
        f"the file is over the upload limit of {max_bytes} bytes",
        [{"field": FILE_FIELD, "message": f"must be at most {max_bytes} bytes"}],
    )
