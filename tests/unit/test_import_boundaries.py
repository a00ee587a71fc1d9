"""Layering: the API process never loads the inference stack or Celery; the shared core loads no framework."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import core

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import importlib, json, sys
forbidden = {forbidden!r}
found = {{}}
for name in {modules!r}:
    before = {{m for m in forbidden if m in sys.modules}}
    importlib.import_module(name)
    new = sorted(m for m in forbidden if m in sys.modules and m not in before)
    if new:
        found[name] = new
print(json.dumps(found))
"""


def _loaded_by(modules: list[str], forbidden: list[str]) -> dict[str, list[str]]:
    """Import ``modules`` one after another in a fresh interpreter; which forbidden packages each pulled in."""
    code = _PROBE.format(forbidden=forbidden, modules=modules)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _core_modules() -> list[str]:
    return sorted(f"core.{m.name}" for m in pkgutil.iter_modules(core.__path__))


def test_the_probe_notices_a_forbidden_import() -> None:
    assert _loaded_by(["colorsys"], ["colorsys"]) == {"colorsys": ["colorsys"]}


def test_api_main_does_not_import_torch_diffusers_or_celery() -> None:
    assert _loaded_by(["api.main"], ["torch", "diffusers", "celery", "transformers", "kombu"]) == {}


def test_core_modules_import_no_framework() -> None:
    modules = _core_modules()
    assert {"core.schemas", "core.status", "core.queue", "core.submission", "core.sweeper"} <= set(modules)
    assert _loaded_by(modules, ["fastapi", "starlette", "celery", "kombu", "torch", "diffusers"]) == {}


def test_the_worker_app_sets_the_openmp_wait_policy_before_torch_loads() -> None:
    code = (
        "import os, sys; os.environ.pop('OMP_WAIT_POLICY', None); import worker.app, worker.tasks; "
        "print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # Set by worker.app, whose import comes before worker.tasks loads torch.
    assert out.stdout.split()[-2:] == ["PASSIVE", "True"]
    assert _loaded_by(["worker.app"], ["torch"]) == {}


_DEV_BUILDERS = ("deploy.tiny_checkpoint", "deploy.tiny_edit_checkpoint")


def _imported_names(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in the file names, submodules of ``from`` included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_probe_of_imports_sees_from_imports() -> None:
    probe = ROOT / "deploy" / "tiny_edit_checkpoint.py"
    assert "deploy.tiny_checkpoint" in _imported_names(probe)


def test_the_service_packages_never_import_the_tiny_checkpoint_builders() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(n for n in _imported_names(path) if n.startswith(_DEV_BUILDERS))
        for package in ("api", "core", "worker")
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_worker_package_holds_no_checkpoint_builders() -> None:
    # Dev tooling lives in deploy/: a worker image runs real weights and never builds random ones.
    modules = {str(path.relative_to(ROOT)) for path in (ROOT / "worker").rglob("*.py")}
    assert "worker/engine/__init__.py" in modules
    assert sorted(m for m in modules if "tiny" in Path(m).name) == []
