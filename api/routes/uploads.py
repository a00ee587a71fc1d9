"""``/v1/uploads``: store an input image for edit jobs, checked before it is decoded, and read it back."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy import insert, select
from starlette.concurrency import run_in_threadpool

from api.deps import ResourcesDep, TenantDep
from api.resources import Resources
from core import errors, ids, storage
from core.images import MAX_IMAGE_BYTES, ImageInfo, inspect_image
from core.job_object import rfc3339
from core.models import Upload, uploads
from core.schemas import ErrorBody

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])

FILE_FIELD = "file"
# Room for the multipart framing around the file: boundaries, part headers, a few small form fields.
MULTIPART_OVERHEAD = 64 * 1024
MAX_PARTS = 16

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 413, 415, 422, 503)
}
_MULTIPART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FILE_FIELD],
                    "properties": {FILE_FIELD: {"type": "string", "format": "binary"}},
                }
            }
        },
    }
}


class UploadObject(BaseModel):
    """An uploaded input image; ``width`` and ``height`` are as displayed (EXIF orientation applied)."""

    id: str
    object: Literal["upload"] = "upload"
    width: int
    height: int
    format: Literal["png", "jpeg", "webp"]
    bytes: int
    sha256: str
    created_at: str


@router.post("", status_code=201, response_model=UploadObject, responses=_ERRORS, openapi_extra=_MULTIPART_BODY)
async def create_upload(request: Request, res: ResourcesDep, tenant: TenantDep) -> dict[str, Any]:
    """Upload a PNG, JPEG or WEBP (multipart field ``file``, at most 20 MiB and 16 Mi pixels)."""
    data = await read_file_field(request, max_bytes=MAX_IMAGE_BYTES)
    # Parsing and decoding take CPU time: off the event loop, like the blocking S3 call.
    info = await run_in_threadpool(inspect_image, data, max_bytes=MAX_IMAGE_BYTES)
    upload = ids.upload_id()
    key = storage.upload_key(tenant, upload, info.ext)
    await run_in_threadpool(_store, res, key, data, info)
    async with res.db.begin() as conn:
        created_at = (
            await conn.execute(
                insert(Upload)
                .values(
                    id=upload,
                    tenant_id=tenant,
                    key=key,
                    width=info.width,
                    height=info.height,
                    format=info.format,
                    bytes=info.bytes,
                    sha256=info.sha256,
                )
                .returning(Upload.created_at)
            )
        ).scalar_one()
    return _upload_object(upload, info.width, info.height, info.format, info.bytes, info.sha256, created_at)


@router.get("/{upload_id}", response_model=UploadObject, responses=_ERRORS)
async def get_upload(upload_id: str, res: ResourcesDep, tenant: TenantDep) -> dict[str, Any]:
    """One upload of this tenant (another tenant's id is a 404, like an unknown one)."""
    async with res.db.connect() as conn:
        row = (
            await conn.execute(
                select(uploads).where(uploads.c.id == upload_id, uploads.c.tenant_id == tenant)
            )
        ).one_or_none()
    if row is None:
        raise errors.NotFound(f"no upload {upload_id}")
    return _upload_object(row.id, row.width, row.height, row.format, row.bytes, row.sha256, row.created_at)


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


def _store(res: Resources, key: str, data: bytes, info: ImageInfo) -> None:
    """Put the original bytes in S3 with their SHA-256 (the server verifies it); 503 when S3 fails."""
    try:
        storage.put_object_checked(res.s3_data, res.settings.s3_bucket, key, data, info.content_type)
    except storage.StorageError as exc:
        raise errors.Unavailable(f"storage is unavailable; the upload was not saved ({exc.code or 'error'})") from exc


def _upload_object(
    upload_id: str, width: int, height: int, fmt: str, size: int, sha256: str, created_at: datetime
) -> dict[str, Any]:
    """The API's view of an upload."""
    return {
        "id": upload_id,
        "object": "upload",
        "width": width,
        "height": height,
        "format": fmt,
        "bytes": size,
        "sha256": sha256,
        "created_at": rfc3339(created_at),
    }


def _too_large(max_bytes: int) -> errors.PayloadTooLarge:
    return errors.PayloadTooLarge(
        f"the file is over the upload limit of {max_bytes} bytes",
        [{"field": FILE_FIELD, "message": f"must be at most {max_bytes} bytes"}],
    )
