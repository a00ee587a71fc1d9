"""Python SDK and ``zimage`` CLI of the Z-Image job service.

    from zimage_client import Client

    with Client() as zc:                      # ZIMAGE_API_URL and ZIMAGE_API_KEY from the environment
        job = zc.wait(zc.submit(prompt="a red fox in the snow", width=512, height=512)["id"])
        zc.download_outputs(job, "out/")

``AsyncClient`` is the same on asyncio. Errors are ``ZImageError`` and one subclass per API error code.
"""

from .async_client import AsyncClient
from .client import Client
from .config import VERSION as __version__
from .config import ConfigError
from .errors import (
    BadRequest,
    ChecksumMismatch,
    Conflict,
    InternalError,
    InvalidWebhook,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServiceUnreachable,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
    ValidationError,
    WaitTimeout,
    ZImageError,
)
from .objects import Adapter, AdapterPage, Batch, Job, ManifestLine, Output, Upload
from .retry import RetryPolicy
from .watch import PollBackoff
from .webhooks import verify_webhook

__all__ = [
    "Adapter",
    "AdapterPage",
    "AsyncClient",
    "BadRequest",
    "Batch",
    "ChecksumMismatch",
    "Client",
    "ConfigError",
    "Conflict",
    "InternalError",
    "InvalidWebhook",
    "Job",
    "ManifestLine",
    "MethodNotAllowed",
    "NotFound",
    "Output",
    "PayloadTooLarge",
    "PollBackoff",
    "RateLimited",
    "RetryPolicy",
    "ServiceUnreachable",
    "Unauthorized",
    "Unavailable",
    "UnsupportedMediaType",
    "Upload",
    "ValidationError",
    "WaitTimeout",
    "ZImageError",
    "__version__",
    "verify_webhook",
]
