"""API keys: how they are made, hashed and recognised, and how API processes hear of a revocation. Only the hash
and a short prefix are ever stored."""

from __future__ import annotations

import hashlib
import secrets

import redis

KEY_PREFIX = "zk_"


def new_key() -> str:
    """A new API key: ``zk_`` and 43 url-safe characters (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The stored form of a key (hex SHA-256); a fast hash is right for 256-bit random secrets."""
    return hashlib.sha256(key.encode()).hexdigest()


def display_prefix(key: str) -> str:
    """The first characters of a key, kept so that people can tell their keys apart."""
    return key[:10]


def matches(key: str, stored_hash: str) -> bool:
    """Whether ``key`` hashes to ``stored_hash``, compared in constant time."""
    return secrets.compare_digest(hash_key(key), stored_hash)


def revocation_channel(prefix: str) -> str:
    """The Redis channel on which API processes hear that cached keys must be looked up again."""
    return f"{prefix}apikeys"


def announce(redis_url: str, prefix: str, messages: list[str]) -> bool:
    """Tell every API process to drop what it cached (``key:<hash>`` or ``tenant:<id>``); False when Redis could not
    be told (the processes' cache TTL then bounds how long the old answer lives)."""
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        for message in messages:
            client.publish(revocation_channel(prefix), message)
        return True
    except redis.RedisError:
        return False
    finally:
        client.close()
