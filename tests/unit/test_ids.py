"""Ids: prefixed by type, unique, time-ordered, and with at least 74 random bits (UUIDv7)."""

from __future__ import annotations

import os
import re
import time

import pytest

from core import ids

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_SHAPE = re.compile(r"^(job|bat|upl|ten|key)_[0-9a-hjkmnp-tv-z]{26}$")


def _as_int(id_: str) -> int:
    """The 128-bit value behind an id (Crockford base32 after the prefix)."""
    value = 0
    for ch in id_.split("_", 1)[1]:
        value = value * 32 + _ALPHABET.index(ch)
    assert value < 1 << 128
    return value


@pytest.mark.parametrize(
    ("make", "prefix"),
    [
        (ids.job_id, "job_"),
        (ids.batch_id, "bat_"),
        (ids.upload_id, "upl_"),
        (ids.tenant_id, "ten_"),
        (ids.key_id, "key_"),
    ],
)
def test_ids_carry_their_type_prefix(make, prefix: str) -> None:
    value = make()
    assert value.startswith(prefix)
    assert _SHAPE.match(value), value


def test_new_id_uses_any_prefix() -> None:
    assert ids.new_id("lora").startswith("lora_")


def test_ids_fit_the_id_columns() -> None:
    assert len(ids.job_id()) <= 40


def test_10k_ids_are_unique() -> None:
    made = [ids.job_id() for _ in range(10_000)]
    assert len(set(made)) == 10_000


def test_ids_made_later_sort_after() -> None:
    earlier = [ids.job_id() for _ in range(50)]
    time.sleep(0.003)
    later = [ids.job_id() for _ in range(50)]
    assert max(earlier) < min(later)


def test_a_sequence_made_over_time_is_sorted() -> None:
    made = []
    for _ in range(20):
        made.append(ids.job_id())
        time.sleep(0.0015)
    assert made == sorted(made)


def test_ids_are_uuidv7_with_the_current_millisecond() -> None:
    before = time.time_ns() // 1_000_000
    value = _as_int(ids.job_id())
    after = time.time_ns() // 1_000_000
    assert before <= value >> 80 <= after
    assert (value >> 76) & 0xF == 7  # version
    assert (value >> 62) & 0b11 == 0b10  # RFC 4122 variant


def test_ids_have_at_least_74_random_bits() -> None:
    # Made as fast as possible, most of these share a millisecond: only the random bits tell them apart.
    values = [_as_int(ids.job_id()) for _ in range(4000)]
    assert len(set(values)) == len(values)
    random_positions = list(range(0, 62)) + list(range(64, 76))  # rand_b (62 bits) and rand_a (12 bits)
    assert len(random_positions) >= 74
    for bit in random_positions:
        ones = sum((v >> bit) & 1 for v in values)
        # A fair coin over 4000 draws stays well inside 40%..60%.
        assert 0.4 * len(values) < ones < 0.6 * len(values), f"bit {bit} is not random: {ones} ones"


def test_ids_in_the_same_millisecond_are_distinct() -> None:
    by_ms: dict[int, set[int]] = {}
    for _ in range(5000):
        v = _as_int(ids.job_id())
        by_ms.setdefault(v >> 80, set()).add(v)
    busiest = max(by_ms.values(), key=len)
    assert len(busiest) > 1  # several ids were made in one millisecond, and none collided
    assert sum(len(s) for s in by_ms.values()) == 5000


def test_a_forked_child_never_hands_out_its_parents_random_bytes() -> None:
    """Ids draw from a pool of the system's random bytes; a child made by fork (Celery's prefork, uvicorn
    workers) must not reuse what the parent holds, or both would make the same ids."""
    ids.job_id()  # the parent holds a pool now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next bytes, to the parent
        os.close(read)
        os.write(write, ids._ENTROPY.take(64))
        os._exit(0)
    os.close(write)
    child = os.read(read, 64)
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 64
    assert child != ids._ENTROPY.take(64)
    assert len({ids.job_id() for _ in range(10_000)}) == 10_000
