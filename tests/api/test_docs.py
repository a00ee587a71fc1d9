"""The repository documents itself: docs/ covers every route, request field, error code and setting the code
has, and no committed file points outside the repository. Needs no service: the app is built, never started."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from fastapi import FastAPI

from api.errors import STATUS
from api.main import create_app
from core.schemas import JobRequest
from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PLANNED_HEADING = "## Planned, not yet served"
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
# "`GET /v1/jobs/{job_id}`": how the API page names an endpoint.
ENDPOINT = re.compile(r"`(" + "|".join(METHODS) + r") (/[^`\s]*)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")

# References to places outside the repository, assembled here so that this file does not match itself.
_UP = ".."
OUTSIDE = (
    f"{_UP}/shared",
    "/" + "work" + "/",
    *(f"shared/{name}.md" for name in ("API", "GPU", "ARCHITECTURE", "STYLE")),
)


@pytest.fixture(scope="module")
def app() -> FastAPI:
    """The API app as served; its lifespan never runs, so nothing connects."""
    return create_app(Settings(environment="test"), run_sweeper=False)


@pytest.fixture(scope="module")
def api_doc() -> str:
    return (DOCS / "api.md").read_text(encoding="utf-8")


def served_part(doc: str) -> str:
    """The API page up to its "Planned, not yet served" section."""
    assert PLANNED_HEADING in doc, f"docs/api.md lost its '{PLANNED_HEADING}' section"
    return doc.split(PLANNED_HEADING, 1)[0]


def routes(app: FastAPI) -> set[tuple[str, str]]:
    """(METHOD, path template) of every operation in the app's OpenAPI document."""
    return {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
        if method.upper() in METHODS
    }


def undocumented(app: FastAPI, doc: str) -> list[str]:
    """The app's endpoints that the served part of the API page does not name."""
    text = served_part(doc)
    return sorted(f"{m} {p}" for m, p in routes(app) if f"`{m} {p}`" not in text)


def test_every_served_endpoint_is_documented(app: FastAPI, api_doc: str) -> None:
    assert routes(app), "the app serves no route: the check would prove nothing"
    assert undocumented(app, api_doc) == []


def test_the_check_notices_a_missing_endpoint(app: FastAPI, api_doc: str) -> None:
    method, path = sorted(routes(app))[0]
    stripped = api_doc.replace(f"`{method} {path}`", "")
    assert f"{method} {path}" in undocumented(app, stripped)


def test_no_endpoint_is_documented_as_served_that_the_app_does_not_serve(app: FastAPI, api_doc: str) -> None:
    served = routes(app)
    builtin = {app.openapi_url, app.docs_url, app.redoc_url}
    named = {(m, p) for m, p in ENDPOINT.findall(served_part(api_doc)) if p not in builtin}
    assert sorted(named - served) == [], "list it under 'Planned, not yet served' instead"


def test_every_request_field_is_documented(api_doc: str) -> None:
    missing = [name for name in JobRequest.model_fields if f"`{name}`" not in api_doc]
    assert missing == []


def test_every_error_code_is_documented_with_its_status(api_doc: str) -> None:
    missing = [
        f"{status} {cls.code}" for cls, status in STATUS.items() if f"| {status} | `{cls.code}` |" not in api_doc
    ]
    assert missing == []


def test_every_setting_is_documented() -> None:
    operating = (DOCS / "operating.md").read_text(encoding="utf-8")
    names = [f"ZIMAGE_{name.upper()}" for name in Settings.model_fields]
    missing = [name for name in names if f"`{name}`" not in operating]
    assert missing == []


def tracked_files() -> list[Path]:
    """Files git tracks in this checkout (skips the test outside a git checkout, e.g. in an image)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_tracked_file_points_outside_the_repository() -> None:
    files = tracked_files()
    assert ROOT / "README.md" in files, "git ls-files listed nothing useful: the check would prove nothing"
    found = []
    for path in files:
        if not path.is_file():  # deleted in the working tree, not yet committed
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            found += [f"{path.relative_to(ROOT)}:{lineno}: {ref}" for ref in OUTSIDE if ref in line]
    assert found == []


def test_the_outside_check_would_notice_a_reference() -> None:
    line = f"The contract is [the API page]({_UP}/{'shared'}/{'API'}.md)."  # pieces: this file must not match
    assert any(ref in line for ref in OUTSIDE)


def test_links_of_the_docs_resolve_inside_the_repository() -> None:
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    assert len(pages) >= 5, "README.md and docs/api, architecture, operating, performance"
    broken = []
    for page in pages:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue  # a URL, or an anchor on the same page
            resolved = (page.parent / target.split("#", 1)[0]).resolve()
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []
