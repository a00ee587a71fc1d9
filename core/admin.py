"""``zimage-admin``: operator commands (migrate the database; list tenants; create, list, rotate and revoke
API keys; set a tenant's rate, quotas and fair-share weight, show and rotate a tenant's webhook signing secret)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, insert, select, update

from core import apikeys, ids, webhook_secrets
from core import tenants as tenant_admin
from core.db import create_database_if_missing, make_engine
from core.models import api_keys, tenants
from core.settings import Settings
from core.tenants import KeyView, TenantView

_ROOT = Path(__file__).resolve().parent.parent


def migrate(settings: Settings) -> None:
    """Create the database if it is missing and apply every Alembic migration."""
    from alembic import command
    from alembic.config import Config

    create_database_if_missing(settings.database_url)
    cfg = Config(str(_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(_ROOT / "migrations"))
    cfg.attributes["database_url"] = settings.database_url
    command.upgrade(cfg, "head")


def create_key(settings: Settings, tenant_name: str) -> str:
    """Create a key for ``tenant_name`` (creating the tenant if needed) and return the key itself."""
    engine = make_engine(settings, pool_size=1)
    key = apikeys.new_key()
    try:
        with engine.begin() as conn:
            tenant_id = conn.execute(select(tenants.c.id).where(tenants.c.name == tenant_name)).scalar()
            if tenant_id is None:
                tenant_id = ids.tenant_id()
                conn.execute(
                    insert(tenants).values(id=tenant_id, name=tenant_name, webhook_secret=webhook_secrets.new_secret())
                )
            conn.execute(
                insert(api_keys).values(
                    id=ids.key_id(),
                    tenant_id=tenant_id,
                    prefix=apikeys.display_prefix(key),
                    key_hash=apikeys.hash_key(key),
                )
            )
    finally:
        engine.dispose()
    return key


@contextmanager
def _transaction(settings: Settings) -> Iterator[Connection]:
    """One transaction on a one-connection engine, disposed of afterwards."""
    engine = make_engine(settings, pool_size=1)
    try:
        with engine.begin() as conn:
            yield conn
    finally:
        engine.dispose()


def _announce(settings: Settings, messages: list[str]) -> bool:
    """Tell the API processes to drop what they cached of these keys or tenants; False when Redis did not answer."""
    return apikeys.announce(settings.redis_url, settings.redis_prefix, messages)


def revoke_key(settings: Settings, key: str) -> bool:
    """Revoke a key, given itself or its id (``key_…``); True when one was revoked. The API processes refuse it
    from their next request (told through Redis; within 5 s should Redis not answer)."""
    with _transaction(settings) as conn:
        digest = tenant_admin.revoke_key(conn, key)
    if digest is not None:
        _announce(settings, [f"key:{digest}"])
    return digest is not None


def rotate_key(settings: Settings, tenant_name: str, grace_s: float = 0.0) -> tuple[str, int] | None:
    """A new key for the tenant, and how many of its other keys stop working ``grace_s`` from now; None when
    there is no such tenant."""
    with _transaction(settings) as conn:
        rotated = tenant_admin.rotate_key(conn, tenant_name, grace_s)
    if rotated is None:
        return None
    key, retired = rotated
    _announce(settings, [f"key:{digest}" for digest in retired])
    return key, len(retired)


def list_tenants(settings: Settings) -> list[TenantView]:
    """Every tenant, with its own limits and its number of active keys."""
    with _transaction(settings) as conn:
        return tenant_admin.list_tenants(conn)


def list_keys(settings: Settings, tenant_name: str) -> list[KeyView] | None:
    """The tenant's keys (id, prefix, created, revoked; never the key); None when there is no such tenant."""
    with _transaction(settings) as conn:
        return tenant_admin.list_keys(conn, tenant_name)


def set_limits(settings: Settings, tenant_name: str, limits: dict[str, int | None]) -> bool:
    """Set some of the tenant's limits (None: the setting's default, 0: no limit); False when there is no such
    tenant. The API processes apply a new rate from their next request; quotas are read at every submit."""
    with _transaction(settings) as conn:
        tenant = tenant_admin.set_limits(conn, tenant_name, limits)
    if tenant is not None:
        _announce(settings, [f"tenant:{tenant}"])
    return tenant is not None


def set_weight(settings: Settings, tenant_name: str, weight: float) -> bool:
    """Set a tenant's fair-share weight (its share of the accelerators relative to other tenants); False when
    there is no such tenant. A weight that is not a finite number above 0 is a ``ValueError``."""
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"a weight must be a number above 0, not {weight}")
    engine = make_engine(settings, pool_size=1)
    try:
        with engine.begin() as conn:
            result = conn.execute(update(tenants).where(tenants.c.name == tenant_name).values(weight=weight))
            return result.rowcount > 0
    finally:
        engine.dispose()


def webhook_secret(settings: Settings, tenant_name: str, *, rotate: bool) -> str | None:
    """The tenant's webhook signing secret (``whsec_…``; made if it had none), or, with ``rotate``, a new one that
    replaces it (the old one keeps signing for ``webhook_secret_grace_s``); None when there is no such tenant."""
    engine = make_engine(settings, pool_size=1)
    try:
        with engine.connect() as conn:
            if rotate:
                return webhook_secrets.rotate(conn, tenant_name)
            shown = webhook_secrets.show(conn, tenant_name)
            return None if shown is None else shown[0]
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``zimage-admin`` console script."""
    parser = argparse.ArgumentParser(prog="zimage-admin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="create the database if needed and apply migrations")
    ck = sub.add_parser("create-key", help="create an API key (and its tenant); prints only the key")
    ck.add_argument("--tenant", required=True)
    rk = sub.add_parser("revoke-key", help="revoke an API key")
    rk.add_argument("key")
    sw = sub.add_parser("set-weight", help="set a tenant's fair-share weight (above 0; default 1)")
    sw.add_argument("--tenant", required=True)
    sw.add_argument("weight", type=float)
    sub.add_parser("list-tenants", help="every tenant: weight, its own limits, active keys")
    lk = sub.add_parser("list-keys", help="a tenant's keys: id, prefix, created, revoked (never the key)")
    lk.add_argument("--tenant", required=True)
    rot = sub.add_parser("rotate-key", help="print a new key for the tenant; revoke its others (after --grace)")
    rot.add_argument("--tenant", required=True)
    rot.add_argument("--grace", type=float, default=0.0, metavar="SECONDS", help="old keys work this long (0)")
    sl = sub.add_parser("set-limits", help="set a tenant's rate and quotas: N >= 0 (0: no limit) or 'default'")
    sl.add_argument("--tenant", required=True)
    for flag, column in _LIMIT_FLAGS.items():
        sl.add_argument(flag, dest=column, type=_limit, default=argparse.SUPPRESS, metavar="N")
    ws = sub.add_parser("webhook-secret", help="show or rotate a tenant's webhook signing secret")
    ws.add_argument("action", choices=["show", "rotate"])
    ws.add_argument("--tenant", required=True)
    args = parser.parse_args(argv)
    settings = Settings()
    if args.command == "migrate":
        migrate(settings)
        print("database is at the latest migration", file=sys.stderr)
    elif args.command == "create-key":
        print(create_key(settings, args.tenant))
    elif args.command == "revoke-key" and not revoke_key(settings, args.key):
        print("no such active key", file=sys.stderr)
        return 1
    elif args.command in _TENANT_COMMANDS:
        return _TENANT_COMMANDS[args.command](settings, args)
    elif args.command == "set-weight":
        try:
            if not set_weight(settings, args.tenant, args.weight):
                print(f"no such tenant: {args.tenant}", file=sys.stderr)
                return 1
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
    elif args.command == "webhook-secret":
        secret = webhook_secret(settings, args.tenant, rotate=args.action == "rotate")
        if secret is None:
            print(f"no such tenant: {args.tenant}", file=sys.stderr)
            return 1
        print(secret)
        if args.action == "rotate":
            print(
                f"the previous secret also signs for {settings.webhook_secret_grace_s:g} s more", file=sys.stderr
            )
    return 0


_LIMIT_FLAGS = {
    "--rps": "rate_limit_rps",
    "--max-queued": "max_queued_jobs",
    "--max-batch": "max_batch_jobs",
    "--images-per-day": "max_images_per_day",
}


def _limit(text: str) -> int | None:
    """A limit on the command line: a whole number, 0 or more (0: no limit), or ``default`` (None)."""
    if text == "default":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"a whole number, 0 or more, or 'default': not {text!r}")
    return int(text)


def _shown(value: Any) -> str:
    return "default" if value is None else str(value)


def _cmd_list_tenants(settings: Settings, _: argparse.Namespace) -> int:
    print("name\tid\tweight\trps\tmax_queued\tmax_batch\timages_per_day\tactive_keys\tcreated")
    for t in list_tenants(settings):
        limits = "\t".join(_shown(t.limits[c]) for c in _LIMIT_FLAGS.values())
        print(f"{t.name}\t{t.id}\t{t.weight:g}\t{limits}\t{t.active_keys}\t{t.created_at.isoformat()}")
    return 0


def _cmd_list_keys(settings: Settings, args: argparse.Namespace) -> int:
    keys = list_keys(settings, args.tenant)
    if keys is None:
        print(f"no such tenant: {args.tenant}", file=sys.stderr)
        return 1
    print("id\tprefix\tcreated\trevoked")
    for k in keys:
        revoked = "" if k.revoked_at is None else k.revoked_at.isoformat()
        print(f"{k.id}\t{k.prefix}…\t{k.created_at.isoformat()}\t{revoked}")
    return 0


def _cmd_rotate_key(settings: Settings, args: argparse.Namespace) -> int:
    if not math.isfinite(args.grace) or args.grace < 0:
        print("--grace is a number of seconds, 0 or more", file=sys.stderr)
        return 2
    rotated = rotate_key(settings, args.tenant, args.grace)
    if rotated is None:
        print(f"no such tenant: {args.tenant}", file=sys.stderr)
        return 1
    key, retired = rotated
    print(key)
    when = "now" if args.grace == 0 else f"in {args.grace:g} s"
    print(f"the new key is shown once; {retired} earlier key(s) stop working {when}", file=sys.stderr)
    return 0


def _cmd_set_limits(settings: Settings, args: argparse.Namespace) -> int:
    limits = {column: getattr(args, column) for column in _LIMIT_FLAGS.values() if hasattr(args, column)}
    if not set_limits(settings, args.tenant, limits):
        print(f"no such tenant: {args.tenant}", file=sys.stderr)
        return 1
    return 0


_TENANT_COMMANDS = {
    "list-tenants": _cmd_list_tenants,
    "list-keys": _cmd_list_keys,
    "rotate-key": _cmd_rotate_key,
    "set-limits": _cmd_set_limits,
}


if __name__ == "__main__":
    raise SystemExit(main())
