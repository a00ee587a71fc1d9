"""Who sends webhooks: only the delivery process. It loads neither torch nor Celery, and neither the GPU worker nor
the API request path imports the code that sends them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SENDERS = ["worker.webhooks", "core.webhook_delivery"]


def loaded_after(module: str, watched: list[str]) -> list[str]:
    """Which of ``watched`` a fresh interpreter has loaded after importing ``module``."""
    code = (
        f"import importlib, json, sys; importlib.import_module({module!r}); "
        f"print(json.dumps([m for m in {watched!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_delivery_process_loads_no_torch_and_no_celery() -> None:
    assert loaded_after("worker.webhooks", ["torch", "diffusers", "celery", "kombu", "fastapi"]) == []


def test_the_gpu_worker_and_the_api_never_load_the_sender() -> None:
    assert loaded_after("worker.tasks", SENDERS) == []
    assert loaded_after("api.main", SENDERS) == []
