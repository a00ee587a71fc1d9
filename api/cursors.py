"""Page cursors of the list endpoints: an opaque, unpadded base64url of the last id of a page, and the shape a
cursor of one kind of id has (stated in the API document, so a client learns the rule without a 422)."""

from __future__ import annotations

import base64
import binascii
import re

from core import errors

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_CHAR = "[A-Za-z0-9_-]"
_ID_CHARS = re.compile(rb"[0-9a-z]*")


def cursor_pattern(prefix: str) -> str:
    """The regular expression every cursor of ids starting with ``prefix`` (``"job_"``) matches: the prefix's own
    base64url characters, the one it shares with what follows (only the values its last bits allow), then any
    characters, of a length unpadded base64 can have (never one more than a multiple of 4)."""
    raw = prefix.encode()
    whole, spare = divmod(len(raw) * 8, 6)
    pattern = "^" + re.escape(base64.urlsafe_b64encode(raw).decode()[:whole])
    length = whole
    if spare:
        last_bits = raw[-1] & ((1 << spare) - 1)
        pattern += _char_class([c for i, c in enumerate(_ALPHABET) if i >> (6 - spare) == last_bits])
        length += 1
    # After the groups of four, 0-3 more characters: every count but the one that leaves a length of 4k + 1.
    counts = [f"{_CHAR}{{{low}}}" if low == high else f"{_CHAR}{{{low},{high}}}" for low, high in _runs(length)]
    tail = counts[0] if len(counts) == 1 else "(?:" + "|".join(counts) + ")"
    return pattern + f"(?:{_CHAR}{{4}})*" + tail + "$"


def encode_cursor(last_id: str) -> str:
    """An opaque cursor pointing after ``last_id``."""
    return base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, prefix: str) -> str:
    """The id a cursor points after (any cursor of ``cursor_pattern(prefix)`` decodes: ids only compare to it);
    ValidationFailed for one that is not of that shape."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    # What follows the prefix counts up to its first character that no id holds (ids are lower-case base32).
    size = len(prefix)
    value = raw[:size].decode("latin-1") + _ID_CHARS.match(raw, size).group().decode()  # type: ignore[union-attr]
    if not value.startswith(prefix):
        raise errors.ValidationFailed("invalid cursor", [{"field": "cursor", "message": "invalid cursor"}])
    return value


def _runs(length: int) -> list[tuple[int, int]]:
    """The counts 0-3 of further characters a base64 text of ``length`` characters so far may have, as runs."""
    allowed = [n for n in range(4) if (length + n) % 4 != 1]
    runs: list[tuple[int, int]] = []
    for n in allowed:
        if runs and runs[-1][1] == n - 1:
            runs[-1] = (runs[-1][0], n)
        else:
            runs.append((n, n))
    return runs


def _char_class(chars: list[str]) -> str:
    """A regex character class of ``chars`` (in alphabet order), runs of consecutive characters as ranges and a
    ``-`` last, where it needs no escape."""
    runs: list[list[str]] = []
    for char in (c for c in chars if c != "-"):
        if runs and ord(char) == ord(runs[-1][-1]) + 1:
            runs[-1].append(char)
        else:
            runs.append([char])
    parts = [f"{r[0]}-{r[-1]}" if len(r) > 2 else "".join(r) for r in runs]
    return "[" + "".join(parts) + ("-" if "-" in chars else "") + "]"
