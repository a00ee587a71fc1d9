"""Opaque, unguessable, time-ordered identifiers (UUIDv7 in Crockford base32, prefixed by type)."""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case: sorts like the number


class _Entropy:
    """The system's random bytes (``os.urandom``), read 4 KiB at a time: a system call per id was 2.5 % of the
    API's CPU under a bulk load. The same bytes, as unguessable; a forked child starts with none of its parent's."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._pool = b""
        self._at = 0

    def take(self, n: int) -> bytes:
        """``n`` bytes no one else gets."""
        with self._lock:
            if self._at + n > len(self._pool):
                self._pool, self._at = os.urandom(max(n, self._size)), 0
            out = self._pool[self._at : self._at + n]
            self._at += n
            return out

    def forget(self) -> None:
        """Drop what is held (a child must not hand out its parent's bytes)."""
        self._lock = threading.Lock()
        self._pool, self._at = b"", 0


_ENTROPY = _Entropy()
os.register_at_fork(after_in_child=_ENTROPY.forget)


def uuid7_int() -> int:
    """A UUIDv7 as an integer: 48-bit unix milliseconds, version and variant bits, 74 random bits."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(_ENTROPY.take(10), "big")  # 80 bits, 74 used
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version 7
    value |= ((rand >> 68) & 0xFFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # RFC 4122 variant
    value |= rand & ((1 << 62) - 1)  # rand_b, 62 bits
    return value


# Every pair of digits, by the 10 bits it stands for: an id is 13 lookups (a third of base64.b32encode's time,
# which CPython writes in Python; a 10 000-job batch makes 10 000 ids, a submit one).
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]


def _base32(value: int) -> str:
    """26 Crockford base32 digits of a 128-bit value (26 * 5 = 130 bits), most significant first."""
    p = _PAIRS
    return "".join(
        [
            p[(value >> 120) & 1023], p[(value >> 110) & 1023], p[(value >> 100) & 1023], p[(value >> 90) & 1023],
            p[(value >> 80) & 1023], p[(value >> 70) & 1023], p[(value >> 60) & 1023], p[(value >> 50) & 1023],
            p[(value >> 40) & 1023], p[(value >> 30) & 1023], p[(value >> 20) & 1023], p[(value >> 10) & 1023],
            p[value & 1023],
        ]
    )  # fmt: skip


def new_id(prefix: str) -> str:
    """A new id such as ``job_01jd…``; ids made later sort after ids made earlier (millisecond order)."""
    return f"{prefix}_{_base32(uuid7_int())}"


def job_id() -> str:
    """A new job id."""
    return new_id("job")


def batch_id() -> str:
    """A new batch id."""
    return new_id("bat")


def upload_id() -> str:
    """A new upload id."""
    return new_id("upl")


def adapter_id() -> str:
    """A new LoRA adapter id."""
    return new_id("lora")


def tenant_id() -> str:
    """A new tenant id."""
    return new_id("ten")


def key_id() -> str:
    """A new API key id."""
    return new_id("key")
