"""Writing a downloaded image safely: into a temporary file beside its destination, hashed as it is written,
renamed into place only when its SHA-256 is the one the service recorded. A reader never sees half a file,
and an interrupted download leaves at most a ``.part`` file that the next one replaces."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from types import TracebackType

from .errors import ChecksumMismatch
from .objects import Output

PART_SUFFIX = ".part"


def file_sha256(path: str | Path) -> str:
    """The hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_verified(path: str | Path, sha256: str | None) -> bool:
    """Whether ``path`` exists and holds exactly the bytes ``sha256`` names."""
    p = Path(path)
    return sha256 is not None and p.is_file() and file_sha256(p) == sha256


def extension(output: Output) -> str:
    """The file extension of an output (``png``, ``jpg``, ``webp``), from its S3 key or format."""
    key = output.get("key", "")
    if "." in key.rsplit("/", 1)[-1]:
        return key.rsplit(".", 1)[1]
    return {"jpeg": "jpg"}.get(output.get("format", "png"), output.get("format", "png"))


class AtomicWriter:
    """``with AtomicWriter(path, sha256) as w: w.write(chunk)``: the file appears at ``path`` only if the
    bytes hash to ``sha256`` (ChecksumMismatch otherwise, and nothing is left behind)."""

    def __init__(self, path: str | Path, sha256: str | None) -> None:
        self.path = Path(path)
        self.expected = sha256
        self._digest = hashlib.sha256()
        self._fd = -1
        self._tmp = ""

    def __enter__(self) -> AtomicWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=PART_SUFFIX)
        return self

    def write(self, chunk: bytes) -> None:
        """Append bytes."""
        self._digest.update(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(self._fd, view) :]

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is None:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)
        if exc_type is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            return
        got = self._digest.hexdigest()
        if self.expected is not None and got != self.expected:
            os.unlink(self._tmp)
            raise ChecksumMismatch(f"{self.path.name}: got sha256 {got}, expected {self.expected}")
        os.chmod(self._tmp, 0o644)
        os.replace(self._tmp, self.path)


def remove_partials(directory: str | Path) -> int:
    """Delete the ``.part`` files an interrupted run left in ``directory``; how many there were."""
    removed = 0
    for part in Path(directory).glob(f".*{PART_SUFFIX}"):
        with contextlib.suppress(OSError):
            part.unlink()
            removed += 1
    return removed


def verified_bytes(output: Output, data: bytes) -> bytes:
    """``data`` if it hashes to the output's sha256; ChecksumMismatch otherwise."""
    expected = output.get("sha256")
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise ChecksumMismatch(f"{output.get('key', 'an output')}: the bytes do not match their sha256")
    return data
