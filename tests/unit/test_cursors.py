"""Page cursors: every id's cursor matches its kind's documented pattern and decodes back; the job pattern is the
one the API document has always stated; a cursor of another kind is refused."""

from __future__ import annotations

import random
import re

import pytest

from api.cursors import cursor_pattern, decode_cursor, encode_cursor
from core import ids
from core.errors import ValidationFailed

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def test_the_job_pattern_is_the_documented_one() -> None:
    assert cursor_pattern("job_") == r"^am9iX[w-z0-9_-](?:[A-Za-z0-9_-]{4})*[A-Za-z0-9_-]{0,2}$"


@pytest.mark.parametrize(("prefix", "make"), [("job_", ids.job_id), ("lora_", ids.adapter_id), ("bat_", ids.batch_id)])
def test_cursors_of_real_ids_match_their_pattern_and_decode_back(prefix: str, make: object) -> None:
    pattern = re.compile(cursor_pattern(prefix))
    for _ in range(200):
        value = make()  # type: ignore[operator]
        cursor = encode_cursor(value)
        assert pattern.fullmatch(cursor), cursor
        assert decode_cursor(cursor, prefix) == value


@pytest.mark.parametrize("prefix", ["job_", "lora_"])
def test_every_string_of_the_pattern_decodes_to_an_id_of_the_prefix(prefix: str) -> None:
    pattern = re.compile(cursor_pattern(prefix))
    start = encode_cursor(prefix)[: len(prefix) * 8 // 6]
    rng = random.Random(7)
    matched = 0
    for _ in range(5000):
        candidate = start + "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 14)))
        if pattern.fullmatch(candidate):
            matched += 1
            assert decode_cursor(candidate, prefix).startswith(prefix)
    assert matched > 100


def test_a_cursor_of_another_kind_is_refused() -> None:
    with pytest.raises(ValidationFailed):
        decode_cursor(encode_cursor(ids.job_id()), "lora_")
    assert not re.fullmatch(cursor_pattern("lora_"), encode_cursor(ids.job_id()))
