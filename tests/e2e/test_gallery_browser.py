"""The batch gallery in a real browser: the API and a worker run a real batch on the tiny checkpoint, then
Chromium (Debian's, driven by Playwright) opens the gallery's signed link at a phone's size and a desktop's.

Skipped when Playwright or a ``chromium`` executable is missing (``.ci/run`` installs chromium with apt; this
test never downloads a browser). Screenshots: /tmp/gallery.png (phone), /tmp/gallery-desktop.png.
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text

from core.admin import create_key
from core.links import gallery_url
from core.settings import Settings
from deploy.stack import Stack, free_port
from tests.fixtures.services import cancel_backlog
from tests.helpers.api import auth

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)"),
]

PHONE = {"width": 390, "height": 844}
SCREENSHOT = "/tmp/gallery.png"
PROMPTS = [
    "a red fox in fresh snow",
    "一只在竹林里吃竹子的大熊猫",
    '<script>alert("gallery")</script> a lighthouse & a "storm"',
    "macro photo of a dew drop on a leaf, " + "unbroken" * 12,  # one long word: must wrap, not scroll
    "a watercolor street at dusk",
    "an isometric tiny house",
]


@pytest.fixture(scope="module")
def stack(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """SeaweedFS (the session's), the API and one worker, as real processes."""
    port = free_port()
    run = Stack(
        settings.model_copy(update={"api_base_url": f"http://127.0.0.1:{port}"}),
        tmp_path_factory.mktemp("gallery-stack"),
        api_port=port,
        s3_port=None,
    )
    cancel_backlog(settings)  # this module's jobs run first, not earlier modules' leftovers
    run.start()
    yield run
    run.stop()


def _tenant(db: Engine, batch_id: str) -> str:
    with db.connect() as conn:
        return str(conn.execute(text("SELECT tenant_id FROM batches WHERE id = :id"), {"id": batch_id}).scalar_one())


def _submit(stack: Stack, key: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{stack.api_url}/v1/batches", json=body, headers=auth(key), timeout=30)
    assert r.status_code == 202, r.text
    return dict(r.json())


@pytest.fixture(scope="module")
def batch(stack: Stack, settings: Settings, db: Engine) -> dict[str, Any]:
    """A finished batch of six jobs (one of two images), by a tenant of its own: its id, tenant and jobs."""
    key = create_key(settings, f"gallery-{secrets.token_hex(4)}")
    jobs = [{"prompt": p, "seed": 40 + i, "metadata": {"row": i}} for i, p in enumerate(PROMPTS)]
    jobs[0]["num_images"] = 2
    jobs[4].update(width=384, height=256)
    body = {"defaults": {"width": 256, "height": 256}, "jobs": jobs, "metadata": {"title": "<b>browser</b> test"}}
    created = _submit(stack, key, body)
    deadline = time.monotonic() + 300
    while True:
        got = httpx.get(f"{stack.api_url}/v1/batches/{created['id']}", headers=auth(key), timeout=30).json()
        if got["status"] != "running":
            break
        assert time.monotonic() < deadline, got
        time.sleep(0.5)
    listed = httpx.get(
        f"{stack.api_url}/v1/batches/{created['id']}/jobs", params={"limit": 100}, headers=auth(key), timeout=30
    ).json()["data"]
    assert {j["status"] for j in listed} == {"succeeded"}, [(j["status"], j["error"]) for j in listed]
    return {"id": created["id"], "tenant": _tenant(db, created["id"]), "jobs": listed}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium from the system, never a downloaded one."""
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--disable-dev-shm-usage"])
        yield launched
        launched.close()


class Watch:
    """What went wrong on a page: console errors, script errors, failed requests and answers of 400 or more."""

    def __init__(self, page: Any) -> None:
        self.problems: list[str] = []
        page.on("console", lambda m: self._note(m.type == "error", f"console: {m.text}"))
        page.on("pageerror", lambda e: self._note(True, f"page error: {e}"))
        page.on("requestfailed", lambda r: self._note(True, f"failed: {r.url} {r.failure}"))
        page.on("response", lambda r: self._note(r.status >= 400, f"{r.status}: {r.url}"))

    def _note(self, bad: bool, what: str) -> None:
        if bad:
            self.problems.append(what)


def _load_every_image(page: Any) -> list[int]:
    """Scroll each (lazy) image into view, wait until all have loaded; their natural widths."""
    for image in page.locator("img").all():
        image.scroll_into_view_if_needed()
    page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=30_000)
    widths: list[int] = page.evaluate("Array.from(document.images).map(i => i.naturalWidth)")
    return widths


def test_the_signed_link_shows_every_image_on_a_phone(
    stack: Stack, settings: Settings, batch: dict[str, Any], browser: Any
) -> None:
    context = browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True)
    page = context.new_page()
    watch = Watch(page)
    url = stack.api_url + gallery_url(settings, batch["tenant"], batch["id"])
    response = page.goto(url, wait_until="load")
    assert response is not None and response.status == 200
    assert response.headers["referrer-policy"] == "no-referrer"

    widths = _load_every_image(page)
    expected = sorted(o["width"] for j in batch["jobs"] for o in j["outputs"])
    assert len(widths) == len(expected) == 7 and all(w > 0 for w in widths), widths
    assert sorted(widths) == expected
    # fits a phone: nothing wider than the screen, and the grid did lay out (more than one tile per row)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    tops = page.evaluate("Array.from(document.querySelectorAll('figure')).map(f => f.getBoundingClientRect().top)")
    assert len(tops) == 6 and tops[0] == tops[1]
    # the hostile prompt is shown as text and ran nothing
    assert page.locator("script").count() == 0
    assert page.get_by_text('<script>alert("gallery")</script>', exact=False).count() == 1
    assert page.get_by_text("<b>browser</b> test").count() == 1
    assert page.get_by_text("completed · 6 jobs: 6 succeeded").count() == 1
    # every job finished: the page does not refresh itself
    assert page.locator('meta[http-equiv="refresh"]').count() == 0
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=SCREENSHOT, full_page=True)
    assert watch.problems == []
    context.close()


def test_the_gallery_on_a_desktop(stack: Stack, settings: Settings, batch: dict[str, Any], browser: Any) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    watch = Watch(page)
    response = page.goto(stack.api_url + gallery_url(settings, batch["tenant"], batch["id"]))
    assert response is not None and response.status == 200
    assert all(w > 0 for w in _load_every_image(page))
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    page.screenshot(path="/tmp/gallery-desktop.png", full_page=True)
    assert watch.problems == []
    context.close()


def test_another_tenants_token_opens_nothing(
    stack: Stack, settings: Settings, db: Engine, batch: dict[str, Any], browser: Any
) -> None:
    key = create_key(settings, f"gallery-other-{secrets.token_hex(4)}")
    other = _submit(stack, key, {"jobs": [{"prompt": "someone else's fox", "width": 256, "height": 256}]})
    theirs = gallery_url(settings, _tenant(db, other["id"]), other["id"])
    ours = gallery_url(settings, batch["tenant"], batch["id"])
    context = browser.new_context(viewport=PHONE)
    page = context.new_page()
    watch = Watch(page)
    for path in (
        ours.split("?")[0] + "?" + theirs.split("?")[1],  # our batch, their token
        theirs.split("?")[0] + "?" + ours.split("?")[1],  # their batch, our token
    ):
        response = page.goto(stack.api_url + path)
        assert response is not None and response.status == 404
        assert response.json()["error"]["code"] == "not_found"
        assert page.locator("img").count() == 0
    assert [p.split(":")[0] for p in watch.problems if not p.startswith("console")] == ["404", "404"]  # it watches
    context.close()
