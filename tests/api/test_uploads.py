"""POST /v1/uploads and GET /v1/uploads/{id} on the real app, Postgres and S3: stored originals, hostile files."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import Engine, func, select

from api.main import create_app
from api.routes import uploads as uploads_route
from core import storage
from core.models import api_keys, uploads
from core.settings import Settings
from tests.helpers.api import auth

URL = "/v1/uploads"


def app_client(settings: Settings) -> Iterator[TestClient]:
    """A client of the app with the uploads router (registered here too until api/main.py includes it)."""
    app = create_app(settings, run_sweeper=False)
    if not any(getattr(route, "path", None) == URL for route in app.routes):
        app.include_router(uploads_route.router)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    """The app as configured for this run."""
    yield from app_client(settings)


@pytest.fixture(scope="module")
def route_capped(settings: Settings) -> Iterator[TestClient]:
    """The app with the general body limit out of the way, so the route's own 20 MiB cap is what answers."""
    yield from app_client(settings.model_copy(update={"max_body_bytes": 1 << 30}))


@pytest.fixture(scope="module")
def s3(settings: Settings) -> Any:
    """An S3 client on the test bucket."""
    return storage.make_s3_client(settings)


def png(size: tuple[int, int] = (64, 48), noise: bool = False) -> bytes:
    """A PNG: a gradient, or incompressible noise (to make large files)."""
    if noise:
        image = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
    else:
        image = Image.linear_gradient("L").resize(size).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(size: tuple[int, int] = (64, 48), orientation: int | None = None) -> bytes:
    """A JPEG, optionally with an EXIF orientation."""
    buffer = io.BytesIO()
    params: dict[str, Any] = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        params["exif"] = exif.tobytes()
    Image.linear_gradient("L").resize(size).convert("RGB").save(buffer, "JPEG", **params)
    return buffer.getvalue()


def upload(client: TestClient, key: str, data: bytes, name: str = "image.png", ctype: str = "image/png") -> Any:
    """POST ``data`` as the multipart file field."""
    return client.post(URL, files={"file": (name, data, ctype)}, headers=auth(key))


def tenant_of(db: Engine, key: str) -> str:
    """The tenant id behind an API key (by its prefix)."""
    with db.connect() as conn:
        rows = conn.execute(select(api_keys.c.tenant_id, api_keys.c.prefix)).all()
    return next(t for t, prefix in rows if key.startswith(prefix))


def upload_count(db: Engine, tenant: str) -> int:
    """How many uploads the tenant has."""
    with db.connect() as conn:
        return int(conn.execute(select(func.count()).where(uploads.c.tenant_id == tenant)).scalar_one())


def assert_error(response: Any, status: int, code: str, field: str | None = "file") -> None:
    """The response is the API's error body with this status and code (and a detail naming ``field``)."""
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["code"] == code
    if field is not None:
        assert field in [d["field"] for d in body["details"]], body


# --- the happy path -------------------------------------------------------------------------------------


def test_upload_answers_201_stores_the_original_and_records_it(
    client: TestClient, key: str, db: Engine, s3: Any, settings: Settings
) -> None:
    data = png()
    response = upload(client, key, data)
    assert response.status_code == 201, response.text
    body = response.json()
    digest = hashlib.sha256(data).hexdigest()
    assert body["id"].startswith("upl_")
    assert body["object"] == "upload"
    assert (body["width"], body["height"], body["format"]) == (64, 48, "png")
    assert (body["bytes"], body["sha256"]) == (len(data), digest)
    assert body["created_at"].endswith("Z")

    tenant = tenant_of(db, key)
    with db.connect() as conn:
        row = conn.execute(select(uploads).where(uploads.c.id == body["id"])).one()
    assert row.tenant_id == tenant
    assert (row.width, row.height, row.format, row.bytes, row.sha256) == (64, 48, "png", len(data), digest)
    assert row.key == storage.upload_key(tenant, body["id"], "png")
    # The object in S3 is the original, byte for byte.
    assert storage.object_sha256(s3, settings.s3_bucket, row.key) == digest
    head = s3.head_object(Bucket=settings.s3_bucket, Key=row.key)
    assert head["ContentType"] == "image/png"


def test_get_returns_the_upload_and_hides_it_from_other_tenants(client: TestClient, new_key: Any) -> None:
    owner, stranger = new_key(), new_key()
    created = upload(client, owner, jpeg(), "photo.jpg", "image/jpeg").json()
    mine = client.get(f"{URL}/{created['id']}", headers=auth(owner))
    assert mine.status_code == 200
    assert mine.json() == created
    assert_error(client.get(f"{URL}/{created['id']}", headers=auth(stranger)), 404, "not_found", None)
    assert_error(client.get(f"{URL}/upl_00000000000000000000000000", headers=auth(owner)), 404, "not_found", None)


def test_format_is_judged_by_content_not_name_or_declared_type(client: TestClient, key: str) -> None:
    response = upload(client, key, png(), "holiday.jpg", "text/plain")
    assert response.status_code == 201
    assert response.json()["format"] == "png"


def test_size_is_reported_as_displayed_after_exif_orientation(client: TestClient, key: str) -> None:
    body = upload(client, key, jpeg((64, 48), orientation=6), "r.jpg", "image/jpeg").json()
    assert (body["width"], body["height"]) == (48, 64)


def test_webp_upload(client: TestClient, key: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, "WEBP")
    assert upload(client, key, buffer.getvalue(), "a.webp", "image/webp").json()["format"] == "webp"


def test_uploads_over_the_general_body_limit_but_under_20_mib_are_accepted(
    client: TestClient, key: str, settings: Settings
) -> None:
    # Needs api/main.py's BodyLimit to leave /v1/uploads to the route's own 20 MiB cap.
    data = png((1024, 1024), noise=True)
    assert settings.max_body_bytes < len(data) < 20 * 1024 * 1024
    response = upload(client, key, data)
    assert response.status_code == 201, response.text
    assert response.json()["bytes"] == len(data)


# --- refused uploads ------------------------------------------------------------------------------------


def refused_and_nothing_stored(
    client: TestClient, new_key: Any, db: Engine, status: int, code: str, **kwargs: Any
) -> None:
    """Upload with a fresh tenant: the answer is ``status``/``code`` and the tenant has no upload."""
    key = new_key()
    data = kwargs.pop("data")
    field = kwargs.pop("field", "file")
    assert_error(upload(client, key, data, **kwargs), status, code, field)
    assert upload_count(db, tenant_of(db, key)) == 0


def test_non_images_are_415(client: TestClient, new_key: Any, db: Engine) -> None:
    text = b"just some text, named like an image\n"
    refused_and_nothing_stored(client, new_key, db, 415, "unsupported_media_type", data=text, name="cat.png")
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, "GIF")
    refused_and_nothing_stored(client, new_key, db, 415, "unsupported_media_type", data=gif.getvalue())
    bmp = io.BytesIO()
    Image.new("RGB", (8, 8)).save(bmp, "BMP")
    refused_and_nothing_stored(client, new_key, db, 415, "unsupported_media_type", data=bmp.getvalue())


def test_a_body_that_is_not_multipart_is_415(client: TestClient, key: str) -> None:
    raw = client.post(URL, content=png(), headers={**auth(key), "Content-Type": "image/png"})
    assert_error(raw, 415, "unsupported_media_type", "Content-Type")
    json_body = client.post(URL, json={"url": "https://example.com/a.png"}, headers=auth(key))
    assert_error(json_body, 415, "unsupported_media_type", "Content-Type")


def test_corrupt_truncated_empty_and_polyglot_files_are_422(client: TestClient, new_key: Any, db: Engine) -> None:
    for bad in (
        jpeg((128, 96))[:700],  # truncated
        b"",  # empty
        png() + zip_bytes(),  # PNG followed by a ZIP archive
        b"\x89PNG\r\n\x1a\n" + b"\0" * 64,  # a PNG signature on garbage
    ):
        refused_and_nothing_stored(client, new_key, db, 422, "validation_error", data=bad)


def test_declared_decompression_bomb_is_413_without_decoding(client: TestClient, new_key: Any, db: Engine) -> None:
    ihdr = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    refused_and_nothing_stored(client, new_key, db, 413, "payload_too_large", data=bomb)


def test_file_over_20_mib_is_413(client: TestClient, route_capped: TestClient, new_key: Any, db: Engine) -> None:
    big = png() + b"\0" * (20 * 1024 * 1024)  # zero padding would be accepted; the size is not
    refused_and_nothing_stored(route_capped, new_key, db, 413, "payload_too_large", data=big)
    # Whichever layer answers in the configured app, it is the same 413.
    refused_and_nothing_stored(client, new_key, db, 413, "payload_too_large", data=big, field=None)


def test_file_of_exactly_20_mib_is_judged_as_an_image(route_capped: TestClient, key: str) -> None:
    data = png()
    padded = data + b"\0" * (20 * 1024 * 1024 - len(data))
    response = upload(route_capped, key, padded)
    assert response.status_code == 201, response.text
    assert response.json()["bytes"] == 20 * 1024 * 1024


def test_chunked_body_without_length_is_capped(route_capped: TestClient, key: str, db: Engine) -> None:
    def body() -> Iterator[bytes]:
        yield b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        for _ in range(24):  # 24 MiB offered, with no Content-Length
            yield b"\0" * (1024 * 1024)
        yield b"\r\n--XyZ--\r\n"

    headers = {**auth(key), "Content-Type": "multipart/form-data; boundary=XyZ"}
    assert_error(route_capped.post(URL, content=body(), headers=headers), 413, "payload_too_large")
    assert upload_count(db, tenant_of(db, key)) == 0


def test_missing_file_field_is_422(client: TestClient, key: str) -> None:
    response = client.post(URL, files={"image": ("a.png", png(), "image/png")}, headers=auth(key))
    assert_error(response, 422, "validation_error", "file")
    twice = client.post(
        URL, files=[("file", ("a.png", png(), "image/png")), ("file", ("b.png", png(), "image/png"))], headers=auth(key)
    )
    assert_error(twice, 422, "validation_error", "file")


def test_broken_multipart_is_400(client: TestClient, key: str) -> None:
    headers = {**auth(key), "Content-Type": "multipart/form-data; boundary=XyZ"}
    response = client.post(URL, content=b"--XyZ\r\nthis is not a part header at all", headers=headers)
    assert response.status_code in (400, 422), response.text


def test_uploads_need_a_key(client: TestClient) -> None:
    response = client.post(URL, files={"file": ("a.png", png(), "image/png")})
    assert_error(response, 401, "unauthorized", None)


def zip_bytes() -> bytes:
    """A small ZIP archive."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("evil.txt", "payload")
    return buffer.getvalue()


def chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk with its CRC."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_openapi_documents_the_upload_endpoints(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    post = spec["paths"][URL]["post"]
    assert "multipart/form-data" in post["requestBody"]["content"]
    assert {"201", "413", "415", "422"} <= set(post["responses"])
    assert "get" in spec["paths"][URL + "/{upload_id}"]
