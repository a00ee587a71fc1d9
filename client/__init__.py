"""A small Python client of the Z-Image job service HTTP API."""

from client.zimage import ApiError, ZImageClient

__all__ = ["ApiError", "ZImageClient"]
