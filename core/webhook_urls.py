"""Which webhook URLs the service may call: the submit's check, and the delivery process's again before each send.

The rules are those of ``core.fetch`` for image URLs: https only; no credentials in the URL; the host resolved
once and every address it returns public (loopback, private, link-local, metadata and the other special blocks
refused), unless the host is on ``ZIMAGE_WEBHOOK_ALLOW_HOSTS``. Outside production an allow-listed host may also
be plain http (a receiver on loopback in tests and local runs); in production every webhook is https.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import httpx

from core.errors import ValidationFailed
from core.fetch import checked_address, host_allowed, precheck_url
from core.settings import Settings

FIELD = "webhook_url"


def parsed_webhook_url(url: str, settings: Settings, *, field: str = FIELD) -> httpx.URL:
    """The URL parsed, after every check that needs no network; ValidationFailed naming ``field``."""
    parsed = precheck_url(url, field=field, allow_hosts=settings.webhook_allow_hosts)
    if parsed.scheme != "https" and settings.environment == "production":
        raise ValidationFailed(f"{field} must be an https URL", [{"field": field, "message": "must be an https URL"}])
    return parsed


def webhook_address(url: str, settings: Settings, *, field: str = FIELD) -> tuple[httpx.URL, str]:
    """The URL parsed and the checked address to connect to (resolves the name: blocking, call it off an event
    loop); ValidationFailed naming ``field`` when the URL may not be called."""
    parsed = parsed_webhook_url(url, settings, field=field)
    return parsed, checked_address(parsed, field=field, allow_hosts=settings.webhook_allow_hosts)


def is_allow_listed(url: httpx.URL, settings: Settings) -> bool:
    """Whether the URL's host is on the webhook allow-list."""
    return host_allowed(url.raw_host.decode("ascii", "replace"), settings.webhook_allow_hosts)


async def check_webhook_url(url: str, settings: Settings, *, field: str = FIELD) -> None:
    """The submit's check of one webhook URL (the name is resolved in a thread); ValidationFailed naming ``field``."""
    await asyncio.to_thread(webhook_address, url, settings, field=field)


async def webhook_url_problems(urls: Iterable[tuple[int | None, str]], settings: Settings) -> list[dict[str, object]]:
    """The problems of a batch's webhook URLs, ``(index, url)`` each (index None: the batch's own), as refusal
    details naming ``webhook_url`` and the job's index. Each distinct URL is checked once."""
    by_url: dict[str, list[int | None]] = {}
    for index, url in urls:
        by_url.setdefault(url, []).append(index)
    problems: list[dict[str, object]] = []
    for url, indexes in by_url.items():
        try:
            await check_webhook_url(url, settings)
        except ValidationFailed as exc:
            message = exc.details[0]["message"] if exc.details else str(exc)
            for index in indexes:
                item: dict[str, object] = {"field": FIELD, "message": message}
                if index is not None:
                    item["index"] = index
                problems.append(item)
    return problems
