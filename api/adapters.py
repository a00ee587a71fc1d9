"""LoRA adapters of a tenant: a ``.safetensors`` file streamed to S3 while it is checked (from a multipart upload or
a URL), its row inserted once the whole file is stored and checked; list, read and delete.

Nothing is ever left behind by a refusal: the header is checked before the first byte is stored, a later refusal
(a length that does not match the header, a storage failure, a client gone) aborts the upload or deletes what was
stored, and a file without its row is unusable anyway. An adapter named by a queued or running job of the tenant
cannot be deleted.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime
from typing import Any

from fastapi import Request
from sqlalchemy import insert, select, text
from starlette.concurrency import run_in_threadpool

from api.adapter_writer import AdapterWriter
from api.cursors import cursor_pattern, decode_cursor, encode_cursor
from api.multipart import stream_file_field
from api.resources import Resources
from core import errors, ids, storage
from core.adapter_shapes import served_layers
from core.errors import PayloadTooLarge
from core.fetch import open_url, precheck_url
from core.job_object import rfc3339
from core.lora_file import LoraChecker, LoraFile
from core.models import adapters

log = logging.getLogger(__name__)

MAX_PAGE = 100
MAX_NAME = 200
NAME_FIELD = "name"
CURSOR_PATTERN = cursor_pattern("lora_")
_EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,16}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A job still to run that names the adapter (JSONB containment on the job's normalized request).
_IN_USE = text(
    """
    SELECT id FROM jobs
    WHERE tenant_id = :tenant AND status IN ('queued', 'running')
      AND request->'loras' @> jsonb_build_array(jsonb_build_object('adapter_id', CAST(:adapter AS text)))
    ORDER BY id LIMIT 1
    """
)


async def create_from_form(res: Resources, request: Request, *, tenant_id: str) -> dict[str, Any]:
    """An adapter from a multipart body (field ``file``, optional ``name``), streamed to S3 as it arrives."""
    adapter_id = ids.adapter_id()
    writer = _writer(res, tenant_id, adapter_id, field="file")
    try:
        form = await stream_file_field(
            request,
            writer,
            max_bytes=res.settings.max_adapter_bytes,
            text_fields=(NAME_FIELD,),
            what="the adapter (or JSON with its url)",
        )
        name = adapter_name(form.fields.get(NAME_FIELD), default=form.filename, adapter_id=adapter_id)
        summary, sha256 = await run_in_threadpool(writer.finish)
        return await _insert(res, tenant_id, adapter_id, writer, name, summary, sha256)
    except BaseException:
        await writer.abort_shielded()
        raise


async def create_from_url(res: Resources, *, tenant_id: str, url: str, name: str | None) -> dict[str, Any]:
    """An adapter fetched from ``url`` under the image-URL rules (SSRF-safe), streamed to S3 as it arrives."""
    settings = res.settings
    parsed = precheck_url(url, field="url", allow_hosts=settings.fetch_allow_hosts)  # no network: refuse early
    adapter_id = ids.adapter_id()
    name = adapter_name(name, default=parsed.path.rsplit("/", 1)[-1], adapter_id=adapter_id)
    writer = _writer(res, tenant_id, adapter_id, field="url")

    def fetch_and_store() -> tuple[LoraFile, str]:
        with open_url(
            url,
            field="url",
            allow_hosts=settings.fetch_allow_hosts,
            timeout_s=settings.adapter_fetch_timeout_s,
            max_bytes=settings.max_adapter_bytes,
            max_redirects=settings.fetch_max_redirects,
            accept="application/octet-stream",
            too_large=PayloadTooLarge,
        ) as body:
            for piece in body.pieces():
                writer.write(piece)
                writer.flush()  # sends a part only once one is waiting
        return writer.finish()

    try:
        summary, sha256 = await run_in_threadpool(fetch_and_store)
        return await _insert(res, tenant_id, adapter_id, writer, name, summary, sha256)
    except BaseException:
        await writer.abort_shielded()
        raise


def adapter_name(given: str | None, *, default: str | None, adapter_id: str) -> str:
    """The adapter's name: the one given (1-200 characters, no control characters; 422 otherwise), else the file
    name without its extension (cut to 200 characters), else the id."""
    if given is not None:
        name = given.strip()
        problem = None
        if not name:
            problem = "must not be empty"
        elif len(name) > MAX_NAME:
            problem = f"must be at most {MAX_NAME} characters"
        elif _CONTROL.search(name):
            problem = "must not contain control characters"
        if problem is not None:
            raise errors.ValidationFailed(f"{NAME_FIELD} {problem}", [{"field": NAME_FIELD, "message": problem}])
        return name
    base = re.split(r"[/\\]", default or "")[-1]
    base = _CONTROL.sub("", _EXTENSION.sub("", base)).strip()[:MAX_NAME].strip()
    return base or adapter_id


async def list_adapters(
    res: Resources, *, tenant_id: str, limit: int = 20, cursor: str | None = None
) -> dict[str, Any]:
    """A page of the tenant's adapters, newest first (ids sort by creation time)."""
    query = select(adapters).where(adapters.c.tenant_id == tenant_id)
    if cursor is not None:
        query = query.where(adapters.c.id < decode_cursor(cursor, "lora_"))
    query = query.order_by(adapters.c.id.desc()).limit(limit + 1)
    async with res.db.connect() as conn:
        rows = (await conn.execute(query)).mappings().all()
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1]["id"]) if len(rows) > limit else None
    return {"data": [adapter_object(r) for r in page], "next_cursor": next_cursor}


async def get_adapter(res: Resources, *, tenant_id: str, adapter_id: str) -> dict[str, Any]:
    """One adapter of the tenant; NotFound for an unknown id or another tenant's."""
    async with res.db.connect() as conn:
        row = (
            (await conn.execute(select(adapters).where(adapters.c.id == adapter_id, adapters.c.tenant_id == tenant_id)))
            .mappings()
            .first()
        )
    if row is None:
        raise errors.NotFound(f"no adapter {adapter_id!r}")
    return adapter_object(row)


async def delete_adapter(res: Resources, *, tenant_id: str, adapter_id: str) -> None:
    """Delete the adapter's row and its file; 409 while a queued or running job of the tenant names it, 503 when
    S3 cannot delete the file (then nothing is deleted)."""
    async with res.db.connect() as conn:
        key = (
            await conn.execute(
                select(adapters.c.key)
                .where(adapters.c.id == adapter_id, adapters.c.tenant_id == tenant_id)
                .with_for_update()
            )
        ).scalar()
        if key is None:
            raise errors.NotFound(f"no adapter {adapter_id!r}")
        user = (await conn.execute(_IN_USE, {"tenant": tenant_id, "adapter": adapter_id})).scalar()
        if user is not None:
            await conn.rollback()
            message = f"adapter {adapter_id} is used by {user}, which is queued or running; cancel it or let it end"
            raise errors.Conflict(message, [{"field": "adapter_id", "message": f"in use by {user}"}])
        await conn.execute(adapters.delete().where(adapters.c.id == adapter_id))
        try:
            await run_in_threadpool(storage.delete_keys, res.s3_data, res.settings.s3_bucket, [key])
        except errors.StorageError as exc:
            await conn.rollback()
            raise errors.Unavailable(f"storage is unavailable; the adapter was not deleted ({exc.s3_code})") from exc
        await conn.commit()
    log.info("adapter deleted", extra={"adapter_id": adapter_id, "tenant": tenant_id})


def adapter_object(row: Any) -> dict[str, Any]:
    """The API's view of an adapter."""
    return {
        "id": row["id"],
        "object": "adapter",
        "name": row["name"],
        "bytes": row["bytes"],
        "sha256": row["sha256"],
        "rank": row["rank"],
        "target_modules": row["target_modules"],
        "created_at": rfc3339(row["created_at"]),
    }


def _writer(res: Resources, tenant_id: str, adapter_id: str, *, field: str) -> AdapterWriter:
    settings = res.settings
    checker = LoraChecker(served_layers(settings), max_rank=settings.max_adapter_rank, field=field)
    key = storage.adapter_key(tenant_id, adapter_id)
    return AdapterWriter(
        res.s3_data, settings.s3_bucket, key, checker, max_bytes=settings.max_adapter_bytes, field=field
    )


async def _insert(
    res: Resources,
    tenant_id: str,
    adapter_id: str,
    writer: AdapterWriter,
    name: str,
    summary: LoraFile,
    sha256: str,
) -> dict[str, Any]:
    """The row of a stored, checked file: from here on jobs may name the adapter."""
    values = {
        "id": adapter_id,
        "tenant_id": tenant_id,
        "name": name,
        "key": writer.key,
        "bytes": writer.size,
        "sha256": sha256,
        "rank": summary.rank,
        "target_modules": summary.target_modules,
    }
    async with res.db.begin() as conn:
        created_at: datetime = (
            await conn.execute(insert(adapters).values(**values).returning(adapters.c.created_at))
        ).scalar_one()
    log.info(
        "adapter stored",
        extra={"adapter_id": adapter_id, "tenant": tenant_id, "bytes": writer.size, "parts": len(writer.parts)},
    )
    return adapter_object({**values, "created_at": created_at})
