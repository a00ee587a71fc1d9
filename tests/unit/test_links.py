"""core/links.py: gallery tokens verify only for their batch, under their secret, before their expiry; the page's
HTML escapes what clients wrote. No service needed."""

from __future__ import annotations

import base64
import json

import pytest

from api.gallery import render_gallery
from api.gallery_page import GalleryPage, Tile
from core import errors
from core.links import gallery_token, gallery_url, verify_gallery_token
from core.settings import Settings

SECRET = "s" * 40
NOW = 1_800_000_000.0


def test_a_token_names_its_tenant_until_it_expires() -> None:
    token = gallery_token(SECRET, "ten_a", "bat_b", 600, now=NOW)
    assert verify_gallery_token(SECRET, token, "bat_b", now=NOW) == "ten_a"
    assert verify_gallery_token(SECRET, token, "bat_b", now=NOW + 599) == "ten_a"
    with pytest.raises(errors.Unauthorized, match="expired"):
        verify_gallery_token(SECRET, token, "bat_b", now=NOW + 600)


def test_the_token_is_url_safe_and_holds_no_secret() -> None:
    token = gallery_token(SECRET, "ten_a", "bat_b", 600, now=NOW)
    assert token.replace("-", "").replace("_", "").replace(".", "").isalnum()
    assert SECRET not in token
    payload = token.split(".")[0]
    assert json.loads(base64.urlsafe_b64decode(payload + "==")) == ["ten_a", "bat_b", int(NOW) + 600]


@pytest.mark.parametrize(
    "why",
    ["other batch", "other secret", "payload edited", "signature edited", "no dot", "empty", "not base64", "unicode"],
)
def test_a_bad_token_looks_like_an_unknown_batch(why: str) -> None:
    good = gallery_token(SECRET, "ten_a", "bat_b", 600, now=NOW)
    payload, signature = good.split(".")
    forged = base64.urlsafe_b64encode(json.dumps(["ten_x", "bat_b", int(NOW) + 600]).encode()).decode().rstrip("=")
    token, batch = {
        "other batch": (good, "bat_c"),
        "other secret": (gallery_token("t" * 40, "ten_a", "bat_b", 600, now=NOW), "bat_b"),
        "payload edited": (f"{forged}.{signature}", "bat_b"),
        "signature edited": (f"{payload}.{signature[::-1]}", "bat_b"),
        "no dot": (payload + signature, "bat_b"),
        "empty": ("", "bat_b"),
        "not base64": ("%%%.%%%", "bat_b"),
        "unicode": (f"é{payload}.{signature}", "bat_b"),
    }[why]
    with pytest.raises(errors.NotFound) as raised:
        verify_gallery_token(SECRET, token, batch, now=NOW)
    assert raised.value.message == f"no batch {batch!r}"


def test_an_expired_token_for_another_batch_is_still_404() -> None:
    token = gallery_token(SECRET, "ten_a", "bat_b", 60, now=NOW)
    with pytest.raises(errors.NotFound):
        verify_gallery_token(SECRET, token, "bat_c", now=NOW + 3600)


def test_gallery_url_is_relative_and_lives_for_the_link_ttl() -> None:
    settings = Settings(link_secret=SECRET, link_ttl_s=120)
    url = gallery_url(settings, "ten_a", "bat_b", now=NOW)
    path, _, query = url.partition("?token=")
    assert path == "/v1/batches/bat_b/gallery"
    assert verify_gallery_token(SECRET, query, "bat_b", now=NOW + 119) == "ten_a"
    with pytest.raises(errors.Unauthorized):
        verify_gallery_token(SECRET, query, "bat_b", now=NOW + 120)


def test_production_refuses_a_placeholder_or_short_link_secret() -> None:
    for weak in ("", "changeme", "zimage-dev-link-secret", "short-but-real"):
        with pytest.raises(ValueError, match="ZIMAGE_LINK_SECRET"):
            Settings(environment="production", s3_secret_access_key="x" * 40, link_secret=weak)
    assert Settings(environment="production", s3_secret_access_key="x" * 40, link_secret=SECRET).link_secret
    assert Settings().link_secret  # development keeps its default


def test_the_page_escapes_everything_a_client_wrote() -> None:
    hostile = "<script>alert(1)</script>\"'&"
    tile = Tile(
        index=0, job_id="job_1", status="failed", prompt=hostile, seed=1, width=256, height=256, images=[],
        error={"code": "invalid_input", "message": hostile}, progress=None, metadata={hostile: hostile},
    )  # fmt: skip
    page = GalleryPage(
        batch_id="bat_<x>", batch_status="completed", metadata={hostile: [hostile]}, counts={"failed": 1},
        page=1, pages=1, tiles=[tile],
    )  # fmt: skip
    text = render_gallery(page, lambda n: f"?page={n}&token=<t>")
    assert "<script" not in text and "<x>" not in text and "\"'&<" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#x27;&amp;" in text
