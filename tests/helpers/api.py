"""Helpers for tests that call the API."""

from __future__ import annotations


def auth(key: str) -> dict[str, str]:
    """The Authorization header for ``key``."""
    return {"Authorization": f"Bearer {key}"}
