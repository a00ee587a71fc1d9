"""The gallery's HTML: a self-contained page (inline CSS, no script, no outside asset) and its response headers.

Every value that came from a client (prompts, metadata, ids, error messages) goes through ``_e`` before it is
written; URLs too, since a presigned URL holds ``&``.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from typing import Any

from api.gallery_page import GalleryPage, Tile

REFRESH_S = 5  # while any job of the batch is queued or running
_PROMPT_TITLE_CHARS = 1000
_META_CHARS = 160

_CSS = """
*,*::before,*::after{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;font:15px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;background:#f4f4f5;color:#18181b}
header,nav,footer{padding:12px 16px}
h1{font-size:1.15rem;margin:0 0 4px;overflow-wrap:anywhere}
.summary{margin:0;color:#52525b}
dl.meta{display:grid;grid-template-columns:minmax(0,max-content) minmax(0,1fr);gap:2px 12px;margin:8px 0 0;
font-size:.85rem}
dl.meta dt{color:#71717a;overflow-wrap:anywhere}
dl.meta dd{margin:0;overflow-wrap:anywhere}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(170px,100%),1fr));gap:12px;padding:4px 16px}
.tile{margin:0;background:#fff;border-radius:8px;overflow:hidden;box-shadow:0 1px 3px rgba(0,0,0,.12);
display:flex;flex-direction:column;min-width:0}
.shots{display:grid;gap:2px}
.shots.multi{grid-template-columns:1fr 1fr}
.shots a{display:block}
.shots img{display:block;width:100%;height:auto;background:#e4e4e7}
.ph{display:flex;flex-direction:column;align-items:center;justify-content:center;gap:4px;padding:8px;
background:repeating-linear-gradient(45deg,#e4e4e7 0 10px,#ececef 10px 20px);color:#3f3f46;text-align:center}
.ph strong{font-size:.95rem}
.ph small{overflow-wrap:anywhere;max-width:100%}
figcaption{padding:8px 10px;font-size:.8rem;display:flex;flex-direction:column;gap:4px;min-width:0}
.line{display:flex;flex-wrap:wrap;gap:4px 8px;align-items:center;color:#52525b}
.badge{border-radius:999px;padding:1px 8px;font-size:.72rem;font-weight:600;background:#e4e4e7;color:#3f3f46}
.lora{border-radius:4px;padding:1px 6px;font-size:.72rem;background:#ede9fe;color:#5b21b6}
.s-succeeded .badge{background:#dcfce7;color:#166534}
.s-failed .badge{background:#fee2e2;color:#991b1b}
.s-running .badge{background:#dbeafe;color:#1e40af}
.s-queued .badge{background:#fef9c3;color:#854d0e}
.prompt{margin:0;overflow-wrap:anywhere;display:-webkit-box;-webkit-line-clamp:3;-webkit-box-orient:vertical;
overflow:hidden}
.jmeta{margin:0;color:#71717a;font:.72rem/1.3 ui-monospace,SFMono-Regular,Menlo,monospace;overflow-wrap:anywhere}
nav{display:flex;gap:12px;align-items:center;justify-content:space-between}
nav a{color:#1d4ed8;text-decoration:none;padding:8px 12px;border:1px solid #d4d4d8;border-radius:6px;background:#fff}
nav .off{visibility:hidden}
footer{color:#71717a;font-size:.8rem}
@media (prefers-color-scheme:dark){
body{background:#18181b;color:#f4f4f5}
.tile,nav a{background:#27272a;border-color:#3f3f46}
.summary,.line{color:#a1a1aa}
.ph{background:repeating-linear-gradient(45deg,#3f3f46 0 10px,#35353b 10px 20px);color:#e4e4e7}
nav a{color:#93c5fd}
}
"""


def _e(value: object) -> str:
    """``value`` as text safe inside an element or a quoted attribute."""
    return html.escape(str(value), quote=True)


def _text(value: Any) -> str:
    """A metadata value as one line of text (strings as they are, the rest as compact JSON)."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _shots(tile: Tile) -> str:
    if tile.images:
        alt = _e(_clip(f"#{tile.index}: {tile.prompt}", 120))
        links = "".join(
            f'<a href="{_e(image["url"])}" target="_blank" rel="noopener noreferrer">'
            f'<img src="{_e(image["url"])}" alt="{alt}" width="{int(image["width"])}" '
            f'height="{int(image["height"])}" loading="lazy" decoding="async"></a>'
            for image in tile.images
        )
        multi = " multi" if len(tile.images) > 1 else ""
        return f'<div class="shots{multi}">{links}</div>'
    detail = ""
    if tile.error is not None:
        detail = f"<small>{_e(tile.error['code'])}: {_e(_clip(tile.error['message'], 200))}</small>"
    elif tile.progress is not None:
        detail = f"<small>step {int(tile.progress['step'])} of {int(tile.progress['total'])}</small>"
    # Sized like the image it stands for, so the grid does not jump when the image arrives.
    return (
        f'<div class="ph" style="aspect-ratio:{tile.width}/{tile.height}">'
        f"<strong>{_e(tile.status)}</strong>{detail}</div>"
    )


def _tile(tile: Tile) -> str:
    seed = f"<span>seed {_e(tile.seed)}</span>" if tile.seed is not None else ""
    # Adapter jobs say which adapters and scales made them, so they read beside their bare twins.
    seed += "".join(f'<span class="lora">{_e(lo["adapter_id"])} ×{_e(lo["scale"])}</span>' for lo in tile.loras)
    meta = ""
    if tile.metadata:
        meta = f'<p class="jmeta">{_e(_clip(_text(tile.metadata), _META_CHARS))}</p>'
    return (
        f'<figure class="tile s-{_e(tile.status)}" id="i{tile.index}">{_shots(tile)}<figcaption>'
        f'<div class="line"><span>#{tile.index}</span><span class="badge">{_e(tile.status)}</span>{seed}</div>'
        f'<p class="prompt" title="{_e(_clip(tile.prompt, _PROMPT_TITLE_CHARS))}">{_e(tile.prompt)}</p>'
        f"{meta}</figcaption></figure>"
    )


def _pager(page: GalleryPage, page_url: Callable[[int], str]) -> str:
    if page.pages == 1:
        return ""
    previous = (
        f'<a rel="prev" href="{_e(page_url(page.page - 1))}">← Previous</a>'
        if page.page > 1
        else '<span class="off">← Previous</span>'
    )
    following = (
        f'<a rel="next" href="{_e(page_url(page.page + 1))}">Next →</a>'
        if page.page < page.pages
        else '<span class="off">Next →</span>'
    )
    return f"<nav>{previous}<span>Page {page.page} of {page.pages}</span>{following}</nav>"


def render_gallery(page: GalleryPage, page_url: Callable[[int], str]) -> str:
    """The HTML of one gallery page; ``page_url(n)`` is the link to page ``n`` (carrying the caller's token)."""
    counts = ", ".join(f"{n} {status}" for status, n in page.counts.items())
    summary = f"{_e(page.batch_status)} · {page.total} job{'s' if page.total != 1 else ''}"
    if counts:
        summary += f": {_e(counts)}"
    metadata = "".join(f"<dt>{_e(k)}</dt><dd>{_e(_text(v))}</dd>" for k, v in page.metadata.items())
    refresh = f'<meta http-equiv="refresh" content="{REFRESH_S}">' if page.active else ""
    footer = (
        f"This page refreshes every {REFRESH_S} s while jobs are queued or running."
        if page.active
        else "Every job of this batch has finished."
    )
    pager = _pager(page, page_url)
    tiles = "".join(_tile(t) for t in page.tiles)
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="no-referrer"><meta name="robots" content="noindex">'
        f"{refresh}<title>Batch {_e(page.batch_id)} · gallery</title><style>{_CSS}</style></head>"
        f'<body><header><h1>Batch {_e(page.batch_id)}</h1><p class="summary">{summary}</p>'
        f"{f'<dl class=meta>{metadata}</dl>' if metadata else ''}</header>"
        f"{pager}<main>{tiles}</main>{pager}<footer>{footer}</footer></body></html>\n"
    )


def gallery_headers(page: GalleryPage) -> dict[str, str]:
    """Response headers: never cached or sent on as a Referer (the URL may hold a token), and a policy that lets
    the page load nothing but its own inline style and the images of the S3 origin it names."""
    images = " ".join(page.image_origins) or "'none'"
    policy = (
        f"default-src 'none'; img-src {images}; style-src 'unsafe-inline'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return {
        "Cache-Control": "no-store",
        "Referrer-Policy": "no-referrer",
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
    }
