"""Submit-time image references: unknown or foreign uploads and mismatched masks are 422s naming the field."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from sqlalchemy import Engine, insert

from core import ids
from core.db import make_async_engine
from core.errors import ValidationFailed
from core.image_refs import check_batch_refs, check_refs
from core.models import tenants, uploads
from core.schemas import JobRequest
from core.settings import Settings


def new_tenant(db: Engine) -> str:
    """Insert a tenant and return its id."""
    tenant = ids.tenant_id()
    with db.begin() as conn:
        conn.execute(insert(tenants).values(id=tenant, name=f"refs-{tenant}"))
    return tenant


def new_upload(db: Engine, tenant: str, width: int = 64, height: int = 48) -> str:
    """Insert an upload row of ``tenant`` and return its id."""
    upload = ids.upload_id()
    with db.begin() as conn:
        conn.execute(
            insert(uploads).values(
                id=upload,
                tenant_id=tenant,
                key=f"uploads/{tenant}/{upload}.png",
                width=width,
                height=height,
                format="png",
                bytes=100,
                sha256="0" * 64,
            )
        )
    return upload


def edit(mode: str, images: list[dict[str, str]], mask: dict[str, str] | None = None) -> JobRequest:
    """An edit request with these refs."""
    body = {"kind": "edit", "mode": mode, "prompt": "p", "input_images": images, "mask": mask}
    return JobRequest.model_validate(body)


Check = Callable[[Callable[[Any], Coroutine[Any, Any, None]]], None]


@pytest.fixture
def run(settings: Settings) -> Check:
    """Run ``scenario(conn)`` on an AsyncConnection of this run's database."""

    def go(scenario: Callable[[Any], Coroutine[Any, Any, None]]) -> None:
        async def main() -> None:
            engine = make_async_engine(settings)
            try:
                async with engine.connect() as conn:
                    await scenario(conn)
            finally:
                await engine.dispose()

        asyncio.run(main())

    return go


def problems(run: Check, tenant: str, req: JobRequest) -> list[dict[str, Any]]:
    """The details of the 422 check_refs raises (or [] when it passes)."""
    found: list[dict[str, Any]] = []

    async def scenario(conn: Any) -> None:
        try:
            await check_refs(conn, tenant, req)
        except ValidationFailed as exc:
            found.extend(exc.details)

    run(scenario)
    return found


def test_own_uploads_pass(db: Engine, run: Check) -> None:
    tenant = new_tenant(db)
    image, mask = new_upload(db, tenant), new_upload(db, tenant)
    assert problems(run, tenant, edit("inpaint", [{"upload_id": image}], {"upload_id": mask})) == []
    three = [{"upload_id": new_upload(db, tenant, 32 * n, 32)} for n in (1, 2, 3)]
    assert problems(run, tenant, edit("instruct", three)) == []


def test_unknown_upload_is_named_by_its_field(db: Engine, run: Check) -> None:
    tenant = new_tenant(db)
    good = new_upload(db, tenant)
    unknown = ids.upload_id()
    found = problems(run, tenant, edit("instruct", [{"upload_id": good}, {"upload_id": unknown}]))
    assert found == [{"field": "input_images.1.upload_id", "message": "no such upload for this tenant"}]


def test_another_tenants_upload_looks_exactly_like_an_unknown_one(db: Engine, run: Check) -> None:
    mine, theirs = new_tenant(db), new_tenant(db)
    foreign = new_upload(db, theirs)
    as_foreign = problems(run, mine, edit("img2img", [{"upload_id": foreign}]))
    as_unknown = problems(run, mine, edit("img2img", [{"upload_id": ids.upload_id()}]))
    assert as_foreign == as_unknown == [
        {"field": "input_images.0.upload_id", "message": "no such upload for this tenant"}
    ]
    assert problems(run, theirs, edit("img2img", [{"upload_id": foreign}])) == []


def test_unknown_mask_upload_is_named(db: Engine, run: Check) -> None:
    tenant = new_tenant(db)
    req = edit("inpaint", [{"upload_id": new_upload(db, tenant)}], {"upload_id": ids.upload_id()})
    found = problems(run, tenant, req)
    assert [p["field"] for p in found] == ["mask.upload_id"]


def test_mask_of_another_size_than_its_image_is_refused(db: Engine, run: Check) -> None:
    tenant = new_tenant(db)
    image, mask = new_upload(db, tenant, 64, 48), new_upload(db, tenant, 48, 64)
    found = problems(run, tenant, edit("inpaint", [{"upload_id": image}], {"upload_id": mask}))
    assert [p["field"] for p in found] == ["mask"]
    assert "48x64" in found[0]["message"] and "64x48" in found[0]["message"]


def test_url_refs_are_only_syntax_checked(db: Engine, run: Check) -> None:
    tenant = new_tenant(db)
    upload = new_upload(db, tenant)
    # A name is not resolved at submit time, and a URL mask cannot be compared with its image yet.
    req = edit("inpaint", [{"upload_id": upload}], {"url": "https://images.example.com/mask.png"})
    assert problems(run, tenant, req) == []
    literal = edit("img2img", [{"url": "https://169.254.169.254/latest/meta-data/"}])
    assert [p["field"] for p in problems(run, tenant, literal)] == ["input_images.0.url"]
    with_credentials = edit("img2img", [{"url": "https://user:pw@images.example.com/a.png"}])
    assert [p["field"] for p in problems(run, tenant, with_credentials)] == ["input_images.0.url"]


def test_generate_requests_have_nothing_to_check(db: Engine, run: Check) -> None:
    assert problems(run, new_tenant(db), JobRequest.model_validate({"prompt": "a cat"})) == []


def test_batch_problems_carry_the_job_index(db: Engine, run: Check) -> None:
    tenant = new_tenant(db)
    good = new_upload(db, tenant)
    reqs = [
        edit("img2img", [{"upload_id": good}]),
        edit("img2img", [{"upload_id": ids.upload_id()}]),
        edit("inpaint", [{"upload_id": good}], {"upload_id": new_upload(db, tenant, 16, 16)}),
    ]
    found: list[dict[str, Any]] = []

    async def scenario(conn: Any) -> None:
        with pytest.raises(ValidationFailed) as info:
            await check_batch_refs(conn, tenant, reqs)
        found.extend(info.value.details)

    run(scenario)
    assert [(p["index"], p["field"]) for p in found] == [(1, "input_images.0.upload_id"), (2, "mask")]
