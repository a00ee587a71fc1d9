"""``zimage-admin``: operator commands (migrate the database, create and revoke API keys, set a tenant's
fair-share weight, show and rotate a tenant's webhook signing secret)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from sqlalchemy import insert, select, update
from sqlalchemy.sql import func

from core import apikeys, ids, webhook_secrets
from core.db import create_database_if_missing, make_engine
from core.models import api_keys, tenants
from core.settings import Settings

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


def revoke_key(settings: Settings, key: str) -> bool:
    """Revoke a key; True when one was revoked."""
    engine = make_engine(settings, pool_size=1)
    try:
        with engine.begin() as conn:
            result = conn.execute(
                update(api_keys)
                .where(api_keys.c.key_hash == apikeys.hash_key(key), api_keys.c.revoked_at.is_(None))
                .values(revoked_at=func.now())
            )
            return result.rowcount > 0
    finally:
        engine.dispose()


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


if __name__ == "__main__":
    raise SystemExit(main())
