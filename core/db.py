"""Database engines (sync for the worker and tools, async for the API) and database creation."""

from __future__ import annotations

from typing import Any

import psycopg
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from core.settings import Settings

# A statement that hangs (a lock, a dead server) must not hang a request or a worker forever.
_CONNECT_ARGS: dict[str, Any] = {"connect_timeout": 5, "options": "-c statement_timeout=30000"}


def make_engine(settings: Settings, *, pool_size: int | None = None) -> Engine:
    """A synchronous engine (worker, sweeper, admin tools)."""
    return create_engine(
        settings.database_url,
        pool_size=pool_size or settings.db_pool_size,
        pool_pre_ping=True,
        connect_args=_CONNECT_ARGS,
    )


def make_async_engine(settings: Settings) -> AsyncEngine:
    """An asyncio engine (the API)."""
    return create_async_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
        pool_pre_ping=True,
        connect_args=_CONNECT_ARGS,
    )


async def connect_driver(engine: AsyncEngine) -> psycopg.AsyncConnection:
    """A psycopg connection to ``engine``'s database of its own (outside the engine's pool), with the engines'
    connect options: for code that runs only hot, prepared statements on it (the API's group commit)."""
    url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    return await psycopg.AsyncConnection.connect(
        url, connect_timeout=_CONNECT_ARGS["connect_timeout"], options=_CONNECT_ARGS["options"]
    )


async def driver_connection(conn: AsyncConnection) -> psycopg.AsyncConnection:
    """The psycopg connection under ``conn``, inside ``conn``'s transaction (begun here if need be, so that its
    commit or rollback also covers what runs on the driver): for hot statements that skip SQLAlchemy's per-call
    work (prepared once per connection, named parameters in psycopg's ``%(name)s`` form)."""
    if not conn.in_transaction():
        await conn.begin()
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    assert isinstance(driver, psycopg.AsyncConnection)
    return driver


def create_database_if_missing(database_url: str) -> bool:
    """Create the database named in ``database_url`` when it does not exist; True when it was created."""
    url = make_url(database_url)
    name = url.database
    admin = create_engine(
        url.set(database="postgres"), isolation_level="AUTOCOMMIT", connect_args=_CONNECT_ARGS
    )
    try:
        with admin.connect() as conn:
            exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).scalar()
            if exists:
                return False
            conn.execute(text(f'CREATE DATABASE "{name}"'))
            return True
    finally:
        admin.dispose()


def drop_database(database_url: str) -> None:
    """Drop the database named in ``database_url`` (tests), closing its other connections first."""
    url = make_url(database_url)
    admin = create_engine(
        url.set(database="postgres"), isolation_level="AUTOCOMMIT", connect_args=_CONNECT_ARGS
    )
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
    finally:
        admin.dispose()
