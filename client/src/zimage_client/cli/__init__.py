"""The ``zimage`` command line: generate, edit, batch (resumable), status, cancel, webhooks verify."""

from .app import app, main

__all__ = ["app", "main"]
