"""``GET /v1/batches/{batch_id}/gallery`` against the real app (Postgres, S3): both ways in (API key, signed
link), every refusal, the page itself (images, statuses, escaping, pages, refresh) and its headers.

The batches and jobs are written straight into Postgres, in every status, so no worker is needed; their queue
names no worker's, and each test deletes what it wrote."""

from __future__ import annotations

import html
import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import Engine, insert, text

from core import ids, storage
from core.apikeys import hash_key
from core.links import gallery_token, gallery_url
from core.models import batches, jobs
from core.settings import Settings
from tests.helpers.api import auth

SCRIPT_PROMPT = '<script>alert("x")</script> a fox & a "hound"'
META_TITLE = "<img src=x onerror=alert(1)>"


@dataclass
class Batch:
    """A batch written for a test: its tenant's key and id, its id and its jobs' ids in index order."""

    key: str
    tenant_id: str
    batch_id: str
    job_ids: list[str]


def _tenant_of(db: Engine, key: str) -> str:
    with db.connect() as conn:
        return str(
            conn.execute(text("SELECT tenant_id FROM api_keys WHERE key_hash = :h"), {"h": hash_key(key)}).scalar_one()
        )


def _png(width: int, height: int) -> bytes:
    image = Image.new("RGB", (width, height))
    image.putdata([(x * 255 // width, y * 255 // height, 128) for y in range(height) for x in range(width)])
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _job(tenant_id: str, batch_id: str, index: int, status: str = "queued", **row: Any) -> dict[str, Any]:
    prompt = row.pop("prompt", f"a lighthouse number {index}")
    return {
        "id": ids.job_id(),
        "tenant_id": tenant_id,
        "batch_id": batch_id,
        "batch_index": index,
        "kind": "generate",
        "queue": "gallery-test",  # no worker serves it
        "group_key": "gallery-test",
        "cost_tokens": 256,
        "status": status,
        "request": {"kind": "generate", "prompt": prompt, "seed": 1000 + index, "width": 256, "height": 256},
        "dispatched_at": text("now()"),
        **row,
    }


@pytest.fixture
def make_batch(db: Engine, new_key: Callable[..., str]) -> Iterator[Callable[..., Batch]]:
    """``make_batch(job_rows_for(tenant_id, batch_id), key=…)`` writes a batch and its jobs; all deleted after."""
    made: list[str] = []

    def make(rows: Callable[[str, str], list[dict[str, Any]]], *, key: str | None = None, **batch: Any) -> Batch:
        key = key or new_key()
        tenant_id = _tenant_of(db, key)
        batch_id = ids.batch_id()
        job_rows = rows(tenant_id, batch_id)
        with db.begin() as conn:
            conn.execute(insert(batches).values(id=batch_id, tenant_id=tenant_id, total=len(job_rows), **batch))
            for row in job_rows:
                conn.execute(insert(jobs).values(**row))
        made.append(batch_id)
        return Batch(key, tenant_id, batch_id, [r["id"] for r in job_rows])

    yield make
    with db.begin() as conn:  # the jobs go with their batch (ON DELETE CASCADE)
        conn.execute(batches.delete().where(batches.c.id.in_(made)))


@pytest.fixture
def mixed(make_batch: Callable[..., Batch], settings: Settings) -> Iterator[tuple[Batch, bytes]]:
    """A batch of six jobs, one in each status (two queued), the succeeded one with a real PNG in S3."""
    png = _png(64, 48)
    s3 = storage.make_s3_client(settings)
    storage.ensure_bucket(s3, settings.s3_bucket)
    keys: list[str] = []

    def rows(tenant_id: str, batch_id: str) -> list[dict[str, Any]]:
        done = _job(tenant_id, batch_id, 0, "succeeded", finished_at=text("now()"))
        key = storage.result_key(tenant_id, done["id"], 0, "png")
        sha = storage.put_object_checked(s3, settings.s3_bucket, key, png, "image/png")
        keys.append(key)
        done["outputs"] = [
            {"index": 0, "key": key, "width": 64, "height": 48, "seed": 1000, "format": "png",
             "bytes": len(png), "sha256": sha}
        ]  # fmt: skip
        return [
            done,
            _job(tenant_id, batch_id, 1, "running", attempt=1, started_at=text("now()"), progress_step=3,
                 progress_total=8),
            _job(tenant_id, batch_id, 2, "queued"),
            _job(tenant_id, batch_id, 3, "failed", error_code="out_of_memory",
                 error_message="one image does not fit <the card>", finished_at=text("now()")),
            _job(tenant_id, batch_id, 4, "canceled", finished_at=text("now()")),
            _job(tenant_id, batch_id, 5, "queued", prompt=SCRIPT_PROMPT, metadata={"sku": "<b>A-1</b>"}),
        ]  # fmt: skip

    yield make_batch(rows, metadata={"title": META_TITLE}), png
    storage.delete_keys(s3, settings.s3_bucket, keys)


def _error(r: Any, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["error"]["code"] == code
    return body


def _tiles(page: str) -> list[str]:
    """The ``#n`` labels of the page's tiles, in order."""
    return re.findall(r'<figure class="tile [^"]*" id="i(\d+)"', page)


def _link(page: str, rel: str) -> str | None:
    found = re.search(rf'<a rel="{rel}" href="([^"]*)"', page)
    return html.unescape(found.group(1)) if found else None


# --- the two ways in ---------------------------------------------------------------------------------------


def test_an_api_key_opens_the_gallery(client: TestClient, mixed: tuple[Batch, bytes], settings: Settings) -> None:
    batch, png = mixed
    r = client.get(f"/v1/batches/{batch.batch_id}/gallery", headers=auth(batch.key))
    assert r.status_code == 200, r.text
    page = r.text
    assert page.startswith("<!doctype html>")
    assert _tiles(page) == ["0", "1", "2", "3", "4", "5"]
    for i in range(5):
        assert f"a lighthouse number {i}" in page and f"seed {1000 + i}" in page
    # the succeeded job: one image, a presigned URL of its key, that serves the stored PNG
    urls = [html.unescape(u) for u in re.findall(r'<img src="([^"]+)"', page)]
    assert len(urls) == 1
    assert f"/{settings.s3_bucket}/results/{batch.tenant_id}/{batch.job_ids[0]}/0.png?" in urls[0]
    assert "X-Amz-Signature=" in urls[0]
    assert httpx.get(urls[0], timeout=10).content == png
    assert 'width="64" height="48"' in page
    # the others show their status instead of an image
    assert "<strong>running</strong><small>step 3 of 8</small>" in page
    assert "<strong>queued</strong>" in page and "<strong>canceled</strong>" in page
    assert "<strong>failed</strong><small>out_of_memory: one image does not fit &lt;the card&gt;</small>" in page
    assert "running · 6 jobs: 2 queued, 1 running, 1 succeeded, 1 failed, 1 canceled" in page


def test_a_signed_link_opens_the_gallery_without_a_key(
    client: TestClient, mixed: tuple[Batch, bytes], settings: Settings
) -> None:
    batch, _ = mixed
    url = gallery_url(settings, batch.tenant_id, batch.batch_id)
    assert url.startswith(f"/v1/batches/{batch.batch_id}/gallery?token=")
    r = client.get(url)
    assert r.status_code == 200, r.text
    assert _tiles(r.text) == ["0", "1", "2", "3", "4", "5"]
    assert len(re.findall(r"<img ", r.text)) == 1
    assert batch.key not in r.text


def test_the_page_headers(client: TestClient, mixed: tuple[Batch, bytes], settings: Settings) -> None:
    batch, _ = mixed
    r = client.get(gallery_url(settings, batch.tenant_id, batch.batch_id))
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["x-content-type-options"] == "nosniff"
    endpoint = urlsplit(settings.presign_endpoint or "")
    policy = dict(part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";"))
    assert policy == {
        "default-src": "'none'",
        "img-src": f"{endpoint.scheme}://{endpoint.netloc}",
        "style-src": "'unsafe-inline'",
        "base-uri": "'none'",
        "form-action": "'none'",
        "frame-ancestors": "'none'",
    }
    assert "<script" not in r.text.lower()  # the page needs no script at all
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in r.text
    # nothing from outside but the images: no stylesheet, script, font, frame or CSS url()
    assert not re.search(r"<(link|script|iframe|object|embed)\b", r.text) and "url(" not in r.text


def test_a_page_without_images_allows_none(client: TestClient, make_batch: Callable[..., Batch]) -> None:
    batch = make_batch(lambda t, b: [_job(t, b, 0, "queued")])
    r = client.get(f"/v1/batches/{batch.batch_id}/gallery", headers=auth(batch.key))
    assert "img-src 'none'" in r.headers["content-security-policy"]


# --- refusals ----------------------------------------------------------------------------------------------


def test_no_key_and_no_token_is_401(client: TestClient, mixed: tuple[Batch, bytes]) -> None:
    batch, _ = mixed
    r = client.get(f"/v1/batches/{batch.batch_id}/gallery")
    body = _error(r, 401, "unauthorized")
    assert "gallery_url" in body["error"]["message"]
    assert r.headers["www-authenticate"] == "Bearer"
    _error(client.get(f"/v1/batches/{batch.batch_id}/gallery", headers=auth("zk_nope")), 401, "unauthorized")


def test_another_tenants_key_is_404_like_an_unknown_batch(
    client: TestClient, mixed: tuple[Batch, bytes], new_key: Callable[..., str]
) -> None:
    batch, _ = mixed
    other = new_key()
    foreign = _error(client.get(f"/v1/batches/{batch.batch_id}/gallery", headers=auth(other)), 404, "not_found")
    unknown_id = ids.batch_id()
    unknown = _error(client.get(f"/v1/batches/{unknown_id}/gallery", headers=auth(batch.key)), 404, "not_found")
    assert foreign["error"]["message"].replace(batch.batch_id, unknown_id) == unknown["error"]["message"]


def test_bad_tokens_are_404_like_an_unknown_batch(
    client: TestClient, mixed: tuple[Batch, bytes], make_batch: Callable[..., Batch], settings: Settings
) -> None:
    batch, _ = mixed
    path = f"/v1/batches/{batch.batch_id}/gallery"
    unknown = client.get(path, headers=auth(make_batch(lambda t, b: []).key)).json()  # a tenant without it
    good = gallery_token(settings.link_secret, batch.tenant_id, batch.batch_id, 600)
    payload, signature = good.split(".")
    flip = {"A": "B"}.get(payload[5], "A")
    same_tenant_other_batch = make_batch(lambda t, b: [_job(t, b, 0)], key=batch.key)
    other_tenant = make_batch(lambda t, b: [_job(t, b, 0)])
    secret = settings.link_secret
    bad = {
        "tampered payload": f"{payload[:5]}{flip}{payload[6:]}.{signature}",
        "tampered signature": f"{payload}.{signature[:-3]}{'AAA' if not signature.endswith('AAA') else 'BBB'}",
        "another secret": gallery_token("not-the-secret", batch.tenant_id, batch.batch_id, 600),
        "another batch of the tenant": gallery_token(
            settings.link_secret, batch.tenant_id, same_tenant_other_batch.batch_id, 600
        ),
        "another tenant's batch": gallery_token(secret, other_tenant.tenant_id, other_tenant.batch_id, 600),
        "another tenant on this batch": gallery_token(secret, other_tenant.tenant_id, batch.batch_id, 600),
        "garbage": "not-a-token",
        "no signature": payload,
        "empty": "",
    }
    for why, token in bad.items():
        r = client.get(path, params={"token": token})
        assert r.status_code == 404, (why, r.text)
        assert r.json() == unknown, why
    assert client.get(path, params={"token": good}).status_code == 200


def test_an_expired_token_is_401_saying_so(client: TestClient, mixed: tuple[Batch, bytes], settings: Settings) -> None:
    batch, _ = mixed
    expired = gallery_token(settings.link_secret, batch.tenant_id, batch.batch_id, 60, now=1_000_000)
    r = client.get(f"/v1/batches/{batch.batch_id}/gallery", params={"token": expired})
    body = _error(r, 401, "unauthorized")
    assert "expired" in body["error"]["message"] and "gallery_url" in body["error"]["message"]


def test_a_bad_page_number(client: TestClient, mixed: tuple[Batch, bytes]) -> None:
    batch, _ = mixed
    path = f"/v1/batches/{batch.batch_id}/gallery"
    _error(client.get(path, params={"page": 0}, headers=auth(batch.key)), 422, "validation_error")
    _error(client.get(path, params={"page": "x"}, headers=auth(batch.key)), 422, "validation_error")
    _error(client.get(path, params={"page": 2}, headers=auth(batch.key)), 404, "not_found")


# --- the page ----------------------------------------------------------------------------------------------


def test_user_text_is_escaped(client: TestClient, mixed: tuple[Batch, bytes]) -> None:
    batch, _ = mixed
    page = client.get(f"/v1/batches/{batch.batch_id}/gallery", headers=auth(batch.key)).text
    assert "<script" not in page.lower() and "<b>" not in page and "<img src=x" not in page
    assert html.escape(SCRIPT_PROMPT) in page  # shown, as text
    assert "&lt;b&gt;A-1&lt;/b&gt;" in page
    assert f"<dd>{html.escape(META_TITLE)}</dd>" in page


def test_61_jobs_make_two_pages_whose_links_carry_the_token(
    client: TestClient, make_batch: Callable[..., Batch], settings: Settings
) -> None:
    # Inserted out of order: the page follows batch_index, not insertion.
    batch = make_batch(lambda t, b: [_job(t, b, i, "canceled") for i in reversed(range(61))])
    first_url = gallery_url(settings, batch.tenant_id, batch.batch_id)
    token = parse_qs(urlsplit(first_url).query)["token"][0]
    first = client.get(first_url)
    assert first.status_code == 200
    assert _tiles(first.text) == [str(i) for i in range(60)]
    assert "Page 1 of 2" in first.text and _link(first.text, "prev") is None
    following = _link(first.text, "next")
    assert following is not None and parse_qs(urlsplit(following).query) == {"page": ["2"], "token": [token]}

    second = client.get(urljoin(first_url, following))
    assert second.status_code == 200, second.text
    assert _tiles(second.text) == ["60"] and "Page 2 of 2" in second.text
    previous = _link(second.text, "prev")
    assert _link(second.text, "next") is None and previous is not None
    assert parse_qs(urlsplit(previous).query) == {"page": ["1"], "token": [token]}
    assert _tiles(client.get(urljoin(first_url, previous)).text) == [str(i) for i in range(60)]

    # opened with the API key, the links carry no token
    keyed = client.get(f"/v1/batches/{batch.batch_id}/gallery", headers=auth(batch.key)).text
    assert parse_qs(urlsplit(_link(keyed, "next") or "").query) == {"page": ["2"]}


def test_the_page_refreshes_only_while_jobs_are_queued_or_running(
    client: TestClient, mixed: tuple[Batch, bytes], db: Engine
) -> None:
    batch, _ = mixed
    path = f"/v1/batches/{batch.batch_id}/gallery"
    refresh = re.compile(r'<meta http-equiv="refresh" content="\d+">')
    finish = text("UPDATE jobs SET status = :to, finished_at = now() WHERE batch_id = :b AND status = :from")
    assert refresh.search(client.get(path, headers=auth(batch.key)).text)
    with db.begin() as conn:
        conn.execute(finish, {"b": batch.batch_id, "from": "queued", "to": "canceled"})
    assert refresh.search(client.get(path, headers=auth(batch.key)).text), "a job is still running"
    with db.begin() as conn:
        conn.execute(finish, {"b": batch.batch_id, "from": "running", "to": "succeeded"})
    page = client.get(path, headers=auth(batch.key)).text
    assert not refresh.search(page) and "http-equiv" not in page
    assert "Every job of this batch has finished." in page
    assert "completed · 6 jobs" in page  # the batch object's status, not the row's column


def test_an_empty_batch_has_one_empty_page(client: TestClient, make_batch: Callable[..., Batch]) -> None:
    batch = make_batch(lambda t, b: [])
    r = client.get(f"/v1/batches/{batch.batch_id}/gallery", headers=auth(batch.key))
    assert r.status_code == 200 and _tiles(r.text) == [] and "0 jobs" in r.text and "<nav>" not in r.text


def test_the_token_is_not_an_api_key(client: TestClient, mixed: tuple[Batch, bytes], settings: Settings) -> None:
    batch, _ = mixed
    token = gallery_token(settings.link_secret, batch.tenant_id, batch.batch_id, 600)
    _error(client.get(f"/v1/jobs/{batch.job_ids[0]}", headers=auth(token)), 401, "unauthorized")
    _error(client.get(f"/v1/jobs/{batch.job_ids[0]}", params={"token": token}), 401, "unauthorized")
    assert client.get(f"/v1/jobs/{batch.job_ids[0]}", headers=auth(batch.key)).status_code == 200
