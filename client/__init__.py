"""The repository's import path of its first client, ``ZImageClient`` (kept for tests and benches).

The SDK itself is ``zimage_client`` (``client/src/zimage_client``, installable alone with ``pip install
./client``): ``Client``, ``AsyncClient``, the error classes and the ``zimage`` command line.
"""

from client.zimage import ApiError, ZImageClient

__all__ = ["ApiError", "ZImageClient"]
